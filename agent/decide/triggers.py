"""Trigger evaluation: structured conditions over a Sample and a Risk (no eval, no strings run).

Each playbook has a :class:`TriggerEvaluator` holding the per-condition state that ``for:``
and hysteresis need. ``evaluate`` is called once per sample and returns the list of
:class:`Match`es: an empty list means "does not hold". A match carries the variables bound by
wildcard labels (``disk.used_pct[{mount}]`` binds ``mount``), the inputs that made it fire
(for the audit log) and a severity used to pick the worst match when several hold.

Semantics (see docs/playbooks.md):

* metric: ``value op threshold``; with ``for`` it must hold continuously that long. Once it
  holds, ``clear_below``/``clear_above`` keep it holding until the value crosses back (hysteresis).
  A metric that reads ``None`` (collector could not read it) neither starts, advances nor
  clears the condition; a key absent from the sample drops its state.
* event: count of matching events within ``within`` (and after the playbook's watermark, so
  events a run already handled are not counted twice) is at least ``count``.
* all: every item holds with consistent bindings (joined); any: the union of the items' matches.
  Every item is always evaluated, so ``for`` timers advance regardless of short-circuits.
"""

from __future__ import annotations

import collections
import operator
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from agent.collect.sample import Event, Sample, split_key
from agent.decide.model import (
    GPU_FAILURE,
    AllCond,
    AnyCond,
    Condition,
    DemandCond,
    EventCond,
    FailureCond,
    ForecastCond,
    KeyPattern,
    MetricCond,
    RiskCond,
)
from agent.score.types import Forecast, Risk

_OPS: dict[str, Callable[[float, float], bool]] = {
    ">": operator.gt,
    ">=": operator.ge,
    "<": operator.lt,
    "<=": operator.le,
    "==": operator.eq,
    "!=": operator.ne,
}
MAX_MATCHES = 64


@dataclass(frozen=True, slots=True)
class Match:
    bindings: Mapping[str, str]
    inputs: Mapping[str, Any]
    severity: float = 0.0


def consistent(a: Mapping[str, str], b: Mapping[str, str]) -> bool:
    return all(b[k] == v for k, v in a.items() if k in b)


class KeyPlan:
    """Where each family's keys are in a sample: ``family -> [(label, key)]`` (a family's entries
    in the order the sample holds them), worked out again only when the sample's set of keys
    differs from the last sample's, and then only for the families whose keys came or went
    (the per-process series of a host where processes come and go change a few keys most
    samples). Shared by the :class:`SampleIndex` of consecutive samples
    (:class:`agent.decide.latest.Latest` holds one); a plan once handed out is never changed."""

    def __init__(self) -> None:
        self._keys: frozenset[str] = frozenset()
        self.by_family: dict[str, list[tuple[str | None, str]]] = {}

    def update(self, metrics: Mapping[str, float | None]) -> dict[str, list[tuple[str | None, str]]]:
        keys = metrics.keys()
        if keys != self._keys:
            old = self._keys
            added, removed = keys - old, old - keys
            if (len(added) + len(removed)) * 4 > len(keys):  # most keys changed (or the first sample)
                self.by_family = self._full(metrics)
            else:
                self.by_family = self._patch(metrics, added, removed)
            self._keys = frozenset(keys)
        return self.by_family

    @staticmethod
    def _full(metrics: Mapping[str, float | None]) -> dict[str, list[tuple[str | None, str]]]:
        plan: dict[str, list[tuple[str | None, str]]] = {}
        for k in metrics:
            fam, label = split_key(k)
            entries = plan.get(fam)
            if entries is None:
                plan[fam] = [(label, k)]
            else:
                entries.append((label, k))
        return plan

    def _patch(self, metrics: Mapping[str, float | None], added: set[str] | frozenset[str],
               removed: set[str] | frozenset[str]) -> dict[str, list[tuple[str | None, str]]]:
        """The last plan with the families whose keys came or went gathered again, in the order
        the sample holds their keys (the other families keep theirs)."""
        touched: dict[str, list[str]] = {}
        for k in removed:
            touched.setdefault(split_key(k)[0], [])
        for k in added:
            touched.setdefault(split_key(k)[0], []).append(k)
        plan = dict(self.by_family)
        pos: dict[str, int] | None = None
        for fam, new in touched.items():
            ks = [k for _, k in plan.get(fam, ()) if k not in removed] + new
            if not ks:
                plan.pop(fam, None)
                continue
            if len(ks) > 1:
                if pos is None:
                    pos = {k: i for i, k in enumerate(metrics)}
                ks.sort(key=pos.__getitem__)
            plan[fam] = [(split_key(k)[1], k) for k in ks]
        return plan


