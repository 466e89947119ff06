"""Build wire messages from the pipeline's own types: samples, risk, events, and the playbook
engine's audit records and events.

The envelope's ``node``, ``site`` and ``seq`` are placeholders here: :meth:`Reporter.submit`
stamps them. ``ts``/``mono`` are taken now, so a replayed message keeps its creation time.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from typing import Any, Literal, TypedDict

import msgspec

from agent import wire
from agent.act.records import ENDS_A_RUN
from agent.collect.sample import Event as SampleEvent
from agent.collect.sample import Sample
from agent.score.types import Risk as ScoreRisk
from agent.wire.messages import Args

PLACEHOLDER = "unset"  # a valid id; replaced by Reporter.submit


class _Env(TypedDict):
    v: int
    node: str
    site: str
    seq: int
    ts: float
    mono: float


def envelope() -> _Env:
    """The envelope fields of a new message (node, site and seq are stamped by the reporter)."""
    return {"v": wire.PROTOCOL_VERSION, "node": PLACEHOLDER, "site": PLACEHOLDER, "seq": 0,
            "ts": time.time(), "mono": time.monotonic()}


def metrics(samples: Iterable[Sample]) -> wire.Metrics:
    batch = [wire.MetricSample(seq=s.seq, wall=s.wall, mono=s.mono, metrics=dict(s.metrics)) for s in samples]
    return wire.Metrics(**envelope(), samples=batch)


def risk(r: ScoreRisk) -> wire.Risk:
    return wire.Risk(
        **envelope(),
        sample_seq=r.seq, anomaly=r.anomaly, alert=r.alert, cold=r.cold, model_version=r.model_version,
        explanation=[wire.Contribution(c.feature, c.share) for c in r.explanation],
        failure={k: min(1.0, max(0.0, v)) for k, v in r.failure.items()},
        forecasts=[wire.Forecast(resource=f.resource, eta_s=f.eta_s,
                                 confidence=min(1.0, max(0.0, f.confidence)), rate_per_s=f.rate_per_s)
                   for f in r.forecasts],
    )


def event(e: SampleEvent) -> wire.Event:
    return wire.Event(**envelope(), name=e.kind, source=e.source, wall=e.wall,
                      labels=dict(e.labels), value=e.value, message=e.message[:4096])


def report_event(name: str, *, value: float | None = None, message: str = "",
                 labels: Mapping[str, str] | None = None) -> wire.Event:
    """An event about the agent itself (source "report")."""
    return wire.Event(**envelope(), name=name, source="report", wall=time.time(),
                      value=value, message=message, labels=dict(labels or {}))


Outcome = Literal["ok", "failed", "skipped", "timeout", "refused"]


def action(*, phase: Literal["started", "finished"], run_id: str, playbook: str, step: str, action: str,
           dry_run: bool, outcome: Outcome | None = None, result: Args | None = None, error: str = "",
           duration_s: float | None = None) -> wire.Action:
    return wire.Action(**envelope(), phase=phase, run_id=run_id, playbook=playbook, step=step, action=action,
                       dry_run=dry_run, outcome=outcome, result=dict(result or {}), error=error,
                       duration_s=duration_s)


def command_ack(command_id: str, status: wire.AckStatus, *, message: str = "",
                result: Args | None = None) -> wire.CommandAck:
    return wire.CommandAck(**envelope(), command_id=command_id, status=status, message=message,
                           result=dict(result or {}))


# --- the playbook engine's audit records and events ----------------------------------------------

_OUTCOMES: dict[str, Outcome] = {
    "ok": "ok", "succeeded": "ok", "verified": "ok", "done": "ok", "dry-run": "ok",
    "failed": "failed", "escalated": "failed", "interrupted": "failed", "abandoned": "skipped",
    "skipped": "skipped", "held": "refused", "refused": "refused", "timeout": "timeout",
}
#: Records that end a playbook's pending business with a decision, not a run: an operator's "no"
#: to an approval is finished, refused (never a failure: nothing ran).
_DECIDED: dict[str, Outcome] = {"approval.denied": "refused"}


def flat_args(value: Mapping[str, Any], prefix: str = "", out: dict[str, Any] | None = None) -> Args:
    """Audit records -> wire ``Args``, which are flat (a scalar or a list of scalars per key):
    nested mappings become dotted keys, anything else that is not a scalar becomes JSON text."""
    out = {} if out is None else out
    for k, v in value.items():
        key = f"{prefix}{k}"
        if v is None or isinstance(v, str | bool | int | float):
            out[key] = v[:4096] if isinstance(v, str) else v
        elif isinstance(v, Mapping):
            flat_args(v, key + ".", out)
        elif isinstance(v, list | tuple) and all(x is None or isinstance(x, str | bool | int | float)
                                                 for x in v):
            out[key] = list(v)
        else:
            out[key] = msgspec.json.encode(v, enc_hook=str).decode()[:4096]
    return out


def playbook_record(record: Mapping[str, Any]) -> wire.Action:
    """One engine audit record (:mod:`agent.act.records`) as a wire ``action`` message.

    Every record is an action, escalations included: the escalation's *event* for humans goes
    out once, through :func:`playbook_event` (so the coordinator opens one escalation, not two).
    """
    kind = str(record.get("type", "decision"))
    env = envelope()  # same envelope rules as every other report
    playbook = str(record.get("playbook") or "-")
    run_id = str(record.get("run_id") or "-")
    status = str(record.get("status") or record.get("outcome") or "")
    finished = kind == "step" and status not in ("intent", "started", "")
    finished = finished or kind in ENDS_A_RUN or kind in _DECIDED
    outcome: Outcome | None = None
    if finished:
        ok = record.get("ok")
        outcome = _DECIDED.get(kind) or _OUTCOMES.get(status, "ok" if ok is True else "failed")
    result = {k: v for k, v in record.items()
              if k not in ("node", "playbook", "run_id", "action", "dry_run", "duration_s", "type")}
    duration = record.get("duration_s")
    return wire.Action(
        **env, phase="finished" if finished else "started", run_id=run_id[:128] or "-",
        playbook=playbook[:128] or "-", step=str(record.get("step_name") or record.get("step") or kind),
        action=str(record.get("action") or kind), dry_run=bool(record.get("dry_run", False)),
        outcome=outcome, result=flat_args({"type": kind, **result}),
        error=str(record.get("detail", ""))[:4096] if outcome == "failed" else "",
        duration_s=duration if isinstance(duration, int | float) else None,
    )


def playbook_event(event: Mapping[str, Any]) -> wire.Event:
    """An engine event for humans (escalation, approval request, breaker trip) as a wire event.

    Approval requests go out as ``approval_request`` events, the name the coordinator queues for
    an operator's signed approve/deny.
    """
    env = envelope()
    kind = str(event.get("kind") or "playbook.event")
    playbook = str(event.get("playbook") or "")
    labels = {str(k): str(v) for k, v in dict(event.get("labels") or {}).items()}
    labels.update({k: str(event[k]) for k in ("playbook", "run_id", "severity") if event.get(k)})
    if kind == "playbook.approval_requested":
        kind = wire.RequestEvent.APPROVAL_REQUEST
        # the engine names each request (one playbook may wait on several targets at once)
        labels.setdefault("request_id",
                          f"{event.get('node', '')}-{playbook}-{int(float(event.get('wall', 0)))}")
        labels.setdefault("action", str(event.get("action") or "playbook"))
    wall = float(event.get("wall") or time.time())
    return wire.Event(**env, name=kind[:128], source="playbooks", wall=wall, labels=labels,
                      message=str(event.get("message", ""))[:4096])
