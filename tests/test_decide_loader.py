"""Loader and unit parsers: property tests (never a traceback, always a located problem)."""

from __future__ import annotations

import json

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.decide.loader import parse_playbook
from agent.decide.schema import schema
from agent.decide.units import format_duration, parse_duration, parse_size

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-5, 10**6),
    st.floats(allow_nan=False, width=32),
    st.text(max_size=12),
)
keys = st.sampled_from(
    [
        "name",
        "description",
        "mode",
        "trigger",
        "steps",
        "verify",
        "guards",
        "escalate",
        "metric",
        "op",
        "value",
        "for",
        "action",
        "params",
        "event",
        "all",
        "any",
        "unit",
        "target",
        "top",
        "timeout",
        "clear_below",
        "values",
        "bogus",
    ]
)
docs = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(keys, inner, max_size=6)),
    max_leaves=25,
)


@settings(max_examples=300, deadline=None)
@given(docs)
def test_any_document_gives_a_playbook_or_located_problems(doc: object) -> None:
    text = yaml.safe_dump(doc)
    pb, problems = parse_playbook(text, "fuzz.yaml")
    assert (pb is None) == bool(problems)
    for p in problems:
        assert p.file == "fuzz.yaml"
        assert str(p).startswith("fuzz.yaml")


@given(st.text(max_size=200))
def test_arbitrary_text_never_raises(text: str) -> None:
    pb, problems = parse_playbook(text, "t.yaml")
    assert pb is not None or problems


@given(st.integers(0, 10**7))
def test_duration_roundtrip(seconds: int) -> None:
    assert parse_duration(format_duration(float(seconds))) == seconds


def test_duration_grammar_includes_the_fleet_clis() -> None:
    """`heald fleet silence DURATION` parses with this one grammar (then requires > 0 itself)."""
    for text, seconds in [("90s", 90), ("15m", 900), ("2h", 7200), ("1d", 86400), ("1.5h", 5400),
                          ("90", 90), ("2.5", 2.5), (" 30 s ", 30), ("250ms", 0.25), ("0", 0)]:
        assert parse_duration(text) == seconds, text
    for bad in ["", "s", "-5", "-5s", "5 x", "1e3", "90sec", "15M"]:
        with pytest.raises(ValueError, match="not a duration"):
            parse_duration(bad)


@given(st.integers(0, 2**40))
def test_size_plain_and_suffixed(n: int) -> None:
    assert parse_size(n) == n
    assert parse_size(str(n)) == n
    assert parse_size(f"{n}K") == n * 1024


def test_schema_is_valid_2020_12_and_lists_every_action() -> None:
    import jsonschema  # noqa: PLC0415

    s = schema()
    jsonschema.Draft202012Validator.check_schema(s)
    assert s["$schema"].endswith("2020-12/schema")
    actions = {k.removeprefix("params_") for k in s["$defs"] if k.startswith("params_")}
    assert {"restart_unit", "clean_paths", "gpu_reset", "restart_process", "cordon"} <= actions
    json.dumps(s)