class SampleIndex:
    """The sample's metrics grouped by family, shared by every playbook: a family's
    ``[(label, value)]`` is gathered when a trigger first reads it (through a :class:`KeyPlan`),
    so a sample costs what the playbooks read, not what the collectors report."""

    def __init__(self, sample: Sample | None, plan: KeyPlan | None = None) -> None:
        self.sample = sample
        self._metrics: Mapping[str, float | None] = sample.metrics if sample is not None else {}
        self._plan = (plan or KeyPlan()).update(self._metrics)
        self._families: dict[str, list[tuple[str | None, float | None]]] = {}

    def family(self, name: str) -> list[tuple[str | None, float | None]]:
        """``[(label, value)]`` of the family's keys in this sample (empty when it has none)."""
        got = self._families.get(name)
        if got is None:
            m = self._metrics
            got = self._families[name] = [(label, m[k]) for label, k in self._plan.get(name, ())]
        return got

    def has(self, name: str) -> bool:
        """Whether the sample has any key of family ``name``."""
        return name in self._plan

    @property
    def families(self) -> dict[str, list[tuple[str | None, float | None]]]:
        """Every family of the sample (all gathered: for tools, not the per-sample path)."""
        return {name: self.family(name) for name in self._plan}

    def lookup(
        self, pattern: KeyPattern, bindings: Mapping[str, str]
    ) -> list[tuple[str | None, float | None]]:
        entries = self.family(pattern.family)
        lp = pattern.label
        if lp.var is not None:
            if lp.var in bindings:
                return [(lab, v) for lab, v in entries if lab == bindings[lp.var]]
            return [(lab, v) for lab, v in entries if lab is not None]
        return [(lab, v) for lab, v in entries if lab == lp.literal]


def cleanable_mounts(mounts: Iterable[str], clean_roots: Iterable[str]) -> frozenset[str]:
    """The mounts that hold one of ``clean_roots``: for each root, the deepest mount it lies on."""
    mounts = sorted(set(mounts), key=len, reverse=True)
    out: set[str] = set()
    for root in clean_roots:
        for mount in mounts:
            if root == mount or root.startswith(mount.rstrip("/") + "/"):
                out.add(mount)
                break
    return frozenset(out)


def _event_key(e: Event) -> tuple[Any, ...]:
    return (e.kind, e.source, e.wall, e.value, tuple(sorted(e.labels.items())), e.message)


class EventLog:
    """Recent events by kind, deduplicated, bounded in count and age."""

    def __init__(self, max_age_s: float = 3600.0, max_per_kind: int = 10_000) -> None:
        self.max_age_s = max_age_s
        self._by_kind: dict[str, collections.deque[Event]] = {}
        self._seen: dict[tuple[Any, ...], None] = {}
        self._max = max_per_kind

    def add(self, events: Iterable[Event], now_wall: float) -> None:
        for e in events:
            k = _event_key(e)
            if k in self._seen:
                continue
            self._seen[k] = None
            dq = self._by_kind.setdefault(e.kind, collections.deque(maxlen=self._max))
            dq.append(e)
        horizon = now_wall - self.max_age_s
        for dq in self._by_kind.values():
            while dq and dq[0].wall < horizon:
                dq.popleft()
        if len(self._seen) > 4 * self._max:
            keep = {_event_key(e) for dq in self._by_kind.values() for e in dq}
            self._seen = {k: None for k in self._seen if k in keep}

    def has(self, kind: str) -> bool:
        """Whether the log holds any event of ``kind`` (of the last ``max_age_s``)."""
        return bool(self._by_kind.get(kind))

    def query(self, kind: str, since_wall: float) -> list[Event]:
        dq = self._by_kind.get(kind)
        if not dq:
            return []
        return [e for e in dq if e.wall > since_wall]


def _norm(value: float | None) -> str:
    if value is None:
        return ""
    return str(int(value)) if float(value).is_integer() else str(value)


@dataclass
class _MState:
    since: float | None = None
    active: bool = False


