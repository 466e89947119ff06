"""SIGHUP, key by key: which config keys apply live and which need a restart.

The policy is data (:data:`RELOAD_POLICY`): each section, and the keys that differ from their
section, say ``live`` or ``restart``; the longest matching prefix wins. :func:`plan` diffs the
running and the new :class:`~agent.runtime.config.Settings`: restart-only keys keep their running
values (and are named), the sections whose live keys changed are handed to their appliers
(:meth:`agent.runtime.daemon.Daemon.on_reload`). ``heald check`` and the generated configuration
reference list the restart-only keys from the same table.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, Final, Literal

import msgspec

from agent.runtime.config import Settings

Policy = Literal["live", "restart"]

RELOAD_POLICY: Final[Mapping[str, Policy]] = MappingProxyType({
    # MQTT topics, the spool, the journal and the audit log are keyed by the node's identity.
    "node": "restart",
    # Open files (spool, journal, counters, sockets) live there.
    "paths": "restart",
    # structlog is set up once per process, and bound loggers keep the level they were made with.
    "log": "restart",
    "sample": "live",
    "collect": "live",  # the collectors are rebuilt; sample numbers go on
    # The reporter reconnects with the new settings; the spool (and what waits in it) is kept.
    "mqtt": "live",
    "mqtt.enabled": "restart",  # a stage is added or removed only at start
    "mqtt.spool.quota_bytes": "restart",  # the open spool's layout
    "mqtt.spool.segment_bytes": "restart",
    "model": "live",  # from the next fit; a new classifier_path is loaded at once
    "model.enabled": "restart",
    "playbooks": "live",  # an invalid set is refused, the running one kept
    "prometheus": "live",  # bound on the new address first, then the old port closed
    "prometheus.enabled": "restart",
    "coordinator": "live",  # a key rotation: the new keys verify the next command
    "cost": "restart",  # the meter's periods and prices are fixed at start
    "demand": "restart",  # the history's step and the model are fixed at start
    "security": "live",  # the next block_address reads the new allow list and timeout
})


def policy(key: str) -> Policy:
    """The policy of a dotted key (``mqtt.port``): its own entry, else its nearest section's."""
    probe = key
    while probe not in RELOAD_POLICY:
        if "." not in probe:
            raise KeyError(f"no reload policy for {key!r}")
        probe = probe.rsplit(".", 1)[0]
    return RELOAD_POLICY[probe]


def restart_keys() -> list[str]:
    """The keys (or whole sections) that a SIGHUP cannot change."""
    return [k for k, p in RELOAD_POLICY.items() if p == "restart"]


def _get(doc: Mapping[str, Any], dotted: str) -> Any:
    value: Any = doc
    for part in dotted.split("."):
        value = value[part]
    return value


def _set(doc: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    for part in parents:
        doc = doc[part]
    doc[last] = value


def plan(old: Settings, new: Settings) -> tuple[Settings, list[str], list[str]]:
    """``(effective settings, sections to apply, restart-only keys refused)``.

    The effective settings are ``new`` with every changed restart-only key set back to its
    running value, so what runs and what ``self.settings`` says never disagree.
    """
    before = msgspec.to_builtins(old)
    after = msgspec.to_builtins(new)
    refused = [k for k in restart_keys() if _get(before, k) != _get(after, k)]
    for key in refused:
        _set(after, key, _get(before, key))
    effective = msgspec.convert(after, Settings) if refused else new
    sections = [f.name for f in msgspec.structs.fields(Settings)
                if getattr(effective, f.name) != getattr(old, f.name)]
    return effective, sections, refused


def keep_sections(effective: Settings, old: Settings, sections: list[str]) -> Settings:
    """``effective`` with ``sections`` back to their running values (those that failed to apply)."""
    return msgspec.structs.replace(effective, **{s: getattr(old, s) for s in sections})
