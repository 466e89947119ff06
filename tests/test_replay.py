"""`heald replay`: recorded samples through features -> score -> decide in dry-run.

The replay is held against live `heald run` dry-runs twice: here, where the samples a daemon
published over MQTT are captured and replayed with the same playbooks, and on ``host3.npz``, a
fault recording made by a live agent (``bench/faults/run.py --live-agent``: the shipped
playbooks, forced to dry-run, on real injected faults), which keeps that agent's would-be runs.
Either way the replay's runs must be the live daemon's (playbook, target, time). The older
recordings (``host1``, ``host2``) were sampled by the harness itself and hold no live run.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
import pytest

from agent import wire

ROOT = Path(__file__).resolve().parents[1]
HOST2 = ROOT / "bench" / "faults" / "data" / "host2.npz"
HOST3 = ROOT / "bench" / "faults" / "data" / "host3.npz"

PLAYBOOKS = {
    "probe-cpu.yaml": """\
name: probe-cpu
description: fires on every host (a replay check)
mode: enforce
trigger:
  metric: cpu.count
  op: ">="
  value: 1
  for: 3s
guards:
  cooldown: 5s
steps:
  - action: run_command
    params: {argv: ["true"]}
""",
    "probe-disk.yaml": """\
name: probe-disk
description: one target per cleanable mount (a replay check)
mode: enforce
trigger:
  metric: "disk.used_pct[{mount}]"
  op: ">="
  value: 0
  for: 2s
  mounts: cleanable
guards:
  cooldown: 7s
steps:
  - action: run_command
    params: {argv: ["true"]}
""",
}


def heald(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "agent", *args], capture_output=True, text=True,
                          timeout=120, check=False, cwd=ROOT)


def replay_json(*args: str) -> dict[str, Any]:
    done = heald("replay", *args, "--json")
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = json.loads(done.stdout)
    return result


class Capture:
    """Every sample of the node's ``metrics`` messages, as the replay's .jsonl lines."""

    def __init__(self, port: int) -> None:
        self.samples: dict[int, dict[str, Any]] = {}
        self.lock = threading.Lock()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        self.client.on_message = self._on_message
        self.client.suppress_exceptions = True
        self.client.connect("127.0.0.1", port)
        self.client.subscribe("heald/v1/#", qos=1)
        self.client.loop_start()

    def _on_message(self, _c: object, _u: object, msg: mqtt.MQTTMessage) -> None:
        decoded = wire.decode(msg.payload)
        if isinstance(decoded, wire.Metrics):
            with self.lock:
                for s in decoded.samples:
                    self.samples[s.seq] = {"seq": s.seq, "wall": s.wall, "mono": s.mono, "metrics": s.metrics}

    def count(self) -> int:
        with self.lock:
            return len(self.samples)

    def write(self, path: Path) -> list[dict[str, Any]]:
        with self.lock:
            rows = [self.samples[k] for k in sorted(self.samples)]
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return rows

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def live_runs(audit: Path) -> dict[str, int]:
    """Per playbook, the most dry runs the live daemon has started so far on one of its targets."""
    runs = {"probe-cpu": 0, "probe-disk": 0}
    per_target: dict[tuple[str, str], int] = {}
    if audit.exists():
        for line in audit.read_text().splitlines():
            try:
                rec = json.loads(line)["record"]
            except ValueError:
                continue  # a line being written
            if rec["type"] == "run.start" and rec["playbook"] in runs:
                key = (rec["playbook"], rec["target"])
                per_target[key] = per_target.get(key, 0) + 1
                runs[key[0]] = max(runs[key[0]], per_target[key])
    return runs


@pytest.mark.slow
def test_replay_matches_a_live_dry_run(tmp_path: Path, mosquitto: Any) -> None:
    # A sample every 2 s and cooldowns an odd number of seconds: a guard boundary is 1 s from any
    # sample, so the few hundred ms a live dry-run takes to start and end (audit fsyncs on a
    # loaded machine) never moves a decision across it.
    books = tmp_path / "playbooks"
    books.mkdir()
    for name, text in PLAYBOOKS.items():
        (books / name).write_text(text)
    state = tmp_path / "state"
    cfg = tmp_path / "agent.toml"
    cfg.write_text(f"""
