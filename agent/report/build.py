"""Build wire messages from the pipeline's own types: samples, risk, events, and the playbook
engine's audit records and events.

The envelope's ``node``, ``site`` and ``seq`` are placeholders here: :meth:`Reporter.submit`
stamps them. ``ts``/``mono`` are taken now, so a replayed message keeps its creation time.

The builders keep every message inside the wire's bounds (docs/wire.md, "Bounds"), so what a
collector or the engine hands them never makes a message the coordinator would reject: a metric
value or an optional number that is NaN or infinite becomes null, another number is clamped,
strings are cut to their bound, maps and lists keep their first entries up to theirs. What still
slips through is caught by :mod:`agent.report.check` before it is queued.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Mapping
from itertools import islice
from typing import Any, Literal, TypedDict

import msgspec

from agent import wire
from agent.act.records import ENDS_A_RUN
from agent.collect.sample import Event as SampleEvent
from agent.collect.sample import Sample
from agent.score.types import Risk as ScoreRisk
from agent.wire.messages import (
    MAX_ARGS,
    MAX_FLOAT,
    MAX_ITEMS,
    MAX_KEY,
    MAX_LABELS,
    MAX_METRICS,
    MAX_NAME,
    MAX_TEXT,
    MAX_WALL,
    Args,
)
from agent.wire.messages import GpuRisk as WireGpuRisk

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


# --- keeping values inside the wire's bounds ------------------------------------------------------

def finite_or_none(value: object) -> float | None:
    """``value`` if it is a finite number, else None (NaN, the infinities, an int too big for a float,
    a bool or anything else: the wire has no bool where it wants a number)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        return value if math.isfinite(value) else None
    except OverflowError:
        return None


def finite(value: float, default: float = 0.0) -> float:
    """A finite ``value``: the infinities clamped to the largest float, NaN (or no number) ``default``."""
    try:
        if math.isfinite(value):
            return value
    except (OverflowError, TypeError):
        return default
    return default if math.isnan(value) else math.copysign(MAX_FLOAT, value)


def _share(value: float) -> float:
    """A probability or share: clamped to 0..1, NaN 0."""
    return min(1.0, max(0.0, value)) if value == value else 0.0  # noqa: PLR0124 - NaN is not itself


def _wall(value: float | None) -> float:
    """A wall-clock timestamp on the wire's range (0 .. 1e11), or now when it is not."""
    return value if value is not None and 0.0 <= value <= MAX_WALL else time.time()


def _name(value: str, default: str) -> str:
    """A non-empty name of at most 256 characters."""
    return value[:MAX_NAME] or default


def bounded_labels(value: Mapping[str, str] | None) -> dict[str, str]:
    """A label map inside the bounds: keys of at most 1024 characters, values of at most 4096, 256 labels."""
    if not value:
        return {}
    return {str(k)[:MAX_KEY]: str(v)[:MAX_TEXT] for k, v in islice(value.items(), MAX_LABELS)}


def bounded_names(value: Iterable[str]) -> list[str]:
    """A list of names (collectors, capabilities) inside the bounds."""
    return [str(v)[:MAX_KEY] for v in islice(value, MAX_ITEMS)]


def metric_values(values: Mapping[str, float | None]) -> dict[str, float | None]:
    """One sample's metrics as the wire takes them: a value that is not a finite number is null
    ("could not read"); a key over 1024 characters is left out; at most 16384 metrics."""
    isfinite = math.isfinite
    try:  # the sample path: one pass, no call per value
        out = {k: v if v is None or isfinite(v) else None for k, v in values.items() if len(k) <= MAX_KEY}
    except (OverflowError, TypeError):  # an int too large for a float
        out = {k: finite_or_none(v) for k, v in values.items() if len(k) <= MAX_KEY}
    if len(out) > MAX_METRICS:
        out = dict(islice(out.items(), MAX_METRICS))
    return out


