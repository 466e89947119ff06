"""Evidence for the failure classifier's ``memory_exhaustion``: more than a fall in available memory.

The shipped classifier argues ``memory_exhaustion`` mostly from the *level* of available memory
(``mem.available_bytes:value``, in GB): it was fitted on one 25 GB host whose memory faults (a
process leaking into a 1.5 GB cgroup) took the host from 24.4 to 23 GB available, and whose
fault-free data never went lower. On that host, and on any other, it says p >= 0.5 whenever
less than ~20 GB is available: a benign job holding 25 % of the RAM, a page-cache-heavy copy, or
simply a smaller host. A level cannot tell a leak from a workload; the model's probability is
therefore kept only with evidence that memory is really running out, and otherwise capped at
:data:`NO_EVIDENCE_CAP` (below the stage's alert line, 0.5, and every shipped playbook's).

Evidence (any one, from the sample's own metrics; no labels, nothing host-specific):

* **pressure**: host PSI memory ``some`` avg10 >= ``psi_some_pct`` (1 %) or ``full`` >= half of
  it, or a cgroup's own memory PSI ``some`` >= ``psi_some_pct``;
* **OOM kills**: ``mem.oom_kills`` rose within the last ``hold_s`` (60 s);
* **swap**: ``mem.swap_used_pct`` rose by >= ``swap_rise_pct`` (0.5 points) over the fall window;
* **thrashing**: ``mem.major_faults_per_s`` >= ``major_per_s`` (100/s), as the median of the last
  ``major_samples`` (5) samples: a program start pages in its binary and libraries in one burst
  (up to 147/s for one sample in the fault-free recordings: a test suite, a burst of process
  starts, stress-ng starting), thrashing goes on;
* **little left**: available memory under ``low_frac`` (10 %) of the total, or a memory-limited
  cgroup's working set at >= 90 % of its limit;
* **a leak past two thirds**: a memory-limited cgroup's working set at >= ``used_frac`` (2/3) of
  its limit and still growing (``cgroup.mem.eta_s`` reported);
* **a sustained fall past two thirds**: more than ``used_frac`` (2/3) of the host's memory in use
  and available memory keeps setting new lows: of the last ``window`` (16) samples, at least
  ``renewals`` (8) were below every earlier one of them (by more than ``eps_frac`` = 0.01 % of
  the total), the last of them within the last ``recent`` (3) samples. A leak keeps falling; a
  job that allocates its working set in a few seconds and then holds it (a step), or a copy
  that fills the page cache and gives it back, does not. Nor can a fall far from the end be
  told from a job that allocates for a while: stress-ng --vm took a quarter of the RAM in 13 s
  (300 MB/s, 8 of 16 samples new lows after 7 s) in the fault-free recordings, and nothing
  there went past 57 % of a cgroup's limit or 34 % of the host's; the same line as the
  forecaster's (:data:`agent.score.forecast.MEM_MIN_USED`).

Cost: :meth:`push` appends one value per sample; :meth:`reasons` runs only when the classifier's
probability would be capped (see :meth:`gate`).
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from collections.abc import Mapping

from agent.score.forecast import MEM_MIN_USED

MEM_CLASS = "memory_exhaustion"
NO_EVIDENCE_CAP = 0.25


class MemoryEvidence:
    __slots__ = ("_avail", "_last", "_major", "_mono", "_oom", "_oom_at", "_swap", "eps_frac", "hold_s",
                 "low_frac", "major_per_s", "psi_some_pct", "recent", "renewals", "swap_rise_pct",
                 "used_frac")

    def __init__(self, *, window: int = 16, renewals: int = 8, recent: int = 3, eps_frac: float = 1e-4,
                 low_frac: float = 0.10, psi_some_pct: float = 1.0, major_per_s: float = 100.0,
                 major_samples: int = 5, swap_rise_pct: float = 0.5, hold_s: float = 60.0,
                 used_frac: float = MEM_MIN_USED) -> None:
        self._avail: deque[float] = deque(maxlen=max(2, window))
        self._swap: deque[float] = deque(maxlen=max(2, window))
        self._major: deque[float] = deque(maxlen=max(1, major_samples))
        self.used_frac = used_frac
        self.renewals, self.recent, self.eps_frac = renewals, recent, eps_frac
        self.low_frac = low_frac
        self.psi_some_pct, self.major_per_s = psi_some_pct, major_per_s
        self.swap_rise_pct, self.hold_s = swap_rise_pct, hold_s
        self._oom: float | None = None
        self._oom_at = -math.inf
        self._mono = 0.0
        self._last: Mapping[str, float | None] = {}

    def push(self, metrics: Mapping[str, float | None], mono: float) -> None:
        a = metrics.get("mem.available_bytes")
        self._avail.append(math.nan if a is None else a)
        s = metrics.get("mem.swap_used_pct")
        self._swap.append(math.nan if s is None else s)
        f = metrics.get("mem.major_faults_per_s")
        self._major.append(0.0 if f is None or f != f else f)  # noqa: PLR0124 - NaN test
        oom = metrics.get("mem.oom_kills")
        if oom is not None:
            if self._oom is not None and oom > self._oom:
                self._oom_at = mono
            self._oom = oom
        self._mono = mono
        self._last = metrics

    def gate(self, failure: dict[str, float]) -> dict[str, float]:
        """``failure`` with ``memory_exhaustion`` capped at :data:`NO_EVIDENCE_CAP` when no
        evidence holds (the same dict when nothing changes)."""
        p = failure.get(MEM_CLASS)
        if p is None or p <= NO_EVIDENCE_CAP or self.reasons():
            return failure
        return {**failure, MEM_CLASS: NO_EVIDENCE_CAP}

    def reasons(self) -> list[str]:
        """Which evidence holds now (empty: none)."""
        m = self._last
        why: list[str] = []
        some = m.get("psi.some_avg10_pct[memory]")
        full = m.get("psi.full_avg10_pct[memory]")
        if (some is not None and some >= self.psi_some_pct) \
                or (full is not None and full >= self.psi_some_pct / 2):
            why.append("psi")
        if self._mono - self._oom_at <= self.hold_s:
            why.append("oom_kills")
        sw = [v for v in self._swap if v == v]  # noqa: PLR0124 - NaN test
        if len(sw) >= 2 and sw[-1] - min(sw) >= self.swap_rise_pct:
            why.append("swap")
        if self._major and self._major[-1] >= self.major_per_s \
                and statistics.median(self._major) >= self.major_per_s:
            why.append("major_faults")
        total = m.get("mem.total_bytes")
        avail = m.get("mem.available_bytes")
        if total and avail is not None and avail < self.low_frac * total:
            why.append("low")
        past = 100.0 * self.used_frac
        for k, v in m.items():
            if v is None or not k.startswith("cgroup."):
                continue
            if (k.startswith("cgroup.mem.used_pct[") and (v >= 90.0 or (
                    v >= past and m.get("cgroup.mem.eta_s" + k[len("cgroup.mem.used_pct"):]) is not None))) \
                    or (k.startswith("cgroup.psi.mem_some_avg10_pct[") and v >= self.psi_some_pct):
                why.append("cgroup")
                break
        if total and avail is not None and avail <= (1.0 - self.used_frac) * total \
                and self._falling(self.eps_frac * total):
            why.append("falling")
        return why

    def _falling(self, eps: float) -> bool:
        """New lows, again and again: of the last ``window`` samples at least ``renewals`` set a new
        low (by more than ``eps``) against every earlier one of them, the last of them within the
        last ``recent`` samples."""
        low = math.inf
        count, last = 0, -1
        for i, v in enumerate(self._avail):
            if v < low - eps:
                if low < math.inf:
                    count += 1
                    last = i
                low = v
            elif v < low:
                low = v
        return count >= self.renewals and last >= len(self._avail) - self.recent