[node]
id = "n1"
[paths]
state_dir = "{state}"
[sample]
interval_s = 2.0
[collect.gpu]
enabled = false
[playbooks]
dirs = ["{books}"]
load_shipped = false
force_mode = "dry-run"
max_concurrent = 16
[mqtt]
enabled = true
host = "127.0.0.1"
port = {mosquitto.port}
metrics_interval_s = 1.0
""")
    capture = Capture(mosquitto.port)
    log = (tmp_path / "agent.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "agent", "run", "--config", str(cfg)],
                            stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ))
    try:
        # until the captured samples reach the floor asserted below and each playbook has run twice
        # (a cooldown crossed live), not a fixed 32 s: the same checks, ~10 s sooner
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and not (
                capture.count() >= 10 and min(live_runs(state / "audit.jsonl").values()) >= 2):
            time.sleep(0.5)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        log.close()
        time.sleep(1.0)
        capture.close()
    recording = tmp_path / "live.jsonl"
    rows = capture.write(recording)
    assert len(rows) >= 10, (tmp_path / "agent.log").read_text()[-3000:]
    seqs = [r["seq"] for r in rows]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), "a sample was lost on the way"
    last_wall = rows[-1]["wall"]
    live = []
    for line in (state / "audit.jsonl").read_text().splitlines():
        entry = json.loads(line)
        rec = entry["record"]
        if rec["type"] == "run.start" and entry["ts"] <= last_wall + 1.9:
            assert rec["dry_run"] is True
            live.append((rec["playbook"], rec["target"], entry["ts"]))
    assert {p for p, _, _ in live} == {"probe-cpu", "probe-disk"}, live

    result = replay_json(str(recording), "--playbooks", str(books))
    assert result["samples"] == len(rows)
    replayed = [(d["playbook"], d["target"], d["wall"]) for d in result["decisions"] if d["kind"] == "run"]
    # the same runs, in the same order, each at the sample the live daemon started it on
    assert [(p, t) for p, t, _ in replayed] == [(p, t) for p, t, _ in live], (replayed, live)
    for (_, _, wall), (_, _, ts) in zip(replayed, live, strict=True):
        assert wall <= ts < wall + 1.9, (wall, ts)
    # the table names the same runs
    table = heald("replay", str(recording), "--playbooks", str(books))
    assert table.returncode == 0, table.stderr
    assert table.stdout.count(" run ") == len(live)


@pytest.mark.slow
def test_replay_of_the_host2_recording(tmp_path: Path) -> None:
    """host2 with the shipped playbooks: nothing would have fired (its fault mounts are neither
    cleanable nor full for 30 s at a stretch; memory faults stay in a 1.5 GB cgroup); a playbook on
    the fault mounts fires where the raw recording says it must: once a mount has stayed >= 90% for
    5 s, then again after each 5 s cooldown while it stays there, at most 6 runs an hour."""
    shipped = replay_json(str(HOST2), "--playbooks", str(ROOT / "remediations"), "--cold-start", "600")
    assert shipped["samples"] == 1362
    assert [f["ok"] for f in shipped["fits"]] == [True, True]
    assert [d for d in shipped["decisions"] if d["kind"] == "run"] == []

    books = tmp_path / "pb"
    books.mkdir()
    (books / "fill.yaml").write_text("""\
name: fault-disk-fill
description: the fault harness's disk fills
mode: enforce
trigger:
  metric: "disk.used_pct[{mount}]"
  op: ">="
  value: 90
  for: 5s
  clear_below: 50
guards:
  cooldown: 5s
steps:
  - action: run_command
    params: {argv: ["true"]}
