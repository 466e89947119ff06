"""The score stage: Sample -> Risk, once per sample, numpy only.

:class:`RiskStage` chains, per sample:

1. :class:`~agent.features.window.FeatureWindow` (declared schema) -> feature vector, also
   appended to the on-disk history (:mod:`agent.features.history`);
2. :class:`~agent.score.forecast.Forecaster` -> exhaustion forecasts (refreshed every 10 samples);
3. the failure classifier (compiled, :mod:`agent.score.classifier`) -> class probabilities;
   ``memory_exhaustion`` is capped below the alert line without evidence that memory is really
   running out (:mod:`agent.score.mem_evidence`), ``disk_full`` without evidence that a file
   system is really filling (:mod:`agent.score.disk_evidence`);
4. the node's anomaly detector (:class:`~agent.score.detector.StreamingDetector`) -> normalised
   score, alert and, when the score is at or above ``explain_above``, the top features.
5. :class:`~agent.score.gpu_risk.GpuRiskScorer` -> per-GPU failure risk (``Risk.gpu``, and
   ``failure["gpu.failure[<pci>]"]``).

Cold start: until ``cold_start_s`` of history exists and a detector is fitted, ``anomaly`` is
None and ``cold`` is True (forecasts and the shipped classifier still run: they need no
node-specific fit). :meth:`RiskStage.refit_loop` (an asyncio task of the daemon) fits the detector
in child processes — the history export (``python -m agent model export-history``) and the fit
(``python -m agent model train`` via :func:`agent.score.fit.fit_in_child`, in a worker thread) —
with timeouts, on the last ``window_s`` of history, first once the cold-start history exists,
then every ``refit_interval_s``. The artifact lives in ``<state_dir>/models/detector.npz`` and is
reloaded at start. A model that cannot be loaded or does not match the feature schema is refused
with one clear log line; the stage then runs rules-only. Nothing here raises on bad models, and
nothing imports scikit-learn.

A full or read-only state dir (issue 17) only costs refits: a refit that fails (the export or the
fit cannot write under ``<state_dir>/models/work``, the artifact cannot be installed) keeps the
previous model, is logged once per streak of failed refits, and leaves no training file behind
to take space; the history keeps its rows queued (:mod:`agent.features.history`); scoring goes on.

``Risk.alert`` is the anomaly alert (score >= 1). The other two alert sources are in
``Risk.failure`` and ``Risk.forecasts``; :meth:`RiskStage.risk_alert` combines all three with the
stage's thresholds (used by ``bench/faults/evaluate.py`` and documented in ``docs/risk.md``).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt
import structlog

from agent.collect.sample import Sample
from agent.errors import ModelError, Problem
from agent.features.history import HistoryWriter
from agent.features.schema import GPU_COUNTER_LEVELS, FeatureSchema
from agent.features.window import FeatureWindow
from agent.fsutil import FailureStreak
from agent.score import classifier as clf
from agent.score import compiled as art
from agent.score.detector import StreamingDetector
from agent.score.disk_evidence import DiskEvidence
from agent.score.drift import DRIFT_EVERY, DRIFT_LINE, DriftMonitor
from agent.score.forecast import Forecaster
from agent.score.gpu_risk import GpuRiskScorer, failure_key
from agent.score.mem_evidence import MemoryEvidence
from agent.score.settings import ModelSettings
from agent.score.types import Contribution, Forecast, Risk

if TYPE_CHECKING:
    from agent.score.demand_stage import DemandStage

log = structlog.get_logger("heald.score")

DETECTOR_FILE = "detector.npz"
# Fit options for the node's detector: a margin over the training-quantile threshold, because the
# first fit sees only cold_start_s of history (see docs/risk.md for how this was chosen).
# Workload levels are left out of the anomaly detector: a healthy node changes them at will (a
# batch job at 50 % CPU is not a failure risk), and the failure classifier and the forecasts
# cover runaways and exhaustion. Measured on bench/faults/data/faultfree-quiet-71min.npz.
WORKLOAD_LEVELS: tuple[str, ...] = (
    "cpu.util_pct", "cpu.load1", "proc.running", "proc.top_cpu_pct", "max(disk.util_pct[*])",
    "sum(disk.write_bytes_per_s[*])", "mem.page_faults_per_s",
)
# CPU contention follows the CPU demand as closely as the levels do: runnable tasks waiting for a
# core (PSI cpu "some") and, on a VM, the hypervisor running other guests on our cores (steal).
# On the quiet recording they were the whole of the detector's alerts once blips were despiked.
# CPU saturation is the failure classifier's cpu_runaway; memory and I/O pressure stay in.
CPU_CONTENTION: tuple[str, ...] = ("cpu.steal_pct", "psi.some_avg10_pct[cpu]")
# Process churn: a burst of short process starts leaves its children as zombies until the parent
# waits for them (200-500 at once in bench/faultfree_load.py's proc-burst), and the process table is
# read every 2 s, so one such reading spans two samples and passes the despiking median. Zombies
# that stay are the zombie-storm playbook's line (>= 50 for 1 min), a filling PID table the
# task-table-full and cgroup-pids-leak playbooks'; in the detector zombies were every proc-burst
# alert (docs/risk.md, "Fault-free under varied load").
PROCESS_CHURN: tuple[str, ...] = ("proc.zombies",)
DEFAULT_FIT_OPTIONS: dict[str, object] = {
    "threshold_margin": 1.5,
    "exclude": [*WORKLOAD_LEVELS, *CPU_CONTENTION, *PROCESS_CHURN, *GPU_COUNTER_LEVELS]}


class RiskStage:
    def __init__(
        self,
        settings: ModelSettings,
        state_dir: str | os.PathLike[str],
        schema: FeatureSchema | None = None,
        *,
        sample_interval_s: float = 1.0,
        forecast_alert_s: float = 1800.0,
        forecast_min_confidence: float = 0.5,
        failure_threshold: float = 0.5,
        explain_above: float = 1.0,
        fit_options: Mapping[str, object] | None = None,
        fit_timeout_s: float = 600.0,
        gap_reset_s: float = 30.0,
        history: bool = True,
        drift_every: int = DRIFT_EVERY,
        drift_line: float = DRIFT_LINE,
        drift_refit_min_s: float = 1800.0,
    ) -> None:
        self.settings = settings
        self.state_dir = Path(state_dir)
        self.schema = schema or FeatureSchema()
        self.window = FeatureWindow(self.schema)
        self.forecaster = Forecaster()
        self.mem_evidence = MemoryEvidence()  # the classifier's memory_exhaustion needs evidence
        self.disk_evidence = DiskEvidence()  # and its disk_full (agent.score.disk_evidence)
        self.gpu_risk = GpuRiskScorer()  # per-GPU failure risk from the health counters
        self.sample_interval_s = sample_interval_s
        self.forecast_alert_s = forecast_alert_s
        self.forecast_min_confidence = forecast_min_confidence
        self.failure_threshold = failure_threshold
        self.explain_above = explain_above
        self.fit_options = dict(DEFAULT_FIT_OPTIONS if fit_options is None else fit_options)
        self.fit_timeout_s = fit_timeout_s
        self.gap_reset_s = gap_reset_s
        self.model_dir = self.state_dir / "models"
        self.history = HistoryWriter(self.state_dir / "history", self.schema, settings.window_s) \
            if history else None
        self._prev_mono: float | None = None
        self._last_fit_mono: float | None = None
        self._fit_rows = 0  # history rows when the current model's fit started
        self._fitting = False
        self._refit_failures = FailureStreak("anomaly refit failed; keeping the previous model", log)
        self.scorer: clf.Scorer | None = None
        self.detector: StreamingDetector | None = None
        self._det_idx: npt.NDArray[np.intp] | None = None
        # drift of the live features from the detector's training data (agent.score.drift)
        self.drift_every, self.drift_line, self.drift_refit_min_s = drift_every, drift_line, drift_refit_min_s
        self.drift: DriftMonitor | None = None
        self.drift_score: float | None = None
        self.drift_refit = False  # drift past the line asked for a refit
        self.demand: DemandStage | None = None  # [demand] forecasts (agent.score.demand_stage)
        if settings.enabled:
            log.info("score stage ready", kernels="native" if self.window.native else "numpy",
                     features=self.schema.dim)
            self._load_classifier()
            self._load_detector(self.model_dir / DETECTOR_FILE, at_start=True)
        self._version = ""
        self._update_version()

    def reconfigure(self, settings: ModelSettings) -> None:
        """New ``[model]`` settings (SIGHUP, in a thread): used from the next fit and history prune; a
        new ``classifier_path`` is loaded now (refused: the running classifier stays)."""
        old, self.settings = self.settings, settings
        if self.history is not None:
            self.history.window_s = settings.window_s
        if settings.classifier_path != old.classifier_path and settings.enabled:
            self._load_classifier()

    # ------------------------------------------------------------------ models
    def _load_classifier(self) -> None:
        path = self.settings.classifier_path or str(clf.DEFAULT_PATH)
        try:
            model = clf.load(path)
            check_schema_compatible(model.meta.schema, self.schema)
            self.scorer = clf.Scorer(model, self.window.names)
        except ModelError as exc:
            log.error("failure classifier refused; running without failure probabilities",
                      path=path, error=str(exc))
            self.scorer = None
            return
        log.info("failure classifier loaded", path=path, version=model.version,
                 classes=list(model.meta.classes))

    def _load_detector(self, path: Path, *, at_start: bool = False) -> bool:
        if not path.exists():
            if not at_start:
                log.error("anomaly model missing after fit", path=str(path))
            return False
        try:
            model = art.load(path)
            self._install_detector(model)
        except ModelError as exc:
            log.error("anomaly model refused; rules only until the next refit", path=str(path),
                      error=str(exc))
            return False
        log.info("anomaly model loaded", path=str(path), version=model.version,
                 features=len(model.meta.features), rows=model.meta.training.rows)
        return True

    def _install_detector(self, model: art.CompiledDetector) -> None:
        pos = {n: i for i, n in enumerate(self.window.names)}
        missing = [n for n in model.meta.feature_names if n not in pos]
        if missing:
            raise ModelError(f"model {model.version}: feature schema mismatch: features {missing[:5]} "
                             f"are not produced by this node's schema")
        self._det_idx = np.array([pos[n] for n in model.meta.feature_names], dtype=np.intp)
        self.detector = StreamingDetector(model, max_span_s=2.0 * self.sample_interval_s)
        self.detector.bind(self.window.output, self._det_idx)  # read in place from the window
        edges, expected = model.arrays.get("drift_edges"), model.arrays.get("drift_expected")
        self.drift = DriftMonitor(edges, expected, model.arrays.get("drift_stable"), every=self.drift_every,
                                  line=self.drift_line) \
            if edges is not None and expected is not None else None
        self.drift_score = None
        self._update_version()

    def _update_version(self) -> None:
        d = self.detector.model.version if self.detector is not None else "-"
        c = self.scorer.model.version if self.scorer is not None else "-"
        self._version = f"anomaly:{d} classifier:{c}"

    @property
    def model_version(self) -> str:
        return self._version

    @property
    def cold(self) -> bool:
        return self.detector is None

    # ------------------------------------------------------------------ per sample
    def on_sample(self, sample: Sample) -> Risk:
        if not self.settings.enabled:
            return Risk(seq=sample.seq, wall=sample.wall, anomaly=None, alert=False, cold=True,
                        model_version="disabled")
        prev = self._prev_mono
        self._prev_mono = sample.mono
        if prev is not None and sample.mono - prev > self.gap_reset_s:
            self.window.reset()
            if self.detector is not None:
                self.detector.reset()
        vec = self.window.push_metrics(sample.metrics, sample.mono)
        if self.history is not None:
            self.history.append(sample.wall, vec)
        self.forecaster.push(sample.metrics, sample.mono)
        self.mem_evidence.push(sample.metrics, sample.mono)
        self.disk_evidence.push(sample.metrics)
        failure = self.disk_evidence.gate(self.mem_evidence.gate(self.scorer.failure(vec))) \
            if self.scorer is not None else {}
        gpus = self.gpu_risk.push(sample)
        if gpus:
            failure = {**failure, **{failure_key(g): g.score for g in gpus}}
        anomaly: float | None = None
        alert = False
        explanation: tuple[Contribution, ...] = ()
        channel = ""
        det = self.detector
        if det is not None and self._det_idx is not None:
            anomaly, alert = det.score_bound(vec, self._det_idx, sample.mono)
            channel = det.channel
            if anomaly >= self.explain_above:
                explanation = tuple(det.explain_bound(vec, self._det_idx))
            if self.drift is not None:
                self._drift(det, vec[self._det_idx])
        demand = self.demand.on_sample(sample.metrics, sample.wall) if self.demand is not None else ()
        return Risk(seq=sample.seq, wall=sample.wall, anomaly=anomaly, alert=alert, cold=det is None,
                    model_version=self._version, explanation=explanation, anomaly_channel=channel,
                    failure=failure, forecasts=self.forecaster.forecasts, gpu=gpus, drift=self.drift_score,
                    demand=demand)

    def _drift(self, det: StreamingDetector, vec: npt.NDArray[np.float64]) -> None:
        assert self.drift is not None  # noqa: S101 - the caller checked
        report = self.drift.push(vec)
        if report is None:
            return
        self.drift_score = report.score
        if report.flagged:
            names = det.model.meta.feature_names
            log.warning("model drift: the live features moved from the training data; refit requested",
                        drift=report.score, line=self.drift_line, model=det.model.version,
                        top={names[i]: v for i, v in report.top})
            self.drift_refit = True

    def risk_alert(self, risk: Risk) -> list[str]:
        """Why this risk is an alert (empty when it is not): anomaly, failure[c], forecast[key]."""
        why = []
        if risk.alert:
            why.append("anomaly")
        why.extend(f"failure[{c}]" for c, p in risk.failure.items() if p >= self.failure_threshold)
        why.extend(f"forecast[{f.resource}]" for f in risk.forecasts if _forecast_alert(
            f, self.forecast_alert_s, self.forecast_min_confidence))
        return why

    # ------------------------------------------------------------------ refit
    def history_rows(self) -> int:
        return self.history.rows if self.history is not None else 0

    def refit_due(self, now_mono: float | None = None) -> bool:
        if not self.settings.enabled or self.history is None or self._fitting:
            return False
        if self.history_rows() * self.sample_interval_s < self.settings.cold_start_s:
            return False
        if self.detector is None or self._last_fit_mono is None:
            return True
        now = time.monotonic() if now_mono is None else now_mono
        if self.drift_refit and now - self._last_fit_mono >= self.drift_refit_min_s:
            return True
        # Early life: refit each time the history has doubled (10, 20, 40, ... minutes), until
        # the regular interval is the shorter wait: the model learns the node's normal as fast as
        # the node shows it, instead of judging hours by its first ten minutes.
        rows = self.history_rows()
        if self._fit_rows and rows >= 2 * self._fit_rows \
                and self._fit_rows * self.sample_interval_s < self.settings.refit_interval_s:
            return True
        return now - self._last_fit_mono >= self.settings.refit_interval_s

    async def refit(self) -> bool:
        """Export the history and fit a detector, both in child processes; install it if it loads."""
        if self.history is None:
            return False
        self._fitting = True
        self.drift_refit = False
        self._last_fit_mono = time.monotonic()
        self._fit_rows = self.history_rows()
        work = self.model_dir / "work"
        train, tmp = work / "train.npz", work / "detector.npz"
        try:
            work.mkdir(parents=True, exist_ok=True)
            self.history.seal()  # here, on the thread that appends; written by the worker
            await asyncio.to_thread(self.history.write_pending)
            last = self.history.last_wall if self.history.last_wall is not None else time.time()
            since = last - self.settings.window_s
            rc, err = await _run_child([sys.executable, "-m", "agent", "model", "export-history",
                                        "--dir", str(self.history.dir),
                                        "--schema", self.schema.to_json().decode(),
                                        "--out", str(train), "--since", f"{since:.3f}"], self.fit_timeout_s)
            if rc != 0:
                if rc == 1 and not err:
                    log.warning("anomaly refit skipped: no usable history", exit=rc)
                else:  # e.g. it could not write the training file: the state dir is full
                    self._refit_failures.failed(ModelError(f"history export failed (exit {rc}): {err}"))
                return False
            from agent.score.fit import fit_in_child  # noqa: PLC0415 - numpy-only module, lazy

            model = await asyncio.to_thread(fit_in_child, train, tmp, options=self.fit_options,
                                            timeout_s=self.fit_timeout_s)
            self._install_detector(model)
            saved = self._save_detector(tmp)
        except (ModelError, OSError) as exc:
            self._refit_failures.failed(exc, previous=self.detector.model.version if self.detector else None)
            return False
        finally:
            self._fitting = False
            for leftover in (train, tmp):  # on a full disk, a failed fit's files must not keep the space
                with contextlib.suppress(OSError):
                    leftover.unlink(missing_ok=True)
        if saved:
            self._refit_failures.succeeded()
        log.info("anomaly model refitted", version=model.version, rows=model.meta.training.rows,
                 features=len(model.meta.features), saved=saved)
        return True

    def _save_detector(self, fitted: Path) -> bool:
        """Put the fitted artifact where the next start loads it; False when the state dir would not
        take it (the new model is in use all the same, until a restart)."""
        try:
            os.replace(fitted, self.model_dir / DETECTOR_FILE)
        except OSError as exc:
            self._refit_failures.failed(exc, consequence="the new model is in use but not saved: a restart "
                                                         "goes back to the previous one")
            return False
        return True

    async def refit_loop(self, check_every_s: float = 30.0) -> None:
        """Daemon task: fit once the cold-start history exists, then every ``refit_interval_s``;
        also writes the feature history's full chunks (in a worker thread)."""
        while True:
            await asyncio.sleep(check_every_s)
            if self.history is not None and self.history.pending:
                await asyncio.to_thread(self.history.write_pending)
            if self.refit_due():
                await self.refit()

    def close(self) -> None:
        if self.history is not None:
            self.history.flush()


