"""The ``bundle_chunk`` and ``bundle_activate`` commands: take a bundle, switch a role to it.

The live role swaps the engine's playbook set the way SIGHUP does (:meth:`Engine.reload`: guard
state kept by target, running runs finish with their definition); version ``""`` goes back to the
configured playbook directories. The shadow role hands the set to :class:`Shadowed`. Every switch
is written to ``active.json`` first-verified (the kept files are hashed and their signature checked
again), reported as a ``bundle.active`` event and answered with the active versions.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

import msgspec
import structlog

from agent import wire
from agent.act.engine import Engine
from agent.bundle.shadow import Shadowed
from agent.bundle.store import BundleStore
from agent.decide.loader import load_playbooks
from agent.decide.model import Playbook
from agent.decide.settings import PlaybookSettings
from agent.wire.bundles import BundleError

log = structlog.get_logger("heald.bundle")

Result = tuple[wire.AckStatus, str, dict[str, Any]]
ROLES = ("live", "shadow")


class BundleControl:
    def __init__(self, store: BundleStore, engine: Engine, shadow: Shadowed, base: PlaybookSettings,
                 report: Callable[[dict[str, Any]], None]) -> None:
        self.store = store
        self.engine = engine
        self.shadow = shadow
        self.base = base
        self.report = report

    def playbooks(self, version: str) -> list[Playbook]:
        """The playbook set of a kept bundle (the configured set for ``""``), verified again."""
        if not version:
            return load_playbooks(self.base)
        directory = self.store.checked_dir(version)
        return load_playbooks(msgspec.structs.replace(self.base, dirs=(str(directory),)))

    def state(self) -> dict[str, Any]:
        active = self.store.active()
        return {"live": active["live"], "shadow": active["shadow"],
                "kept": [str(m["version"]) for m in self.store.versions()],
                "shadow_decisions": self.shadow.decisions}

    def restore(self) -> None:
        """At start: the roles ``active.json`` names (a version that no longer verifies is dropped)."""
        for role, version in self.store.active().items():
            if version:
                try:
                    self._switch(role, version, "restart")
                except (BundleError, wire.WireError, ValueError) as exc:
                    log.error("bundle not restored", role=role, bundle=version, error=str(exc))
                    self.store.set_active(role, "")

    async def handle(self, name: str, args: Mapping[str, Any], by: str) -> Result:
        if name == wire.CommandName.BUNDLE_CHUNK:
            info = self.store.add_chunk(args)
            message = (f"bundle {info['bundle']} complete and verified" if info["complete"]
                       else f"bundle {info['bundle']}: {info['missing']} chunk(s) to go")
            return "done", message, info | self.state()
        role = str(args.get("role") or "live")
        if role not in ROLES:
            raise BundleError(f"bundle_activate: role must be one of {', '.join(ROLES)}")
        version = str(args.get("bundle") or "")
        self._switch(role, version, by)
        return "done", f"{role} playbook set is now {version or 'the configured one'}", self.state()

    def _switch(self, role: str, version: str, by: str) -> None:
        if role == "live":
            self.engine.reload(self.playbooks(version))
        else:
            self.shadow.set_shadow(version, self.playbooks(version) if version else None)
        self.store.set_active(role, version)
        log.warning("bundle switched", role=role, bundle=version or "(configured)", by=by)
        self.report({"kind": "bundle.active", "wall": time.time(),
                     "labels": {"role": role, "bundle": version, "by": by},
                     "message": f"{role} playbook set: {version or 'the configured one'}"})


def attach(state_dir: Any, node: str, base: PlaybookSettings, engine: Engine, *, dispatcher: Any,
           reporter: Any, keep: int = 3) -> Shadowed:
    """Give the dispatcher the bundle commands (keys: the dispatcher's verifier's, rekeys included),
    restore the active versions and return the decider the pipeline should call (the engine, with
    the shadow beside it)."""
    from agent.report import build  # noqa: PLC0415

    def report(event: dict[str, Any]) -> None:
        reporter.submit(build.playbook_event(event))

    def keys() -> list[Any]:
        verifier = dispatcher.verifier
        return list(verifier.keys.values()) if verifier is not None else []

    from pathlib import Path  # noqa: PLC0415

    root = Path(state_dir) / "bundles"
    shadow = Shadowed(engine, root / "shadow-state", node, report)
    control = BundleControl(BundleStore(root, keys, keep=keep), engine, shadow, base, report)
    control.restore()
    dispatcher.bundles = control
    return shadow
