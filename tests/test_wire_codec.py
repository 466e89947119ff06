"""Wire protocol: round trips for every message kind, typed rejection of bad input, topics, isolation."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import msgpack
import msgspec
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from agent import wire
from agent.errors import HealdError, WireError

REPO = Path(__file__).resolve().parents[1]

ids = st.from_regex(r"\A[A-Za-z0-9][A-Za-z0-9_.-]{0,20}\Z")
targets = ids | st.just("*")
floats = st.floats(allow_nan=False, allow_infinity=False)  # every float on the wire is finite
walls = st.floats(0.0, wire.MAX_WALL)  # timestamps: 0 .. 1e11
texts = st.text(max_size=40)
names = st.text(min_size=1, max_size=40)
probs = st.floats(0.0, 1.0)
seqs = st.integers(0, 2**63 - 1)
scalars = st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | floats | texts
args = st.dictionaries(texts, scalars | st.lists(scalars, max_size=4), max_size=5)
labels = st.dictionaries(texts, texts, max_size=4)


def env(**extra: st.SearchStrategy[object]) -> dict[str, st.SearchStrategy[object]]:
    base: dict[str, st.SearchStrategy[object]] = {
        "v": st.just(wire.PROTOCOL_VERSION), "node": ids, "site": ids, "seq": seqs, "ts": walls,
        "mono": st.none() | floats,
    }
    return base | extra


MESSAGES: dict[type[wire.Envelope], st.SearchStrategy[wire.Envelope]] = {
    wire.Birth: st.builds(wire.Birth, **env(
        bdseq=st.integers(0, 2**40), agent_version=texts, model_version=texts, labels=labels,
        collectors=st.lists(texts, max_size=5), capabilities=st.lists(texts, max_size=5), hostname=texts,
        boot_ts=st.none() | walls)),
    wire.Status: st.builds(wire.Status, **env(
        state=st.sampled_from(["online", "offline"]), bdseq=st.integers(0, 2**40), reason=texts,
        spool_pending=st.integers(0, 2**40), dropped_metrics=st.integers(0, 2**40))),
    wire.Metrics: st.builds(wire.Metrics, **env(samples=st.lists(st.builds(
        wire.MetricSample, seq=seqs, wall=walls, mono=floats,
        metrics=st.dictionaries(texts, st.none() | floats, max_size=8)), max_size=5))),
    wire.Risk: st.builds(wire.Risk, **env(
        sample_seq=seqs, anomaly=st.none() | floats, alert=st.booleans(), cold=st.booleans(),
        model_version=texts, explanation=st.lists(st.builds(wire.Contribution, texts, probs), max_size=4),
        failure=st.dictionaries(texts, probs, max_size=4),
        forecasts=st.lists(st.builds(wire.Forecast, resource=texts, eta_s=st.none() | floats,
                                     confidence=probs, rate_per_s=floats), max_size=3))),
    wire.Event: st.builds(wire.Event, **env(
        name=names, source=texts, wall=walls, labels=labels, value=st.none() | floats, message=texts)),
    wire.Action: st.builds(wire.Action, **env(
        phase=st.sampled_from(["started", "finished"]), run_id=names, playbook=names, step=texts,
        action=texts, dry_run=st.booleans(),
        outcome=st.none() | st.sampled_from(["ok", "failed", "skipped", "timeout", "refused"]),
        result=args, error=texts, duration_s=st.none() | floats)),
    wire.Command: st.builds(wire.Command, **env(
        node=targets, site=targets, id=names, issuer=texts, issued_at=walls, expires_at=walls,
        nonce=st.binary(max_size=64), name=names, args=args, signature=st.binary(max_size=128))),
    wire.CommandAck: st.builds(wire.CommandAck, **env(
        command_id=names, status=st.sampled_from(["accepted", "rejected", "done", "failed", "expired"]),
        message=texts, result=args)),
    wire.Cost: st.builds(wire.Cost, **env(
        start=walls, end=walls, node_class=st.text(max_size=64), currency=st.text(max_size=16),
        **{f: st.floats(0.0, 1e12) for f in ("money", "seconds", "core_h", "idle_core_h",
                                            "cores_under_line_h", "gpu_h", "idle_gpu_h",
                                            "gpu_mem_idle_gib_h", "mem_stranded_gib_h", "energy_kwh")})),
}
any_message = st.one_of(*MESSAGES.values())


def test_every_kind_has_a_strategy() -> None:
    assert set(MESSAGES) == set(wire.MESSAGE_TYPES)
    assert set(wire.KINDS) == set(wire.DELIVERY) == set(wire.SUFFIX)


@pytest.mark.parametrize("cls", list(MESSAGES), ids=lambda c: c.__name__)
@settings(max_examples=100)
@given(data=st.data())
def test_round_trip(cls: type[wire.Envelope], data: st.DataObject) -> None:
    msg = data.draw(MESSAGES[cls])
    raw = wire.encode(msg)
    assert wire.decode(raw) == msg
    assert wire.decode_json(wire.encode_json(msg)) == msg
    assert msgpack.unpackb(raw)["kind"] == wire.kind_of(cls)  # plain msgpack readers see the tag


def valid_payloads() -> st.SearchStrategy[bytes]:
    return any_message.map(wire.encode)


def assert_only_wire_errors(data: bytes) -> None:
    try:
        msg = wire.decode(data)
    except WireError:
        return
    assert isinstance(msg, wire.MESSAGE_TYPES)


@settings(max_examples=1000)
@given(st.binary(max_size=512))
@example(b"")
@example(b"\xc1")
@example(b"\x91" * 50_000 + b"\xc0")  # deep nesting
@example(b"\x81\xa1v" + b"\x91" * 50_000 + b"\x01")  # deep nesting where the version is diagnosed
@example(b"\xdf\xff\xff\xff\xff")  # a map claiming 4 billion entries
def test_fuzz_random_bytes(data: bytes) -> None:
    assert_only_wire_errors(data)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(valid_payloads(), st.data())
def test_fuzz_truncated_and_mutated(raw: bytes, data: st.DataObject) -> None:
    for cut in range(len(raw)):
        with pytest.raises(WireError):
            wire.decode(raw[:cut])
    mutated = bytearray(raw)
    for _ in range(data.draw(st.integers(1, 8))):
        i = data.draw(st.integers(0, len(mutated) - 1))
        op = data.draw(st.sampled_from(["flip", "insert", "delete"]))
        if op == "flip":
            mutated[i] ^= data.draw(st.integers(1, 255))
        elif op == "insert":
            mutated.insert(i, data.draw(st.integers(0, 255)))
        elif len(mutated) > 1:
            del mutated[i]
    assert_only_wire_errors(bytes(mutated))


msgpack_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats() | st.text(max_size=10)
    | st.binary(max_size=10),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)


@settings(max_examples=250)
@given(st.dictionaries(st.sampled_from(["v", "kind", "node", "site", "seq", "ts", "samples", "state",
                                        "bdseq", "name", "nonce"]), msgpack_values),
       st.sampled_from([None, *wire.KINDS, "nope"]), st.sampled_from([None, 1, 2, "1", True]))
def test_fuzz_structured_maps(fields: dict[str, object], kind: str | None, v: object) -> None:
    if kind is not None:
        fields["kind"] = kind
    if v is not None:
        fields["v"] = v
    assert_only_wire_errors(msgpack.packb(fields))


def good_event(**override: object) -> dict[str, object]:
    doc: dict[str, object] = {"v": 1, "kind": "event", "node": "n1", "site": "s1", "seq": 7, "ts": 1.5,
                              "name": "gpu.xid", "source": "gpu", "wall": 1.0}
    doc.update(override)
    return doc


def test_size_is_checked_before_decoding() -> None:
    huge = b"\xff" * 2000  # garbage: decoding would fail differently
    with pytest.raises(wire.WireTooLarge) as err:
        wire.decode(huge, max_bytes=1000)
    assert err.value.size == 2000
    assert err.value.limit == 1000
    ok = msgpack.packb(good_event())
    assert isinstance(wire.decode(ok, max_bytes=len(ok)), wire.Event)
    with pytest.raises(wire.WireTooLarge):
        wire.decode(ok, max_bytes=len(ok) - 1)


@pytest.mark.parametrize(("doc", "error", "text"), [
    (good_event(v=2), wire.WireVersionError, "protocol version 2 is not supported"),
    (good_event(v=2, kind="future_kind"), wire.WireVersionError, "version 2"),
    ({k: v for k, v in good_event().items() if k != "v"}, wire.WireVersionError, "'v'"),
    (good_event(v="1"), wire.WireVersionError, "'v'"),
    (good_event(kind="future_kind"), wire.WireKindError, "unknown message kind 'future_kind'"),
    (good_event(seq=-1), wire.WireDecodeError, "$.seq"),
    (good_event(node="a/b"), wire.WireDecodeError, "$.node"),
    (good_event(node="+"), wire.WireDecodeError, "$.node"),
    (good_event(name=""), wire.WireDecodeError, "$.name"),
    ({k: v for k, v in good_event().items() if k != "ts"}, wire.WireDecodeError, "ts"),
    ([1, 2, 3], wire.WireDecodeError, "invalid message"),
])
def test_typed_errors(doc: object, error: type[WireError], text: str) -> None:
    with pytest.raises(error, match=None) as err:
        wire.decode(msgpack.packb(doc))
    assert text in str(err.value)
    assert isinstance(err.value, HealdError)


def test_unknown_fields_are_ignored_for_forward_compatibility() -> None:
    msg = wire.decode(msgpack.packb(good_event(added_in_1_1="x")))
    assert isinstance(msg, wire.Event)


def test_decode_command_rejects_other_kinds() -> None:
    with pytest.raises(wire.WireKindError, match="expected a command"):
        wire.decode_command(msgpack.packb(good_event()))


def test_decode_rejects_non_bytes() -> None:
    with pytest.raises(wire.WireDecodeError):
        wire.decode("text")  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------ topics
@given(ids, ids, st.sampled_from(sorted(wire.KINDS)))
def test_topic_round_trip(site: str, node: str, kind: str) -> None:
    topic = wire.topic_for(site, node, kind)
    assert wire.parse_topic(topic) == wire.Topic(site, node, kind)


def test_topic_layout() -> None:
    assert wire.topic_for("dc1", "gpu-07", "metrics") == "heald/v1/dc1/gpu-07/metrics"
    assert wire.topic_for("dc1", "gpu-07", "command") == "heald/v1/dc1/gpu-07/cmd"
    assert wire.topic_for("dc1", "*", "command") == "heald/v1/dc1/_all/cmd"
    assert wire.topic_for("*", "*", "command") == "heald/v1/_all/_all/cmd"
    assert wire.command_topics("dc1", "n1") == (
        "heald/v1/dc1/n1/cmd", "heald/v1/dc1/_all/cmd", "heald/v1/_all/_all/cmd")
    assert wire.parse_topic("heald/v1/_all/_all/cmd") == wire.Topic("_all", "_all", "command")


@pytest.mark.parametrize("topic", [
    "heald/v2/s/n/event", "heald/v1/s/n", "heald/v1/s/n/event/x", "heald/v1/s/n/bogus",
    "heald/v1/s/_all/event", "heald/v1/_all/n1/cmd", "heald/v1/s/+/event", "other/v1/s/n/event",
])
def test_parse_topic_rejects(topic: str) -> None:
    with pytest.raises(wire.WireTopicError):
        wire.parse_topic(topic)


@pytest.mark.parametrize(("site", "node", "kind"), [
    ("s", "*", "event"), ("*", "n1", "command"), ("s", "a/b", "event"), ("s", "n", "nope"),
])
def test_topic_for_rejects(site: str, node: str, kind: str) -> None:
    with pytest.raises(wire.WireTopicError):
        wire.topic_for(site, node, kind)


def test_command_matches() -> None:
    cmd = wire.Command(v=1, node="*", site="dc1", seq=1, ts=0.0, id="c1", issued_at=0.0, expires_at=1.0,
                       nonce=b"n", name="ping")
    assert wire.command_matches(cmd, "dc1", "n1")
    assert not wire.command_matches(cmd, "dc2", "n1")


def test_delivery_policy() -> None:
    assert wire.delivery_for("metrics") == wire.Delivery(qos=0, retain=False)
    assert wire.delivery_for("status") == wire.Delivery(qos=1, retain=True)
    for kind in ("event", "action", "risk", "command_ack"):
        assert wire.delivery_for(kind) == wire.Delivery(qos=1, retain=False)


def test_wire_imports_nothing_else_of_the_agent() -> None:
    """The coordinator imports agent.wire alone: it must not drag in any agent stage or heavy library."""
    code = ("import json, sys; import agent.wire; "
            "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('agent', 'structlog', 'aiomqtt', 'paho', 'numpy', 'psutil', 'msgpack', 'yaml', 'sklearn'))))")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                         check=True, timeout=60)
    loaded = set(json.loads(out.stdout))
    allowed = {"agent", "agent.errors"}
    stray = {m for m in loaded if m not in allowed and not m.startswith("agent.wire")}
    assert not stray, f"agent.wire pulled in {sorted(stray)}"
    assert "msgspec" in sys.modules  # the one third-party dependency (present in this process too)


def test_msgspec_errors_never_escape_decode_json() -> None:
    for bad in (b"", b"{", b'{"v": 1, "kind": "event"}', b'"x"', b"[" * 10000):
        with pytest.raises(WireError):
            wire.decode_json(bad)
    assert msgspec.json.decode(wire.encode_json(wire.decode(msgpack.packb(good_event()))))["kind"] == "event"


def test_docs_describe_every_field_and_kind() -> None:
    doc = (REPO / "docs" / "wire.md").read_text()
    for kind, cls in wire.KINDS.items():
        assert f"### `{kind}`" in doc, kind
        for f in msgspec.structs.fields(cls):
            assert f"`{f.name}`" in doc, f"{kind}.{f.name} undocumented"
    for suffix in wire.SUFFIX.values():
        assert f"`{suffix}`" in doc
