"""The optional Prometheus ``/metrics`` endpoint (``[prometheus] enabled/listen``).

The daemon owns one :class:`Exposition` and feeds it on the event loop once a second
(:meth:`~Exposition.update_sample`, :meth:`~Exposition.update_risk`,
:meth:`~Exposition.record_run`, :meth:`~Exposition.set_report_state`). The HTTP server runs
in prometheus_client's own thread and calls :meth:`Exposition.collect` on each scrape, which
builds the metric families from the latest snapshot under a lock. Nothing here allocates a
``Gauge`` per metric key: a node with many mounts, interfaces and units exposes thousands of
series, and they come and go with the hardware.

Every sample metric ``family[label]`` becomes the gauge ``heald_<family>`` (dots and other
characters outside ``[a-zA-Z0-9_]`` become ``_``) with the bracketed part in the label
``label``; a metric the host could not read this time (``None``) is left out of that scrape.
The full list of names is in docs/metrics.md and :data:`FIXED_METRICS`.
"""

from __future__ import annotations

import asyncio
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final
from wsgiref.simple_server import WSGIServer

import structlog
from prometheus_client import start_http_server
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    InfoMetricFamily,
    Metric,
    SummaryMetricFamily,
)
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector, CollectorRegistry

from agent import __version__
from agent.collect.sample import Sample, split_key
from agent.errors import HealdError
from agent.score.types import Risk

if TYPE_CHECKING:
    from agent.runtime.pipeline import StageCost

log = structlog.get_logger("heald.prometheus")

PREFIX: Final = "heald_"
SAMPLE_LABEL: Final = "label"
COLLECTOR_STATES: Final = ("ok", "stale", "disabled", "absent")

#: Every metric name the exposition itself defines (as written in the text format), with its
#: type and help. Sample metrics (``heald_<family>``) come on top of these.
FIXED_METRICS: Final[dict[str, tuple[str, str]]] = {
    "heald_info": ("info", "heald version and node id (value 1)"),
    "heald_sample_seq": ("gauge", "Sequence number of the latest sample"),
    "heald_sample_timestamp_seconds": ("gauge", "Unix time the latest sample was assembled"),
    "heald_sample_age_seconds": ("gauge", "Seconds since the latest sample was assembled"),
    "heald_events_total": ("counter", "Events seen in samples (XID, OOM kill, link down, ...) by kind"),
    "heald_collector_status": ("gauge", "1 for the collector's current status (ok, stale, disabled, absent)"),
    "heald_collector_age_seconds": ("gauge", "Seconds since the collector's last successful reading"),
    "heald_collector_duration_seconds": ("gauge", "Duration of the collector's last pass"),
    "heald_risk_anomaly": ("gauge", "Anomaly score, 1.0 = alert threshold (absent while cold)"),
    "heald_risk_alert": ("gauge", "1 while the anomaly score is at or above the alert threshold"),
    "heald_risk_cold": ("gauge", "1 while the model is in its cold-start window (rules only)"),
    "heald_model_drift": ("gauge", "Share of the model's features moved from its training data (drift)"),
    "heald_failure_probability": ("gauge", "Probability of a failure of this class within the horizon"),
    "heald_forecast_eta_seconds": ("gauge", "Forecast seconds until the resource is exhausted"),
    "heald_model_info": ("info", "Version of the anomaly model in use (value 1)"),
    "heald_playbook_runs_total": ("counter", "Playbook runs by playbook and outcome"),
    "heald_mqtt_connected": ("gauge", "1 while connected to the MQTT broker"),
    "heald_spool_bytes": ("gauge", "Bytes waiting in the on-disk report spool"),
    "heald_spool_records": ("gauge", "Records waiting in the on-disk report spool"),
    "heald_pipeline_cpu_seconds": ("summary", "Thread CPU per sample by stage (score, decide, sample)"),
}

