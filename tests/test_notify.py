"""Notifications from the coordinator reach people (issue 19): a real agent's escalation reaches a
loopback webhook receiver and a real Alertmanager (Debian's ``prometheus-alertmanager``) once,
with retries while the receiver is down or answers 503, and no repeat after a coordinator
restart; a node going offline and coming back fires and resolves an Alertmanager alert.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import msgspec
import pytest
from broker import Broker
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.wire import kind_of
from agent.wire.signing import CommandSigner
from coordinator.config import BudgetSection, NotifyRoute, NotifySection, StoreSection, loads
from coordinator.errors import CoordinatorConfigError
from coordinator.model import Incoming
from coordinator.notify import Notifier
from coordinator.notify.send import slack_text
from coordinator.store import Store, open_store
from devtools.coordinator_proc import REPO_ROOT, CoordinatorProcess, free_port, write_config
from devtools.fleet_sim import SimNode

ALERTMANAGER = shutil.which("prometheus-alertmanager") or shutil.which("alertmanager")
WORKER = "heald-notify-wk"
PLAYBOOK = """
name: notify-worker
description: start the test's worker; verify never holds, so the one run escalates
mode: enforce
trigger:
  metric: "proc.count[{worker}]"
  op: "<"
  value: 1
steps:
  - action: restart_process
    params: {{name: {worker}, argv: ["{exe}", "300"]}}
    timeout: 10s
verify:
  settle: 0s
  expect: {{metric: "proc.count[{worker}]", op: "<", value: 0}}
guards:
  cooldown: 0s
  max_runs: {{count: 1, window: 1h}}