def metrics(samples: Iterable[Sample]) -> wire.Metrics:
    batch = [wire.MetricSample(seq=s.seq, wall=_wall(s.wall), mono=finite(s.mono),
                               metrics=metric_values(s.metrics)) for s in samples]
    return wire.Metrics(**envelope(), samples=batch)


def risk(r: ScoreRisk) -> wire.Risk:
    return wire.Risk(
        **envelope(),
        sample_seq=r.seq, anomaly=finite_or_none(r.anomaly), alert=r.alert, cold=r.cold,
        model_version=r.model_version[:MAX_TEXT],
        explanation=[wire.Contribution(c.feature[:MAX_KEY], _share(c.share))
                     for c in r.explanation[:MAX_ITEMS]],
        failure={k[:MAX_KEY]: _share(v) for k, v in islice(r.failure.items(), MAX_ITEMS)},
        forecasts=[wire.Forecast(resource=f.resource[:MAX_KEY], eta_s=finite_or_none(f.eta_s),
                                 confidence=_share(f.confidence), rate_per_s=finite(f.rate_per_s))
                   for f in r.forecasts[:MAX_ITEMS]],
        gpu=[WireGpuRisk(gpu=g.gpu[:MAX_KEY], pci=g.pci[:MAX_KEY], score=_share(g.score),
                         reasons=[x[:MAX_KEY] for x in g.reasons[:MAX_ITEMS]]) for g in r.gpu[:MAX_ITEMS]],
    )


def event(e: SampleEvent) -> wire.Event:
    return wire.Event(**envelope(), name=_name(e.kind, "event"), source=e.source[:MAX_TEXT],
                      wall=_wall(e.wall), labels=bounded_labels(e.labels), value=finite_or_none(e.value),
                      message=e.message[:MAX_TEXT])


def report_event(name: str, *, value: float | None = None, message: str = "",
                 labels: Mapping[str, str] | None = None) -> wire.Event:
    """An event about the agent itself (source "report")."""
    return event(SampleEvent(kind=name, source="report", wall=time.time(), value=value, message=message,
                             labels=dict(labels or {})))


Outcome = Literal["ok", "failed", "skipped", "timeout", "refused"]


def action(*, phase: Literal["started", "finished"], run_id: str, playbook: str, step: str, action: str,
           dry_run: bool, outcome: Outcome | None = None, result: Args | None = None, error: str = "",
           duration_s: float | None = None) -> wire.Action:
    return wire.Action(**envelope(), phase=phase, run_id=_name(run_id, "-"), playbook=_name(playbook, "-"),
                       step=step[:MAX_TEXT], action=action[:MAX_TEXT], dry_run=dry_run, outcome=outcome,
                       result=flat_args(result or {}), error=error[:MAX_TEXT],
                       duration_s=finite_or_none(duration_s))


def command_ack(command_id: str, status: wire.AckStatus, *, message: str = "",
                result: Args | None = None) -> wire.CommandAck:
    return wire.CommandAck(**envelope(), command_id=_name(command_id, "-"), status=status,
                           message=message[:MAX_TEXT], result=flat_args(result or {}))


# --- the playbook engine's audit records and events ----------------------------------------------

_OUTCOMES: dict[str, Outcome] = {
    "ok": "ok", "succeeded": "ok", "verified": "ok", "done": "ok", "dry-run": "ok",
    "failed": "failed", "escalated": "failed", "interrupted": "failed", "abandoned": "skipped",
    "skipped": "skipped", "held": "refused", "refused": "refused", "timeout": "timeout",
    "rejected": "refused",  # an operator's command (``control``) refused as bad input
}
#: Records that end a playbook's pending business with a decision, not a run: an operator's "no"
#: to an approval is finished, refused (never a failure: nothing ran).
_DECIDED: dict[str, Outcome] = {"approval.denied": "refused"}


_MIN_INT = -(2**63)  # msgpack's integers: -2**63 .. 2**64 - 1
_MAX_INT = 2**64 - 1


