"""Coordinator ingest benchmark: a fleet simulator publishing real wire messages.

For each scenario it starts a private mosquitto on a free port, one or two coordinator replicas
(SQLite, or PostgreSQL with shared subscriptions), with ``--raw`` a raw MQTT subscriber that
only counts messages (the ceiling the broker and a Python MQTT client give on this machine), and
a fleet simulator process that publishes one report per node at the given rate (real msgpack wire
messages, fresh ``seq`` and ``ts``, over a minimal MQTT client of its own so that the load
generator costs little): a ``metrics`` report (QoS 0, as agents send them), and every
``--events-every``-th report an ``event`` instead (QoS 1).
The coordinators run with the store's default settings (batch size, interval, intake bound).

It reports, per scenario: offered reports/s, the coordinator's sustained processed reports/s
over the measuring window and the CPU time the coordinator spent on it (cores, and µs per
stored report: the figure that does not depend on what else shares the machine), the raw
subscriber's received/s, p50/p99/max ingest lag (commit time
minus the report's ``ts``), the backlog when publishing stops and the p99 lag in the first and
second half of the window (growing lag = not sustainable), the reports the coordinator shed
(metrics first, when its intake was full: coordinator/intake.py) and whether every published
event was stored anyway (counted in the database after the run). Over the same window: what the
publisher sent per second (the offered rate as it was, next to processed/s), the PostgreSQL
server's CPU (every postgres process: cores and µs per stored report), the whole machine's busy
CPU (is the box the limit?), and, once a second, how many of the replicas' PostgreSQL backends
were waiting on a row or transaction lock (replicas serialising on each other's rows), the WAL
PostgreSQL wrote per stored report and the checkpoints it started inside the window.

Replicas. ``--replica-cpus C`` puts each replica in a cgroup of its own capped at C cores (CFS
quota; root): a replica with a small host of its own, so that one replica falls behind on its
own CPU rather than on the machine that the broker, PostgreSQL and the other replica share, and
what a second replica adds is measured apart from this machine's size. Each scenario starts
after ``sync`` and a PostgreSQL ``CHECKPOINT`` (the previous one's writes land outside it).

Offered more than it can store, a coordinator must degrade by shedding metrics, never by
stalling: ``processed/s`` stays at what the store sustains, ``lag`` stays bounded by the intake,
and ``events lost`` stays 0.

    python bench/coordinator_ingest.py                      # default scenarios: issue 25's lines
    python bench/coordinator_ingest.py --quick              # shorter, for a smoke run
    python bench/coordinator_ingest.py --nodes 10000 --rate 1 --replicas 2 --duration 30

Writes bench/results/coordinator_ingest.json. Every process it starts is stopped and reaped.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing as mp
import os
import platform
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from devtools.coordinator_proc import CoordinatorProcess, free_port, write_config  # noqa: E402

MOSQUITTO = os.environ.get("HEALD_TEST_MOSQUITTO", "/usr/sbin/mosquitto")
PG_ADMIN = os.environ.get("HEALD_BENCH_PG", "postgresql://postgres@127.0.0.1/postgres")
RESULTS = REPO / "bench" / "results" / "coordinator_ingest.json"


@dataclass
class Row:
    store: str
    replicas: int
    nodes: int
    rate_hz: float
    offered_per_s: float
    published: int
    processed_per_s: float
    raw_subscriber_per_s: float
    lag_p50_s: float | None
    lag_p99_s: float | None
    lag_max_s: float | None
    lag_p99_first_half_s: float | None
    lag_p99_second_half_s: float | None
    backlog_at_stop: int
    drained_after_s: float | None
    sustained: bool
    shed: int = 0
    events_published: int = 0  # events the broker acknowledged to the publisher
    events_stored: int = 0
    coord_cores: float = 0.0  # CPU time of the coordinator process(es) over the window, in cores
    coord_cpu_us_per_report: float | None = None  # that CPU time per stored report
    received: int = 0  # what the broker delivered to the coordinator(s)
    shed_by_kind: dict[str, int] | None = None
    load_cores: float = 0.0  # the publisher's and mosquitto's CPU over the window, in cores
    replica_cpus: float | None = None  # each replica's CPU cap in cores (a cgroup of its own), None: none
    published_window_per_s: float = 0.0  # what the publisher sent over the same window as processed/s
    pg_cores: float = 0.0  # the PostgreSQL server's CPU over the window (every postgres process), in cores
    pg_cpu_us_per_report: float | None = None  # that CPU time per stored report
    box_cores: float = 0.0  # the whole machine's busy CPU over the window (/proc/stat), in cores
    pg_backend_samples: int = 0  # the replicas' PostgreSQL backends seen in pg_stat_activity, once a second
    pg_lock_waits: int = 0  # of those, backends waiting on a row/transaction (heavyweight) lock
    pg_wal_bytes_per_report: float | None = None  # WAL PostgreSQL wrote over the window, per stored report
    pg_checkpoints: int | None = None  # checkpoints PostgreSQL started over the window (timed + requested)


# ------------------------------------------------------------------------------ processes


def start_mosquitto(directory: Path) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    conf = directory / "mosquitto.conf"
    user = "user root\n" if os.geteuid() == 0 else ""
    conf.write_text(
        f"{user}listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
        "max_queued_messages 1000000\nmax_inflight_messages 0\nlog_dest none\n"
    )
    proc = subprocess.Popen(
        [MOSQUITTO, "-c", str(conf)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    import socket  # noqa: PLC0415

    for _ in range(100):
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return proc, port
        except OSError:
            time.sleep(0.05)
    proc.kill()
    proc.wait()
    raise RuntimeError("mosquitto did not start")


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _remaining_length(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (128 if n else 0))
        if not n:
            return bytes(out)


class RawPublisher:
    """A minimal MQTT 3.1.1 publisher on a plain socket: the load generator's own cost kept small
    (paho spends more per message than the coordinator now does), so that it takes less of the
    CPU the coordinator is measured on. QoS 0 and QoS 1 PUBLISH, writes batched; a thread counts
    the PUBACKs of QoS 1 messages (the broker has those, whatever happens to this process)."""

    def __init__(self, port: int) -> None:
        import socket  # noqa: PLC0415

        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        client_id = f"bench-pub-{secrets.token_hex(3)}".encode()
        # protocol "MQTT" level 4, clean session, keepalive off; the client id
        body = b"\x00\x04MQTT\x04\x02\x00\x00" + len(client_id).to_bytes(2, "big") + client_id
        self.sock.sendall(b"\x10" + _remaining_length(len(body)) + body)
        connack = self.sock.recv(4)
        if len(connack) != 4 or connack[0] != 0x20 or connack[3] != 0:
            raise RuntimeError(f"broker refused the publisher: {connack!r}")
        self.out = bytearray()
        self.pending: set[int] = set()
        self.acked = 0
        self.mid = 0
        self.lock = threading.Lock()
        self.reader = threading.Thread(target=self._read_acks, daemon=True)
        self.reader.start()

    def publish(self, topic: bytes, payload: bytes, qos: int) -> None:
        head = len(topic).to_bytes(2, "big") + topic
        if qos:
            self.mid = self.mid % 65535 + 1
            with self.lock:
                self.pending.add(self.mid)
            head += self.mid.to_bytes(2, "big")
        self.out += bytes([0x30 | (qos << 1)]) + _remaining_length(len(head) + len(payload)) + head + payload
        if len(self.out) > 65536:
            self.flush()

    def flush(self) -> None:
        if self.out:
            self.sock.sendall(self.out)
            self.out.clear()

    def _read_acks(self) -> None:
        buf = b""
        while True:
            try:
                data = self.sock.recv(65536)
            except OSError:
                return
            if not data:
                return
            buf += data
            whole = len(buf) - len(buf) % 4  # PUBACKs only: 0x40 0x02 <mid>
            with self.lock:
                for at in range(0, whole, 4):
                    mid = int.from_bytes(buf[at + 2 : at + 4], "big")
                    if mid in self.pending:
                        self.pending.discard(mid)
                        self.acked += 1
            buf = buf[whole:]

    def close(self, wait_s: float) -> int:
        """Flush, wait for the outstanding PUBACKs (at most ``wait_s``), disconnect: the acked count."""
        self.flush()
        deadline = time.monotonic() + wait_s
        while self.pending and time.monotonic() < deadline:
            time.sleep(0.05)
        with contextlib.suppress(OSError):
            self.sock.sendall(b"\xe0\x00")
        self.sock.close()
        self.reader.join(5)
        return self.acked


def publisher(port: int, nodes: int, rate_hz: float, duration: float, counter: Any, stop_at: Any,  # noqa: PLR0917 - a Process target
              events_every: int, events: Any) -> None:
    """Child process: publish one report per node every 1/rate_hz seconds, spread evenly: metrics
    at QoS 0 (as agents send them), and every ``events_every``-th report an event at QoS 1 (0: none)."""
    from agent.wire import PROTOCOL_VERSION, Event, Metrics, MetricSample, encode  # noqa: PLC0415

    client = RawPublisher(port)
    names = [f"sim-{i:05d}" for i in range(nodes)]
    sites = [f"site-{i % 10}" for i in range(nodes)]
    topics = [f"heald/v1/{sites[i]}/{names[i]}/metrics".encode() for i in range(nodes)]
    event_topics = [f"heald/v1/{sites[i]}/{names[i]}/event".encode() for i in range(nodes)]
    # Each scenario has a fresh store: every node starts at seq 0, as a new agent does (a seq far
    # from 0 for a new node is quarantined by the store as a jump: coordinator/store/incarnations.py).
    seqs = [0] * nodes
    per_s = nodes * rate_hz
    start = time.monotonic()
    sent = 0
    i = 0
    while (elapsed := time.monotonic() - start) < duration:
        due = int(elapsed * per_s)
        while sent < due:
            k = i % nodes
            seqs[k] += 1
            now = time.time()
            if events_every and sent % events_every == events_every - 1:
                event = Event(v=PROTOCOL_VERSION, node=names[k], site=sites[k], seq=seqs[k], ts=now,
                              name="bench.event", source="bench", wall=now, value=float(sent))
                client.publish(event_topics[k], encode(event), qos=1)
            else:
                msg = Metrics(
                    v=PROTOCOL_VERSION,
                    node=names[k],
                    site=sites[k],
                    seq=seqs[k],
                    ts=now,
                    samples=[
                        MetricSample(
                            seq=seqs[k],
                            wall=now,
                            mono=time.monotonic(),
                            metrics={"cpu.util": 12.5, "mem.used_pct": 40.0, "disk.root.used_pct": 61.0},
                        )
                    ],
                )
                client.publish(topics[k], encode(msg), qos=0)
            sent += 1
            i += 1
        client.flush()
        counter.value = sent
        time.sleep(0.002)
    counter.value = sent
    stop_at.value = time.time()
    events.value = client.close(30.0)


class RawSubscriber:
    """Counts messages on heald/v1/+/+/metrics without decoding them (paho, QoS 1)."""

    def __init__(self, port: int) -> None:
        import paho.mqtt.client as mqtt  # noqa: PLC0415

        self.count = 0
        self.first: float | None = None
        self.last: float | None = None
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=f"bench-raw-{secrets.token_hex(3)}"
        )
        self.client.on_message = self._on_message
        self.client.on_connect = lambda c, *_: c.subscribe("heald/v1/+/+/metrics", qos=1)
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    def _on_message(self, *_: Any) -> None:
        now = time.monotonic()
        if self.first is None:
            self.first = now
        self.last = now
        self.count += 1

    def rate(self) -> float:
        if self.first is None or self.last is None or self.last <= self.first:
            return 0.0
        return self.count / (self.last - self.first)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


# ------------------------------------------------------------------------------ scenario


def create_pg_db() -> str | None:
    try:
        import psycopg  # noqa: PLC0415

        name = f"heald_bench_{secrets.token_hex(4)}"
        with psycopg.connect(PG_ADMIN, autocommit=True, connect_timeout=3) as conn:
            conn.execute(f"CREATE DATABASE {name}")
    except Exception:  # noqa: BLE001
        return None
    return name


def drop_pg_db(name: str) -> None:
    import psycopg  # noqa: PLC0415

    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def quiesce(store: str) -> None:
    """Start each scenario from a written-back disk: the page cache the last one dirtied (its
    SQLite file, its PostgreSQL database) is flushed and, on PostgreSQL, a checkpoint taken, so
    that none of that lands inside the next scenario's window."""
    os.sync()
    if store == "postgresql":
        with contextlib.suppress(Exception):
            import psycopg  # noqa: PLC0415

            with psycopg.connect(PG_ADMIN, autocommit=True, connect_timeout=3) as conn:
                conn.execute("CHECKPOINT")
    time.sleep(2.0)