escalate: {{event: notify.worker.escalated, severity: critical, message: "worker needs a human"}}
"""


def wait_until(what: str, check: Callable[[], Any], timeout: float = 60.0, interval: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = check()
        if got:
            return got
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what}")


# ------------------------------------------------------------------------------ receivers
class Receiver:
    """A loopback HTTP receiver: answers 503 to the first ``fail_first`` requests, then 200 (or
    what ``answers`` says for the path); its handler takes a notification once per path and
    Idempotency-Key (a repeat is answered 200 and counted, not taken)."""

    def __init__(self, port: int, fail_first: int = 0, answers: dict[str, int] | None = None) -> None:
        self.port = port
        self.fail_first = fail_first
        self.answers = answers or {}  # path -> the status always answered there
        self.requests: list[tuple[str, dict[str, str], Any]] = []
        self.taken: dict[str, list[Any]] = {}  # "<path> <Idempotency-Key>" -> the body taken
        self.repeats = 0
        self.lock = threading.Lock()
        self.server: ThreadingHTTPServer | None = None

    def start(self) -> None:
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", "0"))))
                with outer.lock:
                    outer.requests.append((self.path, dict(self.headers), body))
                    failing = len(outer.requests) <= outer.fail_first
                    status = outer.answers.get(self.path, 503 if failing else 200)
                    failing = status != 200
                    key = f"{self.path} {self.headers.get('Idempotency-Key', '')}"  # per route
                    if not failing:
                        if key in outer.taken:
                            outer.repeats += 1
                        else:
                            outer.taken[key] = [body]
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *_args: object) -> None:
                pass

        class Server(ThreadingHTTPServer):
            request_queue_size = 128  # the listen backlog: 5 by default, and a burst of POSTs waits 1 s

        self.server = Server(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self.server.serve_forever, name="receiver", daemon=True).start()

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()


@pytest.fixture
def alertmanager(tmp_path: Path) -> Iterator[str]:
    """A real Alertmanager on a free loopback port, clustering off, its own config and storage."""
    if ALERTMANAGER is None:
        pytest.skip("prometheus-alertmanager is not installed (apt-get install prometheus-alertmanager)")
    d = tmp_path / "alertmanager"
    d.mkdir()
    (d / "alertmanager.yml").write_text('route:\n  receiver: "null"\nreceivers:\n  - name: "null"\n')
    port = free_port()
    with (d / "log").open("ab") as log:
        proc = subprocess.Popen(
            [ALERTMANAGER, f"--config.file={d / 'alertmanager.yml'}", f"--storage.path={d / 'data'}",
             f"--web.listen-address=127.0.0.1:{port}", "--cluster.listen-address="],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log)
    url = f"http://127.0.0.1:{port}"
    try:
        def ready() -> bool:
            assert proc.poll() is None, (d / "log").read_text()
            with contextlib.suppress(OSError), urllib.request.urlopen(  # noqa: S310 - loopback
                url + "/-/ready", timeout=2
            ) as resp:
                return resp.status == 200
            return False

        wait_until("alertmanager ready", ready, timeout=30)
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def am_alerts(url: str, alertname: str, *, active: bool = True) -> list[dict[str, Any]]:
    query = f"filter=alertname%3D%22{alertname}%22&active={str(active).lower()}&silenced=true&inhibited=true"
    with urllib.request.urlopen(f"{url}/api/v2/alerts?{query}", timeout=5) as resp:  # noqa: S310 - loopback
        alerts: list[dict[str, Any]] = json.loads(resp.read())
    return alerts


# ------------------------------------------------------------------------------ agent
class Agent:
    """A real `heald run` acting only on the worker the test made (a symlink to /bin/sleep)."""

    def __init__(self, directory: Path, node: str, port: int) -> None:
        self.dir = directory
        playbooks = directory / "playbooks.d"
        playbooks.mkdir(parents=True)
        exe = directory / WORKER
        exe.symlink_to("/bin/sleep")
        self.exe = exe
        (playbooks / "notify-worker.yaml").write_text(PLAYBOOK.format(worker=WORKER, exe=exe))
        self.config = directory / "agent.toml"
        self.config.write_text(
            f'[node]\nid = "{node}"\nsite = "lab"\n'
            f'[paths]\nstate_dir = "{directory / "state"}"\nruntime_dir = "{directory / "run"}"\n'
            f'[collect.gpu]\nenabled = false\n[collect.processes]\ninterval_s = 1.0\nwatch = ["{WORKER}"]\n'
            f'[mqtt]\nenabled = true\nhost = "127.0.0.1"\nport = {port}\nmetrics_interval_s = 1.0\n'
            f'[playbooks]\ndirs = ["{playbooks}"]\nload_shipped = false\n[log]\nformat = "json"\n'
        )
        self.log = directory / "agent.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "agent", "run", "--config", str(self.config)], cwd=REPO_ROOT,
                stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)))

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        for entry in Path("/proc").iterdir():  # the worker the agent started (only ours: our path)
            with contextlib.suppress(OSError, UnicodeDecodeError, ValueError):
                if (entry / "cmdline").read_bytes().split(b"\0")[0].decode() == str(self.exe):
                    os.kill(int(entry.name), signal.SIGKILL)


def coordinator(tmp_path: Path, mosquitto: Broker, notify: str) -> CoordinatorProcess:
    web_port = free_port()
    cfg = write_config(tmp_path / "coord", mqtt_port=mosquitto.port, web_port=web_port)
    cfg.write_text(cfg.read_text() + notify)
    return CoordinatorProcess(cfg, web_port)


def rows_of(proc: CoordinatorProcess, table: str) -> list[dict[str, Any]]:
    """The rows of a table of the coordinator's SQLite store, read straight from its file."""
    db = proc.config.parent / "state" / "coordinator.db"
    with contextlib.closing(sqlite3.connect(db, timeout=10)) as conn:
        conn.row_factory = sqlite3.Row
        return [dict(r) for r in conn.execute(f"SELECT * FROM {table} ORDER BY rowid")]  # noqa: S608


def outbox(proc: CoordinatorProcess) -> list[dict[str, Any]]:
    return rows_of(proc, "notify_outbox")


