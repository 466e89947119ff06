"""Network-side security (issue 22): auth failures per source -> block_address in heald's own
nftables table; new listening sockets -> escalation.

The end-to-end test builds two network namespaces joined by a veth pair: the node (10.77.0.1:
a real Debian sshd with its own config, host key and log file in tmp_path, and a real
``heald run`` whose nft therefore acts only there) and the other side: 10.77.0.2 (the attacker),
10.77.0.3 (allow-listed in the node's config) and 10.77.0.4 (a real mosquitto, the node's MQTT
broker, with a subscriber writing the node's events). A key login that succeeds counts nothing;
then real ``ssh`` clients fail to log in with a wrong password (SSH_ASKPASS) from all three
addresses: 10.77.0.2 is in heald's set within 5 s of its 10th failure line and its next
connection times out, the allow-listed address and the broker's never are (their runs
escalate, and the escalations reach the broker); the block expires; a new listener escalates;
on stop heald's table is gone. The node's own address cannot be an attacker here: block_address
refuses the node's own addresses, so the attacker lives in a namespace of its own rather than
on the node's loopback. The other tests check the parts alone, with hostile input.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import os
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from heald_kit import Heald, audit, wait

from agent.act.actions.nftables import block_address, element, remove_table, table_script
from agent.act.base import ActionContext
from agent.collect.auth import LOCAL, OTHER, FailureWindow, FileTail, JournalFollower, parse, source
from agent.collect.security_net import SecurityNetCollector, parse_proc_net
from agent.collect.settings import SecurityNetSettings
from agent.decide.loader import shipped_dir
from agent.decide.settings import PlaybookSettings, SecuritySettings
from agent.errors import ConfigError
from agent.runtime.config import load_config

ROOT = os.geteuid() == 0
SSHD = shutil.which("sshd") or ("/usr/sbin/sshd" if os.path.exists("/usr/sbin/sshd") else None)
NFT = shutil.which("nft")
SSH = shutil.which("ssh")
IP = shutil.which("ip")
MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"


def _why_not_netns() -> str:
    if not ROOT:
        return "needs root (network namespaces, nftables)"
    if NFT is None:
        return "needs nft (apt-get install nftables)"
    if IP is None:
        return "needs ip (iproute2)"
    return ""


needs_nft = pytest.mark.skipif(bool(_why_not_netns()), reason=_why_not_netns() or "-")
needs_sshd = pytest.mark.skipif(
    bool(_why_not_netns()) or SSHD is None or SSH is None or not os.path.exists(MOSQUITTO),
    reason=_why_not_netns() or "needs sshd, ssh and mosquitto (apt-get install openssh-server openssh-client "
                               "mosquitto)")

SUBSCRIBER = """
import asyncio, json, aiomqtt, msgspec
from agent import wire

async def main():
    async with aiomqtt.Client("10.77.0.4", 1883) as client:
        await client.subscribe("heald/v1/+/+/event", qos=1)
        open({out!r}, "a").close()
        async for msg in client.messages:
            event = msgspec.to_builtins(wire.decode(bytes(msg.payload)))
            with open({out!r}, "a") as f:
                f.write(json.dumps(event) + "\\n")

