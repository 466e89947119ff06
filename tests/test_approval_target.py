"""An approval request names what the run would act on (issue 19): the real engine, running the
shipped runaway-cpu playbook in approval mode, asks with the process the latest sample shows at
the top (name and pid), and the request goes on the wire with it (``labels.acts_on``)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from playbook_kit import make_engine, playbook, running

from agent.act.preview import acts_on
from agent.collect.sample import Sample
from agent.report.build import playbook_event
from agent.wire import RequestEvent, decode, encode

REPO = Path(__file__).resolve().parent.parent
TOP = {"pid": 4242, "name": "stress-ng", "cpu_pct": 97.4, "rss_bytes": 3 * 2**30}


def _runaway_cpu() -> str:
    text = (REPO / "remediations" / "runaway-cpu.yaml").read_text()
    assert text.count("for: 10m") == 2  # a CPU pegged, and tasks waiting for a CPU, for ten minutes
    return text.replace("for: 10m", "for: 0s")  # the same playbook, without ten minutes of waiting


def _sample(seq: int) -> Sample:
    return Sample(node="n1", seq=seq, wall=time.time(), mono=time.monotonic(),
                  metrics={"proc.top_cpu_pct": 97.4, "psi.some_avg60_pct[cpu]": 31.0},
                  detail={"processes": {"top_cpu": [TOP], "top_mem": [TOP]}})


@pytest.mark.asyncio
async def test_approval_request_names_the_process_it_would_stop(tmp_path: Path) -> None:
    eng, rec = make_engine(tmp_path, [playbook(_runaway_cpu())])
    async with running(eng):
        for seq in range(1, 6):
            await eng.evaluate(_sample(seq), None)
            await asyncio.sleep(0.01)
            if rec.events:
                break
    requests = [e for e in rec.events if e["kind"] == "playbook.approval_requested"]
    assert len(requests) == 1, rec.events
    would = "stop_process: stress-ng (pid 4242, 97% CPU, top cpu now)"
    assert requests[0]["labels"]["acts_on"] == would
    assert would in requests[0]["message"]
    # on the wire: an approval_request event whose labels carry it (an optional label: older
    # coordinators ignore it)
    event = decode(encode(playbook_event(requests[0] | {"node": "n1", "wall": time.time()})))
    assert event.name == RequestEvent.APPROVAL_REQUEST
    assert event.labels["acts_on"] == would
    assert event.labels["target"] == "runaway-cpu"


def test_acts_on_other_targets() -> None:
    pb = playbook(
        "name: cleanup\ndescription: d\nmode: approval\ntrigger:\n  metric: disk.used_pct[{mount}]\n"
        "  op: '>='\n  value: 90\nsteps:\n"
        "  - action: stop_process\n    params: {target: {name: backup-agent}}\n"
        "  - action: restart_unit\n    params: {unit: nginx.service}\n"
    )
    assert acts_on(pb, {"mount": "/var"}, {}) == (
        "stop_process: processes named backup-agent; restart_unit: unit=nginx.service")
    top_cpu = playbook(_runaway_cpu())
    assert acts_on(top_cpu, {}, {}) == "stop_process: the top cpu process (none seen in the latest sample)"
    assert acts_on(top_cpu, {}, {"processes": {"top_cpu": "garbage"}}).startswith("stop_process: the top cpu")
