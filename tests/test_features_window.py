"""FeatureWindow: incremental window features equal a brute-force recomputation."""

from __future__ import annotations

import math

import msgspec
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.collect.sample import Sample
from agent.errors import ModelError
from agent.features.schema import (
    DEFAULT_INPUTS,
    TRANSFORMS,
    FeatureSchema,
    InputSpec,
    decode_schema,
    default_schema,
)
from agent.features.window import FeatureWindow


def brute(times: list[float], values: list[float | None], w: int) -> tuple[float, float]:
    """(std, slope) over the last w samples, missing values skipped."""
    t = np.array(times[-w:])
    x = np.array([np.nan if v is None else v for v in values[-w:]], dtype=float)
    ok = np.isfinite(x)
    if ok.sum() < 2:
        return math.nan, math.nan
    sd = float(x[ok].std(ddof=1))
    tt = t[ok] - t[ok].mean()
    den = float((tt * tt).sum())
    slope = float((tt * (x[ok] - x[ok].mean())).sum() / den) if den > 1e-12 else math.nan
    return sd, slope


def despiked(values: list[float | None], k: int) -> list[float | None]:
    """The schema's despike, by brute force: the median of the last k values when all are finite."""
    out: list[float | None] = []
    for i, v in enumerate(values):
        last = values[max(0, i - k + 1): i + 1]
        ok = k > 1 and len(last) == k and all(x is not None and math.isfinite(x) for x in last)
        out.append(float(np.median(np.array(last, dtype=float))) + 0.0 if ok else v)
    return out


def schema_a(window: int = 10) -> FeatureSchema:
    return FeatureSchema(inputs=(InputSpec(key="a"), InputSpec(key="big", scale=1e-9, unit="GB"),
                                 InputSpec(key="d.used[*]", agg="max"),
                                 InputSpec(key="d.used[*]", agg="sum")),
                         window=window, despike=1)  # exact values in, exact values out


def test_names_units_and_order() -> None:
    s = schema_a()
    assert s.names[:6] == tuple(f"a:{t}" for t in TRANSFORMS)
    assert "max(d.used[*]):slope" in s.names
    assert s.units[s.names.index("big:slope")] == "GB/s"
    assert s.units[s.names.index("big:value")] == "GB"
    assert s.dim == 4 * len(TRANSFORMS)
    fw = FeatureWindow(s)
    assert fw.push_metrics({"a": 1.0}, 0.0).shape == (s.dim,)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.one_of(st.none(), st.floats(-1e6, 1e6)), min_size=1, max_size=80),
       st.integers(3, 12), st.floats(0.5, 2.0), st.sampled_from([1, 3, 5]))
def test_incremental_equals_brute_force(values: list[float | None], w: int, dt: float, k: int) -> None:
    fw = FeatureWindow(FeatureSchema(inputs=(InputSpec(key="a"),), window=w, despike=k))
    times: list[float] = []
    raw: list[float | None] = []
    for i, r in enumerate(values):
        t = 1000.0 + i * dt
        f = fw.push_metrics({"a": r}, t)
        times.append(t)
        raw.append(r)
        seen = despiked(raw, k)
        v = seen[-1]
        sd, slope = brute(times, seen, w)
        got = dict(zip(fw.names, f.tolist(), strict=True))
        # Running sums are exact up to rounding relative to the largest magnitude seen since the
        # last rebase (at most two windows back).
        scale = max(1.0, max((abs(x) for x in seen[-2 * w:] if x is not None), default=1.0))
        assert got["a:std"] == pytest.approx(sd, abs=1e-6 * scale, nan_ok=True)
        assert got["a:slope"] == pytest.approx(slope, abs=1e-6 * scale, nan_ok=True)
        assert (v is None and math.isnan(got["a:value"])) or got["a:value"] == v


def test_large_values_keep_precision_over_many_windows() -> None:
    fw = FeatureWindow(FeatureSchema(inputs=(InputSpec(key="b"),), window=20))
    rng = np.random.default_rng(0)
    for i in range(5000):
        f = fw.push_metrics({"b": 2e12 + 1e6 * i + float(rng.normal(0, 1e3))}, float(i))
    got = dict(zip(fw.names, f.tolist(), strict=True))
    assert got["b:slope"] == pytest.approx(1e6, rel=1e-3)
    assert got["b:rate"] == pytest.approx(1e6, rel=0.01)
    assert 0 < got["b:std"] < 1e7