def cpu_seconds(c: CoordinatorProcess) -> float:
    """User + system CPU time of a coordinator process (all its threads) so far."""
    return 0.0 if c.proc is None else pid_cpu_seconds(c.proc.pid)


def pid_cpu_seconds(pid: int | None) -> float:
    """User + system CPU time of process ``pid`` so far (0 when gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def postgres_cpu_seconds() -> float:
    """User + system CPU time of every PostgreSQL server process so far (the backends serving
    the replicas, the WAL writer, the checkpointer...)."""
    total = 0.0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if not (entry / "comm").read_text().startswith(("postgres", "postmaster")):
                continue
        except OSError:
            continue
        total += pid_cpu_seconds(int(entry.name))
    return total


def busy_cpu_seconds() -> float:
    """The machine's busy CPU time so far (all CPUs, /proc/stat less idle and iowait)."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(values) - values[3] - values[4]) / os.sysconf("SC_CLK_TCK")


class CpuCap:
    """Caps one process (all its threads) at ``cores`` CPUs: a cgroup of its own with a CFS
    quota (cgroup v1 ``cpu`` controller or v2 ``cpu.max``), removed by :meth:`close` once the
    process is gone. It stands for a replica that has a small host of its own: one replica then
    falls behind on its own CPU, not on the machine that the broker, PostgreSQL and the other
    replica share, and what a second replica adds is measured apart from this machine's size."""

    PERIOD_US = 100_000

    def __init__(self, pid: int, cores: float, name: str) -> None:
        quota = max(1000, int(cores * self.PERIOD_US))
        v1 = Path("/sys/fs/cgroup/cpu")
        if (v1 / "cpu.cfs_quota_us").exists():
            self.path = v1 / name
            self.path.mkdir()
            (self.path / "cpu.cfs_period_us").write_text(str(self.PERIOD_US))
            (self.path / "cpu.cfs_quota_us").write_text(str(quota))
        else:
            root = Path("/sys/fs/cgroup")
            if "cpu" not in (root / "cgroup.subtree_control").read_text().split():
                (root / "cgroup.subtree_control").write_text("+cpu")
            self.path = root / name
            self.path.mkdir()
            (self.path / "cpu.max").write_text(f"{quota} {self.PERIOD_US}")
        (self.path / "cgroup.procs").write_text(str(pid))

    def close(self) -> None:
        for _ in range(50):  # the process is stopped first; its exit empties the cgroup
            try:
                self.path.rmdir()
            except FileNotFoundError:
                return
            except OSError:
                time.sleep(0.1)
            else:
                return


