"""The fleet blast-radius budget as the engine sees it: which actions need a lease, and the gate.

In enforce mode a connected agent asks the coordinator for a lease before each disruptive
step, so that a fleet-wide problem does not restart every node's workloads at once. The
daemon plugs the coordinator's side in as ``engine.lease_gate``
(:class:`agent.control.leases.CoordinatorLeases`); without one, steps run without asking.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from agent.decide.model import Playbook
from agent.errors import HealdError

# Actions that disrupt workloads: in enforce mode, a connected agent asks the coordinator for a
# fleet lease before each (the blast-radius budget); see LeaseGate.
DISRUPTIVE_ACTIONS = frozenset({
    "restart_unit", "signal_process", "stop_process", "drop_caches", "cgroup_limit", "gpu_reset",
    "gpu_drain", "cordon", "run_command",
})


class LeaseHeld(HealdError):
    """The fleet budget (or the local policy without one) holds this run; not a failure."""


class LeaseGate(Protocol):
    async def acquire(self, pb: Playbook, run_id: str, action: str) -> Callable[[], None]:
        """Wait for a lease; return its release callback, or raise LeaseHeld."""
        ...