def _forecast_alert(f: Forecast, eta_s: float, min_conf: float) -> bool:
    return f.eta_s is not None and f.eta_s <= eta_s and f.confidence >= min_conf


async def _run_child(argv: list[str], timeout_s: float) -> tuple[int, str]:
    """Run a child process with a timeout; kill and reap it on timeout or cancellation.
    Its exit status and the tail of its stderr."""
    proc = await asyncio.create_subprocess_exec(*argv, stdin=asyncio.subprocess.DEVNULL,
                                                stdout=asyncio.subprocess.DEVNULL,
                                                stderr=asyncio.subprocess.PIPE)
    try:
        async with asyncio.timeout(timeout_s):
            _, err = await proc.communicate()
    except (TimeoutError, asyncio.CancelledError):
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await asyncio.shield(proc.wait())
        raise
    tail = err.decode("utf-8", "replace").strip()[-300:]
    if proc.returncode not in (0, 1):
        log.warning("child process failed", argv=argv[:4], exit=proc.returncode, stderr=tail)
    return (proc.returncode if proc.returncode is not None else -1), tail


def check_schema_compatible(model_schema: FeatureSchema, node_schema: FeatureSchema) -> None:
    """A model's features mean the same on this node only with the same window parameters."""
    def params(s: FeatureSchema) -> tuple[int, float, int, int]:
        return s.window, s.ewma_alpha, s.despike, s.version

    if params(model_schema) != params(node_schema):
        raise ModelError(
            f"feature schema mismatch: the model was trained with window={model_schema.window}, "
            f"ewma_alpha={model_schema.ewma_alpha}, despike={model_schema.despike}, schema "
            f"v{model_schema.version}; this node uses window={node_schema.window}, "
            f"ewma_alpha={node_schema.ewma_alpha}, despike={node_schema.despike}, v{node_schema.version}")
    node_inputs = {i.name: i for i in node_schema.inputs}
    bad = [i.name for i in model_schema.inputs if i.name in node_inputs and node_inputs[i.name] != i]
    if bad:
        raise ModelError(f"feature schema mismatch: inputs {bad[:5]} are defined differently (unit/scale)")


