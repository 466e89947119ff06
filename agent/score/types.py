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


class GpuRisk(msgspec.Struct, frozen=True, kw_only=True):
    """One GPU's failure risk from its health counters (:mod:`agent.score.gpu_risk`)."""

    gpu: str  # the metric label (NVML index)
    pci: str  # PCI bus id ("" when NVML gave none)
    score: float  # 0..1
    reasons: tuple[str, ...] = ()  # the signals behind it, largest first


class DemandForecast(msgspec.Struct, frozen=True, kw_only=True):
    """A resource's demand over the next hours (agent.score.demand): ``point[i]`` with the
    interval ``lo[i]``..``hi[i]``, ``step_s * (i + 1)`` seconds ahead."""

    resource: str  # metric key, e.g. "cpu.util_pct", "gpu.util_pct[0]"
    step_s: float
    point: tuple[float, ...]
    lo: tuple[float, ...]
    hi: tuple[float, ...]

    def peak(self, within_s: float, bound: str = "point") -> tuple[float, float] | None:
        """The highest value of ``bound`` (point, lo or hi) within ``within_s``, and how far ahead."""
        n = min(len(self.point), int(within_s // self.step_s))
        if n <= 0:
            return None
        values = {"point": self.point, "lo": self.lo, "hi": self.hi}[bound][:n]
        i = max(range(n), key=values.__getitem__)
        return values[i], self.step_s * (i + 1)


class Risk(msgspec.Struct, frozen=True, kw_only=True):
    seq: int  # the sample this risk belongs to
    wall: float
    anomaly: float | None  # anomaly score normalised so that 1.0 is the alert threshold; None while cold
    alert: bool
    cold: bool  # still inside the cold-start window: rules only
    model_version: str
    explanation: tuple[Contribution, ...] = ()
    # which of the detector's channels made the anomaly alert: "slow", "fast", "both"; "" when none
    # (agent.score.detector.StreamingDetector.channel)
    anomaly_channel: str = ""
    # failure class -> probability within the horizon
    failure: dict[str, float] = msgspec.field(default_factory=dict)
    forecasts: tuple[Forecast, ...] = ()
    # per-GPU failure risk (also in ``failure`` as gpu.failure[<pci>]); empty without GPUs
    gpu: tuple[GpuRisk, ...] = ()
    # share of the model's informative features whose live distribution moved from the training
    # data (agent.score.drift), from the last completed block; None: not measured yet
    drift: float | None = None
    # demand forecasts (agent.score.demand), when a demand model is loaded
    demand: tuple[DemandForecast, ...] = ()
