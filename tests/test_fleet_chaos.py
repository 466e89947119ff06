"""The fleet under chaos (issue 18's first "Done when" line), counted at the store.

A real mosquitto (with the persistence docs/mqtt-tls-acl.md asks for), a real coordinator and two
real ``heald run`` agents with their default ``[mqtt]`` settings, for a few minutes:

- the broker restarted 5 times, and down for 60 s once;
- one agent (``chaos-b``) killed with SIGKILL 5 times and started again on the same state dir;
- one hostile client publishing throughout: NaN and infinite values, oversized payloads, reports
  in another node's name, NaN reports on a healthy node's own topic, forged commands to both
  agents.

Each agent runs a playbook that restarts a worker which exits after two seconds, so it reports
QoS 1 all the time (actions, escalation events, risk), and metrics every second.

Counted at the store (the coordinator's SQLite file) once it is over:

- 0 QoS 1 reports lost: every QoS 1 report an agent's spool holds as acknowledged by the broker
  is stored (the spool and its cursor are the agent's own record of what it sent);
- 0 duplicates: no audit record of an agent stored twice;
- 0 reports of the healthy node (``chaos-a``) lost, whatever the hostile client sent;
- every metric gap counted: the samples missing from each node's stored batches equal the node's
  ``metric_gaps`` (a batch lost with a kill, a QoS 0 batch lost with a broker restart);
- every hostile message rejected and counted: none stored, and the coordinator's per-node reject
  counts cover every one the broker acknowledged;
- the coordinator's RSS bounded.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
from broker import Broker, BrokerFactory, default_config

from agent import wire
from agent.report.segment import scan
from devtools.coordinator_proc import REPO_ROOT, CoordinatorProcess, free_port, write_config

pytestmark = pytest.mark.slow

mqtt = pytest.importorskip("paho.mqtt.client")

NODES = ("chaos-a", "chaos-b")  # chaos-a is the healthy one; chaos-b is killed
EVIL = "chaos-evil"
WORKER = "hchaos-wk-{}"  # one name per agent: each agent counts only its own worker


def worker_of(node: str) -> str:
    return WORKER.format(node.rsplit("-", 1)[-1])
PLAYBOOK = """
name: keep-worker
description: keep the worker running (it exits every two seconds)
mode: enforce
trigger:
  any:
    - event: proc.exited
      labels: {{name: {worker}}}
      within: 1m
    - metric: "proc.count[{worker}]"
      op: "<"
      value: 1
steps:
  - action: restart_process
    params: {{name: {worker}, argv: ["{exe}", "2"]}}
    timeout: 10s
verify:  # never holds: every run escalates, so each restart also sends an escalation event
  settle: 0s
  expect: {{metric: "proc.count[{worker}]", op: "<", value: 0}}
guards:
  cooldown: 0s
  max_runs: {{count: 10000, window: 1h}}
  breaker: {{failures: 10000, reset_after: 1h}}
