"""Build wire messages from the pipeline's own types.

The envelope's ``node``, ``site`` and ``seq`` are placeholders here: :meth:`Reporter.submit`
stamps them. ``ts``/``mono`` are taken now, so a replayed message keeps its creation time.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from typing import Literal, TypedDict

from agent import wire
from agent.collect.sample import Event as SampleEvent
from agent.collect.sample import Sample
from agent.score.types import Risk as ScoreRisk

PLACEHOLDER = "unset"  # a valid id; replaced by Reporter.submit


class _Env(TypedDict):
    v: int
    node: str
    site: str
    seq: int
    ts: float
    mono: float


def _env() -> _Env:
    return {"v": wire.PROTOCOL_VERSION, "node": PLACEHOLDER, "site": PLACEHOLDER, "seq": 0,
            "ts": time.time(), "mono": time.monotonic()}


def metrics(samples: Iterable[Sample]) -> wire.Metrics:
    batch = [wire.MetricSample(seq=s.seq, wall=s.wall, mono=s.mono, metrics=dict(s.metrics)) for s in samples]
    return wire.Metrics(**_env(), samples=batch)


def risk(r: ScoreRisk) -> wire.Risk:
    return wire.Risk(
        **_env(),
        sample_seq=r.seq, anomaly=r.anomaly, alert=r.alert, cold=r.cold, model_version=r.model_version,
        explanation=[wire.Contribution(c.feature, c.share) for c in r.explanation],
        failure={k: min(1.0, max(0.0, v)) for k, v in r.failure.items()},
        forecasts=[wire.Forecast(resource=f.resource, eta_s=f.eta_s,
                                 confidence=min(1.0, max(0.0, f.confidence)), rate_per_s=f.rate_per_s)
                   for f in r.forecasts],
    )


def event(e: SampleEvent) -> wire.Event:
    return wire.Event(**_env(), name=e.kind, source=e.source, wall=e.wall,
                      labels=dict(e.labels), value=e.value, message=e.message[:4096])


def report_event(name: str, *, value: float | None = None, message: str = "",
                 labels: Mapping[str, str] | None = None) -> wire.Event:
    """An event about the agent itself (source "report")."""
    return wire.Event(**_env(), name=name, source="report", wall=time.time(),
                      value=value, message=message, labels=dict(labels or {}))


Outcome = Literal["ok", "failed", "skipped", "timeout", "refused"]
AckStatus = Literal["accepted", "rejected", "done", "failed", "expired"]
Args = dict[str, wire.messages.Scalar | list[wire.messages.Scalar]]


def action(*, phase: Literal["started", "finished"], run_id: str, playbook: str, step: str, action: str,
           dry_run: bool, outcome: Outcome | None = None, result: Args | None = None, error: str = "",
           duration_s: float | None = None) -> wire.Action:
    return wire.Action(**_env(), phase=phase, run_id=run_id, playbook=playbook, step=step, action=action,
                       dry_run=dry_run, outcome=outcome, result=dict(result or {}), error=error,
                       duration_s=duration_s)


def command_ack(command_id: str, status: AckStatus, *, message: str = "",
                result: Args | None = None) -> wire.CommandAck:
    return wire.CommandAck(**_env(), command_id=command_id, status=status, message=message,
                           result=dict(result or {}))