asyncio.run(main())
"""

# Real sshd 9.2 lines (LogLevel INFO, -E file), captured from the end-to-end test's setup.
SSHD_LINES = [
    "Failed password for root from 10.77.0.2 port 39105 ssh2",
    "Connection closed by authenticating user root 10.77.0.2 port 39105 [preauth]",
    "Invalid user nosuchuser from 10.77.0.2 port 35187",
    "Failed password for invalid user nosuchuser from 10.77.0.2 port 35187 ssh2",
    "Connection closed by invalid user nosuchuser 10.77.0.2 port 35187 [preauth]",
    "Connection closed by 10.77.0.2 port 53435",
]


# --------------------------------------------------------------------------- parsing


def test_real_sshd_lines_and_syslog_forms_parse_to_kind_and_source() -> None:
    assert [parse(line) for line in SSHD_LINES] == [
        ("failed", "10.77.0.2"), ("preauth", "10.77.0.2"), ("invalid_user", "10.77.0.2"),
        ("failed", "10.77.0.2"), ("preauth", "10.77.0.2"), ("preauth", "10.77.0.2"),
    ]
    prefix = "Dec  5 22:10:01 node1 sshd[4242]: "
    def syslog(msg: str) -> tuple[str, str] | None:
        return parse(prefix + msg)

    assert syslog("Failed password for root from 2001:db8::7 port 22 ssh2") == ("failed", "2001:db8::7")
    assert syslog("Failed password for root from ::ffff:192.0.2.9 port 22 ssh2") == ("failed", "192.0.2.9")
    assert syslog("error: maximum authentication attempts exceeded for root from 192.0.2.1 port 2 ssh2 "
                  "[preauth]") == ("max_attempts", "192.0.2.1")
    assert syslog("Did not receive identification string from 192.0.2.3 port 4") == ("preauth", "192.0.2.3")
    assert syslog("Unable to negotiate with 192.0.2.4 port 5: no matching key exchange method found.") \
        == ("preauth", "192.0.2.4")
    # A user name with spaces and a fake "from" in it: the address is the last one before "port".
    assert syslog("Invalid user a from 6.6.6.6 b from 192.0.2.5 port 7") == ("invalid_user", "192.0.2.5")
    # UseDNS yes: a host name is not an address -> the other bucket, never a label.
    assert parse(prefix + "Failed password for root from evil.example port 22 ssh2") == ("failed", OTHER)
    # PAM: other services count, sshd's own PAM line does not (its "Failed password" line does).
    assert parse("su: pam_unix(su:auth): authentication failure; logname=bob uid=1000 euid=0 tty=pts/0 "
                 "ruser=bob rhost=  user=root") == ("pam", LOCAL)
    assert parse("login: pam_unix(login:auth): authentication failure; logname= uid=0 euid=0 tty=tty1 "
                 "ruser= rhost=192.0.2.8") == ("pam", "192.0.2.8")
    assert parse("sshd[1]: pam_unix(sshd:auth): authentication failure; rhost=192.0.2.8 user=root") is None
    assert parse("Dec  5 22:10:01 node1 sudo:      bob : user NOT in sudoers ; TTY=pts/0 ; PWD=/ ; "
                 "USER=root ; COMMAND=/bin/ls") == ("sudo", LOCAL)
    # Normal activity: a successful login and its end are no failures.
    for ok in ("Accepted publickey for root from 10.77.0.2 port 1 ssh2: ED25519 SHA256:x",
               "Received disconnect from 10.77.0.2 port 1:11: disconnected by user",
               "Disconnected from user root 10.77.0.2 port 1",
               "pam_unix(sshd:session): session opened for user root(uid=0) by (uid=0)",
               "sudo:      bob : TTY=pts/0 ; PWD=/home/bob ; USER=root ; COMMAND=/usr/bin/apt install x",
               "Server listening on 0.0.0.0 port 22."):
        assert parse(ok) is None, ok


def test_hostile_lines_are_bounded_and_never_raise() -> None:
    assert source("") == LOCAL
    assert source("[2001:db8::1]") == "2001:db8::1"
    assert source("fe80::1%eth0") == "fe80::1"
    assert source("999.1.1.1") == OTHER
    hostile = [
        "Failed password for " + "x" * 100_000 + " from 192.0.2.1 port 1 ssh2",
        "Failed password for root from " + "1" * 5000 + " port 1 ssh2",
        "\x00\xff" * 4000,
        "Invalid user " + "from " * 5000 + "port 1",
        "pam_unix(" + "a" * 10_000 + ":auth): authentication failure; rhost=1.2.3.4",
        "Failed password for root from nan port 1 ssh2",
        "Failed password for root from inf port 1 ssh2",
    ]
    started = time.monotonic()
    results = [parse(line[:8192]) for line in hostile]
    assert time.monotonic() - started < 2.0
    assert results[1] == ("failed", OTHER)
    assert all(r is None or r[1] in {OTHER, LOCAL} for r in results), results


# --------------------------------------------------------------------------- the window


def test_window_counts_decay_and_memory_is_bounded_under_a_flood_of_sources() -> None:
    w = FailureWindow(window_s=60.0, max_sources=1000)
    t0 = 10_000.0
    for i in range(12):
        w.add("192.0.2.1", "failed", t0 + i)
    assert w.counts(t0 + 12, recent_s=10)["192.0.2.1"] == (12, 10)
    assert w.kinds("192.0.2.1") == {"failed": 12}
    assert w.counts(t0 + 40, recent_s=10)["192.0.2.1"] == (12, 0)  # stopped: nothing recent
    assert "192.0.2.1" not in w.counts(t0 + 80, recent_s=10)  # out of the window: forgotten
    assert w.total == 12
    # 200,000 distinct IPv6 sources, one failure each: at most max_sources kept.
    for i in range(200_000):
        w.add(f"2001:db8::{i:x}", "preauth", t0 + 100)
    assert len(w) == 1000
    assert w.forgotten == 199_000
    assert w.total == 200_012  # the total never goes backwards


def test_collector_caps_series_and_sums_the_rest_into_other(tmp_path: Path) -> None:
    log = tmp_path / "auth.log"
    log.write_text("old history is not counted\n" + SSHD_LINES[0] + "\n")
    c = SecurityNetCollector(SecurityNetSettings(auth_source="files", auth_files=(str(log),), listeners=False,
                                                 max_series=3))
    c.start()
    try:
        with log.open("a") as f:
            for i in range(10):
                for _ in range(i + 1):
                    f.write(f"Failed password for root from 192.0.2.{i} port 1 ssh2\n")
            f.write("Failed password for root from bad.example port 1 ssh2\n")
            f.write("pam_unix(su:auth): authentication failure; logname=bob rhost= user=root\n")
        m = c.collect().metrics
    finally:
        c.close()
    labelled = {k: v for k, v in m.items() if k.startswith("sec.auth_failures[")}
    assert labelled == {"sec.auth_failures[192.0.2.9]": 10.0, "sec.auth_failures[192.0.2.8]": 9.0,
                        "sec.auth_failures[192.0.2.7]": 8.0}
    assert m["sec.auth_failures_other"] == sum(range(1, 8)) + 1  # 7 sources past the cap + a host name
    assert m["sec.auth_failures_local"] == 1.0
    assert m["sec.auth_failures_total"] == 55 + 2
    assert m["sec.auth_sources"] == 10.0


def test_a_flood_is_read_in_bounded_passes_with_bounded_memory(tmp_path: Path) -> None:
    """100,000 failures from distinct IPv6 sources plus megabyte lines: every pass reads at most
    max_read_bytes, the sources kept stay at max_sources, nothing is lost or counted twice."""
    log = tmp_path / "auth.log"
    log.write_text("")
    c = SecurityNetCollector(SecurityNetSettings(auth_source="files", auth_files=(str(log),), listeners=False,
                                                 max_sources=500, max_read_bytes=1 << 20))
    c.start()
    with log.open("a") as f:
        for i in range(100_000):
            addr = f"2001:db8::{i >> 16:x}:{i & 0xFFFF:x}"
            f.write(f"sshd[1]: Failed password for root from {addr} port 1 ssh2\n")
            if i % 20_000 == 0:
                f.write("Failed password for " + "A" * (1 << 20) + " from 192.0.2.1 port 1 ssh2\n")
    size = log.stat().st_size
    passes, slowest = 0, 0.0
    try:
        while c._tails[0].offset < size:
            started = time.monotonic()
            m = c.collect().metrics
            slowest = max(slowest, time.monotonic() - started)
            passes += 1
            assert len(c.window) <= 500
    finally:
        c.close()
    assert passes >= size // (1 << 20)
    assert m["sec.auth_failures_total"] == 100_000  # the cut megabyte lines have no address left
    assert m["sec.auth_sources_forgotten"] == 100_000 - 500
    assert slowest < 5.0  # generous: a shared CPU; about 0.1 s here


# --------------------------------------------------------------------------- tailing


def test_file_tail_survives_rotation_truncation_long_lines_and_a_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "auth.log"
    path.write_bytes(b"before start\n")
    t = FileTail(str(path), max_line=64, from_end=True)
    assert t.poll(1 << 20) == []  # history is skipped
    with path.open("ab") as f:
        f.write(b"one\ntw")
    assert t.poll(1 << 20) == [b"one"]  # a partial line waits for its newline
    with path.open("ab") as f:
        f.write(b"o\n" + b"x" * 10_000 + b"\nthree\n")
    assert t.poll(1 << 20) == [b"two", b"x" * 64, b"three"]  # cut, the rest skipped
    # logrotate (create): the old file gets its last lines, then the new file is read from its start
    with path.open("ab") as f:
        f.write(b"last of old\n")
    path.rename(tmp_path / "auth.log.1")
    path.write_bytes(b"first of new\n")
    assert t.poll(1 << 20) == [b"last of old", b"first of new"]
    assert t.rotations == 1
    # copytruncate: the file shrinks under us; read again from the start, nothing counted twice
    path.write_bytes(b"")
    with path.open("ab") as f:
        f.write(b"after truncate\n")
    assert t.poll(1 << 20) == [b"after truncate"]
    assert t.truncations == 1
    # gone, then back: a new file is read from its start
    path.unlink()
    assert t.poll(1 << 20) == []
    path.write_bytes(b"reborn\n")
    assert t.poll(1 << 20) == [b"reborn"]
    # the budget: a flood is read over several passes, each bounded
    with path.open("ab") as f:
        f.write(b"y\n" * 100_000)
    first = t.poll(4096)
    assert len(first) == 2048
    rest = t.poll(1 << 20)
    assert len(first) + len(rest) == 100_000
    t.close()


def test_journal_follower_resumes_at_its_cursor(tmp_path: Path) -> None:
    """journalctl is replaced by a script that logs its argv and prints JSON entries, then exits:
    the follower restarts it with --after-cursor=<the last cursor it read>."""
    argv_log = tmp_path / "argv.jsonl"
    fake = tmp_path / "journalctl"
    fake.write_text(f"""#!{sys.executable}
