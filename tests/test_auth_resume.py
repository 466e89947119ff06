"""Failed logins written while heald is down or restarting are counted, once.

The auth collector saves where each auth source stood (``STATE/security/auth_tails.json``, and
with every write of ``auth_window.json``); a restart younger than the failure window resumes
there: the same file from its offset, a file rotated while heald was down from its rest and then
the new file from its start, a journal after its cursor. Saved state that does not fit (garbage,
too big, NaN, another file's inode) is refused with one warning: from the end, as a fresh start.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from heald_kit import Heald
from structlog.testing import capture_logs
from test_degraded_storage import Tmpfs, mount_tmpfs, unmount

from agent.collect.auth import FileTail
from agent.collect.security_net import SecurityNetCollector
from agent.collect.settings import SecurityNetSettings

SRC = "192.0.2.77"
FAILED = "Failed password for root from {src} port {port} ssh2\n"


def attack(log: Path, n: int, src: str = SRC, start: int = 0) -> None:
    with log.open("a") as f:
        for i in range(n):
            f.write(FAILED.format(src=src, port=40000 + start + i))


def settings(*files: Path, **kw: Any) -> SecurityNetSettings:
    return SecurityNetSettings(auth_source="files", auth_files=tuple(str(f) for f in files), listeners=False,
                               **kw)


def collector(state: Path, *files: Path, **kw: Any) -> SecurityNetCollector:
    c = SecurityNetCollector(settings(*files, **kw), state_dir=state)
    c.start()
    return c


def failures(c: SecurityNetCollector, src: str = SRC) -> float:
    return c.collect().metrics.get(f"sec.auth_failures[{src}]", 0.0)


def warnings(logs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [x for x in logs if x["log_level"] in {"warning", "error", "critical"}]


# --------------------------------------------------------------------------- the collector, restarted


def test_lines_written_while_down_are_counted_once(tmp_path: Path) -> None:
    log, state = tmp_path / "auth.log", tmp_path / "state"
    log.write_text("history before the first start: never counted\n" + FAILED.format(src=SRC, port=1))
    c = collector(state, log)
    attack(log, 5)
    assert failures(c) == 5
    with log.open("a") as f:  # a line half written when heald dies
        f.write("Failed password for root from 192.0.2")
    assert failures(c) == 5
    c.close()  # as after kill -9: nothing is written at close
    with log.open("a") as f:
        f.write(f"{SRC[len('192.0.2'):]} port 2 ssh2\n")  # the half line, finished while down
    attack(log, 6, start=10)
    with capture_logs() as logs:
        again = collector(state, log)
    assert again.resumed == {str(log): "resumed"}
    assert failures(again) == 5 + 1 + 6  # the window restored, the lines while down once
    assert failures(again) == 12  # nothing twice
    attack(log, 2, start=20)
    assert failures(again) == 14
    again.close()
    assert not warnings(logs), logs
    # A third start with nothing written while down: the same counts, not one more.
    third = collector(state, log)
    assert failures(third) == 14
    third.close()


def test_a_quiet_restart_resumes_from_the_positions_file_and_an_old_one_from_the_end(tmp_path: Path) -> None:
    """No failure while heald ran (no window file): the positions file alone; one older than the
    window is ignored without a warning (from the end, as a fresh start)."""
    log, state = tmp_path / "auth.log", tmp_path / "state"
    log.write_text("")
    c = collector(state, log)
    with log.open("a") as f:
        f.write("sshd[1]: Accepted publickey for root from 192.0.2.1 port 1 ssh2\n")
    assert failures(c) == 0
    c.close()
    saved = state / "security" / "auth_tails.json"
    assert json.loads(saved.read_text())["positions"]["files"][0]["offset"] == log.stat().st_size
    assert not (state / "security" / "auth_window.json").exists()
    attack(log, 3)
    again = collector(state, log)
    assert failures(again) == 3
    again.close()
    # saved long ago: past the window, the lines since are history
    doc = json.loads(saved.read_text())
    doc["wall"] -= 3600
    saved.write_text(json.dumps(doc))
    (state / "security" / "auth_window.json").unlink()
    attack(log, 4, start=10)
    with capture_logs() as logs:
        old = collector(state, log)
    assert failures(old) == 0
    old.close()
    assert not warnings(logs), logs


def test_a_rotation_while_down_reads_the_rest_of_the_old_file_then_the_new_one(tmp_path: Path) -> None:
    log, state = tmp_path / "auth.log", tmp_path / "state"
    log.write_text("")
    c = collector(state, log)
    attack(log, 5)
    assert failures(c) == 5
    c.close()
    attack(log, 3, start=10)  # the old file's last lines
    log.rename(tmp_path / "auth.log.1")  # logrotate (create)
    log.write_text("")
    attack(log, 4, start=20)
    again = collector(state, log)
    assert again.resumed == {str(log): "rotated"}
    assert failures(again) == 12
    assert failures(again) == 12
    assert again._tails[0].rotations == 1
    attack(log, 1, start=30)
    assert failures(again) == 13
    again.close()
    # rotated again while down, the old file gone (compressed): the new file from its start
    log.rename(tmp_path / "auth.log.2")
    (tmp_path / "auth.log.2").unlink()
    log.write_text("")
    attack(log, 2, start=40)
    third = collector(state, log)
    # "new", or "new: rewritten..." where the filesystem gave the new file the old one's inode
    assert third.resumed[str(log)].startswith("new"), third.resumed
    assert failures(third) == 15
    third.close()


def test_a_flood_written_while_down_is_read_in_bounded_passes(tmp_path: Path) -> None:
    log, state = tmp_path / "auth.log", tmp_path / "state"
    log.write_text("")
    c = collector(state, log, max_read_bytes=1 << 16)
    attack(log, 1)
    assert failures(c) == 1
    c.close()
    attack(log, 20_000, "192.0.2.78")
    size = log.stat().st_size
    again = collector(state, log, max_read_bytes=1 << 16)
    passes = 0
    while again._tails[0].offset < size:
        before = again._tails[0].offset
        again.collect()
        assert again._tails[0].offset - before <= 1 << 16
        passes += 1
    assert passes >= size >> 16
    assert failures(again, "192.0.2.78") == 20_000
    again.close()


# --------------------------------------------------------------------------- hostile saved state


def _other_files_position(tmp_path: Path) -> dict[str, Any]:
    other = tmp_path / "other.log"
    other.write_text(FAILED.format(src=SRC, port=1) * 3)
    st = other.stat()
    return {"path": str(tmp_path / "auth.log"), "dev": st.st_dev, "ino": st.st_ino, "offset": 0,
            "head": other.read_bytes()[:64].hex()}


@pytest.mark.parametrize("case", ["garbage", "huge", "nan", "inf_wall", "future", "not_a_dict", "bad_fields",
                                  "other_inode", "head_differs", "longer_than_file", "deep",
                                  "unhashable_path"])
def test_hostile_saved_positions_are_refused_with_one_warning(tmp_path: Path, case: str) -> None:
    log, state = tmp_path / "auth.log", tmp_path / "state"
    log.write_text(FAILED.format(src=SRC, port=1) * 4)  # history: never counted
    st = log.stat()
    pos = {"path": str(log), "dev": st.st_dev, "ino": st.st_ino, "offset": 0,
           "head": log.read_bytes()[:64].hex()}
    now = time.time()
    os.utime(log, (now - 100, now - 100))  # not written since the (claimed) save

    def doc(**kw: Any) -> str:
        return json.dumps({"version": 1, "wall": now, "seq": 9, "positions": {"files": [{**pos, **kw}]}})

    text = {
        "garbage": "\x00{not json",
        "huge": doc() + " " * (2 << 20),
        "nan": doc().replace(f"{now!r}", "NaN"),
        "inf_wall": doc().replace(f"{now!r}", "1e999"),
        "future": doc().replace(f"{now!r}", f"{now + 86400!r}"),
        "not_a_dict": json.dumps([1, 2, 3]),
        "bad_fields": doc(offset=-5, ino="x", head="zz"),
        "other_inode": json.dumps({"wall": now, "positions": {"files": [_other_files_position(tmp_path)]}}),
        "head_differs": doc(head=b"Jan  1 00:00:00 another file".hex()),
        "longer_than_file": doc(offset=1 << 40),
        "deep": "[" * 100_000 + "]" * 100_000,
        "unhashable_path": json.dumps({"wall": now, "positions": {"files": [{"path": [1]}, 7],
                                                                  "journal": 5}}),
    }[case]
    (state / "security").mkdir(parents=True)
    (state / "security" / "auth_tails.json").write_text(text)
    with capture_logs() as logs:
        c = collector(state, log)
    attack(log, 2)
    assert failures(c) == 2, c.resumed  # from the end: only the lines written since the start
    c.close()
    warned = warnings(logs)
    if case in {"head_differs", "longer_than_file"}:  # rewritten in place while down: not hostile
        assert not warned, logs
        assert c.resumed[str(log)].startswith("end:"), c.resumed
    elif case == "unhashable_path":  # names no file followed: nothing to resume, nothing to warn of
        assert not warned, logs
        assert not c.resumed
    else:
        assert len(warned) == 1, logs
        assert "not resumed" in warned[0]["event"]


def test_file_tail_resume_validates_and_never_raises() -> None:
    t = FileTail("/nonexistent/auth.log", max_line=64, from_end=True)
    for junk in ([], "x", {"dev": True, "ino": 1, "offset": 0, "head": ""},
                 {"dev": 1.5, "ino": 1, "offset": 0}, {"dev": 1, "ino": 1 << 70, "offset": 0, "head": ""},
                 {"dev": 1, "ino": 1, "offset": 0, "head": "0" * 500}):
        assert t.resume(junk, time.time()).startswith("refused"), junk
    assert t.resume(None, time.time()) == "new"  # no file then, none now: when it comes, from its start
    t.close()


# --------------------------------------------------------------------------- the journal


def test_the_journal_resumes_after_the_saved_cursor(tmp_path: Path) -> None:
    argv_log = tmp_path / "argv.jsonl"
    fake = tmp_path / "journalctl"
    fake.write_text(f"""#!{sys.executable}
