"""Engine records and events become wire messages that every receiver can decode."""

from __future__ import annotations

from agent import wire
from agent.report.build import playbook_event, playbook_record

RECORDS = [
    {"type": "run.start", "node": "n1", "playbook": "disk-nearly-full", "run_id": "r1", "trigger": "auto",
     "approved_by": None, "dry_run": False, "bindings": {"mount": "/"},
     "inputs": {"disk.used_pct[/]": 93.5}, "model": {"version": "abc", "anomaly": None}},
    {"type": "step", "node": "n1", "playbook": "disk-nearly-full", "run_id": "r1", "step": 0,
     "step_name": "clean", "action": "clean_paths", "status": "done", "dry_run": False, "ok": True,
     "changed": True, "detail": "removed 3 files", "duration_s": 0.25,
     "data": {"removed": [{"path": "/tmp/a", "bytes": 10}], "freed_bytes": 10}},
    {"type": "step", "node": "n1", "playbook": "p", "run_id": "r2", "step": 1, "step_name": "x",
     "action": "restart_unit", "status": "failed", "ok": False, "detail": "exit 1", "duration_s": 1},
    {"type": "run.end", "node": "n1", "playbook": "p", "run_id": "r2", "outcome": "escalated",
     "dry_run": False, "consecutive_failures": 2, "duration_s": None},
    {"type": "run.held", "node": "n1", "playbook": "p", "run_id": "r3", "reason": "fleet budget"},
    {"type": "escalate", "node": "n1", "kind": "playbook.escalated", "severity": "critical", "playbook": "p",
     "run_id": "r2", "message": "still failing", "labels": {"unit": "a.service"}, "inputs": {}},
]


def _roundtrip(m: wire.Envelope) -> wire.Message:
    stamped = m.__class__(**{**{f: getattr(m, f) for f in m.__struct_fields__}, "node": "n1", "site": "lab",
                             "seq": 1})
    return wire.decode(wire.encode(stamped))


def test_every_engine_record_decodes_as_a_wire_message() -> None:
    out = [_roundtrip(playbook_record(r)) for r in RECORDS]
    start, step_ok, step_failed, end, held, esc = out
    assert isinstance(start, wire.Action)
    assert start.phase == "started"
    assert start.result["bindings.mount"] == "/"
    assert start.result["inputs.disk.used_pct[/]"] == 93.5
    assert isinstance(step_ok, wire.Action)
    assert (step_ok.phase, step_ok.outcome, step_ok.action) == ("finished", "ok", "clean_paths")
    assert isinstance(step_ok.result["data.removed"], str)  # a list of mappings travels as JSON text
    assert isinstance(step_failed, wire.Action)
    assert (step_failed.outcome, step_failed.error) == ("failed", "exit 1")
    assert isinstance(end, wire.Action)
    assert end.outcome == "failed"
    assert isinstance(held, wire.Action)
    # The escalation record is an action like every record; the escalation *event* goes out once,
    # through playbook_event (test_escalation_is_published_once).
    assert isinstance(esc, wire.Action)
    assert esc.result["type"] == "escalate"
    assert esc.result["labels.unit"] == "a.service"


def test_approval_request_event_has_what_the_coordinator_queues() -> None:
    ev = _roundtrip(playbook_event({"kind": "playbook.approval_requested", "node": "n1", "wall": 1000.5,
                                   "playbook": "runaway-cpu", "severity": "warning", "message": "approve?",
                                   "labels": {"pid": 42}}))
    assert isinstance(ev, wire.Event)
    assert ev.name == "approval_request"
    assert ev.labels["playbook"] == "runaway-cpu"
    assert ev.labels["request_id"] == "n1-runaway-cpu-1000"
    assert ev.labels["pid"] == "42"


def test_escalation_is_published_once() -> None:
    """An escalation is one event for the coordinator (it was two: the audit record and the event)."""
    record = RECORDS[-1]
    event = {"kind": "playbook.escalated", "node": "n1", "wall": 1000.0, "severity": "critical",
             "playbook": "p", "run_id": "r2", "message": "still failing", "labels": {"unit": "a.service"}}
    messages = [playbook_record(record), playbook_event(event)]
    events = [m for m in messages if isinstance(m, wire.Event)]
    assert [e.name for e in events] == ["playbook.escalated"]
    assert events[0].labels["unit"] == "a.service"