import json, sys
with open({str(argv_log)!r}, "a") as f:
    f.write(json.dumps(sys.argv[1:]) + "\\n")
after = [a.split("=", 1)[1] for a in sys.argv if a.startswith("--after-cursor=")]
start = int(after[0].split("-")[1]) + 1 if after else 0
for i in range(start, start + 3):
    msg = f"Failed password for root from 192.0.2.{{i}} port 1 ssh2"
    if i == 1:
        msg = list(msg.encode())  # journald's binary-safe form
    print(json.dumps({{"__CURSOR": f"c-{{i}}", "MESSAGE": msg}}), flush=True)
print("not json", flush=True)
""")
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    j = JournalFollower([str(fake)], ["SYSLOG_FACILITY=4"], max_line=8192, restart_s=0.0)
    got: list[str] = []
    deadline = time.monotonic() + 20
    while len(got) < 6 and time.monotonic() < deadline:
        got += j.poll(1 << 20)
        time.sleep(0.05)
    j.close()
    assert [parse(g) for g in got[:6]] == [("failed", f"192.0.2.{i}") for i in range(6)]
    runs = [json.loads(line) for line in argv_log.read_text().splitlines()]
    assert "--lines=0" in runs[0]
    assert "SYSLOG_FACILITY=4" in runs[0]
    assert "--after-cursor=c-2" in runs[1]


JOURNAL_REMOTE = next((p for p in ("/lib/systemd/systemd-journal-remote",
                                    "/usr/lib/systemd/systemd-journal-remote") if os.path.exists(p)), None)


def _journal_append(path: Path, entries: list[tuple[int, str]]) -> None:
    """Append (facility, MESSAGE) entries to a real journal file (systemd-journal-remote reading
    the journal export format)."""
    now = int(time.time() * 1e6)
    export = "".join(f"__REALTIME_TIMESTAMP={now + i}\n_BOOT_ID={'ab' * 16}\nSYSLOG_FACILITY={fac}\n"
                     f"SYSLOG_IDENTIFIER=sshd\nMESSAGE={msg}\n\n" for i, (fac, msg) in enumerate(entries))
    subprocess.run([str(JOURNAL_REMOTE), f"--output={path}", "-"], input=export.encode(), check=True,
                   capture_output=True)


@pytest.mark.skipif(JOURNAL_REMOTE is None or shutil.which("journalctl") is None,
                    reason="needs journalctl and systemd-journal-remote (apt-get install "
                           "systemd-journal-remote)")
def test_a_real_journal_is_followed_and_resumed_at_its_cursor(tmp_path: Path) -> None:
    """Real journal files, real journalctl (--file: no journald needed): entries from before the
    start are not counted, the auth facilities only, and after the journalctl child dies the
    next one starts after its cursor: nothing lost, nothing counted twice."""
    jfile = tmp_path / "remote.journal"

    def failed(src: str) -> str:
        return f"Failed password for root from {src} port 1 ssh2"

    _journal_append(jfile, [(10, failed("192.0.2.1"))] * 5)  # history
    c = SecurityNetCollector(SecurityNetSettings(
        auth_source="journal", journalctl=("journalctl", f"--file={jfile}"), listeners=False))
    c.start()
    assert c.collect().metrics["sec.auth_failures_total"] == 0.0  # starts journalctl at the end
    time.sleep(2.0)  # journalctl has found the end (--lines=0) before anything new is written
    _journal_append(jfile, [(10, failed("192.0.2.2")), (4, failed("192.0.2.2")), (3, failed("192.0.2.9")),
                            (10, failed("192.0.2.2"))])
    try:
        wait("3 failures from the auth facilities",
             lambda: c.collect().metrics["sec.auth_failures_total"] == 3, 15)
        assert c._journal is not None
        assert c._journal._proc is not None
        c._journal._proc.kill()  # journalctl dies
        _journal_append(jfile, [(10, failed("192.0.2.3"))] * 2)
        wait("the 2 written meanwhile", lambda: c.collect().metrics["sec.auth_failures_total"] == 5, 20)
        time.sleep(1.0)
        m = c.collect().metrics
        assert m["sec.auth_failures_total"] == 5  # nothing twice
        assert m["sec.auth_failures[192.0.2.2]"] == 3
        assert m["sec.auth_failures[192.0.2.3]"] == 2
        assert "sec.auth_failures[192.0.2.1]" not in m
        assert "sec.auth_failures[192.0.2.9]" not in m
        assert c._journal.restarts == 1
    finally:
        c.close()
    # A cursor journalctl refuses (the journal was vacuumed): the follower starts at the end.
    j = JournalFollower(["journalctl", f"--file={jfile}"], ["SYSLOG_FACILITY=10"], max_line=8192,
                        restart_s=0.0)
    j.cursor = "s=0000;i=1"
    try:
        wait("journalctl to refuse the cursor", lambda: j.poll(1 << 20) == [] and not j.cursor, 15)
        j.poll(1 << 20)  # started again, at the end
        time.sleep(2.0)
        _journal_append(jfile, [(10, failed("192.0.2.4"))])
        got: list[str] = []
        wait("the entry after the restart", lambda: got.extend(j.poll(1 << 20)) or got, 15)
        assert [parse(g) for g in got] == [("failed", "192.0.2.4")]
    finally:
        j.close()


# --------------------------------------------------------------------------- listeners


def _new_listeners(reading: Any, port: int) -> list[Any]:
    return [e for e in reading.events if e.kind == "sec.new_listener" and e.labels["port"] == str(port)]


def test_listeners_baseline_then_a_new_one_is_an_event_once() -> None:
    c = SecurityNetCollector(SecurityNetSettings(auth_source="files", auth_files=(), listeners=True,
                                                 listener_interval_s=0.1, baseline_s=0.0,
                                                 listener_ignore_loopback=False))
    c.start()
    srv = socket.create_server(("127.0.0.1", 0))
    try:
        first = c.collect()  # the first scan is the baseline
        assert not [e for e in first.events if e.kind == "sec.new_listener"]
        new = socket.create_server(("127.0.0.1", 0), family=socket.AF_INET)
        port = new.getsockname()[1]
        time.sleep(0.15)
        # (the host is shared: other listeners may come and go meanwhile; only ours are asserted)
        events = _new_listeners(c.collect(), port)
        assert [e.labels["proto"] for e in events] == ["tcp"]
        assert events[0].labels["exe"] == os.path.realpath(sys.executable)
        time.sleep(0.15)
        again = c.collect()
        assert not _new_listeners(again, port)
        assert again.metrics["sec.listeners_new"] >= 1.0
        assert again.metrics[f"sec.listener_new[{port}]"] == 1.0
        new.close()
        time.sleep(0.15)
        assert c.collect().metrics[f"sec.listener_new[{port}]"] == 0.0  # gone: 0, not absent
        # with the default, a loopback-only listener is never "new"
        c.settings = SecurityNetSettings(listener_interval_s=0.1, baseline_s=0.0)
        lo = socket.create_server(("127.0.0.1", 0))
        time.sleep(0.15)
        assert not _new_listeners(c.collect(), lo.getsockname()[1])
        lo.close()
    finally:
        srv.close()
        c.close()


def test_the_listener_baseline_survives_a_restart(tmp_path: Path) -> None:
    """A listener opened while heald was down is reported by the next start (not learned as
    normal), and one already reported is not reported again."""
    def collector() -> SecurityNetCollector:
        settings = SecurityNetSettings(auth_source="files", auth_files=(), listener_interval_s=0.1,
                                       baseline_s=0.5, listener_ignore_loopback=False)
        c = SecurityNetCollector(settings, state_dir=tmp_path)
        c.start()
        return c

    def new_ports(c: SecurityNetCollector) -> set[str]:
        return {e.labels["port"] for e in c.collect().events if e.kind == "sec.new_listener"}

    # (the host is shared: other listeners may come and go meanwhile; only ours are asserted)
    first = collector()
    assert new_ports(first) == set()  # learning
    time.sleep(0.7)  # past baseline_s
    a = socket.create_server(("127.0.0.1", 0))
    b: socket.socket | None = None
    try:
        assert str(a.getsockname()[1]) in new_ports(first)
        first.close()  # "heald is down"
        b = socket.create_server(("127.0.0.1", 0))
        second = collector()
        got = new_ports(second)
        assert str(b.getsockname()[1]) in got  # reported, not learned as normal
        assert str(a.getsockname()[1]) not in got  # already reported: not again
        second.close()
        doc = json.loads((tmp_path / "security" / "listeners.json").read_text())
        assert doc["version"] == 1
        assert ["tcp", b.getsockname()[1], os.path.realpath(sys.executable)] in doc["reported"]
        # a damaged file is learned again, never an error
        (tmp_path / "security" / "listeners.json").write_text('{"created": "x", "baseline": [[1, 2]]}')
        third = collector()
        assert new_ports(third) == set()
        third.close()
    finally:
        a.close()
        if b is not None:
            b.close()


def test_proc_net_parsing_ipv6_udp_and_garbage() -> None:
    text = ("  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt  uid timeout inode\n"
            "   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000  0  0 4242 1\n"
            "   1: 0100007F:1F91 0200007F:D431 01 00000000:00000000 00:00000000 00000000  0  0 4243 1\n"
            "   2: 0100007F:1F92 00000000:0000 0A 00000000:00000000 00:00000000 00000000  0  0 4244 1\n"
            "garbage\n")
    # listeners come first in the kernel's TCP table: reading stops at the first other socket
    assert parse_proc_net(text, "tcp") == [("127.0.0.1", 8080, 4242)]
    junk = "header\n   2: ZZZZ:1F90 00000000:0000 0A 0 0 0 0 0 x\ngarbage\n\x00\n"
    assert parse_proc_net(junk, "tcp") == []
    v6 = ("header\n   0: 00000000000000000000000001000000:0016 00000000000000000000000000000000:0000 0A "
          "00000000:00000000 00:00000000 00000000     0        0 77 1\n")
    assert parse_proc_net(v6, "tcp") == [("::1", 22, 77)]
    udp = ("header\n   0: 00000000:0035 00000000:0000 07 0 0 0 0 0 88 1\n"
           "   1: 00000000:8000 08080808:0035 07 0 0 0 0 0 89 1\n")
    assert parse_proc_net(udp, "udp") == [("0.0.0.0", 53, 88)]


# --------------------------------------------------------------------------- config


def test_allow_list_entries_are_checked(tmp_path: Path) -> None:
    cfg = tmp_path / "agent.toml"
    cfg.write_text('[security]\nallow_list = ["10.0.0.0/8", "2001:db8::1", "not-an-address"]\n')
    with pytest.raises(ConfigError) as err:
        load_config(cfg)
    assert "security.allow_list" in str(err.value)
    assert "not-an-address" in str(err.value)
    cfg.write_text('[security]\nallow_list = ["10.0.0.0/8", "2001:db8::1"]\nkeep_blocks_on_stop = true\n')
    assert load_config(cfg).settings.security.keep_blocks_on_stop is True


# --------------------------------------------------------------------------- block_address in a netns


@contextlib.contextmanager
def netns(name: str) -> Iterator[str]:
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def _nft_in(ns: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", "netns", "exec", ns, "nft", *args],
                          capture_output=True, text=True, check=False)


def _ctx(security: SecuritySettings, *, dry_run: bool = False, hosts: tuple[str, ...] = ()) -> ActionContext:
    return ActionContext(settings=PlaybookSettings(), node="n1", playbook="ssh-brute-force", run_id="r1",
                         dry_run=dry_run, supervisor=None,  # type: ignore[arg-type]  # not used by this action
                         emit=lambda _e: None, security=security, protected_hosts=hosts,
                         inputs={"sec.auth_failures[192.0.2.66]": 12.0},
                         detail={"security_net": {"auth": {"window_s": 60.0, "source": "files", "sources": {
                             "192.0.2.66": {"failures": 12, "recent": 5, "kinds": {"failed": 12}}}}}})


@needs_nft
def test_block_address_refusals_dry_run_renewal_and_the_operators_table_untouched() -> None:
    with netns(f"h3b{os.getpid()}") as ns:
        operator = ("table inet operator {\n chain input {\n"
                    "  type filter hook input priority 0; policy accept;\n  tcp dport 22 accept\n }\n}\n")
        subprocess.run(["ip", "netns", "exec", ns, "nft", "-f", "-"], input=operator, text=True, check=True)
        before = _nft_in(ns, "-j", "list", "table", "inet", "operator").stdout
        sec = SecuritySettings(nft=("ip", "netns", "exec", ns, "nft"), allow_list=("198.51.100.0/24",),
                               block_timeout_s=30)

        async def run(addr: str, **params: Any) -> Any:
            return await block_address({"address": addr, **params}, _ctx(sec))

        async def scenario() -> list[Any]:
            return [
                await block_address({"address": "192.0.2.66"}, _ctx(sec, dry_run=True)),
                await run("192.0.2.66"),
                await run("192.0.2.66", timeout="2s"),
                await run("2001:db8::66"),
                await run("198.51.100.7"),
                await run("127.0.0.1"),
                await run("::1"),
                await run("0.0.0.0"),
                await block_address({"address": "203.0.113.5"}, _ctx(sec, hosts=("203.0.113.5",))),
                await run("not an address; nft flush ruleset"),
                await run("{ 192.0.2.1 }"),
            ]

        dry, first, renew, v6, allowed, lo, lo6, unspec, broker, junk, braces = asyncio.run(scenario())
        assert dry.ok
        assert not dry.changed
        assert dry.detail.startswith("would block 192.0.2.66 for 30s")
        assert first.ok
        assert first.changed
        assert first.detail.startswith("blocked 192.0.2.66 for 30s")
        assert first.data["evidence"]["failures"] == 12
        assert first.data["evidence"]["window_s"] == 60.0
        assert first.data["table_state"] == "table created"
        assert renew.ok
        assert renew.detail.startswith("renewed the block of 192.0.2.66 for 2s")
        assert v6.ok
        assert "blocked6" in v6.detail
        assert [r.ok for r in (allowed, lo, lo6, unspec, broker, junk, braces)] == [False] * 7
        assert "allow_list" in allowed.detail
        assert "broker" in broker.detail
        assert "not an IP address" in junk.detail
        assert "not an IP address" in braces.detail
        # the renewed 2 s timeout: the kernel removes the element by itself
        deadline = time.monotonic() + 10
        while element(sec, ipaddress.ip_address("192.0.2.66")) is not None:
            assert time.monotonic() < deadline, "the element did not expire"
            time.sleep(0.2)
        assert _nft_in(ns, "-j", "list", "table", "inet", "operator").stdout == before
        assert remove_table(sec) is True
        assert _nft_in(ns, "list", "table", "inet", "heald").returncode != 0
        assert remove_table(sec) is False  # nothing to remove: nothing done
        assert _nft_in(ns, "-j", "list", "table", "inet", "operator").stdout == before


@needs_nft
def test_the_undo_commands_in_docs_security_md_work() -> None:
    """The sh block under "how to undo" in docs/security.md, run as written (in a netns)."""
    doc = (Path(__file__).resolve().parents[1] / "docs" / "security.md").read_text()
    block = doc.split("## Network side: how to undo", 1)[1].split("```sh", 1)[1].split("```", 1)[0]
    commands = [shlex.split(line, comments=True) for line in block.strip().splitlines()]
    assert [c[:2] for c in commands] == [["nft", "list"], ["nft", "delete"], ["nft", "delete"]]
    with netns(f"h3u{os.getpid()}") as ns:
        sec = SecuritySettings(nft=("ip", "netns", "exec", ns, "nft"))
        for addr in ("192.0.2.66", "192.0.2.67"):
            assert asyncio.run(block_address({"address": addr}, _ctx(sec))).ok
        listing = subprocess.run(["ip", "netns", "exec", ns, *commands[0]], capture_output=True, text=True,
                                 check=True).stdout
        assert "192.0.2.66" in listing
        assert "expires" in listing
        subprocess.run(["ip", "netns", "exec", ns, *commands[1]], check=True)
        assert element(sec, ipaddress.ip_address("192.0.2.66")) is None
        assert element(sec, ipaddress.ip_address("192.0.2.67")) is not None
        subprocess.run(["ip", "netns", "exec", ns, *commands[2]], check=True)
        assert _nft_in(ns, "list", "table", "inet", "heald").returncode != 0


@needs_nft
def test_keep_blocks_on_stop_set_by_a_reload_keeps_the_table(tmp_path: Path) -> None:
    """A real `heald run` in a netns: [security] keep_blocks_on_stop = true applied by SIGHUP (a
    live key), then SIGTERM: heald's table and its blocks stay."""
    with netns(f"h3k{os.getpid()}") as ns:
        sec = SecuritySettings(nft=("ip", "netns", "exec", ns, "nft"))
        assert asyncio.run(block_address({"address": "192.0.2.70"}, _ctx(sec))).ok
        cfg = tmp_path / "agent.toml"

        def write(keep: bool) -> None:
            cfg.write_text(f"""
[paths]
state_dir = "{tmp_path / 'state'}"
runtime_dir = "{tmp_path / 'run'}"
[log]
format = "json"
[collect.gpu]
enabled = false
[playbooks]
dirs = []
load_shipped = false
[model]
enabled = false
[security]
keep_blocks_on_stop = {str(keep).lower()}
""")

        write(False)
        log = tmp_path / "agent.log"
        agent = Heald(cfg, log, ns=ns)
        try:
            wait("the agent's start", lambda: "heald starting" in agent.text(), 30)
            write(True)
            agent.proc.send_signal(signal.SIGHUP)
            wait("the reload", lambda: "configuration reloaded" in agent.text(), 30)
        finally:
            rc = agent.stop()
        assert rc in {0, 130}, log.read_text()[-3000:]
        assert "security" in [r for line in log.read_text().splitlines() if "configuration reloaded" in line
                              for r in json.loads(line).get("applied", [])]
        assert element(sec, ipaddress.ip_address("192.0.2.70")) is not None, "the block was removed"


