"""What the score stage hands to decide/report. Extend, do not break: playbooks read these."""

from __future__ import annotations

import msgspec


class Contribution(msgspec.Struct, frozen=True):
    feature: str
    share: float  # fraction of the anomaly score explained by this feature (0..1)


class Forecast(msgspec.Struct, frozen=True, kw_only=True):
    """Time until a monotone resource is exhausted, from a robust trend."""

    resource: str  # metric key, e.g. "disk.used_bytes[/]", "mem.used_pct"
    eta_s: float | None  # None: not trending towards exhaustion
    confidence: float  # 0..1
    rate_per_s: float  # robust slope in the metric's unit per second


class Risk(msgspec.Struct, frozen=True, kw_only=True):
    seq: int  # the sample this risk belongs to
    wall: float
    anomaly: float | None  # anomaly score normalised so that 1.0 is the alert threshold; None while cold
    alert: bool
    cold: bool  # still inside the cold-start window: rules only
    model_version: str
    explanation: tuple[Contribution, ...] = ()
    # failure class -> probability within the horizon
    failure: dict[str, float] = msgspec.field(default_factory=dict)
    forecasts: tuple[Forecast, ...] = ()
    # share of the model's informative features whose live distribution moved from the training
    # data (agent.score.drift), from the last completed block; None: not measured yet
    drift: float | None = None