def _scalar(v: str | bool | int | float | None) -> str | bool | int | float | None:
    """A scalar inside the bounds: strings cut, non-finite floats null, an int msgpack cannot carry
    as text."""
    if isinstance(v, str):
        return v[:MAX_TEXT]
    if isinstance(v, float):
        return finite_or_none(v)
    if isinstance(v, int) and not isinstance(v, bool) and not _MIN_INT <= v <= _MAX_INT:
        return str(v)[:MAX_TEXT]
    return v


def flat_args(value: Mapping[str, Any], prefix: str = "", out: dict[str, Any] | None = None) -> Args:
    """Audit records -> wire ``Args``, which are flat (a scalar or a list of scalars per key):
    nested mappings become dotted keys, anything else that is not a scalar becomes JSON text.
    Inside the bounds: keys and strings cut, at most 1024 entries and 1024 items a list."""
    out = {} if out is None else out
    for k, v in value.items():
        if len(out) >= MAX_ARGS:
            break
        key = f"{prefix}{k}"[:MAX_KEY]
        if v is None or isinstance(v, str | bool | int | float):
            out[key] = _scalar(v)
        elif isinstance(v, Mapping):
            flat_args(v, key + ".", out)
        elif isinstance(v, list | tuple) and all(x is None or isinstance(x, str | bool | int | float)
                                                 for x in v):
            out[key] = [_scalar(x) for x in v[:MAX_ARGS]]
        else:
            out[key] = msgspec.json.encode(v, enc_hook=str).decode()[:MAX_TEXT]
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
    # an operator's command (``control``) is finished once recorded: its status is its outcome
    finished = finished or kind in ENDS_A_RUN or kind in _DECIDED or kind == "control"
    outcome: Outcome | None = None
    if finished:
        ok = record.get("ok")
        outcome = _DECIDED.get(kind) or _OUTCOMES.get(status, "ok" if ok is True else "failed")
    result = {k: v for k, v in record.items()
              if k not in ("node", "playbook", "run_id", "action", "dry_run", "duration_s", "type")}
    duration = record.get("duration_s")
    return wire.Action(
        **env, phase="finished" if finished else "started", run_id=run_id[:128] or "-",
        playbook=playbook[:128] or "-",
        step=str(record.get("step_name") or record.get("step") or kind)[:MAX_TEXT],
        action=str(record.get("action") or record.get("command") or kind)[:MAX_TEXT],
        dry_run=bool(record.get("dry_run", False)),
        outcome=outcome, result=flat_args({"type": kind, **result}),
        error=str(record.get("detail", ""))[:MAX_TEXT] if outcome == "failed" else "",
        duration_s=finite_or_none(duration) if isinstance(duration, int | float) else None,
    )


def playbook_event(event: Mapping[str, Any]) -> wire.Event:
    """An engine event for humans (escalation, approval request, breaker trip) as a wire event.

    Approval requests go out as ``approval_request`` events, the name the coordinator queues for
    an operator's signed approve/deny.
    """
    env = envelope()
    kind = str(event.get("kind") or "playbook.event")
    playbook = str(event.get("playbook") or "")
    tags = {str(k): str(v) for k, v in dict(event.get("labels") or {}).items()}
    tags.update({k: str(event[k]) for k in ("playbook", "run_id", "severity") if event.get(k)})
    if kind == "playbook.approval_requested":
        kind = wire.RequestEvent.APPROVAL_REQUEST
        # the engine names each request (one playbook may wait on several targets at once)
        tags.setdefault("request_id",
                        f"{event.get('node', '')}-{playbook}-{int(finite(float(event.get('wall', 0))))}")
        tags.setdefault("action", str(event.get("action") or "playbook"))
    when = _wall(float(event.get("wall") or time.time()))
    return wire.Event(**env, name=kind[:128], source="playbooks", wall=when, labels=bounded_labels(tags),
                      message=str(event.get("message", ""))[:MAX_TEXT])