def test_table_script_names_only_heald_objects() -> None:
    script = table_script(-200)
    for line in filter(None, script.splitlines()):
        assert line.startswith(("add table inet heald", "add set inet heald ", "add chain inet heald ",
                                "add rule inet heald ")), line


# --------------------------------------------------------------------------- end to end


def _in_set(node: str, addr: str) -> bool:
    return _nft_in(node, "get", "element", "inet", "heald", "blocked4", "{", addr, "}").returncode == 0


def _connect(attacker: str, src: str, dst: str, port: int, timeout: float = 1.5) -> str:
    """'up', or why not: 'refused' (RST / ICMP unreachable), 'timeout', or another error."""
    code = (f"import socket\ns = socket.socket(); s.settimeout({timeout})\n"
            f"s.bind(({src!r}, 0))\ntry:\n s.connect(({dst!r}, {port})); print('up')\n"
            "except ConnectionRefusedError:\n print('refused')\n"
            "except TimeoutError:\n print('timeout')\n"
            "except OSError as e:\n print('down', e)\n")
    out = subprocess.run(["ip", "netns", "exec", attacker, sys.executable, "-c", code],
                         capture_output=True, text=True, check=False, timeout=30).stdout
    return out.strip()


def _connects(attacker: str, src: str, dst: str, port: int, timeout: float = 1.5) -> bool:
    return _connect(attacker, src, dst, port, timeout) == "up"


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[dict[str, Any]]:
    """Two namespaces joined by a veth pair: node 10.77.0.1/24; attacker 10.77.0.2, .3 and .4."""
    tag = f"{os.getpid() % 100000}"
    node, attacker = f"h3node{tag}", f"h3att{tag}"
    procs: list[subprocess.Popen[bytes]] = []
    created: list[str] = []
    try:
        for ns in (node, attacker):
            subprocess.run(["ip", "netns", "add", ns], check=True)
            created.append(ns)
        va, vb = f"h3a{tag}", f"h3b{tag}"
        steps = [
            ["ip", "link", "add", va, "type", "veth", "peer", "name", vb],
            ["ip", "link", "set", va, "netns", node], ["ip", "link", "set", vb, "netns", attacker],
            ["ip", "-n", node, "addr", "add", "10.77.0.1/24", "dev", va],
            ["ip", "-n", attacker, "addr", "add", "10.77.0.2/24", "dev", vb],
            ["ip", "-n", attacker, "addr", "add", "10.77.0.3/24", "dev", vb],
            ["ip", "-n", attacker, "addr", "add", "10.77.0.4/24", "dev", vb],
        ]
        steps += [["ip", "-n", ns, "link", "set", dev, "up"]
                  for ns, dev in ((node, va), (attacker, vb), (node, "lo"), (attacker, "lo"))]
        for argv in steps:
            subprocess.run(argv, check=True)
        yield {"node": node, "attacker": attacker, "procs": procs}
    finally:
        for p in reversed(procs):  # the last started first (the subscriber before its broker)
            if p.poll() is None:
                p.kill()
            p.wait()
        for ns in created:
            subprocess.run(["ip", "netns", "del", ns], check=False)