@dataclass
class EvalContext:
    index: SampleIndex
    risk: Risk | None
    events: EventLog
    now_wall: float
    now_mono: float
    watermark: float = 0.0  # events at or before this wall time are ignored
    stateless: bool = False  # verify.expect: no for/hysteresis, no state change
    bindings: Mapping[str, str] = field(default_factory=dict)
    # Verification of a run: does the problem still hold *now*? Stateless (no timers: a restart
    # must not change the verdict), a metric counts as cleared only past its hysteresis line
    # (clear_below/clear_above), and a value that cannot be read is not evidence that it cleared.
    verify: bool = False
    # Mounts that hold one of [playbooks] clean_roots (for ``mounts: cleanable|uncleanable``).
    cleanable_mounts: frozenset[str] = frozenset()
    # Per target: events at or before the wall time this returns for a match's bindings were
    # handled by a run of that target (one GPU's run does not hide another GPU's XIDs).
    watermark_of: Callable[[Mapping[str, str]], float] | None = None


@dataclass(frozen=True, slots=True)
class Reads:
    """What a condition tree of metric, forecast and event conditions reads."""

    metrics: frozenset[str]  # metric families
    forecasts: frozenset[str]  # forecast resource families
    events: frozenset[str]  # event kinds


def reads(c: Condition) -> Reads | None:
    """The families and event kinds a trigger reads; None when it reads anything else too (the
    risk, failure probabilities, demand forecasts: their state or inputs are not per family)."""
    if isinstance(c, MetricCond):
        return Reads(frozenset({c.key.family}), frozenset(), frozenset())
    if isinstance(c, ForecastCond):
        return Reads(frozenset(), frozenset({c.key.family}), frozenset())
    if isinstance(c, EventCond):
        return Reads(frozenset(), frozenset(), frozenset({c.kind}))
    if isinstance(c, AllCond | AnyCond):
        parts = [reads(item) for item in c.items]
        if any(p is None for p in parts):
            return None
        got = [p for p in parts if p is not None]
        return Reads(frozenset().union(*(p.metrics for p in got)),
                     frozenset().union(*(p.forecasts for p in got)),
                     frozenset().union(*(p.events for p in got)))
    return None


def _leaves(c: Condition) -> list[Condition]:
    if isinstance(c, AllCond | AnyCond):
        return [leaf for item in c.items for leaf in _leaves(item)]
    return [c]


