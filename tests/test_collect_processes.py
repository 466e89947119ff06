"""Processes collector: zombies, watched names, top lists, systemd units through a fake systemctl."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.collect.processes import (
    ProcessCollector,
    extended_name,
    parse_cmdline,
    parse_pid_stat,
    parse_procs_counts,
)
from agent.collect.settings import ProcessSettings
from agent.collect.units import parse_systemctl_show


def _wait_state(pid: int, state: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return
        if stat.rpartition(")")[2].split()[0] == state:
            return
        time.sleep(0.01)
    raise AssertionError(f"pid {pid} never reached state {state}")


def test_zombie_is_counted_then_reaped() -> None:
    c = ProcessCollector(ProcessSettings())
    c.start()
    pid = os.fork()
    if pid == 0:  # child: exit at once, without running any Python cleanup
        os._exit(0)
    try:
        _wait_state(pid, "Z")
        r = c.collect()
        zombies = r.metrics["proc.zombies"]
        assert zombies is not None
        assert zombies >= 1
        zombie_pids = r.detail["zombie_pids"]
        assert isinstance(zombie_pids, list)
        assert pid in zombie_pids
    finally:
        os.waitpid(pid, 0)
    r = c.collect()
    zombie_pids = r.detail["zombie_pids"]
    assert isinstance(zombie_pids, list)
    assert pid not in zombie_pids


def test_watched_name_is_counted(tmp_path: Path) -> None:
    sleep = shutil.which("sleep")
    assert sleep is not None
    name = f"hw{os.getpid() % 100000}z"  # unique and shorter than comm's 15 characters
    exe = tmp_path / name
    shutil.copy(sleep, exe)
    c = ProcessCollector(ProcessSettings(watch=(name,)))
    c.start()
    assert c.collect().metrics[f"proc.count[{name}]"] == 0
    proc = subprocess.Popen([str(exe), "30"])
    try:
        _wait_state(proc.pid, "S")
        r = c.collect()
        assert r.metrics[f"proc.count[{name}]"] == 1
        assert r.detail["watch"] == {name: [proc.pid]}
    finally:
        proc.kill()
        proc.wait(timeout=5)
    assert c.collect().metrics[f"proc.count[{name}]"] == 0


def test_counts_top_lists_and_cpu_across_passes() -> None:
    c = ProcessCollector(ProcessSettings(top_n=100))
    c.start()
    burner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        c.collect()
        time.sleep(0.5)
        r = c.collect()
    finally:
        burner.kill()
        burner.wait(timeout=5)
    m = r.metrics
    count, threads = m["proc.count"], m["proc.threads"]
    assert count is not None
    assert threads is not None
    # an independent count; other processes come and go meanwhile
    assert count == pytest.approx(sum(1 for d in os.listdir("/proc") if d.isdigit()), rel=0.2)
    assert threads >= count - (m["proc.zombies"] or 0) - 50  # kernel threads have 1 thread each
    top_cpu = r.detail["top_cpu"]
    assert isinstance(top_cpu, list)
    assert len(top_cpu) == min(100, int(count))
    cpus = [row["cpu_pct"] for row in top_cpu]
    assert cpus == sorted(cpus, reverse=True)
    # The busy loop's CPU use was measured across the two passes (the machine may be shared).
    burner_row = next(row for row in top_cpu if row["pid"] == burner.pid)
    assert burner_row["cpu_pct"] > 20
    assert m["proc.top_cpu_pct"] == cpus[0]
    top_mem = r.detail["top_mem"]
    assert isinstance(top_mem, list)
    assert m["proc.top_rss_bytes"] == top_mem[0]["rss_bytes"]
    assert set(top_mem[0]) == {"pid", "name", "cpu_pct", "rss_bytes"}
    assert m["proc.running"] is not None
    assert m["proc.blocked"] is not None


FAKE_SYSTEMCTL = """#!/bin/sh
printf '%s\\n' "$*" >> "{log}"
printf 'ActiveState=failed\\nSubState=failed\\nNRestarts=4\\nMainPID=0\\n\\n'
printf 'ActiveState=active\\nSubState=running\\nNRestarts=0\\nMainPID=1234\\n'
"""


def _script(path: Path, body: str) -> Path:
    path.write_text(body)
    path.chmod(0o755)
    return path


def test_units_through_recording_fake_systemctl(tmp_path: Path) -> None:
    log = tmp_path / "argv.log"
    fake = _script(tmp_path / "systemctl", FAKE_SYSTEMCTL.format(log=log))
    settings = ProcessSettings(units=("db.service", "web.service"), systemctl=str(fake))
    c = ProcessCollector(settings)
    c.start()
    r = c.collect()
    m = r.metrics
    def state(unit: str) -> tuple[float | None, ...]:
        return tuple(m[f"unit.{fam}[{unit}]"] for fam in ("active", "failed", "restarts"))

    assert state("db.service") == (0.0, 1.0, 4.0)
    assert state("web.service") == (1.0, 0.0, 0.0)
    units = r.detail["units"]
    assert isinstance(units, dict)
    assert units["web.service"]["MainPID"] == "1234"
    assert log.read_text().splitlines() == [
        "show db.service web.service --property=ActiveState,SubState,NRestarts,MainPID"
    ]


def test_units_none_when_systemd_is_not_pid1(tmp_path: Path) -> None:
    fake = _script(
        tmp_path / "systemctl",
        "#!/bin/sh\necho 'System has not been booted with systemd as init system (PID 1).' >&2\nexit 1\n",
    )
    c = ProcessCollector(ProcessSettings(units=("db.service",), systemctl=str(fake)))
    c.start()
    m = c.collect().metrics
    assert m["unit.active[db.service]"] is None
    assert m["unit.failed[db.service]"] is None
    assert m["unit.restarts[db.service]"] is None


def test_units_none_when_systemctl_hangs(tmp_path: Path) -> None:
    fake = _script(tmp_path / "systemctl", "#!/bin/sh\nexec sleep 30\n")
    c = ProcessCollector(ProcessSettings(units=("db.service",), systemctl=str(fake), systemctl_timeout_s=0.2))
    c.start()
    t0 = time.monotonic()
    m = c.collect().metrics
    assert time.monotonic() - t0 < 5
    assert m["unit.active[db.service]"] is None


def test_units_absent_without_systemctl(tmp_path: Path) -> None:
    missing = str(tmp_path / "no-such-systemctl")
    c = ProcessCollector(ProcessSettings(units=("db.service",), systemctl=missing))
    c.start()
    assert not any(k.startswith("unit.") for k in c.collect().metrics)


def test_real_systemctl_without_systemd_pid1_does_not_crash() -> None:
    if shutil.which("systemctl") is None:
        pytest.skip("systemctl not installed")
    c = ProcessCollector(ProcessSettings(units=("cron.service",)))
    c.start()
    m = c.collect().metrics
    assert "unit.active[cron.service]" in m


def test_parse_systemctl_show_blocks() -> None:
    text = "ActiveState=active\nNRestarts=1\n\nActiveState=inactive\nNRestarts=0\n"
    assert parse_systemctl_show(text, ("a", "b")) == {
        "a": {"ActiveState": "active", "NRestarts": "1"},
        "b": {"ActiveState": "inactive", "NRestarts": "0"},
    }



# --- the /proc/PID/stat reader, against fixture trees -------------------------------------------

def _stat_line(pid: int, comm: str, *, state: str = "S", ticks: tuple[int, int] = (0, 0), threads: int = 1,
               start: int = 1000, rss_pages: int = 10) -> str:
    """A /proc/PID/stat line with the fields the collector reads (fields 3..52 of proc(5))."""
    after = ["0"] * 50
    after[0] = state
    after[1] = "1"  # ppid
    after[11], after[12] = str(ticks[0]), str(ticks[1])
    after[17] = str(threads)
    after[19] = str(start)
    after[21] = str(rss_pages)
    return f"{pid} ({comm}) {' '.join(after)}\n"


def _fixture(root: Path, procs: dict[int, str], cmdlines: dict[int, bytes] | None = None) -> Path:
    proc = root / "proc"
    proc.mkdir(exist_ok=True)
    (proc / "stat").write_text("cpu  1 2 3 4\nintr 5 6\nctxt 7\nprocs_running 3\nprocs_blocked 2\n")
    (proc / "self").mkdir(exist_ok=True)
    for pid, line in procs.items():
        (proc / str(pid)).mkdir(exist_ok=True)
        (proc / str(pid) / "stat").write_text(line)
        (proc / str(pid) / "cmdline").write_bytes((cmdlines or {}).get(pid, b""))
    return root


def test_fixture_table_counts_names_and_cpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [100.0]
    monkeypatch.setattr("agent.collect.processes.time.monotonic", lambda: clock[0])
    page = os.sysconf("SC_PAGE_SIZE")
    tck = os.sysconf("SC_CLK_TCK")
    root = _fixture(tmp_path, {
        1: _stat_line(1, "init", threads=1, rss_pages=100),
        20: _stat_line(20, "we(ird) )name", ticks=(10, 5), threads=4, rss_pages=50),
        30: _stat_line(30, "averyverylongpr", threads=2, rss_pages=5),  # comm truncated at 15
        40: _stat_line(40, "dead", state="Z", threads=1, rss_pages=0),
    }, cmdlines={30: b"/opt/bin/averyverylongprocessname\x00--flag\x00"})
    settings = ProcessSettings(top_n=3, watch=("we(ird) )name", "averyverylongprocessname", "dead"))
    c = ProcessCollector(settings, root=str(root))
    c.start()
    r = c.collect()
    m = r.metrics
    assert (m["proc.count"], m["proc.threads"], m["proc.zombies"]) == (4.0, 7.0, 1.0)
    assert (m["proc.running"], m["proc.blocked"]) == (3.0, 2.0)
    assert r.detail["zombie_pids"] == [40]
    assert r.detail["watch"] == {"we(ird) )name": [20], "averyverylongprocessname": [30], "dead": [40]}
    assert m["proc.top_cpu_pct"] == 0.0  # first pass: no interval yet
    assert m["proc.top_rss_bytes"] == 100 * page
    top_mem = r.detail["top_mem"]
    assert isinstance(top_mem, list)
    assert [row["pid"] for row in top_mem] == [1, 20, 30]

    # 2 s later pid 20 used 1 s of CPU (user + system); pid 1 was replaced by another process.
    clock[0] += 2.0
    (root / "proc/20/stat").write_text(_stat_line(20, "we(ird) )name", ticks=(10 + tck // 2, 5 + tck // 2),
                                                  threads=4, rss_pages=50))
    (root / "proc/1/stat").write_text(_stat_line(1, "init", ticks=(500, 500), start=9999, rss_pages=100))
    r = c.collect()
    top_cpu = r.detail["top_cpu"]
    assert isinstance(top_cpu, list)
    assert top_cpu[0] == {"pid": 20, "name": "we(ird) )name", "cpu_pct": 50.0, "rss_bytes": 50 * page}
    assert r.metrics["proc.top_cpu_pct"] == 50.0
    assert next(row for row in top_cpu if row["pid"] == 1)["cpu_pct"] == 0.0  # reused pid: no delta
    assert next(row for row in top_cpu if row["pid"] == 30)["name"] == "averyverylongprocessname"


def test_fixture_vanished_and_malformed_entries_are_skipped(tmp_path: Path) -> None:
    root = _fixture(tmp_path, {5: _stat_line(5, "ok"), 6: "garbage\n"})
    (root / "proc/7").mkdir()  # exited between listdir and open: no stat file
    c = ProcessCollector(ProcessSettings(), root=str(root))
    c.start()
    assert c.collect().metrics["proc.count"] == 1.0


def test_unreadable_proc_reports_none(tmp_path: Path) -> None:
    c = ProcessCollector(ProcessSettings(watch=("x",)), root=str(tmp_path))
    c.start()
    m = c.collect().metrics
    assert m["proc.count"] is None
    assert m["proc.count[x]"] is None
    assert m["proc.running"] is None


def test_psutil_fallback_gives_the_same_table() -> None:
    fast, slow = ProcessCollector(ProcessSettings(top_n=3)), ProcessCollector(ProcessSettings(top_n=3))
    fast.start()
    slow.start()
    slow._fast = False  # what start() decides where /proc is unusual
    a, b = fast.collect().metrics, slow.collect().metrics
    assert set(a) == set(b)
    assert a["proc.count"] == pytest.approx(b["proc.count"], abs=10)


@given(st.text(alphabet=st.characters(codec="utf-8", exclude_characters="\x00"), max_size=15),
       st.tuples(st.integers(0, 2**40), st.integers(0, 2**40), st.integers(1, 10**5), st.integers(0, 2**40)),
       st.sampled_from("RSDZTtXIP"))
def test_parse_pid_stat_any_comm(comm: str, nums: tuple[int, int, int, int], state: str) -> None:
    utime, stime, threads, rss = nums
    line = _stat_line(42, comm, state=state, ticks=(utime, stime), threads=threads, start=77, rss_pages=rss)
    want = (comm.encode(), state.encode(), utime + stime, threads, b"77", rss)
    assert parse_pid_stat(line.encode()) == want


def test_parse_pid_stat_malformed() -> None:
    assert parse_pid_stat(b"") is None
    assert parse_pid_stat(b"1 (x) S 1 2") is None
    assert parse_pid_stat(b"1 x) " + b"1 " * 40) is None


def test_parse_cmdline_and_extended_name() -> None:
    assert parse_cmdline(b"/usr/bin/gnome-keyring-daemon\x00--start\x00") == [
        "/usr/bin/gnome-keyring-daemon", "--start"]
    assert parse_cmdline(b"nginx: worker process") == ["nginx:", "worker", "process"]  # setproctitle
    assert parse_cmdline(b"") == []
    assert extended_name("gnome-keyring-d", ["/usr/bin/gnome-keyring-daemon"]) == "gnome-keyring-daemon"
    assert extended_name("gnome-keyring-d", ["/usr/bin/other"]) == "gnome-keyring-d"
    assert extended_name("short", ["/usr/bin/shorter"]) == "short"


def test_parse_procs_counts() -> None:
    assert parse_procs_counts(b"cpu 1\nprocs_running 4\nprocs_blocked 1\n") == (4, 1)
    assert parse_procs_counts(b"cpu 1\nprocs_running 4") == (4, None)
    assert parse_procs_counts(b"cpu 1\nprocs_running x\n") == (None, None)


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_held_stat_fds_follow_processes_and_are_closed() -> None:
    c = ProcessCollector(ProcessSettings())
    c.start()
    before = _open_fds()
    c.collect()
    held = len(c._fds)
    assert held > 0
    assert _open_fds() == before + held
    child = subprocess.Popen(["sleep", "30"])
    try:
        _wait_state(child.pid, "S")
        r = c.collect()
        assert str(child.pid) in c._fds
    finally:
        child.kill()
        child.wait(timeout=5)
    r = c.collect()  # reaped: its fd is closed, and the pid is not counted
    assert str(child.pid) not in c._fds
    top_mem = r.detail["top_mem"]
    assert isinstance(top_mem, list)
    assert child.pid not in [row["pid"] for row in top_mem]
    c.close()
    assert not c._fds
    assert _open_fds() == before


def test_no_fd_budget_reads_the_same_table() -> None:
    held, plain = ProcessCollector(ProcessSettings()), ProcessCollector(ProcessSettings())
    held.start()
    plain.start()
    plain._max_fds = 0  # what start() decides under a tiny RLIMIT_NOFILE
    a, b = held.collect().metrics, plain.collect().metrics
    assert not plain._fds
    assert a.keys() == b.keys()
    assert a["proc.count"] == pytest.approx(b["proc.count"], abs=10)
    held.close()


def test_reported_rss_is_statm_and_ranks_candidates(tmp_path: Path) -> None:
    """stat's rss only picks candidates; the exact statm value is reported and ranks them."""
    page = os.sysconf("SC_PAGE_SIZE")
    root = _fixture(tmp_path, {pid: _stat_line(pid, f"p{pid}", rss_pages=1000 - pid) for pid in range(1, 8)})
    (root / "proc/2/statm").write_text("5000 1200 10 1 0 100 0\n")  # 2 is really the largest
    (root / "proc/1/statm").write_text("5000 999 10 1 0 100 0\n")
    c = ProcessCollector(ProcessSettings(top_n=2), root=str(root))
    c.start()
    r = c.collect()
    top_mem = r.detail["top_mem"]
    assert isinstance(top_mem, list)
    assert [(row["pid"], row["rss_bytes"]) for row in top_mem] == [(2, 1200 * page), (1, 999 * page)]
    assert r.metrics["proc.top_rss_bytes"] == 1200 * page


def test_dropped_collector_releases_its_held_fds() -> None:
    import gc  # noqa: PLC0415

    def open_fds() -> int:
        return len(os.listdir("/proc/self/fd"))

    before = open_fds()
    c = ProcessCollector(ProcessSettings())
    c.start()
    c.collect()
    c.collect()
    assert open_fds() > before + 5  # it holds /proc/PID/stat files open between passes
    del c
    gc.collect()
    assert open_fds() <= before + 1