def pg_lock_waits(conn: Any, database: str) -> tuple[int, int]:
    """(client backends of ``database`` now, those waiting on a heavyweight lock: a row, a
    transaction, a tuple): replicas that serialise on each other's rows show up here."""
    row = conn.execute(
        "SELECT count(*), count(*) FILTER (WHERE wait_event_type = 'Lock') FROM pg_stat_activity "
        "WHERE datname = %s AND backend_type = 'client backend'", (database,)).fetchone()
    return (int(row[0]), int(row[1])) if row else (0, 0)


def pg_wal_and_checkpoints(conn: Any) -> tuple[int, int]:
    """(WAL position in bytes, checkpoints started so far): the server's, every database's."""
    row = conn.execute("SELECT pg_current_wal_lsn() - '0/0'::pg_lsn, checkpoints_timed + checkpoints_req "
                       "FROM pg_stat_bgwriter").fetchone()
    return (int(row[0]), int(row[1])) if row else (0, 0)


def info_of(c: CoordinatorProcess) -> dict[str, Any]:
    status, body = c.api("GET", "/api/info")
    if status != 200:
        raise RuntimeError(f"/api/info: {status} {body}")
    return dict(body)


def count_events(store: str, work: Path, url: str) -> int:
    """Events in the store after the run (each published one is stored once, whatever was shed)."""
    sql = "SELECT count(*) FROM events WHERE name = 'bench.event'"
    if store == "postgresql":
        import psycopg  # noqa: PLC0415

        with psycopg.connect(url) as conn:
            row = conn.execute(sql).fetchone()
            return int(row[0]) if row else 0
    import sqlite3  # noqa: PLC0415

    with contextlib.closing(sqlite3.connect(work / "r0" / "state" / "coordinator.db")) as conn:
        return int(conn.execute(sql).fetchone()[0])


