"""Validated, typed playbooks (what the loader builds from YAML and the engine runs)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Literal

Mode = Literal["enforce", "dry-run", "off", "approval"]
PLACEHOLDER = re.compile(r"\{([a-z_][a-z0-9_]*)\}")
# Variables every step may use without a trigger binding them.
BUILTIN_VARS = frozenset({"node", "playbook", "run_id"})
#: The per-GPU failure risk's family in ``Risk.failure`` (agent.score.gpu_risk.FAILURE_FAMILY).
GPU_FAILURE = "gpu.failure"


@dataclass(frozen=True, slots=True)
class LabelPattern:
    """The ``[label]`` part of a metric key: a literal, or a variable that binds any label."""

    literal: str | None = None  # exact label; None with var None: key has no label
    var: str | None = None  # name bound to the matched label ('*' binds 'label')

    @property
    def wildcard(self) -> bool:
        return self.var is not None


@dataclass(frozen=True, slots=True)
class KeyPattern:
    family: str
    label: LabelPattern

    @property
    def text(self) -> str:
        if self.label.var is not None:
            return f"{self.family}[{{{self.label.var}}}]"
        if self.label.literal is not None:
            return f"{self.family}[{self.label.literal}]"
        return self.family


@dataclass(frozen=True, slots=True)
class MetricCond:
    cid: int
    key: KeyPattern
    op: str
    value: float
    for_s: float = 0.0
    clear_below: float | None = None
    clear_above: float | None = None
    # disk.* with a variable label: only mounts that hold a clean root, or only the others
    mounts: Literal["cleanable", "uncleanable"] | None = None


@dataclass(frozen=True, slots=True)
class ForecastCond:
    cid: int
    key: KeyPattern
    eta_below_s: float
    min_confidence: float = 0.5
    mounts: Literal["cleanable", "uncleanable"] | None = None  # as for MetricCond


@dataclass(frozen=True, slots=True)
class DemandCond:
    """The demand forecast (agent.score.demand) of ``key`` reaches ``above`` within ``within_s``."""

    cid: int
    key: KeyPattern
    above: float
    within_s: float
    bound: Literal["point", "lo", "hi"] = "point"  # the forecast's point or an interval edge


@dataclass(frozen=True, slots=True)
class RiskCond:
    cid: int
    risk: Literal["anomaly", "alert"]
    above: float = 1.0
    for_s: float = 0.0


@dataclass(frozen=True, slots=True)
class FailureCond:
    cid: int
    failure: str
    above: float
    # "family[{var}]" (gpu.failure[{pci}]): one match per label of that family, bound to var
    # (gpu.failure also binds the GPU's index as {gpu})
    key: KeyPattern | None = None


@dataclass(frozen=True, slots=True)
class EventCond:
    cid: int
    kind: str
    values: frozenset[str] | None  # None: any value; compared as normalised strings ("79")
    ignore_values: frozenset[str] = frozenset()
    count: int = 1
    within_s: float = 600.0
    labels: tuple[tuple[str, LabelPattern], ...] = ()


@dataclass(frozen=True, slots=True)
class AllCond:
    cid: int
    items: tuple[Condition, ...]


@dataclass(frozen=True, slots=True)
class AnyCond:
    cid: int
    items: tuple[Condition, ...]


Condition = MetricCond | ForecastCond | DemandCond | RiskCond | FailureCond | EventCond | AllCond | AnyCond


def walk(cond: Condition) -> list[Condition]:
    """The condition and all its descendants, depth first."""
    out: list[Condition] = [cond]
    if isinstance(cond, AllCond | AnyCond):
        for item in cond.items:
            out.extend(walk(item))
    return out


def model_driven(cond: Condition) -> bool:
    """Whether any part of the condition reads the model (held while the model is cold).

    ``demand`` is not: it reads the demand model (its own fit or ``[demand] model_path``), which has
    nothing to do with the anomaly detector's cold start, and matches nothing until one is loaded."""
    return any(isinstance(c, ForecastCond | RiskCond | FailureCond) for c in walk(cond))


def bound_vars(cond: Condition) -> frozenset[str]:
    """Variables a match of ``cond`` always binds (``any`` binds only what every branch binds)."""
    if isinstance(cond, MetricCond | ForecastCond | DemandCond):
        return frozenset({cond.key.label.var} if cond.key.label.var else ())
    if isinstance(cond, FailureCond):
        if cond.key is None or not cond.key.label.var:
            return frozenset()
        gpu = {"gpu"} if cond.key.family == GPU_FAILURE else set()
        return frozenset({cond.key.label.var, *gpu})
    if isinstance(cond, EventCond):
        return frozenset(p.var for _, p in cond.labels if p.var)
    if isinstance(cond, AllCond):
        out: frozenset[str] = frozenset()
        for item in cond.items:
            out |= bound_vars(item)
        return out
    if isinstance(cond, AnyCond):
        sets = [bound_vars(i) for i in cond.items]
        return frozenset.intersection(*sets) if sets else frozenset()
    return frozenset()


@dataclass(frozen=True, slots=True)
class Step:
    index: int
    name: str
    action: str
    params: dict[str, Any]
    timeout_s: float = 60.0
    verify: bool = True


#: The longest ``verify.within``: a run watching longer holds its target (no other run of the
#: playbook for it) and delays its next step and its escalation.
MAX_VERIFY_WITHIN_S = 3600.0


@dataclass(frozen=True, slots=True)
class Verify:
    settle_s: float = 10.0
    expect: Condition | None = None
    # check again on each new sample until it passes or this long after the first check
    within_s: float = 0.0


@dataclass(frozen=True, slots=True)
class Guards:
    cooldown_s: float = 300.0
    backoff: float = 2.0
    max_cooldown_s: float = 3600.0
    max_runs: int = 6
    window_s: float = 3600.0
    breaker_failures: int = 3
    breaker_reset_s: float | None = None
    max_parallel: int | None = None  # runs of the playbook at once over all its targets
    cold_start: Literal["hold", "act"] = "hold"
    disconnected: Literal["act", "hold"] = "act"


@dataclass(frozen=True, slots=True)
class Escalate:
    event: str = "playbook.escalated"
    severity: str = "critical"
    message: str = ""


@dataclass(frozen=True, slots=True)
class Playbook:
    name: str
    description: str
    mode: Mode
    trigger: Condition
    steps: tuple[Step, ...]
    verify: Verify = Verify()
    guards: Guards = Guards()
    escalate: Escalate = Escalate()
    source: str = ""  # file it came from
    source_line: int | None = None
    shipped: bool = False
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def model_driven(self) -> bool:
        return model_driven(self.trigger)