# ------------------------------------------------------------------------------ tests
@pytest.mark.slow
def test_agent_escalation_reaches_webhook_and_alertmanager_once(
    tmp_path: Path, mosquitto: Broker, alertmanager: str
) -> None:
    """Done when: an escalation raised by a real agent reaches a loopback webhook receiver and a
    real Alertmanager once, with retries when the receiver is briefly down; a coordinator restart
    repeats nothing."""
    hook_port = free_port()
    receiver = Receiver(hook_port, fail_first=2)  # not listening at first, then 503 twice
    notify = (
        "[notify]\npoll_interval_s = 0.2\nbackoff_s = 0.3\nbackoff_max_s = 1.0\nmax_attempts = 50\n"
        "timeout_s = 5\n"
        '[[notify.routes]]\nname = "hook"\nkind = "webhook"\n'
        f'url = "http://127.0.0.1:{hook_port}/hook"\nmin_severity = "critical"\nevents = ["escalation"]\n'
        '[[notify.routes]]\nname = "chat"\nkind = "slack"\n'
        f'url = "http://127.0.0.1:{hook_port}/slack"\nevents = ["escalation"]\nsend_resolved = false\n'
        f'[[notify.routes]]\nname = "am"\nkind = "alertmanager"\nurl = "{alertmanager}"\n'
        'events = ["escalation"]\n'
    )
    coord = coordinator(tmp_path, mosquitto, notify)
    coord.start()
    agent = Agent(tmp_path / "agent", "notify-a", mosquitto.port)
    try:
        agent.start()
        fired = wait_until("the escalation at Alertmanager",
                           lambda: am_alerts(alertmanager, "HealdEscalation"), timeout=90)
        # the receiver is still down: its rows are being retried, not lost
        rows = wait_until("two failed tries on the webhook route", lambda: [
            r for r in outbox(coord)
            if r["route"] == "hook" and r["attempts"] >= 2 and r["state"] == "pending"])
        assert "Connect" in rows[0]["last_error"] or "refused" in rows[0]["last_error"].lower(), rows
        receiver.start()
        wait_until("delivery to the webhook and the chat route",
                   lambda: len(receiver.taken) == 2 and all(r["state"] == "sent" for r in outbox(coord)))

        # restart the coordinator: nothing is sent again
        assert coord.stop() == 0
        coord.start()
        time.sleep(3)  # 15 scan rounds
        _, info = coord.api("GET", "/api/info")
        assert (info["notify"]["queued"], info["notify"]["sent"]) == (0, 0), info["notify"]
    finally:
        agent.stop()
        coord.stop()
        receiver.stop()

    assert len(rows_of(coord, "escalations")) == 1, rows_of(coord, "escalations")
    assert receiver.repeats == 0
    hook_key = next(k for k in receiver.taken if k.startswith("/hook escalation:notify-a:")).split()[1]
    assert hook_key.endswith(":firing")
    (hook_body,) = receiver.taken["/hook " + hook_key]
    assert hook_body["kind"] == "escalation"
    assert hook_body["node"] == "notify-a"
    assert hook_body["site"] == "lab"
    assert hook_body["severity"] == "critical"
    assert "worker needs a human" in hook_body["summary"]
    paths = [p for p, _, _ in receiver.requests]
    assert paths.count("/hook") + paths.count("/slack") == 4  # 2 answered 503, then one each
    slack = [b for p, _, b in receiver.requests if p == "/slack"]
    assert "[CRITICAL] heald escalation: notify-a" in slack[-1]["text"]
    rows = outbox(coord)
    assert sorted(r["route"] for r in rows) == ["am", "chat", "hook"], rows  # one notice per route, once
    assert all(r["state"] == "sent" and r["dedup_key"] == hook_key.rsplit(":", 1)[0] for r in rows), rows
    (alert,) = fired
    assert alert["labels"]["node"] == "notify-a"
    assert alert["labels"]["severity"] == "critical"
    assert alert["labels"]["heald_key"] == hook_key.rsplit(":", 1)[0]
    assert len(am_alerts(alertmanager, "HealdEscalation")) == 1  # still one, after the restart