def handled(infos: list[dict[str, Any]]) -> int:
    """Reports the replicas are done with: stored (or found duplicate) or shed."""
    return sum(i["ingest"]["processed"] + i["ingest"]["duplicates"] + shed_of(i)["total"] for i in infos)


def shed_of(info: dict[str, Any]) -> dict[str, Any]:
    """A replica's shed counts (none from a coordinator that predates shedding)."""
    return dict(info["ingest"].get("shed", {"total": 0, "by_reason": {}}))


def run_scenario(store: str, replicas: int, nodes: int, rate_hz: float, duration: float,  # noqa: PLR0917
                 events_every: int, *, with_raw: bool, replica_cpus: float | None = None,
                 prune_interval_s: float | None = None) -> Row | None:
    quiesce(store)
    work = Path(tempfile.mkdtemp(prefix="heald-bench-"))
    broker, port = start_mosquitto(work)
    pg_name = None
    coords: list[CoordinatorProcess] = []
    caps: list[CpuCap] = []
    watch: Any = None  # the admin connection that looks at the replicas' backends (PostgreSQL)
    raw: RawSubscriber | None = None
    try:
        url = ""
        if store == "postgresql":
            pg_name = create_pg_db()
            if pg_name is None:
                print(f"  skipped: PostgreSQL unreachable at {PG_ADMIN}")
                return None
            url = PG_ADMIN.rsplit("/", 1)[0] + "/" + pg_name
        for r in range(replicas):
            web = free_port()
            cfg = write_config(
                work / f"r{r}",
                mqtt_port=port,
                web_port=web,
                store_url=url,
                share_group="bench" if replicas > 1 else "",
                replica_id=f"bench-{r}",
                # the default batch interval (write_config's is the tests' 0.02); retention's default
                # unless --prune-interval says otherwise
                store={"batch_interval_s": 0.05,
                       **({} if prune_interval_s is None else {"prune_interval_s": prune_interval_s})},
            )
            c = CoordinatorProcess(cfg, web)
            c.start()
            coords.append(c)
            if replica_cpus is not None and c.proc is not None:
                caps.append(CpuCap(c.proc.pid, replica_cpus, f"{work.name}-r{r}"))
        if with_raw:
            raw = RawSubscriber(port)
        time.sleep(0.5)
        ctx = mp.get_context("spawn")
        counter, stop_at, events = ctx.Value("q", 0), ctx.Value("d", 0.0), ctx.Value("q", 0)
        pub = ctx.Process(
            target=publisher, args=(port, nodes, rate_hz, duration, counter, stop_at, events_every, events),
            daemon=True,
        )
        pub.start()
        samples: list[tuple[float, int, float | None, float]] = []  # (t, processed, p99, coordinator CPU s)
        load_cpu: list[float] = []  # publisher + broker CPU s, at the same times
        others: list[tuple[int, float, float]] = []  # (published, PostgreSQL CPU s, busy CPU s), same times
        backends = lock_waits = 0
        wal: list[tuple[float, int, int]] = []  # (t, WAL bytes, checkpoints) over the window
        if pg_name:
            import psycopg  # noqa: PLC0415

            watch = psycopg.connect(PG_ADMIN, autocommit=True, connect_timeout=3)
        t0 = time.monotonic()
        half_p99: list[float | None] = []
        while pub.is_alive() and time.monotonic() - t0 < duration + 60:
            time.sleep(1.0)
            infos = [info_of(c) for c in coords]
            processed = sum(i["ingest"]["processed"] for i in infos)
            p99s = [i["ingest"]["lag_s"]["p99"] for i in infos if i["ingest"]["lag_s"]["p99"] is not None]
            samples.append((time.monotonic() - t0, processed, max(p99s) if p99s else None,
                            sum(cpu_seconds(c) for c in coords)))
            load_cpu.append(pid_cpu_seconds(pub.pid) + pid_cpu_seconds(broker.pid))
            others.append((int(counter.value), postgres_cpu_seconds() if store == "postgresql" else 0.0,
                           busy_cpu_seconds()))
            if watch is not None and duration * 0.2 <= samples[-1][0] <= duration:
                seen, waiting = pg_lock_waits(watch, str(pg_name))
                backends, lock_waits = backends + seen, lock_waits + waiting
                wal.append((samples[-1][0], *pg_wal_and_checkpoints(watch)))
            if (
                abs((time.monotonic() - t0) - duration / 2) < 0.6
                or abs((time.monotonic() - t0) - duration) < 0.6
            ):
                half_p99.append(max(p99s) if p99s else None)
        pub.join(60)
        published = int(counter.value)
        infos = [info_of(c) for c in coords]
        backlog = published - handled(infos)
        drained_after = None
        t_stop = time.monotonic()
        last_received, still_since = -1, time.monotonic()
        while time.monotonic() - t_stop < 60:
            infos = [info_of(c) for c in coords]
            if handled(infos) >= published:
                drained_after = time.monotonic() - t_stop
                break
            # the broker may drop QoS 0 metrics it cannot deliver in time: then the count never
            # gets there, and the run is over once nothing more arrives and nothing waits
            received = sum(i["ingest"]["received"] for i in infos)
            if received != last_received:
                last_received, still_since = received, time.monotonic()
            elif (time.monotonic() - still_since > 3 and handled(infos) >= received
                  and not any(i["ingest"]["queue_depth"] for i in infos)):
                drained_after = still_since - t_stop
                break
            time.sleep(0.25)
        received_total = sum(i["ingest"]["received"] for i in infos)
        shed_by_kind: dict[str, int] = {}
        for i in infos:
            for kind, n in shed_of(i)["by_reason"].items():
                shed_by_kind[kind] = shed_by_kind.get(kind, 0) + n
        # sustained rate: processed over the window that skips the first 20% (warm-up)
        window = [s for s in samples if duration * 0.2 <= s[0] <= duration]
        rate = (window[-1][1] - window[0][1]) / (window[-1][0] - window[0][0]) if len(window) >= 2 else 0.0
        cores, cpu_per_report, load_cores = 0.0, None, 0.0
        sent_rate, pg_cores, pg_per_report, box_cores = 0.0, 0.0, None, 0.0
        if len(window) >= 2:
            span = window[-1][0] - window[0][0]
            cpu = window[-1][3] - window[0][3]
            cores = round(cpu / span, 2)
            first, last = samples.index(window[0]), samples.index(window[-1])
            load_cores = round((load_cpu[last] - load_cpu[first]) / span, 2)
            stored = window[-1][1] - window[0][1]
            cpu_per_report = round(cpu / stored * 1e6, 1) if stored else None
            sent_rate = round((others[last][0] - others[first][0]) / span, 1)
            pg_cpu = others[last][1] - others[first][1]
            pg_cores = round(pg_cpu / span, 2)
            pg_per_report = round(pg_cpu / stored * 1e6, 1) if stored and store == "postgresql" else None
            box_cores = round((others[last][2] - others[first][2]) / span, 2)
        wal_per_report, checkpoints = None, None
        if len(wal) >= 2 and len(window) >= 2:
            stored_wal = window[-1][1] - window[0][1]
            wal_per_report = round((wal[-1][1] - wal[0][1]) / stored_wal) if stored_wal else None
            checkpoints = wal[-1][2] - wal[0][2]
        lags = [i["ingest"]["lag_s"] for i in infos]
        p50 = max((x["p50"] for x in lags if x["p50"] is not None), default=None)
        p99 = max((x["p99"] for x in lags if x["p99"] is not None), default=None)
        lmax = max((x["max"] for x in lags if x["max"] is not None), default=None)
        first = half_p99[0] if half_p99 else None
        second = half_p99[-1] if len(half_p99) > 1 else None
        offered = nodes * rate_hz
        shed = sum(shed_of(i)["total"] for i in infos)
        sustained = (
            rate >= 0.95 * offered and backlog < max(1000, offered) and (second is None or second < 2.0)
            and shed == 0
        )
        events_stored = count_events(store, work, url)
        return Row(
            store,
            replicas,
            nodes,
            rate_hz,
            offered,
            published,
            round(rate, 1),
            round(raw.rate(), 1) if raw is not None else 0.0,
            p50,
            p99,
            lmax,
            first,
            second,
            backlog,
            drained_after,
            sustained,
            shed,
            int(events.value),
            events_stored,
            cores,
            cpu_per_report,
            received_total,
            shed_by_kind,
            load_cores,
            replica_cpus,
            sent_rate,
            pg_cores,
            pg_per_report,
            box_cores,
            backends,
            lock_waits,
            wal_per_report,
            checkpoints,
        )
    finally:
        if watch is not None:
            watch.close()
        if raw is not None:
            raw.close()
        for c in coords:
            c.stop()
        for cap in caps:
            cap.close()
        stop(broker)
        if pg_name:
            drop_pg_db(pg_name)
        shutil.rmtree(work, ignore_errors=True)