#: Quantiles of ``heald_pipeline_cpu_seconds`` (over the pipeline's last samples).
STAGE_QUANTILES: Final = (0.5, 0.9, 0.99)

_INVALID = re.compile(r"[^a-zA-Z0-9_]")


def metric_name(family: str) -> str:
    """``cpu.util_pct`` -> ``heald_cpu_util_pct``."""
    return PREFIX + _INVALID.sub("_", family)


# A sample family must not shadow one of ours (heald_events would clash with heald_events_total).
_RESERVED: Final = frozenset(FIXED_METRICS) | {
    name.removesuffix("_total").removesuffix("_info") for name in FIXED_METRICS}


class Exposition(Collector):
    """The latest state of the daemon, as Prometheus metric families. Thread-safe."""

    def __init__(self, node: str) -> None:
        self._lock = threading.Lock()
        self._node = node
        self._sample: Sample | None = None
        self._risk: Risk | None = None
        self._events: dict[str, int] = {}
        self._runs: dict[tuple[str, str], int] = {}
        self._report: tuple[bool, int, int] | None = None
        self._names: dict[str, str | None] = {}  # family -> metric name (None: reserved, skipped)
        self._stage_cost: StageCost | None = None

    # --- fed by the daemon (event loop) ---------------------------------------------------
    def update_sample(self, sample: Sample) -> None:
        with self._lock:
            self._sample = sample
            self._node = sample.node
            for event in sample.events:
                self._events[event.kind] = self._events.get(event.kind, 0) + 1

    def update_risk(self, risk: Risk) -> None:
        with self._lock:
            self._risk = risk

    def record_run(self, playbook: str, outcome: str) -> None:
        """Count one finished playbook run (``outcome``: ok, failed, dry-run, skipped, ...)."""
        with self._lock:
            self._runs[(playbook, outcome)] = self._runs.get((playbook, outcome), 0) + 1

    def set_report_state(self, connected: bool, spool_bytes: int, spool_records: int) -> None:
        with self._lock:
            self._report = (connected, spool_bytes, spool_records)

    def update_stage_cost(self, cost: StageCost) -> None:
        """The pipeline's per-sample CPU accounting (read at scrape time; one reference, no copy)."""
        self._stage_cost = cost

    # --- read by the HTTP thread ----------------------------------------------------------
    def collect(self) -> Iterable[Metric]:
        with self._lock:
            sample, risk, node = self._sample, self._risk, self._node
            events, runs, report = dict(self._events), dict(self._runs), self._report
        yield from self._meta(node)
        if sample is not None:
            yield from self._sample_families(sample, events)
        if risk is not None:
            yield from self._risk_families(risk)
        help_text = FIXED_METRICS["heald_playbook_runs_total"][1]
        runs_family = CounterMetricFamily("heald_playbook_runs", help_text, labels=["playbook", "outcome"])
        for (playbook, outcome), count in sorted(runs.items()):
            runs_family.add_metric([playbook, outcome], count)
        yield runs_family
        if report is not None:
            connected, spool_bytes, spool_records = report
            yield self._gauge("heald_mqtt_connected", 1.0 if connected else 0.0)
            yield self._gauge("heald_spool_bytes", float(spool_bytes))
            yield self._gauge("heald_spool_records", float(spool_records))
        if self._stage_cost is not None:
            yield self._stage_cost_family(self._stage_cost)

    @staticmethod
    def _stage_cost_family(cost: StageCost) -> SummaryMetricFamily:
        name = "heald_pipeline_cpu_seconds"
        family = SummaryMetricFamily(name, FIXED_METRICS[name][1], labels=["stage"])
        samples, score_ns, decide_ns = cost.samples, cost.score_ns, cost.decide_ns
        score, decide = cost.recent()
        per_stage = {"score": (score, score_ns), "decide": (decide, decide_ns),
                     "sample": ([a + b for a, b in zip(score, decide, strict=True)], score_ns + decide_ns)}
        for stage, (recent, total_ns) in per_stage.items():
            ordered = sorted(recent)
            for q in STAGE_QUANTILES:
                at = min(len(ordered) - 1, int(q * len(ordered)))
                value = ordered[at] / 1e9 if ordered else float("nan")
                family.add_sample(name, {"stage": stage, "quantile": str(q)}, value)
            family.add_metric([stage], samples, total_ns / 1e9)
        return family

    @staticmethod
    def _gauge(name: str, value: float) -> GaugeMetricFamily:
        return GaugeMetricFamily(name, FIXED_METRICS[name][1], value=value)

    @staticmethod
    def _meta(node: str) -> Iterator[Metric]:
        info = InfoMetricFamily("heald", FIXED_METRICS["heald_info"][1])
        info.add_metric([], {"version": __version__, "node": node})
        yield info

    def _family_name(self, family: str) -> str | None:
        name = self._names.get(family, "")
        if name == "":
            candidate = metric_name(family)
            name = None if candidate in _RESERVED else candidate
            self._names[family] = name
        return name

    def _sample_families(self, sample: Sample, events: dict[str, int]) -> Iterator[Metric]:
        yield self._gauge("heald_sample_seq", float(sample.seq))
        yield self._gauge("heald_sample_timestamp_seconds", sample.wall)
        yield self._gauge("heald_sample_age_seconds", max(0.0, time.monotonic() - sample.mono))

        families: dict[str, Metric] = {}
        for metric_key, value in sample.metrics.items():
            if value is None:
                continue
            family, label = split_key(metric_key)
            name = self._family_name(family)
            if name is None:
                continue
            out = families.get(name)
            if out is None:
                out = families[name] = Metric(name, f"heald sample metric {family}", "gauge")
            out.add_sample(name, {} if label is None else {SAMPLE_LABEL: label}, float(value))
        yield from families.values()

        ev = CounterMetricFamily("heald_events", FIXED_METRICS["heald_events_total"][1], labels=["kind"])
        for kind, count in sorted(events.items()):
            ev.add_metric([kind], count)
        yield ev

        status = GaugeMetricFamily("heald_collector_status", FIXED_METRICS["heald_collector_status"][1],
                                   labels=["collector", "status"])
        age = GaugeMetricFamily("heald_collector_age_seconds",
                                FIXED_METRICS["heald_collector_age_seconds"][1], labels=["collector"])
        duration = GaugeMetricFamily("heald_collector_duration_seconds",
                                     FIXED_METRICS["heald_collector_duration_seconds"][1],
                                     labels=["collector"])
        for collector, state in sorted(sample.collectors.items()):
            states = set(COLLECTOR_STATES) | {state.status}
            for s in sorted(states):
                status.add_metric([collector, s], 1.0 if s == state.status else 0.0)
            if state.age_s is not None:
                age.add_metric([collector], state.age_s)
            if state.duration_ms is not None:
                duration.add_metric([collector], state.duration_ms / 1000.0)
        yield status
        yield age
        yield duration

    @staticmethod
    def _risk_families(risk: Risk) -> Iterator[Metric]:
        if risk.anomaly is not None:
            yield Exposition._gauge("heald_risk_anomaly", risk.anomaly)
        yield Exposition._gauge("heald_risk_alert", 1.0 if risk.alert else 0.0)
        yield Exposition._gauge("heald_risk_cold", 1.0 if risk.cold else 0.0)
        if risk.drift is not None:
            yield Exposition._gauge("heald_model_drift", risk.drift)
        failure = GaugeMetricFamily("heald_failure_probability",
                                    FIXED_METRICS["heald_failure_probability"][1], labels=["class"])
        for cls, p in sorted(risk.failure.items()):
            failure.add_metric([cls], p)
        yield failure
        eta = GaugeMetricFamily("heald_forecast_eta_seconds", FIXED_METRICS["heald_forecast_eta_seconds"][1],
                                labels=["resource"])
        for forecast in risk.forecasts:
            if forecast.eta_s is not None:
                eta.add_metric([forecast.resource], forecast.eta_s)
        yield eta
        model = InfoMetricFamily("heald_model", FIXED_METRICS["heald_model_info"][1])
        model.add_metric([], {"version": risk.model_version})
        yield model


