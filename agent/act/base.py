"""The action contract: name -> async implementation with a structured result and a dry-run form.

An action is ``async def action(params, ctx) -> ActionResult``. ``params`` are the step's
params after placeholder substitution; ``ctx.dry_run`` asks the action to resolve everything
it would touch (the pid it would signal, the files it would delete) and to return what it
WOULD do, changing nothing. The engine wraps every call in the step's timeout (cancelling
the action, whose subprocesses are then killed and reaped) and fills in ``duration_s``.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec
import structlog
from structlog.typing import FilteringBoundLogger

from agent.decide.settings import PlaybookSettings, SecuritySettings

if TYPE_CHECKING:
    from agent.act.supervisor import Supervisor


class ActionResult(msgspec.Struct, kw_only=True):
    ok: bool
    changed: bool = False
    detail: str = ""
    duration_s: float = 0.0
    data: dict[str, Any] = msgspec.field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return msgspec.to_builtins(self)  # type: ignore[no-any-return]


@dataclass
class ActionContext:
    settings: PlaybookSettings
    node: str
    playbook: str
    run_id: str
    dry_run: bool
    supervisor: Supervisor
    emit: Callable[[dict[str, Any]], None]
    bindings: Mapping[str, str] = field(default_factory=dict)
    # the latest sample's detail (per collector), e.g. detail["gpu"]["devices"]["0"]["pci"]
    detail: Mapping[str, Any] = field(default_factory=dict)
    # what made the trigger fire (metric values, forecasts), as in the audit log
    inputs: Mapping[str, Any] = field(default_factory=dict)
    log: FilteringBoundLogger = field(default_factory=lambda: structlog.get_logger("heald.act"))
    # the engine's state directory (forensics of freeze_process go below it); None in bare tests
    state_dir: Path | None = None
    # [security] (block_address's allow list, timeout, nft) and the addresses never blocked
    # besides it: the MQTT broker's host, as configured
    security: SecuritySettings = field(default_factory=SecuritySettings)
    protected_hosts: tuple[str, ...] = ()
    # Called by an action right before its first change to the host (the signal, the restart):
    # the runner writes the step's ``commit`` to the journal (fsync'd). A step of
    # ``agent.act.actions.UNTIL_COMMIT`` that a crash cut off before its commit is run again on
    # resume: it had only looked (a leak scan, a pick), and not running it would lose its effect.
    commit: Callable[[], None] = field(default=lambda: None)

    def env(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        """The environment for a child: the allowlisted variables of ours plus explicit ones."""
        env = {k: os.environ[k] for k in self.settings.command_env_allowlist if k in os.environ}
        env.update(extra or {})
        return env


# The implementations, by name, are listed in agent.act.actions.REGISTRY.
ActionFn = Callable[[Mapping[str, Any], ActionContext], Awaitable[ActionResult]]