escalate: {{event: chaos.worker.escalated, severity: info, message: "worker restarted"}}
"""
QOS1 = {"risk": "risk", "event": "events", "action": "actions", "command_ack": "acks"}


def agent_config(directory: Path, node: str, port: int) -> Path:
    playbooks = directory / "playbooks.d"
    playbooks.mkdir(parents=True)
    exe = directory / worker_of(node)
    exe.symlink_to("/bin/sleep")
    (playbooks / "keep-worker.yaml").write_text(PLAYBOOK.format(worker=worker_of(node), exe=exe))
    path = directory / "agent.toml"
    path.write_text(
        f'[node]\nid = "{node}"\nsite = "lab"\n'
        f'[paths]\nstate_dir = "{directory / "state"}"\nruntime_dir = "{directory / "run"}"\n'
        f'[collect.gpu]\nenabled = false\n[collect.processes]\ninterval_s = 1.0\n'
        f'watch = ["{worker_of(node)}"]\n'
        f'[mqtt]\nenabled = true\nhost = "127.0.0.1"\nport = {port}\nmetrics_interval_s = 1.0\n'
        f'[playbooks]\ndirs = ["{playbooks}"]\nload_shipped = false\n[log]\nformat = "json"\n'
    )
    return path


class Agent:
    def __init__(self, directory: Path, node: str, port: int) -> None:
        self.node = node
        self.dir = directory
        self.config = agent_config(directory, node, port)
        self.log = directory / "agent.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.kills = 0

    def start(self) -> None:
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "agent", "run", "--config", str(self.config)], cwd=REPO_ROOT,
                stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)))

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(15)
        self.kills += 1

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        exe = str(self.dir / worker_of(self.node))
        for entry in Path("/proc").iterdir():  # the workers the agent left running
            with contextlib.suppress(OSError, UnicodeDecodeError, ValueError):
                if (entry / "cmdline").read_bytes().split(b"\0")[0].decode() == exe:
                    os.kill(int(entry.name), signal.SIGKILL)


class Hostile:
    """Publishes garbage with QoS 1 on its own thread; counts what the broker acknowledged, by the
    node whose topic it went to (that is whom the coordinator counts a reject for)."""

    def __init__(self, port: int) -> None:
        self.acked: dict[str, int] = {}
        self.sent: dict[str, int] = {}
        self.oversized = 0  # acknowledged by the broker; too big for the coordinator (see below)
        self._mids: dict[int, str] = {}  # node, or "" for an oversized payload
        self._acked_mids: set[int] = set()  # set.add and set.discard are atomic
        self._stop = threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="chaos-hostile",
                                  protocol=mqtt.MQTTv5)
        self.client.on_publish = self._on_publish
        self.client.reconnect_delay_set(0.2, 2)
        self.client.connect_async("127.0.0.1", port)
        self.client.loop_start()
        self.thread = threading.Thread(target=self._run, name="hostile", daemon=True)
        self.thread.start()

    def _on_publish(self, _c: object, _u: object, mid: int, rc: Any, _p: object) -> None:
        # Never our lock around a client call: paho calls this back from its own thread, which may
        # hold its locks while our thread waits in publish().
        if not rc.is_failure:
            self._acked_mids.add(mid)

    def _publish(self, node: str, kind: str, payload: bytes, *, oversized: bool = False) -> None:
        topic = f"heald/v1/lab/{node}/{wire.SUFFIX[kind]}"
        info = self.client.publish(topic, payload, qos=1)
        # NO_CONN: paho keeps a QoS 1 message while it is disconnected and sends it on reconnect
        if info.rc in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):
            self._mids[info.mid] = "" if oversized else node  # mids are reused once acknowledged
            if not oversized:
                self.sent[node] = self.sent.get(node, 0) + 1
        self._count()

    def _count(self) -> None:
        """Move acknowledged mids into the per-node counts (on the publishing thread only)."""
        for mid in list(self._acked_mids):
            self._acked_mids.discard(mid)
            node = self._mids.pop(mid, None)
            if node == "":
                self.oversized += 1
            elif node is not None:
                self.acked[node] = self.acked.get(node, 0) + 1

    def _run(self) -> None:
        seq = 0
        while not self._stop.wait(0.05):
            seq += 1
            now = time.time()

            def env(node: str) -> dict[str, Any]:
                return {"v": 1, "site": "lab", "ts": now, "node": node, "seq": seq}  # noqa: B023 - this pass's

            # a NaN wall clock: valid msgpack, refused by the decoder
            self._publish(EVIL, "event", wire.encode(wire.Event(**env(EVIL), name="x", source="evil",
                                                                wall=math.nan)))
            # an infinite anomaly
            self._publish(EVIL, "risk", wire.encode(wire.Risk(**env(EVIL), sample_seq=0, anomaly=math.inf,
                                                              alert=True, cold=False, model_version="m")))
            # a report in the healthy node's name on the hostile client's topic: the topic says who
            self._publish(EVIL, "event", wire.encode(wire.Event(**env(NODES[0]), name="forged", source="evil",
                                                                wall=now)))
            # a NaN value on the healthy node's own topic (no broker ACL here)
            nan = wire.Event(**env(NODES[0]), name="nan", source="evil", wall=now, value=math.nan)
            self._publish(NODES[0], "event", wire.encode(nan))
            if seq % 10 == 0:
                self._publish(EVIL, "event", b"\x81" + b"x" * 300_000, oversized=True)  # > max_payload_bytes
                for node in NODES:  # forged commands: signed by nobody the agents trust
                    cmd = wire.Command(**env(node), id=f"forged-{seq}", issued_at=now, expires_at=now + 60,
                                       nonce=os.urandom(16), name="run", args={"playbook": "keep-worker"},
                                       signature=b"\x00" * 64)
                    self.client.publish(f"heald/v1/lab/{node}/cmd", wire.encode(cmd), qos=1)

    def stop(self) -> None:
        self._stop.set()
        self.thread.join(10)
        time.sleep(1)  # the last PUBACKs
        self._count()
        self.client.disconnect()
        self.client.loop_stop()


def acknowledged(state_dir: Path) -> dict[str, set[int]]:
    """QoS 1 reports the broker acknowledged to an agent: its spooled records up to the cursor."""
    spool = state_dir / "spool"
    acked = int(json.loads((spool / "cursor").read_text())["acked_seq"])
    out: dict[str, set[int]] = {kind: set() for kind in QOS1}
    for segment in sorted(spool.glob("*.seg")):
        for _, seq, kind, _ in scan(segment.read_bytes()).records:
            if kind in QOS1 and seq <= acked:
                out[kind].add(seq)
    return out


def acked_seq(state_dir: Path) -> int:
    """The agent's acknowledged cursor (written at most a second late; -1 before the first)."""
    with contextlib.suppress(OSError, ValueError, KeyError):
        return int(json.loads((state_dir / "spool" / "cursor").read_text())["acked_seq"])
    return -1


