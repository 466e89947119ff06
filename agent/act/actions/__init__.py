"""The action implementations, one module per family, and the table naming each of them.

:data:`REGISTRY` is written out rather than filled by decorators at import time, so every
action a playbook can name is listed here, in one place. It must equal the schema's action
vocabulary (:func:`agent.decide.schema.action_names`): :func:`check_registry` runs at import,
so a missing or an extra implementation stops heald at start rather than at the first run.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from agent.act.actions import (
    cgroups,
    commands,
    files,
    freeze,
    gpu,
    leaks,
    nftables,
    notify,
    processes,
    sysctl,
    systemd,
    webhook,
)
from agent.act.base import ActionFn
from agent.decide.schema import action_names

REGISTRY: Mapping[str, ActionFn] = MappingProxyType({
    # systemd
    "restart_unit": systemd.restart_unit,
    # processes
    "stop_process": processes.stop_process,
    "signal_process": processes.signal_process,
    "renice": processes.renice,
    "restart_process": processes.restart_process,
    "freeze_process": freeze.freeze_process,
    "unfreeze_process": freeze.unfreeze_process,
    # cgroups
    "cgroup_limit": cgroups.cgroup_limit,
    # files, journal, caches
    "clean_paths": files.clean_paths,
    "vacuum_journal": files.vacuum_journal,
    "rotate_logs": files.rotate_logs,
    "drop_caches": files.drop_caches,
    # kernel tables
    "raise_limit": sysctl.raise_limit,
    "stop_leaker": leaks.stop_leaker,
    # GPUs
    "gpu_reset": gpu.gpu_reset,
    "gpu_drain": gpu.gpu_drain,
    # network
    "block_address": nftables.block_address,
    # commands and messages
    "run_command": commands.run_command,
    "cordon": commands.cordon,
    "notify": notify.notify,
    "webhook": webhook.webhook,
})


#: Actions that may run again when a crash or ``kill -9`` cut them off (their intent is in the
#: journal, their result is not): doing them twice leaves the host as doing them once, and not
#: doing them again could lose the step's effect altogether (the kill may have come before the
#: action did anything). Every other action is never started twice: a second restart, signal or
#: reset, a re-picked process, a second page or an arbitrary command may do harm of its own.
REPEATABLE: frozenset[str] = frozenset({
    "clean_paths", "vacuum_journal", "drop_caches", "cgroup_limit", "renice", "gpu_drain", "cordon",
    "freeze_process", "block_address",
})


#: Actions that look before they act (a leak scan of seconds, a pick of the process) and call
#: ``ActionContext.commit`` right before their first change to the host: one that a crash cut
#: off before that commit had changed nothing and is run again on resume (else a ``kill -9``
#: during stop_leaker's scans turned a healable leak into an escalation); after it, as any
#: other action, it is never started twice (a second signal, a re-picked process).
UNTIL_COMMIT: frozenset[str] = frozenset({"stop_leaker", "stop_process"})


def check_registry() -> None:
    """The implementations match the schema's action vocabulary exactly."""
    if set(REGISTRY) != set(action_names()):
        missing = set(action_names()) - set(REGISTRY)
        extra = set(REGISTRY) - set(action_names())
        raise RuntimeError(f"action registry mismatch: missing {sorted(missing)}, extra {sorted(extra)}")
    if not set(REGISTRY) >= REPEATABLE:
        raise RuntimeError(f"REPEATABLE names unknown actions: {sorted(REPEATABLE - set(REGISTRY))}")
    if not set(REGISTRY) >= UNTIL_COMMIT or UNTIL_COMMIT & REPEATABLE:
        raise RuntimeError(f"UNTIL_COMMIT: unknown or also REPEATABLE: {sorted(UNTIL_COMMIT)}")


check_registry()