def parse_listen(listen: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[V6]:PORT`` -> (host, port). Port 0 picks a free port."""
    host, sep, port = listen.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise HealdError(f"prometheus.listen: {listen!r} is not HOST:PORT")
    return host, int(port)


def build_registry(exposition: Exposition, *, process: bool = True) -> CollectorRegistry:
    """A private registry: the exposition plus the daemon's own process_* / python_info metrics."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(exposition)
    if process:
        ProcessCollector(registry=registry)
        PlatformCollector(registry=registry)
    return registry


@dataclass
class MetricsServer:
    """A running /metrics server (prometheus_client's WSGI server in its own thread)."""

    _httpd: WSGIServer
    _thread: threading.Thread
    host: str
    port: int

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def close(self, timeout: float = 5.0) -> None:
        """Stop accepting, close the socket and join the thread. Idempotent."""
        if self._thread.is_alive():
            self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout)


def start(exposition: Exposition, listen: str, *, registry: CollectorRegistry | None = None) -> MetricsServer:
    """Bind ``listen`` and serve /metrics from a thread. Raises HealdError if it cannot bind."""
    host, port = parse_listen(listen)
    try:
        httpd, thread = start_http_server(port, addr=host,
                                          registry=registry or build_registry(exposition))
    except OSError as exc:
        raise HealdError(f"prometheus.listen: cannot listen on {listen}: {exc.strerror or exc}") from None
    bound_port: int = httpd.server_address[1]
    return MetricsServer(httpd, thread, host, bound_port)