def spool_head(state_dir: Path) -> int:
    """The seq of the last record in the agent's spool (-1 for none), read while it writes."""
    head = -1
    for segment in (state_dir / "spool").glob("*.seg"):
        with contextlib.suppress(FileNotFoundError):  # an acknowledged segment deleted meanwhile
            head = max([head, *(seq for _, seq, _, _ in scan(segment.read_bytes()).records)])
    return head


def rss_mib(pid: int) -> float:
    return psutil.Process(pid).memory_info().rss / 2**20


@pytest.fixture
def broker(mosquitto_factory: BrokerFactory) -> Broker:
    return mosquitto_factory(default_config(persistence=True))


@pytest.mark.timeout(600)
def test_chaos_loses_nothing_and_counts_everything(broker: Broker, tmp_path: Path) -> None:
    t0 = time.monotonic()

    def phase(name: str) -> None:  # where the minutes (and the coordinator's memory) go, with -s
        rss = f", coordinator RSS {rss_mib(coord.proc.pid):.1f} MiB" if coord.proc is not None else ""
        print(f"chaos: {time.monotonic() - t0:6.1f}s {name}{rss}", file=sys.stderr)

    web = free_port()
    coord = CoordinatorProcess(write_config(tmp_path / "coord", mqtt_port=broker.port, web_port=web), web)
    coord.start()
    agents = {node: Agent(tmp_path / node, node, broker.port) for node in NODES}
    hostile: Hostile | None = None
    try:
        for a in agents.values():
            a.start()

        def both_online(c: CoordinatorProcess) -> object:
            status, body = c.api("GET", "/api/nodes?state=online")
            return status == 200 and {n["node"] for n in body["items"]} >= set(NODES)

        coord.wait_for(both_online, timeout=60)
        phase("both online")
        assert coord.proc is not None
        rss_start = rss_mib(coord.proc.pid)
        hostile = Hostile(broker.port)
        victim = agents[NODES[1]]
        for i in range(5):  # 5 broker restarts, 5 kills of chaos-b, interleaved
            time.sleep(4)
            broker.stop()
            time.sleep(1 + i % 2)
            broker.start()
            time.sleep(3)
            victim.kill9()
            time.sleep(0.5 * i)
            victim.start()
            phase(f"restart and kill {i + 1}")
        time.sleep(3)
        broker.stop()  # down for a minute: the agents spool, the hostile client is refused
        time.sleep(60)
        # everything replays: each agent reconnects (its jittered backoff after a minute's outage
        # can run past a fixed wait) and its acknowledged cursor reaches the last record its spool
        # held when the broker came back (all it spooled through the outage, and before)
        heads = {node: spool_head(a.dir / "state") for node, a in agents.items()}
        broker.start()
        deadline = time.monotonic() + 150
        while time.monotonic() < deadline and not all(
                acked_seq(a.dir / "state") >= heads[node] for node, a in agents.items()):
            time.sleep(0.5)
        replayed = {node: (acked_seq(a.dir / "state"), heads[node]) for node, a in agents.items()}
        assert all(acked >= head for acked, head in replayed.values()), f"not replayed in 150 s: {replayed}"
        phase("replayed")
        hostile.stop()

        def rejects_counted(c: CoordinatorProcess) -> object:  # the hostile's last messages are in
            status, body = c.api("GET", "/api/info")
            nodes = body["ingest"]["rejected"]["nodes"] if status == 200 else {}
            return status == 200 and all(nodes.get(node, {}).get("total", 0) >= n
                                         for node, n in hostile.acked.items())

        coord.wait_for(rejects_counted, timeout=30)
        for a in agents.values():
            a.stop()
        phase("stopped")
        rss_end = rss_mib(coord.proc.pid)
        info = coord.api("GET", "/api/info")[1]
    finally:
        if hostile is not None:
            with contextlib.suppress(Exception):
                hostile.stop()
        for a in agents.values():
            a.stop()
        coord.stop()

    db = tmp_path / "coord" / "state" / "coordinator.db"
    assert victim.kills == 5
    assert broker.starts == 7
    with contextlib.closing(sqlite3.connect(db)) as conn:
        for node, agent in agents.items():
            want = acknowledged(agent.dir / "state")
            assert sum(len(s) for s in want.values()) > 30, (node, {k: len(v) for k, v in want.items()})
            # 0 QoS 1 reports lost: every acknowledged one is stored, under its incarnation's base
            (base,) = conn.execute("SELECT base FROM incarnations WHERE node = ? AND inc != ''",
                                   (node,)).fetchone()
            for kind, table in QOS1.items():
                sql = f"SELECT seq FROM {table} WHERE node = ?"  # noqa: S608 - our table names
                have = {s - base for (s,) in conn.execute(sql, (node,))}
                lost = sorted(want[kind] - have)
                assert lost == [], f"{node}: {len(lost)} {kind} reports acknowledged, not stored: {lost[:10]}"
            # 0 duplicates: each audit record of the agent once
            audits = [json.loads(r)["audit_seq"] for (r,) in
                      conn.execute("SELECT result FROM actions WHERE node = ?", (node,))]
            audits = [a for a in audits if a is not None]
            assert len(audits) == len(set(audits)), f"{node}: audit records stored twice"
            # every metric gap counted
            rows = conn.execute("SELECT samples FROM metrics WHERE node = ?", (node,))
            # each stored sample is [wall, metrics, seq]
            seqs = sorted(int(s[2]) for (samples,) in rows for s in json.loads(samples))
            assert seqs, node
            missing = (seqs[-1] - seqs[0] + 1) - len(set(seqs))
            (gaps,) = conn.execute("SELECT metric_gaps FROM nodes WHERE node = ?", (node,)).fetchone()
            assert gaps == missing, f"{node}: {missing} samples missing, {gaps} counted"
        # nothing of the hostile client's is stored
        assert conn.execute("SELECT count(*) FROM nodes WHERE node = ?", (EVIL,)).fetchone() == (0,)
        forged = conn.execute("SELECT count(*) FROM events WHERE name IN ('forged', 'nan', 'x')").fetchone()
        assert forged == (0,)
    # the oversized payloads never reached the coordinator: its MQTT 5 CONNECT's Maximum Packet
    # Size has the broker drop them (a flood of them once cost the coordinator 66 MiB of RSS)
    rejected = info["ingest"]["rejected"]["nodes"]
    assert hostile is not None
    assert hostile.oversized > 100
    assert info["ingest"]["rejected"]["by_reason"].get("too_large", 0) == 0, info["ingest"]["rejected"]
    # every other hostile message the broker acknowledged was rejected and counted, per node
    assert hostile is not None
    for node, acked in hostile.acked.items():
        assert acked > 0
        counted = rejected.get(node, {}).get("total", 0)
        sent = hostile.sent[node]
        print(f"chaos: {node}: sent {sent}, acked {acked}, rejects counted {counted}", file=sys.stderr)
        # QoS 1 is at least once: a message in flight at a broker restart may reach the coordinator
        # twice (at most the client's 20 in flight per broker start); a reject counted for another
        # node's message would overshoot by thousands
        assert acked <= counted <= sent + 20 * broker.starts, (node, acked, counted, sent)
    assert rss_end - rss_start < 64, f"coordinator RSS grew {rss_end - rss_start:.1f} MiB"