def test_notify_config_errors_name_the_key() -> None:
    good = '[web]\npassword = "correct-horse-battery"\n'
    with pytest.raises(CoordinatorConfigError) as err:
        loads(good + '[[notify.routes]]\nname = "a"\nurl = "file:///etc/passwd"\n', "c.toml")
    assert "notify.routes" in str(err.value)
    assert "not an http(s) URL" in str(err.value)
    with pytest.raises(CoordinatorConfigError) as err:
        loads(good + '[[notify.routes]]\nname = "a"\nurl = "http://x"\n[[notify.routes]]\nname = "a"\n'
              'url = "http://y"\n', "c.toml")
    assert "used twice" in str(err.value)
    with pytest.raises(CoordinatorConfigError) as err:
        loads(good + '[[notify.routes]]\nname = "a"\nurl = "http://x"\nkind = "email"\n', "c.toml")
    assert "notify.routes" in str(err.value)
    ok = loads(good + '[[notify.routes]]\nname = "a"\nurl = "http://x"\nkind = "alertmanager"\n')
    notice = {"status": "firing", "severity": "critical", "kind": "escalation",
              "summary": "n1: <!channel> & co"}
    assert slack_text(notice) == "[CRITICAL] heald escalation: n1: &lt;!channel&gt; &amp; co"
    assert ok.notify.routes[0].events == ["escalation", "approval", "offline"]


def test_check_reads_the_route_token_files(tmp_path: Path) -> None:
    """`heald-coordinator check` names the routes, and refuses a token file it cannot read (exit 2,
    one line naming the file and the key, no traceback)."""
    token = tmp_path / "hook.token"
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[coordinator]\nstate_dir = "{tmp_path}"\n[web]\npassword = "correct-horse-battery"\n'
                   f'[[notify.routes]]\nname = "hook"\nurl = "http://127.0.0.1:9/x"\n'
                   f'bearer_token_file = "{token}"\n')

    def check() -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "coordinator", "--config", str(cfg), "check"],
                              capture_output=True, text=True, cwd=REPO_ROOT, timeout=60, check=False)

    res = check()
    assert res.returncode == 2, res
    assert f"{token}: [notify.routes.bearer_token_file] cannot read" in res.stderr
    assert "Traceback" not in res.stderr
    token.write_text("s3cret-t0ken\n")
    res = check()
    assert res.returncode == 0, res
    assert "notify hook (webhook)" in res.stdout
    assert "s3cret" not in res.stdout + res.stderr


def inc(message: Any) -> Incoming:
    return Incoming(message=message, kind=kind_of(message), received_at=time.time())


async def async_wait(what: str, check: Callable[[], Any], within: float = 30.0) -> Any:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        got = check()
        if asyncio.iscoroutine(got):
            got = await got
        if got:
            return got
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


async def store_outbox(store: Store) -> list[dict[str, Any]]:
    return await store.db.read(lambda cur: store.db.rows(cur, "SELECT * FROM notify_outbox ORDER BY id"))