""")
    result = replay_json(str(HOST2), "--playbooks", str(books), "--no-model")
    runs = [(d["target"], d["wall"]) for d in result["decisions"] if d["kind"] == "run"]
    # expected from the raw recording: the first sample of each >= 90 stretch 5 s long, per mount
    with np.load(HOST2) as z:
        keys = [str(k) for k in z["keys"]]
        x, wall, mono = z["X"], z["wall"], z["mono"]
    expected = []
    for i, key in enumerate(keys):
        if not key.startswith("disk.used_pct["):
            continue
        mount = key[len("disk.used_pct["):-1]
        since: float | None = None
        starts: list[float] = []  # this target's runs: cooldown 5 s after each, at most 6 an hour
        for j in range(wall.size):
            v, t = x[j, i], float(wall[j])
            if v >= 90:
                since = mono[j] if since is None else since
                held = mono[j] - since >= 5
                starts = [s for s in starts if t - s < 3600]
                if held and (not starts or t - starts[-1] >= 5) and len(starts) < 6:
                    expected.append((f"fault-disk-fill[mount={mount}]", t))
                    starts.append(t)
            elif v < 50 or v != v:  # noqa: PLR0124 - cleared, or the mount gone
                since = None
    assert len(expected) >= 2, expected
    assert sorted(runs, key=lambda r: r[1]) == sorted(expected, key=lambda r: r[1])


def write_recording(path: Path, n: int, live: list[tuple[str, str, str, float]] | None) -> None:
    """n samples at 1 Hz with cpu.count = 2 (probe-cpu's trigger holds), and a live run if given."""
    wall = 1.8e9 + np.arange(n, dtype=np.float64)
    arrays: dict[str, Any] = {"keys": np.asarray(["cpu.count"]), "X": np.full((n, 1), 2.0), "wall": wall,
                              "mono": wall - 1.7e9, "seq": np.arange(n, dtype=np.int64)}
    if live is not None:
        arrays |= {"live_kind": np.asarray([d[0] for d in live], dtype=str),
                   "live_playbook": np.asarray([d[1] for d in live], dtype=str),
                   "live_target": np.asarray([d[2] for d in live], dtype=str),
                   "live_wall": np.asarray([d[3] for d in live], dtype=np.float64)}
    np.savez_compressed(path, **arrays)


def test_replay_compares_itself_with_the_recorded_live_run(tmp_path: Path) -> None:
    books = tmp_path / "pb"
    books.mkdir()
    (books / "probe-cpu.yaml").write_text(PLAYBOOKS["probe-cpu.yaml"])
    plain = tmp_path / "plain.npz"
    write_recording(plain, 20, None)
    runs = [d for d in replay_json(str(plain), "--playbooks", str(books), "--no-model")["decisions"]
            if d["kind"] == "run"]
    assert [r["wall"] - 1.8e9 for r in runs] == [3, 8, 13, 18], runs  # held 3 s, then the 5 s cooldown
    assert replay_json(str(plain), "--playbooks", str(books), "--no-model")["live"] is None

    def check(live: list[tuple[str, str, str, float]]) -> dict[str, Any]:
        rec = tmp_path / "live.npz"
        write_recording(rec, 20, live)
        got = replay_json(str(rec), "--playbooks", str(books), "--no-model")["live"]
        text = heald("replay", str(rec), "--playbooks", str(books), "--no-model")
        assert text.returncode == 0, text.stderr
        assert f"recorded live run: {len(live)} would-be actions" in text.stdout
        assert ("this replay: the same" in text.stdout) is got["same"]
        return dict(got)

    same = [("run", "probe-cpu", r["target"], r["wall"] + 0.4) for r in runs]
    assert check(same) == {"decisions": [{"kind": k, "playbook": p, "target": t, "wall": w}
                                         for k, p, t, w in same], "same": True, "differences": []}
    missing = check(same[:3])
    assert not missing["same"]
    assert missing["differences"] == [
        f"#4: replay run {runs[3]['target']} at {runs[3]['wall']:.1f}, not in the live run"]
    late = check([*same[:3], (*same[3][:3], same[3][3] + 2.0)])  # the live start two samples later
    assert not late["same"]
    assert "live at" in late["differences"][0]
    other = check([*same[:3], ("approval", "probe-cpu", same[3][2], same[3][3])])
    assert other["differences"] == [f"#4: replay run {runs[3]['target']}, live approval {runs[3]['target']}"]


def test_a_damaged_live_run_is_one_clear_line(tmp_path: Path) -> None:
    rec = tmp_path / "bad.npz"
    write_recording(rec, 5, [("run", "probe-cpu", "probe-cpu", 1.8e9)])
    with np.load(rec) as z:
        arrays = {k: z[k] for k in z.files}
    arrays["live_wall"] = np.zeros(3)  # three times where there is one decision
    np.savez_compressed(rec, **arrays)
    done = heald("replay", str(rec), "--no-model")
    assert done.returncode != 0
    assert "the live run's columns differ in length" in done.stderr
    assert "Traceback" not in done.stderr


def recorded_library(z: Any, into: Path) -> dict[str, str]:
    """The shipped library the live agent loaded (``live_playbooks``), written to ``into``."""
    library: dict[str, str] = json.loads(str(z["live_playbooks"]))
    into.mkdir()
    for name, text in library.items():
        (into / name).write_text(text)
    return library


@pytest.mark.slow
def test_replay_of_host3_matches_its_recorded_live_run(tmp_path: Path) -> None:
    """`heald replay bench/faults/data/host3.npz --playbooks DIR` prints the would-be actions of
    the live agent that recorded it: the same playbook and target, in the same order, each at the
    sample the live daemon decided on (its audit record within 1.9 s after that sample). DIR is the
    library the live agent loaded (kept in the recording); where remediations/ is still that
    library, `--playbooks remediations/` itself is checked too."""
    with np.load(HOST3) as z:
        live = list(zip(z["live_kind"].tolist(), z["live_playbook"].tolist(), z["live_target"].tolist(),
                        z["live_wall"].tolist(), strict=True))
        failures = {str(n): float(f) for n, f in zip(z["fault_name"], z["fault_failure"], strict=True)}
        library = recorded_library(z, tmp_path / "library")
    shipped = {p.name: p.read_text() for p in (ROOT / "remediations").glob("*.yaml")}
    dirs = [tmp_path / "library"] + ([ROOT / "remediations"] if shipped == library else [])
    assert len(live) >= 3, live  # the recording's memory faults each drew a predictive run
    for books in dirs:
        result = replay_json(str(HOST3), "--playbooks", str(books))
        replayed = [(d["kind"], d["playbook"], d["target"], d["wall"]) for d in result["decisions"]
                    if d["kind"] in ("run", "approval")]
        assert [r[:3] for r in replayed] == [lv[:3] for lv in live], (books, replayed, live)
        for r, lv in zip(replayed, live, strict=True):
            assert r[3] <= lv[3] < r[3] + 1.9, (r, lv)
        assert result["live"]["same"] is True, result["live"]["differences"]
        table = heald("replay", str(HOST3), "--playbooks", str(books))
        assert table.returncode == 0, table.stderr
        assert f"recorded live run: {len(live)} would-be actions; this replay: the same" in table.stdout
        for _, playbook, target, _ in live:
            assert any(playbook in line and target in line for line in table.stdout.splitlines()), target
    # each memory fault (a leak into a 1.5 GB cgroup) drew cgroup-memory-leak (how early: the
    # recording's README; the 70 MB/s one only as the kernel OOM-killed, the cgroup being found late)
    memory = [n for n in failures if n.startswith("memory")]
    assert len(memory) == 3, failures
    ours = [t for k, p, t, _ in live if k == "run" and p == "cgroup-memory-leak" and "heald-fault-" in t]
    assert sorted(ours) == [f"cgroup-memory-leak[cgroup=/heald-fault-{i}]" for i in range(3)], live