def test_despike_removes_a_blip_and_passes_a_step_one_sample_late() -> None:
    fw = FeatureWindow(FeatureSchema(inputs=(InputSpec(key="a"),), window=10))
    assert fw.schema.despike == 3  # the default
    got = []
    for i, r in enumerate([0.0, 0.0, 0.0, 332.0, 0.0, 0.0, 0.0, 5.0, 5.0, 5.0, 5.0]):
        f = dict(zip(fw.names, fw.push_metrics({"a": r}, float(i)).tolist(), strict=True))
        got.append(f["a:value"])
        if i == 5:  # the blip left no trace in the window's spread
            assert f["a:std"] == 0.0
            assert f["a:ewma"] == 0.0
    assert got == [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 5.0, 5.0, 5.0]
    # the first samples after a reset, or after a missing value, pass as they are
    fw.reset()
    assert fw.push_metrics({"a": 7.0}, 20.0)[0] == 7.0
    fw.push_metrics({"a": None}, 21.0)
    fw.push_metrics({"a": 1.0}, 22.0)
    assert fw.push_metrics({"a": 9.0}, 23.0)[0] == 9.0


def test_despike_must_be_odd() -> None:
    with pytest.raises(ModelError, match="despike must be odd"):
        FeatureWindow(FeatureSchema(inputs=(InputSpec(key="a"),), despike=2))


def test_delta_rate_ewma_and_missing() -> None:
    fw = FeatureWindow(FeatureSchema(inputs=(InputSpec(key="a"),), window=5, ewma_alpha=0.5, despike=1))
    fw.push_metrics({"a": 10.0}, 0.0)
    f = dict(zip(fw.names, fw.push_metrics({"a": 14.0}, 2.0).tolist(), strict=True))
    assert f["a:delta"] == 4.0
    assert f["a:rate"] == 2.0
    assert f["a:ewma"] == 12.0
    f = dict(zip(fw.names, fw.push_metrics({"a": None}, 3.0).tolist(), strict=True))
    assert math.isnan(f["a:value"])
    assert math.isnan(f["a:delta"])
    assert f["a:ewma"] == 12.0  # kept while missing
    f = dict(zip(fw.names, fw.push_metrics({}, 4.0).tolist(), strict=True))  # absent key
    assert math.isnan(f["a:value"])


def test_wildcard_reductions_and_new_labels() -> None:
    fw = FeatureWindow(schema_a())
    fw.push_metrics({"d.used[/]": 10.0, "d.used[/var]": 30.0}, 0.0)
    f = dict(zip(fw.names, fw.push_metrics({"d.used[/]": 12.0, "d.used[/var]": 31.0}, 1.0).tolist(),
                 strict=True))
    assert f["max(d.used[*]):value"] == 31.0
    assert f["sum(d.used[*]):value"] == 43.0
    # a mount appearing later joins the reduction
    f = dict(zip(fw.names, fw.push_metrics({"d.used[/]": 12.0, "d.used[/var]": 31.0, "d.used[/new]": 90.0},
                                           2.0).tolist(), strict=True))
    assert f["max(d.used[*]):value"] == 90.0
    assert "d.used[/new]" in fw.columns
    # all labels missing -> NaN, not 0
    f = dict(zip(fw.names, fw.push_metrics({"d.used[/]": None}, 3.0).tolist(), strict=True))
    assert math.isnan(f["sum(d.used[*]):value"])
    assert math.isnan(f["max(d.used[*]):value"])


def test_push_sample_and_non_increasing_time() -> None:
    fw = FeatureWindow(schema_a())
    s = Sample(node="n", seq=1, wall=1.0, mono=5.0, metrics={"a": 1.0})
    fw.push(s)
    f = fw.push(Sample(node="n", seq=2, wall=1.0, mono=5.0, metrics={"a": 2.0}))  # same mono
    assert np.isfinite(f[fw.names.index("a:rate")])
    assert fw.samples_seen == 2