class TriggerEvaluator:
    """Stateful evaluation of one condition tree."""

    def __init__(self, condition: Condition) -> None:
        self.condition = condition
        self._metric: dict[tuple[int, str | None], _MState] = {}
        self._risk_since: dict[int, float | None] = {}
        self.reads = reads(condition)
        leaves = _leaves(condition) if self.reads is not None else []
        # what quiet() compares, flat
        self._metric_leaves = tuple((c.key.family, _OPS[c.op], c.value) for c in leaves
                                    if isinstance(c, MetricCond))
        self._forecast_leaves = tuple((c.key.family, c.eta_below_s, c.min_confidence) for c in leaves
                                      if isinstance(c, ForecastCond))
        self._event_kinds = tuple(self.reads.events) if self.reads is not None else ()

    def evaluate(self, ctx: EvalContext) -> list[Match]:
        return self._eval(self.condition, ctx)

    def quiet(self, index: SampleIndex, forecasts: Mapping[str, list[Forecast]], events: EventLog) -> bool:
        """Whether evaluating now is sure to give no match and change nothing, so it may be
        skipped: the trigger reads only metrics, forecasts and events (``forecasts``: this
        sample's, by resource family); no event of its kinds is in the log; no forecast of its
        resources is due within its line at its confidence; no metric it reads holds its
        condition in this sample (no value of the leaf's family, whatever its label, compares
        true against the threshold); and it holds no timer and nothing active. Each check reads a
        superset of what the leaf reads (every label, every mount), so a doubt means a full
        evaluation. A metric's state that is neither timing nor active is what a first evaluation
        would create, so it is dropped here (the state a full evaluation of this sample would
        leave). The usual case on a healthy node: most triggers' lines are far from every value,
        and the check costs a comparison per value read, where a full evaluation builds each
        label's state and matches."""
        if self.reads is None:
            return False
        for st in self._metric.values():
            if st.active or st.since is not None:
                return False
        for kind in self._event_kinds:
            if events.has(kind):
                return False
        for family, below, confidence in self._forecast_leaves:
            for f in forecasts.get(family, ()):
                if f.eta_s is not None and f.eta_s <= below and f.confidence >= confidence:
                    return False
        for family, cmp, line in self._metric_leaves:
            for _label, v in index.family(family):
                if v is not None and cmp(v, line):
                    return False
        self._metric.clear()
        return True

    def _eval(self, c: Condition, ctx: EvalContext) -> list[Match]:
        if isinstance(c, MetricCond):
            return self._eval_metric(c, ctx)
        if isinstance(c, ForecastCond):
            return _eval_forecast(c, ctx)
        if isinstance(c, DemandCond):
            return _eval_demand(c, ctx)
        if isinstance(c, RiskCond):
            return self._eval_risk(c, ctx)
        if isinstance(c, FailureCond):
            return _eval_failure(c, ctx)
        if isinstance(c, EventCond):
            return _eval_event(c, ctx)
        parts = [self._eval(item, ctx) for item in c.items]  # always evaluate all (timers)
        if isinstance(c, AnyCond):
            return [m for ms in parts for m in ms][:MAX_MATCHES]
        acc = [Match(dict(ctx.bindings), {}, 0.0)]
        for ms in parts:
            acc = [
                Match({**a.bindings, **b.bindings}, {**a.inputs, **b.inputs}, a.severity + b.severity)
                for a in acc
                for b in ms
                if consistent(a.bindings, b.bindings)
            ][:MAX_MATCHES]
            if not acc:
                break
        return acc

    def _eval_metric(self, c: MetricCond, ctx: EvalContext) -> list[Match]:
        cmp = _OPS[c.op]
        out: list[Match] = []
        seen: set[str | None] = set()
        var = c.key.label.var
        for label, value in ctx.index.lookup(c.key, ctx.bindings):
            if c.mounts is not None and (label in ctx.cleanable_mounts) != (c.mounts == "cleanable"):
                continue
            seen.add(label)
            if ctx.verify:
                if _still_holds(c, value):
                    out.append(_metric_match(c, label, value) if value is not None
                               else Match({var: label} if var and label is not None else {}, {}, 0.0))
                continue
            if ctx.stateless:
                if value is not None and cmp(value, c.value):
                    out.append(_metric_match(c, label, value))
                continue
            st = self._metric.get((c.cid, label))
            if st is None:
                st = self._metric[(c.cid, label)] = _MState()
            if value is None:
                if st.active:
                    out.append(Match({var: label} if var and label is not None else {}, {}, 0.0))
                continue
            raw = cmp(value, c.value)
            if st.active:
                if c.clear_below is not None:
                    st.active = value >= c.clear_below
                elif c.clear_above is not None:
                    st.active = value <= c.clear_above
                else:
                    st.active = raw
                if not st.active:
                    st.since = None
            if not st.active:
                if raw:
                    st.since = ctx.now_mono if st.since is None else st.since
                    st.active = ctx.now_mono - st.since >= c.for_s
                else:
                    st.since = None
            if st.active:
                out.append(_metric_match(c, label, value))
        if not (ctx.stateless or ctx.verify) and not ctx.bindings and len(self._metric) > len(seen):
            for k in [k for k in self._metric if k[0] == c.cid and k[1] not in seen]:
                del self._metric[k]
        return out

    def _eval_risk(self, c: RiskCond, ctx: EvalContext) -> list[Match]:
        r = ctx.risk
        if c.risk == "alert":
            ok, score = (r is not None and r.alert), (r.anomaly or 0.0) if r is not None else 0.0
        else:
            score = r.anomaly if r is not None and r.anomaly is not None else 0.0
            ok = r is not None and r.anomaly is not None and r.anomaly >= c.above
        if ctx.stateless or ctx.verify:
            return [Match({}, {f"risk.{c.risk}": score}, score)] if ok else []
        if not ok:
            self._risk_since[c.cid] = None
            return []
        since = self._risk_since.get(c.cid)
        if since is None:
            since = self._risk_since[c.cid] = ctx.now_mono
        if ctx.now_mono - since < c.for_s:
            return []
        return [Match({}, {f"risk.{c.risk}": score, "model_version": r.model_version if r else ""}, score)]


def _still_holds(c: MetricCond, value: float | None) -> bool:
    """Verification: the problem is over only once the value is past the hysteresis line."""
    if value is None:
        return True  # unreadable: no evidence that it cleared
    if c.clear_below is not None:
        return value >= c.clear_below
    if c.clear_above is not None:
        return value <= c.clear_above
    return _OPS[c.op](value, c.value)


def _metric_match(c: MetricCond, label: str | None, value: float) -> Match:
    var = c.key.label.var
    bindings = {var: label} if var and label is not None else {}
    key = c.key.family if label is None else f"{c.key.family}[{label}]"
    sev = value - c.value if c.op in (">", ">=") else c.value - value if c.op in ("<", "<=") else 1.0
    return Match(bindings, {key: value}, sev)