def _failed_logins(attacker: str, src: str, user: str, askpass: Path, known: Path) -> None:
    """One ssh connection from ``src`` with a wrong password twice: real sshd failure lines."""
    env = {**os.environ, "SSH_ASKPASS": str(askpass), "SSH_ASKPASS_REQUIRE": "force", "DISPLAY": ":0"}
    subprocess.run(["ip", "netns", "exec", attacker, "ssh", "-n", "-b", src, "-p", "2222",
                    "-o", "StrictHostKeyChecking=no", "-o", f"UserKnownHostsFile={known}",
                    "-o", "NumberOfPasswordPrompts=2", "-o", "PreferredAuthentications=password",
                    "-o", "ConnectTimeout=3", f"{user}@10.77.0.1", "true"],
                   env=env, capture_output=True, check=False, timeout=30)


def _counted(log: Path, src: str) -> int:
    """Failure lines from ``src`` in sshd's log, as the collector's parser reads them."""
    hits = (parse(line) for line in log.read_text(errors="replace").splitlines())
    return sum(1 for hit in hits if hit is not None and hit[1] == src)


@pytest.mark.exclusive  # a quiet host: see tests/exclusive.py
@pytest.mark.slow
@needs_sshd
def test_brute_force_blocked_within_5s_allow_list_never_new_listener_escalates(
        tmp_path: Path, lab: dict[str, Any]) -> None:
    node, attacker, procs = lab["node"], lab["attacker"], lab["procs"]
    for name in ("hostkey", "userkey"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / name)],
                       check=True)
    (tmp_path / "authorized_keys").write_text((tmp_path / "userkey.pub").read_text())
    auth_log = tmp_path / "auth.log"
    (tmp_path / "sshd_config").write_text(
        f"ListenAddress 10.77.0.1:2222\nHostKey {tmp_path / 'hostkey'}\nPidFile none\nUsePAM no\n"
        "PasswordAuthentication yes\nKbdInteractiveAuthentication no\nPermitRootLogin yes\nLogLevel INFO\n"
        f"AuthorizedKeysFile {tmp_path / 'authorized_keys'}\nStrictModes no\nMaxStartups 100\n")
    Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege separation directory
    procs.append(subprocess.Popen(["ip", "netns", "exec", node, str(SSHD),
                                   "-f", str(tmp_path / "sshd_config"),
                                   "-E", str(auth_log), "-D"]))
    wait("sshd listening", lambda: auth_log.exists() and "Server listening" in auth_log.read_text(), 15)
    askpass = tmp_path / "askpass"
    askpass.write_text("#!/bin/sh\necho wrong-password\n")
    askpass.chmod(0o755)
    pbdir = tmp_path / "playbooks"
    pbdir.mkdir()
    for name in ("ssh-brute-force", "new-listener"):  # the shipped files, unchanged
        shutil.copy(shipped_dir() / f"{name}.yaml", pbdir)
    # The MQTT broker on the other side (10.77.0.4, which also fails to log in: never blocked),
    # and a subscriber there that writes the node's events as JSON lines.
    (tmp_path / "mosquitto.conf").write_text("listener 1883 10.77.0.4\nallow_anonymous true\n")
    procs.append(subprocess.Popen(["ip", "netns", "exec", attacker, MOSQUITTO,
                                   "-c", str(tmp_path / "mosquitto.conf")],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    events = tmp_path / "events.jsonl"
    (tmp_path / "sub.py").write_text(SUBSCRIBER.format(out=str(events)))
    wait("the broker", lambda: _connects(attacker, "10.77.0.4", "10.77.0.4", 1883), 15, tick=0.3)
    with (tmp_path / "sub.log").open("w") as sub_log:
        procs.append(subprocess.Popen(["ip", "netns", "exec", attacker, sys.executable,
                                       str(tmp_path / "sub.py")], cwd=Path(__file__).resolve().parents[1],
                                      stdout=sub_log, stderr=sub_log))
    wait("the subscriber", events.exists, 15)
    state = tmp_path / "state"
    cfg = tmp_path / "agent.toml"
    cfg.write_text(f"""
[node]
id = "sec1"
[paths]
state_dir = "{state}"
runtime_dir = "{tmp_path / 'run'}"
[log]
format = "json"
[collect.gpu]
enabled = false
[collect.security_net]
auth_source = "files"
auth_files = ["{auth_log}"]
listener_interval_s = 1.0
baseline_s = 2.0
[security]
allow_list = ["10.77.0.3"]
block_timeout_s = 8
[playbooks]
dirs = ["{pbdir}"]
load_shipped = false
[model]
enabled = false
[mqtt]
enabled = true
host = "10.77.0.4"
port = 1883
""")
    agent = Heald(cfg, tmp_path / "agent.log", ns=node)
    procs.append(agent.proc)
    try:
        agent.wait_started()
        time.sleep(3.0)  # past the listeners' baseline window (sshd's port is in it)
        known = tmp_path / "known_hosts"
        # A new listener in the node's namespace, after the baseline: escalated once it stays
        # past the playbook's 15 s settle (the attack below runs meanwhile).
        procs.append(subprocess.Popen(["ip", "netns", "exec", node, sys.executable, "-m", "http.server",
                                       "--bind", "10.77.0.1", "18099"], stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL))

        def attack(src: str, connections: int) -> None:
            for _ in range(connections):
                _failed_logins(attacker, src, "root", askpass, known)

        # Normal activity first: a login that succeeds is no failure.
        ok = subprocess.run(["ip", "netns", "exec", attacker, "ssh", "-n", "-b", "10.77.0.2", "-p", "2222",
                             "-i", str(tmp_path / "userkey"), "-o", "IdentitiesOnly=yes",
                             "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no",
                             "-o", f"UserKnownHostsFile={known}", "root@10.77.0.1", "true"],
                            capture_output=True, text=True, check=False, timeout=30)
        assert ok.returncode == 0, ok.stderr
        wait("sshd to log the session's end",
             lambda: "Disconnected from user root" in auth_log.read_text(), 10)
        assert _counted(auth_log, "10.77.0.2") == 0, auth_log.read_text()
        # The allow-listed address fails just as often: never blocked.
        attack("10.77.0.3", 4)
        attack("10.77.0.4", 4)  # the broker's address
        attack("10.77.0.2", 4)
        wait("10 failures from 10.77.0.2 in sshd's log", lambda: _counted(auth_log, "10.77.0.2") >= 10, 30)
        t10 = time.monotonic()
        wait("10.77.0.2 in heald's set", lambda: _in_set(node, "10.77.0.2"), 5.0, tick=0.05)
        blocked_after = time.monotonic() - t10
        assert _counted(auth_log, "10.77.0.3") >= 10
        refused = _connect(attacker, "10.77.0.2", "10.77.0.1", 2222)
        assert refused == "refused", f"the blocked source's next connection: {refused}"
        assert _connects(attacker, "10.77.0.3", "10.77.0.1", 2222), "the allow-listed source was cut off"
        assert _connects(attacker, "10.77.0.4", "10.77.0.1", 2222), "the broker's address was cut off"
        assert not _in_set(node, "10.77.0.3")
        assert not _in_set(node, "10.77.0.4")
        assert _counted(auth_log, "10.77.0.4") >= 10
        escalations = wait("the new listener's escalation", lambda: [
            r for r in audit(state)
            if r.get("type") == "escalate" and r.get("playbook") == "new-listener"], 25)
        assert "18099" in json.dumps(escalations[0])
        assert "python" in json.dumps(escalations[0])
        # The block expires by itself (block_timeout_s = 8), the source connects again.
        wait("the block to expire", lambda: not _in_set(node, "10.77.0.2"), 15, tick=0.2)
        assert _connects(attacker, "10.77.0.2", "10.77.0.1", 2222)
        # Audit: the block with its evidence, verified; the allow-listed source refused, escalated.
        records = audit(state)
        steps = [r for r in records if r.get("type") == "step" and r.get("playbook") == "ssh-brute-force"]
        by_src = {r["data"]["address"]: r for r in steps if "address" in r.get("data", {})}
        assert by_src["10.77.0.2"]["ok"] is True
        evidence = by_src["10.77.0.2"]["data"]["evidence"]
        assert evidence["failures"] >= 10
        assert evidence["window_s"] == 60.0
        assert evidence["kinds"]["failed"] >= 1
        assert by_src["10.77.0.3"]["ok"] is False
        assert "allow_list" in by_src["10.77.0.3"]["detail"]

        def ends() -> dict[str, Any]:  # the block's verification may land after the audit read above
            return {json.dumps(r.get("target")): r.get("outcome") for r in audit(state)
                    if r.get("type") == "run.end" and r.get("playbook") == "ssh-brute-force"}

        wait("the block's run.end", lambda: any("10.77.0.2" in k for k in ends()), 20)
        assert any("10.77.0.2" in k and v == "succeeded" for k, v in ends().items()), ends()
        assert any(r.get("type") == "escalate" and "10.77.0.3" in json.dumps(r) for r in records)
        assert by_src["10.77.0.4"]["ok"] is False
        assert "MQTT broker" in by_src["10.77.0.4"]["detail"]
        # The escalations reached the broker (the coordinator's side) as wire events.
        names = wait("the escalations on the broker", lambda: {
            # an event without labels has none on the wire (omit_defaults)
            (e["name"], e.get("labels", {}).get("src") or e.get("labels", {}).get("port"))
            for e in map(json.loads, events.read_text().splitlines())}
            >= {("security.brute_force", "10.77.0.3"), ("security.brute_force", "10.77.0.4"),
                ("security.new_listener", "18099")}, 20)
        assert names
    finally:
        rc = agent.stop()
    assert rc in {0, 130}, (tmp_path / "agent.log").read_text()[-3000:]
    assert _nft_in(node, "list", "table", "inet", "heald").returncode != 0, "heald's table outlived the agent"
    print(f"blocked {blocked_after:.2f}s after the 10th failure line")