PG_ADMIN = "postgresql://postgres@127.0.0.1/postgres"


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """SQLite, and a fresh PostgreSQL database when one answers on 127.0.0.1 (skipped otherwise)."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'c.db'}"
        return
    psycopg = pytest.importorskip("psycopg")
    try:
        with psycopg.connect(PG_ADMIN, connect_timeout=2):
            pass
    except psycopg.Error:
        pytest.skip("PostgreSQL is not reachable on 127.0.0.1:5432 (postgres user, trust auth)")
    name = f"heald_test_{secrets.token_hex(6)}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    yield f"postgresql://postgres@127.0.0.1/{name}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.mark.asyncio
async def test_kinds_severities_resolves_and_giving_up(
    store_url: str, alertmanager: str, tmp_path: Path
) -> None:
    """Each kind (escalation, approval awaited, node offline) goes where its kind and severity are
    routed; a node back online, an escalation resolved and an approval decided send resolves
    (Alertmanager's alert ends); a 410 is given up at once, a receiver that always answers 503
    after max_attempts, and both are counted."""
    token = tmp_path / "pager.token"
    token.write_text("pager-t0ken-123\n")
    port = free_port()
    receiver = Receiver(port, answers={"/gone": 410, "/flaky": 503})
    receiver.start()
    url = f"http://127.0.0.1:{port}"
    cfg = NotifySection(
        routes=[
            NotifyRoute(name="all", url=f"{url}/all", min_severity="info"),
            NotifyRoute(name="pager", url=f"{url}/pager", min_severity="critical",
                        bearer_token_file=str(token)),
            NotifyRoute(name="gone", url=f"{url}/gone", events=["escalation"]),
            NotifyRoute(name="flaky", url=f"{url}/flaky", events=["escalation"]),
            NotifyRoute(name="am", url=alertmanager, kind="alertmanager", events=["offline"]),
        ],
        poll_interval_s=0.1, backoff_s=0.05, backoff_max_s=0.1, max_attempts=3,
    )
    store = await open_store(store_url, StoreSection(), BudgetSection(), replica="t")
    notifier = Notifier(cfg, store.db, replica="t")
    task = asyncio.create_task(notifier.run(), name="notify")
    try:
        n = SimNode("n1", site="s1")
        will = n.status("offline", "connection lost")
        await store.apply([inc(n.birth()), inc(n.status())])
        await store.apply([
            inc(n.event("approval_request", {"request_id": "n1-ap1", "run_id": "run1", "playbook": "pb"},
                        message="stop the database?")),
            inc(n.event("playbook.escalated", {"playbook": "pb", "run_id": "run1"}, message="gave up")),
        ])
        await store.apply([inc(msgspec.structs.replace(will, bdseq=n.bdseq))])  # the broker's will
        await async_wait("the offline alert", lambda: am_alerts(alertmanager, "HealdNodeOffline"))
        await async_wait("both given up", lambda: notifier.stats.failed == 2)
        await async_wait("three notices on the info route", lambda: len(
            [k for k in receiver.taken if k.startswith("/all ")]) == 3)
        assert sorted(k.split()[1].split(":")[0] for k in receiver.taken if k.startswith("/all ")) == [
            "approval", "escalation", "offline"]
        # the critical-only route: the escalation (critical), not the approval or offline (warning)
        assert [k.split()[1] for k in receiver.taken if k.startswith("/pager ")] == [
            "escalation:n1:1:firing"]
        paths = [p for p, _, _ in receiver.requests]
        assert paths.count("/gone") == 1  # a 4xx: no retry
        assert paths.count("/flaky") == 3  # max_attempts
        rows = {r["route"]: r for r in await store_outbox(store) if r["kind"] == "escalation"}
        assert rows["gone"]["state"] == "failed"
        assert rows["gone"]["last_error"].startswith("HTTP 410")
        assert (rows["flaky"]["state"], rows["flaky"]["attempts"]) == ("failed", 3)

        # over: back online, the escalation resolved
        await store.apply([inc(n.birth()), inc(n.status())])
        await store.resolve_escalation(1, "operator")
        approve = CommandSigner(Ed25519PrivateKey.generate()).make(node="n1", site="s1", name="approve")
        await store.decide_approval("n1-ap1", True, "operator", approve)
        await async_wait("the offline alert resolved",
                         lambda: not am_alerts(alertmanager, "HealdNodeOffline"))
        await async_wait("resolves on the info route", lambda: {
            k.split()[1] for k in receiver.taken if k.startswith("/all ") and k.endswith(":resolved")
        } == {"escalation:n1:1:resolved", "approval:n1:n1-ap1:resolved",
              f"offline:n1:{n.bdseq - 1}:resolved"})
        assert "/pager escalation:n1:1:resolved" in receiver.taken
        auth = {p: h.get("Authorization") for p, h, _ in receiver.requests}
        assert auth["/pager"] == "Bearer pager-t0ken-123"
        assert auth["/all"] is None  # a route's token goes to that route only
        # nothing resolved where nothing fired, nor on a route whose firing was given up
        assert not [k for k in receiver.taken if k.startswith(("/gone", "/flaky"))]
        assert receiver.repeats == 0
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await store.close()
        receiver.stop()


@pytest.mark.asyncio
async def test_two_replicas_send_each_notice_once(store_url: str) -> None:
    """Two notifiers on one store (two replicas sharing PostgreSQL, or one SQLite file): 40 nodes
    go offline at once and each offline notice reaches the receiver once, with no repeat."""
    port = free_port()
    receiver = Receiver(port)
    receiver.start()
    route = NotifyRoute(name="all", url=f"http://127.0.0.1:{port}/all")
    cfg = NotifySection(routes=[route], poll_interval_s=0.05)
    stores = [await open_store(store_url, StoreSection(), BudgetSection(), replica=r) for r in ("r1", "r2")]
    notifiers = [Notifier(cfg, s.db, replica=f"r{i}") for i, s in enumerate(stores, 1)]
    tasks = [asyncio.create_task(n.run(), name=f"notify-{i}") for i, n in enumerate(notifiers)]
    try:
        nodes = [SimNode(f"n{i:02d}") for i in range(40)]
        wills = [n.status("offline", "connection lost") for n in nodes]
        await stores[0].apply([inc(m) for n in nodes for m in (n.birth(), n.status())])
        await stores[1].apply([inc(msgspec.structs.replace(w, bdseq=n.bdseq))
                               for n, w in zip(nodes, wills, strict=True)])
        await async_wait("40 offline notices", lambda: len(receiver.taken) == 40)
        await asyncio.sleep(1.0)  # 20 more scan rounds on each replica
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for s in stores:
            await s.close()
        receiver.stop()
    assert len(receiver.requests) == 40
    assert receiver.repeats == 0
    assert sum(n.stats.sent for n in notifiers) == 40


@pytest.mark.slow
@pytest.mark.asyncio
async def test_alertmanager_alert_kept_firing_until_resolved(tmp_path: Path, alertmanager: str) -> None:
    """A firing alert ends 4 refresh periods ahead; the notifier sends it again before that, so
    Alertmanager still has it well past its first endsAt, and lets it end when it is resolved."""
    cfg = NotifySection(routes=[NotifyRoute(name="am", url=alertmanager, kind="alertmanager")],
                        poll_interval_s=0.1, alertmanager_refresh_s=1.0)
    store = await open_store(f"sqlite:///{tmp_path / 'c.db'}", StoreSection(), BudgetSection(), replica="t")
    notifier = Notifier(cfg, store.db, replica="t")
    task = asyncio.create_task(notifier.run(), name="notify")
    try:
        n = SimNode("n1")
        escalated = n.event("playbook.escalated", {"playbook": "pb", "run_id": "r"}, message="gave up")
        await store.apply([inc(n.birth()), inc(escalated)])
        (first,) = await async_wait("the alert", lambda: am_alerts(alertmanager, "HealdEscalation"))
        await asyncio.sleep(6.0)  # past the first endsAt (4 s ahead)
        (alert,) = am_alerts(alertmanager, "HealdEscalation")
        assert alert["endsAt"] > first["endsAt"]
        assert alert["status"]["state"] == "active"
        assert notifier.stats.refreshed >= 3
        await store.resolve_escalation(1, "operator")
        await async_wait("the alert resolved", lambda: not am_alerts(alertmanager, "HealdEscalation"))
        refreshed = notifier.stats.refreshed
        await asyncio.sleep(1.5)
        assert notifier.stats.refreshed == refreshed  # a resolved alert is not sent again
        assert not am_alerts(alertmanager, "HealdEscalation")
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await store.close()