def fmt(v: float | None, unit: str = "s") -> str:
    if v is None:
        return "-"
    return f"{v * 1000:.0f}ms" if unit == "s" and v < 10 else f"{v:.1f}{unit}"


def print_table(rows: list[Row]) -> None:
    headers = [
        "store",
        "repl",
        "nodes",
        "Hz",
        "offered/s (sent)",
        "processed/s",
        "raw sub/s",
        "lag p50",
        "lag p99",
        "p99 1st/2nd half",
        "backlog",
        "drain",
        "shed",
        "events lost",
        "coord cores",
        "µs CPU/report",
        "pub+broker cores",
        "pg cores",
        "pg µs/report",
        "box cores",
        "lock waits",
        "WAL B/report",
        "checkpoints",
        "cap",
        "sustained",
    ]
    table = [
        [
            r.store,
            str(r.replicas),
            str(r.nodes),
            f"{r.rate_hz:g}",
            f"{r.offered_per_s:.0f} ({r.published_window_per_s:.0f})",
            f"{r.processed_per_s:.0f}",
            f"{r.raw_subscriber_per_s:.0f}" if r.raw_subscriber_per_s else "-",
            fmt(r.lag_p50_s),
            fmt(r.lag_p99_s),
            f"{fmt(r.lag_p99_first_half_s)}/{fmt(r.lag_p99_second_half_s)}",
            str(r.backlog_at_stop),
            fmt(r.drained_after_s),
            str(r.shed),
            f"{r.events_published - r.events_stored}/{r.events_published}",
            f"{r.coord_cores:.2f}",
            "-" if r.coord_cpu_us_per_report is None else f"{r.coord_cpu_us_per_report:.0f}",
            f"{r.load_cores:.2f}",
            f"{r.pg_cores:.2f}" if r.store == "postgresql" else "-",
            "-" if r.pg_cpu_us_per_report is None else f"{r.pg_cpu_us_per_report:.0f}",
            f"{r.box_cores:.2f}",
            f"{r.pg_lock_waits}/{r.pg_backend_samples}" if r.store == "postgresql" else "-",
            "-" if r.pg_wal_bytes_per_report is None else f"{r.pg_wal_bytes_per_report:.0f}",
            "-" if r.pg_checkpoints is None else str(r.pg_checkpoints),
            "-" if r.replica_cpus is None else f"{r.replica_cpus:g}",
            "yes" if r.sustained else "NO",
        ]
        for r in rows
    ]
    widths = [max(len(h), *(len(t[i]) for t in table)) for i, h in enumerate(headers)]
    print("  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)))
    for t in table:
        print("  ".join(c.ljust(w) for c, w in zip(t, widths, strict=True)))


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--nodes", type=int, action="append")
    parser.add_argument("--rate", type=float, action="append",
                        help="reports per node per second (agents send 1; 2 offers twice what a fleet would)")
    parser.add_argument("--replicas", type=int, action="append", choices=[1, 2])
    parser.add_argument("--store", action="append", choices=["sqlite", "postgresql"])
    parser.add_argument("--duration", type=float, default=30.0)
    parser.add_argument("--raw", action="store_true",
                        help="also run the raw counting subscriber (it takes CPU on a small host)")
    parser.add_argument("--events-every", type=int, default=100,
                        help="every Nth report is an event (QoS 1) instead of metrics; 0: metrics only")
    parser.add_argument("--replica-cpus", type=float, default=None,
                        help="cap each coordinator replica at this many cores (a cgroup each, root): one "
                        "replica then falls behind on its own CPU, not on this machine's")
    parser.add_argument("--prune-interval", type=float, default=None,
                        help="[store] prune_interval_s of the replicas (default: the store's, 60 s); "
                        "86400 keeps the retention pass out of the run")
    parser.add_argument("--quick", action="store_true", help="1k nodes only, 10 s")
    parser.add_argument("--smoke", action="store_true", help="50 nodes, SQLite, 3 s, no results file")
    args = parser.parse_args()
    scenarios: list[tuple[str, int, int, float, float | None]]
    if args.smoke:
        scenarios = [("sqlite", 1, 50, 1.0, None)]
        args.duration = 3.0
    elif args.quick:
        scenarios = [("sqlite", 1, 1000, 1.0, None)]
        args.duration = 10.0
    elif args.nodes or args.rate or args.replicas or args.store:
        scenarios = [
            (s, r, n, hz, args.replica_cpus)
            for s in (args.store or ["sqlite"])
            for r in (args.replicas or [1])
            for n in (args.nodes or [1000])
            for hz in (args.rate or [1.0])
            if not (s == "sqlite" and r > 1)
        ]
    else:  # issue 25's lines: 10k nodes x 1 Hz on each store, twice that offered, replicas
        scenarios = [
            ("sqlite", 1, 10000, 1.0, None),
            ("sqlite", 1, 10000, 2.0, None),
            ("postgresql", 1, 10000, 1.0, None),
            ("postgresql", 1, 10000, 2.0, None),
            ("postgresql", 2, 10000, 1.0, None),
            ("postgresql", 2, 10000, 2.0, None),
            ("postgresql", 1, 10000, 1.0, 0.25),
            ("postgresql", 2, 10000, 1.0, 0.25),
        ]
    rows: list[Row] = []
    for store, replicas, nodes, hz, cap in scenarios:
        capped = "" if cap is None else f", each replica capped at {cap:g} cores"
        print(f"== {store} x{replicas}: {nodes} nodes at {hz:g} Hz for {args.duration:.0f}s{capped}",
              flush=True)
        row = run_scenario(store, replicas, nodes, hz, args.duration, args.events_every, with_raw=args.raw,
                           replica_cpus=cap, prune_interval_s=args.prune_interval)
        if row is not None:
            rows.append(row)
            print(
                f"  processed {row.processed_per_s:.0f}/s (offered {row.offered_per_s:.0f}/s, sent "
                f"{row.published_window_per_s:.0f}/s in the same window), "
                f"lag p99 {fmt(row.lag_p99_s)}, backlog {row.backlog_at_stop}, shed {row.shed}, "
                f"events stored {row.events_stored}/{row.events_published}, received {row.received}/"
                f"{row.published}, shed by kind {row.shed_by_kind}",
                flush=True,
            )
    print()
    print_table(rows)
    if args.smoke:
        print(f"smoke run: {RESULTS.relative_to(REPO)} left as it was")
        return 0
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    tmp = RESULTS.with_suffix(".json.tmp")
    tmp.write_text(
        json.dumps(
            {
                "machine": {
                    "cpus": os.cpu_count(),
                    "python": platform.python_version(),
                    "platform": platform.platform(),
                },
                "duration_s": args.duration,
                "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "notes": (
                    "publisher, mosquitto, PostgreSQL, the raw subscriber (--raw) and every coordinator "
                    "replica share this machine's CPUs (and, on a shared host, with whatever else runs: "
                    "the load average is in load_avg); coord_cores and coord_cpu_us_per_report are the "
                    "coordinator's own CPU time over the window, load_cores the publisher's and broker's"
                ),
                "load_avg": Path("/proc/loadavg").read_text().split()[:3],
                "rows": [asdict(r) for r in rows],
            },
            indent=2,
        )
    )
    tmp.replace(RESULTS)
    print(f"\nwrote {RESULTS.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    threading.excepthook = lambda a: None  # paho's network thread at shutdown
    sys.exit(main())