async def serve(exposition: Exposition, listen: str, *,
                started: Callable[[MetricsServer], None] | None = None) -> None:
    """Serve /metrics until cancelled (a task in the daemon's root group), then stop cleanly."""
    server = await asyncio.to_thread(start, exposition, listen)
    try:
        if started is not None:
            started(server)
        await asyncio.Future()  # forever: ends by cancellation
    finally:
        # shutdown() waits for the serving loop's next poll (<= 0.5 s): keep it off the loop.
        try:
            await asyncio.to_thread(server.close)
        except asyncio.CancelledError:  # cancelled again while closing: finish here, then go on
            server.close()
            raise


class Endpoint:
    """The daemon's /metrics: one server at a time, moved by :meth:`rebind` on SIGHUP."""

    def __init__(self, exposition: Exposition, listen: str) -> None:
        self.listen = listen
        self.server: MetricsServer | None = None
        self._exposition = exposition
        self._registry = build_registry(exposition)
        self._swap = asyncio.Lock()  # a SIGHUP at start-up waits for the first bind

    async def run(self) -> None:
        """Serve until cancelled (the daemon's ``prometheus`` task), then close the server."""
        async with self._swap:
            if self.server is None:
                self.server = await asyncio.to_thread(start, self._exposition, self.listen,
                                                      registry=self._registry)
        try:
            await asyncio.Future()  # forever: ends by cancellation
        finally:
            server = self.server
            if server is not None:
                try:
                    await asyncio.to_thread(server.close)
                except asyncio.CancelledError:  # cancelled again while closing: finish here
                    server.close()
                    raise

    async def rebind(self, listen: str) -> None:
        """Listen on ``listen``, then close the old port; a bind failure raises and keeps the old one."""
        async with self._swap:
            if listen == self.listen:
                return
            new = await asyncio.to_thread(start, self._exposition, listen, registry=self._registry)
            old, self.server, self.listen = self.server, new, listen
            if old is not None:
                await asyncio.to_thread(old.close)
        log.info("prometheus.rebound", url=new.url, closed=old.url if old is not None else None)
