"""Memory collector against /proc of this host and a fixture tree."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.collect.memory import MemoryCollector, meminfo_fields, parse_meminfo, parse_vmstat

MEMINFO = """MemTotal:       1000 kB
MemFree:         100 kB
MemAvailable:    250 kB
SwapTotal:       400 kB
SwapFree:        300 kB
"""


def _vmstat(oom: int, pgfault: int = 100) -> str:
    return f"nr_free_pages 5\npgfault {pgfault}\npgmajfault 3\noom_kill {oom}\n"


def test_memtotal_matches_proc_meminfo() -> None:
    c = MemoryCollector()
    c.start()
    m = c.collect().metrics
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            assert m["mem.total_bytes"] == int(line.split()[1]) * 1024
            break
    else:
        raise AssertionError("no MemTotal")
    used = m["mem.used_pct"]
    assert used is not None
    assert 0 < used < 100


def test_psi_present_when_kernel_has_it() -> None:
    c = MemoryCollector()
    c.start()
    m = c.collect().metrics
    if not Path("/proc/pressure/memory").exists():
        assert not any(k.startswith("psi.") for k in m)
        return
    for res in ("memory", "cpu", "io"):
        if Path(f"/proc/pressure/{res}").exists():
            assert m[f"psi.some_avg10_pct[{res}]"] is not None
            assert f"psi.some_avg60_pct[{res}]" in m
    assert m["psi.full_avg10_pct[memory]"] is not None


def test_fixture_swap_oom_event_and_no_psi(tmp_path: Path) -> None:
    (tmp_path / "proc").mkdir()
    (tmp_path / "proc/meminfo").write_text(MEMINFO)
    (tmp_path / "proc/vmstat").write_text(_vmstat(2))
    c = MemoryCollector(root=str(tmp_path))
    c.start()
    r = c.collect()
    assert r.metrics["mem.total_bytes"] == 1000 * 1024
    assert r.metrics["mem.used_pct"] == 75.0
    assert r.metrics["mem.swap_used_pct"] == 25.0
    assert r.metrics["mem.oom_kills"] == 2
    assert r.metrics["mem.page_faults_per_s"] is None  # first pass
    assert not r.events  # kills before the collector started are not new
    assert not any(k.startswith("psi.") for k in r.metrics)  # no /proc/pressure: absent

    (tmp_path / "proc/vmstat").write_text(_vmstat(5, pgfault=200))
    r = c.collect()
    assert r.metrics["mem.oom_kills"] == 5
    assert r.metrics["mem.page_faults_per_s"] is not None
    assert r.metrics["mem.page_faults_per_s"] > 0
    assert [(e.kind, e.value) for e in r.events] == [("mem.oom_kill", 3.0)]
    assert not c.collect().events


def test_no_swap_means_swap_pct_absent(tmp_path: Path) -> None:
    (tmp_path / "proc").mkdir()
    (tmp_path / "proc/meminfo").write_text(
        "MemTotal: 1000 kB\nMemAvailable: 500 kB\nSwapTotal: 0 kB\nSwapFree: 0 kB\n"
    )
    (tmp_path / "proc/pressure").mkdir()
    (tmp_path / "proc/pressure/memory").write_text(
        "some avg10=1.50 avg60=0.20 avg300=0.00 total=10\nfull avg10=0.50 avg60=0.10 avg300=0.00 total=5\n"
    )
    c = MemoryCollector(root=str(tmp_path))
    c.start()
    m = c.collect().metrics
    assert m["mem.swap_total_bytes"] == 0
    assert "mem.swap_used_pct" not in m
    assert "mem.oom_kills" not in m  # no vmstat: absent
    assert m["psi.some_avg10_pct[memory]"] == 1.5
    assert m["psi.full_avg60_pct[memory]"] == 0.1
    assert "psi.some_avg10_pct[io]" not in m


def test_field_lookup_matches_full_parse() -> None:
    data = Path("/proc/meminfo").read_bytes()
    full = parse_meminfo(data)
    assert meminfo_fields(data) == {k: full[k] for k in meminfo_fields(data)}
    assert "MemTotal" in meminfo_fields(data)
    # Only whole names at the start of a line: SwapCached is not Cached, pgfault_x is not pgfault.
    text = b"SwapCached:       7 kB\nCached:  3 kB\nHugePages_Total: 2\nMemTotal: 9 kB"
    assert meminfo_fields(text, (b"Cached", b"MemTotal", b"HugePages_Total")) == {
        "Cached": 3072, "MemTotal": 9216, "HugePages_Total": 2}
    assert parse_vmstat(b"pgfault_x 1\npgmajfault 3\npgfault 9\noom_kill nope\n") == {
        "pgfault": 9, "pgmajfault": 3}


def test_eta_from_the_growth_of_used_memory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """mem.eta_s = MemAvailable / growth of used memory over the last 8 s, only while it grows;
    a value that goes backwards (memory freed) ends the ETA, and one burst does not make a slope."""
    (tmp_path / "proc").mkdir()
    clock = {"t": 1000.0}
    monkeypatch.setattr("agent.collect.memory.time.monotonic", lambda: clock["t"])

    def at(avail_mib: float) -> dict[str, float | None]:
        (tmp_path / "proc/meminfo").write_text(
            f"MemTotal: {4096 * 1024} kB\nMemAvailable: {int(avail_mib * 1024)} kB\n")
        clock["t"] += 1.0
        return c.collect().metrics

    c = MemoryCollector(root=str(tmp_path))
    (tmp_path / "proc/meminfo").write_text("MemTotal: 4194304 kB\n")
    c.start()
    first = at(3000)
    assert first["mem.growth_bytes_per_s"] is None  # one point is no slope
    assert "mem.eta_s" not in first
    at(2950)
    m = at(2900)  # used grows 50 MiB/s: 2 900 MiB left -> 58 s
    assert m["mem.growth_bytes_per_s"] == pytest.approx(50 * 2**20)
    assert m["mem.eta_s"] == pytest.approx(58.0)
    for avail in range(2850, 2400, -50):
        m = at(avail)
    assert m["mem.eta_s"] == pytest.approx(2450 / 50)
    flat = [at(2450) for _ in range(9)][-1]  # the 8 s window holds only the flat stretch
    assert flat["mem.growth_bytes_per_s"] == pytest.approx(0.0)
    assert "mem.eta_s" not in flat
    for avail in (2500, 2600, 2700):
        freed = at(avail)
    assert "mem.eta_s" not in freed  # memory freed: no ETA