def test_schema_roundtrip_digest_and_allow_list() -> None:
    s = FeatureSchema()
    assert decode_schema(s.to_json()) == s
    assert s.digest == decode_schema(s.to_json()).digest
    assert s.digest != schema_a().digest
    cpu_only = default_schema(["cpu.util_pct", "disk.*"])
    fams = {i.family for i in cpu_only.inputs}
    assert "cpu.util_pct" in fams
    assert "disk.used_pct" in fams
    assert "mem.used_pct" not in fams
    assert len(DEFAULT_INPUTS) == len(s.inputs)


def test_resolve_each_fixes_labels() -> None:
    s = FeatureSchema(inputs=(InputSpec(key="disk.used_pct[*]", agg="each", unit="%"), InputSpec(key="a")))
    assert any("must be resolved" in p.message for p in s.problems())
    with pytest.raises(ModelError):
        FeatureWindow(s)
    r = s.resolve(["disk.used_pct[/]", "disk.used_pct[/var]", "mem.used_pct"])
    assert [i.key for i in r.inputs] == ["disk.used_pct[/]", "disk.used_pct[/var]", "a"]
    assert r.problems() == []


def test_bad_schema_is_refused() -> None:
    s = FeatureSchema(inputs=(InputSpec(key="a"), InputSpec(key="a")), transforms=("value", "median"))
    msgs = " ".join(p.message for p in s.problems())
    assert "duplicate" in msgs
    assert "unknown transforms" in msgs
    with pytest.raises(msgspec.ValidationError):
        msgspec.json.decode(b'{"window": 1}', type=FeatureSchema)


# --------------------------------------------------------------------------- keys that come and go

_CHURN_KEYS = ("a", "big", "d.used[/]", "d.used[/var]", "d.used[/new]", "other", "proc.x[1]", "proc.x[2]")
_CHURN_VALUES = st.one_of(st.none(), st.sampled_from([0.0, 1.5, -2.0, 1e12]), st.just(math.nan),
                          st.just(math.inf))


def _brute_values(metrics: dict[str, float | None]) -> dict[str, float]:
    """schema_a's inputs gathered from scratch: exact keys scaled, wildcards reduced over the labels
    present (NaN-aware max; a sum of the finite ones, NaN when none is)."""
    def num(k: str) -> float:
        v = metrics.get(k)
        return math.nan if v is None else float(v)

    labels = [num(k) for k in metrics if k.startswith("d.used[")]
    finite = [v for v in labels if math.isfinite(v)]
    big = num("big") * 1e-9
    real = [v for v in labels if not math.isnan(v)]
    return {"a:value": num("a"), "big:value": big,
            "max(d.used[*]):value": max(real) if real else math.nan,
            "sum(d.used[*]):value": math.fsum(finite) if finite else math.nan}


@settings(max_examples=200, deadline=None)
@given(st.lists(st.dictionaries(st.sampled_from(_CHURN_KEYS), _CHURN_VALUES, max_size=len(_CHURN_KEYS)),
                min_size=1, max_size=40), st.booleans())
def test_the_gather_follows_keys_that_come_and_go(
        stream: list[dict[str, float | None]], native: bool) -> None:
    """Keys arrive, leave and come back (relevant ones, wildcard labels, keys no input reads), values
    turn None, NaN and inf: each sample whose key count changed (or whose keys did not change)
    gathers what a from-scratch gather of that sample would."""
    try:
        fw = FeatureWindow(schema_a(window=10), native=native or False)
    except ModelError:
        pytest.skip("no native kernels here")
    prev: dict[str, float | None] | None = None
    for i, metrics in enumerate(stream):
        got = dict(zip(fw.names, fw.push_metrics(dict(metrics), float(i)).tolist(), strict=True))
        if prev is not None and len(prev) == len(metrics) and prev.keys() != metrics.keys():
            prev = metrics
            continue  # the same count, other keys: seen at a rescan or when a planned key is missing
        prev = metrics
        for name, want in _brute_values(metrics).items():
            assert got[name] == pytest.approx(want, nan_ok=True, rel=1e-12), (i, name, metrics)