def check_model(settings: ModelSettings, state_dir: str | os.PathLike[str] | None = None,
                schema: FeatureSchema | None = None) -> list[Problem]:
    """For ``heald check``: can the configured models be loaded and do they fit the schema?"""
    if not settings.enabled:
        return []
    problems: list[Problem] = []
    sch = schema or FeatureSchema()
    names = sch.names
    path = settings.classifier_path or str(clf.DEFAULT_PATH)
    try:
        model = clf.load(path)
        check_schema_compatible(model.meta.schema, sch)
        clf.Scorer(model, names)
    except ModelError as exc:
        problems.append(Problem(file=path, key="model.classifier_path", message=str(exc)))
    if state_dir is not None:
        det = Path(state_dir) / "models" / DETECTOR_FILE
        if det.exists():
            try:
                dm = art.load(det)
                missing = [n for n in dm.meta.feature_names if n not in set(names)]
                if missing:
                    problems.append(Problem(file=str(det), key="model",
                                            message=f"anomaly model features {missing[:5]} are not in "
                                                    f"this node's feature schema; it will be refused "
                                                    f"and refitted"))
            except ModelError as exc:
                problems.append(Problem(file=str(det), key="model",
                                        message=f"{exc}; it will be refused and refitted"))
    if not math.isfinite(settings.cold_start_s):
        problems.append(Problem(file="agent.toml", key="model.cold_start_s", message="must be finite"))
    return problems