def _eval_failure(c: FailureCond, ctx: EvalContext) -> list[Match]:
    if ctx.risk is None:
        return []
    var = c.key.label.var if c.key is not None else None
    if c.key is None or var is None:
        p = ctx.risk.failure.get(c.failure)
        if p is None or p < c.above:
            return []
        return [Match({}, {f"failure[{c.failure}]": p}, p - c.above)]
    out: list[Match] = []
    # gpu.failure[<pci>] also binds the GPU's index as {gpu}, for the GPU actions and guards
    index = {g.pci or g.gpu: g.gpu for g in ctx.risk.gpu} if c.key.family == GPU_FAILURE else {}
    for k, p in ctx.risk.failure.items():  # gpu.failure[{pci}]: one match per GPU at risk
        fam, label = split_key(k)
        if fam != c.key.family or label is None or p < c.above:
            continue
        bindings = {var: label}
        if label in index and var != "gpu":
            bindings["gpu"] = index[label]
        if any(ctx.bindings.get(v, x) != x for v, x in bindings.items()):
            continue
        out.append(Match(bindings, {f"failure[{k}]": p}, p - c.above))
    return out[:MAX_MATCHES]


def _eval_forecast(c: ForecastCond, ctx: EvalContext) -> list[Match]:
    if ctx.risk is None:
        return []
    out: list[Match] = []
    lp = c.key.label
    for f in ctx.risk.forecasts:
        fam, label = split_key(f.resource)
        if fam != c.key.family or f.eta_s is None or f.confidence < c.min_confidence:
            continue
        if c.mounts is not None and (label in ctx.cleanable_mounts) != (c.mounts == "cleanable"):
            continue
        if lp.var is not None:
            if label is None or (lp.var in ctx.bindings and ctx.bindings[lp.var] != label):
                continue
        elif label != lp.literal:
            continue
        if f.eta_s <= c.eta_below_s:
            bindings = {lp.var: label} if lp.var and label is not None else {}
            inputs = {
                f"forecast[{f.resource}].eta_s": f.eta_s,
                f"forecast[{f.resource}].confidence": f.confidence,
            }
            out.append(Match(bindings, inputs, c.eta_below_s - f.eta_s))
    return out


def _eval_demand(c: DemandCond, ctx: EvalContext) -> list[Match]:
    """The demand forecast's highest ``bound`` within ``within_s`` is at least ``above``."""
    if ctx.risk is None:
        return []
    out: list[Match] = []
    lp = c.key.label
    for f in ctx.risk.demand:
        fam, label = split_key(f.resource)
        if fam != c.key.family:
            continue
        if lp.var is not None:
            if label is None or (lp.var in ctx.bindings and ctx.bindings[lp.var] != label):
                continue
        elif label != lp.literal:
            continue
        peak = f.peak(c.within_s, c.bound)
        if peak is None or not peak[0] >= c.above:
            continue
        bindings = {lp.var: label} if lp.var and label is not None else {}
        inputs = {f"demand[{f.resource}].{c.bound}": peak[0], f"demand[{f.resource}].in_s": peak[1]}
        out.append(Match(bindings, inputs, peak[0] - c.above))
    return out


def _eval_event(c: EventCond, ctx: EvalContext) -> list[Match]:
    since = max(ctx.now_wall - c.within_s, ctx.watermark)
    groups: dict[tuple[tuple[str, str], ...], list[Event]] = {}
    for e in ctx.events.query(c.kind, since):
        v = _norm(e.value)
        if v in c.ignore_values or (c.values is not None and v not in c.values):
            continue
        bound: list[tuple[str, str]] = []
        ok = True
        for lk, lp in c.labels:
            actual = e.labels.get(lk)
            if actual is None:
                ok = False
                break
            if lp.var is None:
                ok = actual == lp.literal
            else:
                ok = ctx.bindings.get(lp.var, actual) == actual
                bound.append((lp.var, actual))
            if not ok:
                break
        if ok:
            groups.setdefault(tuple(bound), []).append(e)
    out: list[Match] = []
    for bound_t, found in groups.items():
        evs = found
        if ctx.watermark_of is not None:
            handled = ctx.watermark_of(dict(bound_t))
            evs = [e for e in found if e.wall > handled]
        if len(evs) >= c.count:
            values = sorted({_norm(e.value) for e in evs})
            inputs = {f"event[{c.kind}].count": len(evs), f"event[{c.kind}].values": values}
            out.append(Match(dict(bound_t), inputs, float(len(evs))))
    return out


def holds_for(matches: list[Match], bindings: Mapping[str, str]) -> bool:
    """Whether any match is consistent with a run's bindings (the trigger still holds for it)."""
    return any(consistent(bindings, m.bindings) for m in matches)


def worst(matches: list[Match]) -> Match:
    return max(matches, key=lambda m: m.severity)
