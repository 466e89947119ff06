"""Per-GPU failure risk: a cheap, explainable score per GPU from its health counters.

:class:`GpuRiskScorer` is fed every sample by the score stage (:mod:`agent.score.stage`) and
keeps, per GPU (metric label ``I``, reported by PCI bus id where the sample's GPU table knows it),
a short window of its counters and the XIDs of the last ``xid_window_s``. The score is a logistic
of a weighted sum of bounded signals (the weights are :data:`WEIGHTS`; docs/risk.md, "GPUs"):

==================== =====================================================================
signal               value (0 .. its cap)
==================== =====================================================================
``lost``             1 when NVML says the GPU has fallen off the bus
``reset_required``   1 when NVML answers "GPU reset required"
``remap_failure``    1 when a row remap failed (the GPU needs service)
``remap_pending``    1 when a row remap waits for a GPU reset
``retired_pending``  1 when a page retirement waits for a reboot
``ecc_dbe``          uncorrected (double-bit) ECC errors added in the window, capped at 3
``xid_service``      1 when an XID of bucket ``service`` was seen in ``xid_window_s``
``xid_reboot_node``  likewise for ``reboot_node``
``xid_reset_gpu``    likewise for ``reset_gpu``
``xid_restart_app``  likewise for ``restart_app``
``pcie_replays``     PCIe replays per minute over the window / 10, capped at 1
``nvlink_errors``    NVLink CRC + replay + recovery errors per minute / 10, capped at 1
``thermal``          1 while a thermal slowdown (SW or HW thermal, HW slowdown) is active
==================== =====================================================================

``score = 1 / (1 + exp(-(BIAS + sum(weight * signal))))``: a healthy GPU scores 0.0025, a GPU
that only runs hot 0.018, one remap pending 0.27; double-bit errors with a remap pending 0.99.
The reasons are the signals that add to the sum, largest first (``ecc_dbe=2``,
``remap_pending``). A host without GPUs has no GPU metrics, so no score: nothing is reported.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from agent.collect.sample import KeyDelta, Sample, split_key
from agent.score.types import GpuRisk

#: Logit of a GPU with no signal: 1 / (1 + e^6) = 0.0025.
BIAS: Final = -6.0
#: Signal -> weight (logit units). One of the first five alone is above 0.5 (remap pending:
#: 0.27; with any other sign, above 0.5); thermal throttling alone stays under 0.02.
WEIGHTS: Final[Mapping[str, float]] = {
    "lost": 10.0,
    "reset_required": 8.0,
    "remap_failure": 9.0,
    "xid_service": 7.0,
    "xid_reboot_node": 7.0,
    "remap_pending": 5.0,
    "xid_reset_gpu": 5.0,
    "retired_pending": 4.0,
    "ecc_dbe": 3.0,  # per error, up to 3
    "pcie_replays": 3.0,
    "nvlink_errors": 3.0,
    "xid_restart_app": 1.5,
    "thermal": 2.0,
}
_CAPS: Final[Mapping[str, float]] = {"ecc_dbe": 3.0}
_FLAGS: Final = (("lost", "gpu.lost"), ("reset_required", "gpu.reset_required"),
                 ("remap_failure", "gpu.remap_failure"), ("remap_pending", "gpu.remap_pending"),
                 ("retired_pending", "gpu.retired_pages_pending"))
_THERMAL: Final = ("gpu.throttle_sw_thermal", "gpu.throttle_hw_thermal", "gpu.throttle_hw_slowdown")
_NVLINK: Final = ("gpu.nvlink_crc_errors", "gpu.nvlink_replay_errors", "gpu.nvlink_recovery_errors")
_COUNTERS: Final = ("gpu.ecc_dbe_volatile", "gpu.pcie_replays", *_NVLINK)
# The families read per GPU, in this order: flags, thermal, counters.
_FAMS: Final = (*(f for _, f in _FLAGS), *_THERMAL, *_COUNTERS)
_N_FLAGS, _N_THERMAL = len(_FLAGS), len(_THERMAL)
_XID_BUCKETS: Final = ("service", "reboot_node", "reset_gpu", "restart_app")
_REPLAN: Final = 60  # samples between two plans of which keys are GPU metrics
_REEVAL_S: Final = 10.0  # unchanged inputs: re-scored this often (a burst leaving the window)
FAILURE_FAMILY: Final = "gpu.failure"  # the failure-map key: gpu.failure[<pci bus id>]


@dataclass(slots=True)
class _Gpu:
    first_mono: float
    # counter family -> change points (mono, value): the latest at or before the window's start,
    # then every change since
    counters: dict[str, deque[tuple[float, float]]] = field(default_factory=dict)
    xids: dict[str, float] = field(default_factory=dict)  # bucket -> wall of the last one


class GpuRiskScorer:
    """Per-GPU failure risk from each sample's ``gpu.*`` metrics and ``gpu.xid`` events.

    Per sample: one gather of the planned GPU keys; when nothing changed (no value, no XID) and
    the last scoring is under ``_REEVAL_S`` old, the previous risks are returned as they are."""

    def __init__(self, *, window_s: float = 600.0, xid_window_s: float = 3600.0) -> None:
        self.window_s = window_s
        self.xid_window_s = xid_window_s
        self._gpus: dict[str, _Gpu] = {}
        self._labels: list[str] = []  # GPUs planned, in index order
        self._keys: list[str] = []  # len(_FAMS) keys per planned GPU
        self._delta = KeyDelta()  # the keys that came and went since the last look
        self._since_plan = 0
        self._last_vals: tuple[float | None, ...] | None = None
        self._last_eval = -math.inf
        self._last: tuple[GpuRisk, ...] = ()

    def _replan(self, metrics: Mapping[str, float | None]) -> None:
        fams = frozenset(_FAMS)
        labels = set()
        for k in metrics:
            if k.startswith("gpu."):
                fam, label = split_key(k)
                if label is not None and fam in fams and "/" not in label:
                    labels.add(label)
        self._labels = sorted(labels, key=lambda s: (len(s), s))
        self._keys = [f"{fam}[{label}]" for label in self._labels for fam in _FAMS]
        self._since_plan = 0
        self._last_vals = None
        for gone in set(self._gpus) - labels:
            del self._gpus[gone]

    def push(self, sample: Sample) -> tuple[GpuRisk, ...]:
        """This sample's per-GPU risks (empty on a host without GPU metrics), by GPU index."""
        metrics = sample.metrics
        self._since_plan += 1
        if self._delta.changed(metrics) or self._since_plan >= _REPLAN:
            added, removed = self._delta.delta(metrics)  # re-planned only when a GPU key came or went
            if self._since_plan >= _REPLAN or any(k.startswith("gpu.") for k in added | removed):
                self._replan(metrics)
        xid = False
        for ev in sample.events:
            if ev.kind == "gpu.xid":
                gi = ev.labels.get("gpu", "").split("/", 1)[0]
                bucket = ev.labels.get("resolution", "")
                if gi and bucket in _XID_BUCKETS:
                    self._gpus.setdefault(gi, _Gpu(sample.mono)).xids[bucket] = ev.wall
                    xid = True
        if not self._labels:
            return ()
        vals = tuple(map(metrics.get, self._keys))
        if not xid and vals == self._last_vals and sample.mono - self._last_eval < _REEVAL_S:
            return self._last
        self._last_vals, self._last_eval = vals, sample.mono
        pci = _bus_ids(sample.detail.get("gpu", {}))
        n = len(_FAMS)
        out = []
        for j, label in enumerate(self._labels):
            g = self._gpus.get(label)
            if g is None:
                g = self._gpus[label] = _Gpu(sample.mono)
            score, reasons = self._score(g, vals[j * n:(j + 1) * n], sample)
            out.append(GpuRisk(gpu=label, pci=pci.get(label, ""), score=score, reasons=reasons))
        self._last = tuple(out)
        return self._last

    def _score(self, g: _Gpu, v: tuple[float | None, ...], sample: Sample) -> tuple[float, tuple[str, ...]]:
        sig: dict[str, float] = {}
        for i, (name, _) in enumerate(_FLAGS):
            if (v[i] or 0.0) >= 1.0:
                sig[name] = 1.0
        if any((x or 0.0) >= 1.0 for x in v[_N_FLAGS:_N_FLAGS + _N_THERMAL]):
            sig["thermal"] = 1.0
        base = _N_FLAGS + _N_THERMAL
        inc = {fam: self._increase(g, fam, v[base + i], sample.mono) for i, fam in enumerate(_COUNTERS)}
        span = min(self.window_s, sample.mono - g.first_mono)
        dbe = inc["gpu.ecc_dbe_volatile"]
        if dbe > 0:
            sig["ecc_dbe"] = dbe
        per_min = 60.0 / span if span > 0 else 0.0
        replays = inc["gpu.pcie_replays"] * per_min / 10.0
        if replays > 0:
            sig["pcie_replays"] = replays
        nvl = sum(inc[f] for f in _NVLINK) * per_min / 10.0
        if nvl > 0:
            sig["nvlink_errors"] = nvl
        for bucket, wall in list(g.xids.items()):
            if sample.wall - wall <= self.xid_window_s:
                sig[f"xid_{bucket}"] = 1.0
            else:
                del g.xids[bucket]
        parts = {n: WEIGHTS[n] * min(x, _CAPS.get(n, 1.0)) for n, x in sig.items()}
        z = BIAS + sum(parts.values())
        score = 1.0 / (1.0 + math.exp(-z))
        reasons = tuple(n if n != "ecc_dbe" else f"{n}={sig[n]:g}"
                        for n, _ in sorted(parts.items(), key=lambda kv: (-kv[1], kv[0])))
        return score, reasons[:4]

    def _increase(self, g: _Gpu, fam: str, value: float | None, mono: float) -> float:
        """How much the counter grew over the window (a counter that went down starts over)."""
        q = g.counters.get(fam)
        if q is None:
            q = g.counters[fam] = deque()
        if value is None or not math.isfinite(value):
            return 0.0
        if q and value < q[-1][1]:  # driver reload / GPU reset: volatile counters start at 0
            q.clear()
        if not q or value != q[-1][1]:
            q.append((mono, value))
        cutoff = mono - self.window_s
        while len(q) > 1 and q[1][0] <= cutoff:
            q.popleft()
        return max(0.0, value - q[0][1])


def _bus_ids(detail: Any) -> dict[str, str]:
    devices = detail.get("devices") if isinstance(detail, Mapping) else None
    if not isinstance(devices, Mapping):
        return {}
    return {str(i): str(d.get("pci", "")) for i, d in devices.items() if isinstance(d, Mapping)}


def failure_key(r: GpuRisk) -> str:
    """The risk's key in ``Risk.failure``: ``gpu.failure[<pci bus id>]`` (the index without one)."""
    return f"{FAILURE_FAMILY}[{r.pci or r.gpu}]"