import json, sys
with open({str(argv_log)!r}, "a") as f:
    f.write(json.dumps(sys.argv[1:]) + "\\n")
after = [a.split("=", 1)[1] for a in sys.argv if a.startswith("--after-cursor=")]
start = int(after[0].split("=")[-1]) + 1 if after else 100
for i in range(start, start + 3):
    msg = f"Failed password for root from {SRC} port {{i}} ssh2"
    print(json.dumps({{"__CURSOR": f"s=x;i={{i}}", "MESSAGE": msg}}), flush=True)
import time; time.sleep(30)
""")
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    state = tmp_path / "state"
    s = SecurityNetSettings(auth_source="journal", journalctl=(str(fake),), listeners=False)

    def run(want: float) -> tuple[SecurityNetCollector, float]:
        c = SecurityNetCollector(s, state_dir=state)
        c.start()
        got = 0.0
        deadline = time.monotonic() + 15
        while got < want and time.monotonic() < deadline:
            got = c.collect().metrics.get(f"sec.auth_failures[{SRC}]", 0.0)
            time.sleep(0.05)
        time.sleep(0.3)
        return c, c.collect().metrics.get(f"sec.auth_failures[{SRC}]", 0.0)

    c, got = run(3)
    c.close()
    assert got == 3
    saved = json.loads((state / "security" / "auth_window.json").read_text())
    assert saved["positions"]["journal"] == "s=x;i=102"
    c, got = run(6)
    c.close()
    assert got == 6  # the 3 restored, the 3 after the cursor
    runs = [json.loads(line) for line in argv_log.read_text().splitlines()]
    assert "--lines=0" in runs[0]
    assert "--after-cursor=s=x;i=102" in runs[1]


# --------------------------------------------------------------------------- a full state dir


@pytest.mark.root
def test_a_full_state_dir_keeps_following_and_saves_once_there_is_room(tmp_path: Path) -> None:
    log, state = tmp_path / "auth.log", tmp_path / "state"
    log.write_text("")
    mount_tmpfs(state)
    try:
        disk = Tmpfs(state)
        c = collector(state, log)
        disk.fill()
        for i in range(5):
            attack(log, 3, start=10 * i)
            assert failures(c) == 3 * (i + 1)
        assert not (state / "security" / "auth_window.json").exists()
        assert not (state / "security" / "auth_tails.json").exists()
        disk.free()
        assert failures(c) == 15
        saved = json.loads((state / "security" / "auth_window.json").read_text())
        assert saved["positions"]["files"][0]["offset"] == log.stat().st_size
        c.close()
        attack(log, 1, start=99)
        again = collector(state, log)
        assert failures(again) == 16
        again.close()
    finally:
        unmount(state)


# --------------------------------------------------------------------------- a real heald, kill -9


def saved_count(state: Path, src: str = SRC) -> float:
    try:
        doc = json.loads((state / "security" / "auth_window.json").read_text())
    except (OSError, ValueError):
        return 0.0
    return float(sum(c for _, c in doc.get("sources", {}).get(src, {}).get("ages", [])))


@pytest.mark.slow
def test_a_real_heald_killed_9_counts_the_lines_written_while_down_once(tmp_path: Path) -> None:
    """``heald run --dry-run`` with no playbook (it acts on nothing): 5 failures, kill -9, 7 written
    while it is down, a restart: its window holds 12, and 12 again after a quiet while."""
    state, log = tmp_path / "state", tmp_path / "auth.log"
    log.write_text(FAILED.format(src=SRC, port=1) * 3)  # history
    cfg = tmp_path / "agent.toml"
    cfg.write_text(f"""
[node]
id = "resume1"
[paths]
state_dir = "{state}"
runtime_dir = "{tmp_path / 'run'}"
[log]
format = "json"
[collect.gpu]
enabled = false
[collect.security_net]
auth_source = "files"
auth_files = ["{log}"]
listeners = false
[playbooks]
dirs = []
load_shipped = false
[model]
enabled = false
""")

    def wait_count(n: float, within: float = 15) -> None:
        deadline = time.monotonic() + within
        while saved_count(state) != n:
            assert time.monotonic() < deadline, f"the window file says {saved_count(state)}, not {n}"
            time.sleep(0.1)

    with Heald(cfg, tmp_path / "agent-1.log", args=("--dry-run",)) as first:
        first.wait_started()
        attack(log, 5)
        wait_count(5)
        assert first.kill() == -signal.SIGKILL
    attack(log, 7, start=10)
    with Heald(cfg, tmp_path / "agent-2.log", args=("--dry-run",)) as second:
        second.wait_started()
        wait_count(12)
        time.sleep(3)  # a few more passes: nothing read twice
        assert saved_count(state) == 12
        text = second.text()
        assert "auth sources resumed" in text, text[-3000:]
        assert second.stop() == 0
    assert os.path.exists(state / "security" / "auth_window.json")
