"""Disk collector: mounts against /proc/self/mounts, diskstats deltas, read-only transitions."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from agent.collect.disk import DiskCollector, parse_mounts, unescape_mount
from agent.collect.settings import DiskSettings


def _reported_mounts(metrics: dict[str, float | None]) -> set[str]:
    prefix = "disk.total_bytes["
    return {k[len(prefix) : -1] for k in metrics if k.startswith(prefix)}


def test_mounts_match_proc_self_mounts() -> None:
    settings = DiskSettings()
    c = DiskCollector(settings)
    c.start()
    m = c.collect().metrics
    expected = set()
    for line in Path("/proc/self/mounts").read_text().splitlines():
        _dev, point, fstype = line.split()[:3]
        if fstype not in settings.exclude_fstypes:
            expected.add(unescape_mount(point))
    assert _reported_mounts(m) == expected
    assert m["disk.readonly[/]"] == 0.0
    used, total = m["disk.used_bytes[/]"], m["disk.total_bytes[/]"]
    assert used is not None
    assert total is not None
    assert 0 < used <= total
    st = os.statvfs("/")
    assert total == st.f_blocks * st.f_frsize


def test_include_and_exclude_mounts() -> None:
    c = DiskCollector(DiskSettings(include_mounts=("/proc",), exclude_mounts=("/",)))
    c.start()
    got = _reported_mounts(c.collect().metrics)
    assert "/proc" in got
    assert "/" not in got


def test_parse_mounts_escapes_and_shadowing() -> None:
    text = "tmpfs /a\\040b tmpfs rw 0 0\n/dev/x /m ext4 rw 0 0\n/dev/y /m xfs ro 0 0\n"
    mounts = parse_mounts(text)
    assert [mt.mountpoint for mt in mounts] == ["/a b", "/m"]
    assert mounts[1].device == "/dev/y"
    assert mounts[1].readonly


def test_diskstats_rates_and_device_selection(tmp_path: Path) -> None:
    (tmp_path / "proc/self").mkdir(parents=True)
    (tmp_path / "proc/self/mounts").write_text(f"/dev/loop1 {tmp_path} ext4 rw 0 0\n")
    line = "{maj} {mn} {name} {r} 0 {rs} {rms} {w} 0 {ws} {wms} 0 {io} 0 0 0 0 0 0 0\n"

    def stats(k: int) -> str:
        return (
            line.format(maj=8, mn=0, name="sda", r=100 * k, rs=800 * k, rms=50 * k, w=10 * k, ws=80 * k,
                        wms=40 * k, io=500 * k)
            + line.format(maj=7, mn=0, name="loop0", r=5 * k, rs=0, rms=0, w=0, ws=0, wms=0, io=0)
            + line.format(maj=7, mn=1, name="loop1", r=k, rs=8 * k, rms=k, w=0, ws=0, wms=0, io=k)
            + line.format(maj=1, mn=0, name="ram0", r=0, rs=0, rms=0, w=0, ws=0, wms=0, io=0)
            + line.format(maj=252, mn=0, name="zram0", r=3 * k, rs=0, rms=0, w=0, ws=0, wms=0, io=0)
        )

    (tmp_path / "proc/diskstats").write_text(stats(1))
    c = DiskCollector(root=str(tmp_path))
    c.start()
    m = c.collect().metrics
    devices = {k.split("[")[1][:-1] for k in m if k.startswith("disk.read_iops[")}
    assert devices == {"sda", "loop1", "zram0"}  # loop0 backs nothing, ram0 never did I/O
    assert m["disk.read_iops[sda]"] is None
    assert m["disk.util_pct[sda]"] is None
    time.sleep(0.5)
    (tmp_path / "proc/diskstats").write_text(stats(2))
    m = c.collect().metrics
    riops, rbps, util = m["disk.read_iops[sda]"], m["disk.read_bytes_per_s[sda]"], m["disk.util_pct[sda]"]
    assert riops is not None
    assert rbps is not None
    assert util is not None
    assert rbps == pytest.approx(riops * 8 * 512)  # 8 sectors per read
    assert m["disk.read_await_ms[sda]"] == pytest.approx(0.5)  # 50 ms over 100 reads
    assert m["disk.write_await_ms[sda]"] == pytest.approx(4.0)
    assert 0 < util <= 100.0
    assert m["disk.write_await_ms[zram0]"] == 0.0  # no writes in the interval


def test_readonly_transition_event(tmp_path: Path) -> None:
    point = tmp_path / "data"
    point.mkdir()
    (tmp_path / "proc/self").mkdir(parents=True)
    mounts = tmp_path / "proc/self/mounts"
    mounts.write_text(f"/dev/sdz1 {point} ext4 rw,relatime 0 0\n")
    c = DiskCollector(root=str(tmp_path))
    c.start()
    r = c.collect()
    assert r.metrics[f"disk.readonly[{point}]"] == 0.0
    assert not r.events
    mounts.write_text(f"/dev/sdz1 {point} ext4 ro,relatime 0 0\n")
    r = c.collect()
    assert r.metrics[f"disk.readonly[{point}]"] == 1.0
    assert [(e.kind, e.labels["mount"], e.labels["device"]) for e in r.events] == [
        ("disk.readonly", str(point), "/dev/sdz1")
    ]
    assert not c.collect().events  # once per transition


@pytest.mark.root
def test_real_tmpfs_used_pct_and_remount_ro(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a tmpfs")
    point = tmp_path / "mnt"
    point.mkdir()
    try:
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "heald-test", str(point)], check=True,
                       capture_output=True, timeout=10)
    except (OSError, subprocess.CalledProcessError) as e:
        pytest.skip(f"cannot mount tmpfs here: {e}")
    try:
        c = DiskCollector()
        c.start()
        k = f"disk.used_pct[{point}]"
        before = c.collect()
        assert before.metrics[f"disk.total_bytes[{point}]"] == 8 * 1024 * 1024
        used0 = before.metrics[k]
        assert used0 is not None
        (point / "blob").write_bytes(os.urandom(2 * 1024 * 1024))
        used1 = c.collect().metrics[k]
        assert used1 is not None
        assert used1 - used0 == pytest.approx(25.0, abs=1.0)
        subprocess.run(["mount", "-o", "remount,ro", str(point)], check=True, capture_output=True, timeout=10)
        r = c.collect()
        assert r.metrics[f"disk.readonly[{point}]"] == 1.0
        assert any(e.kind == "disk.readonly" and e.labels["mount"] == str(point) for e in r.events)
    finally:
        subprocess.run(["umount", str(point)], check=False, capture_output=True, timeout=10)


def test_mount_table_changes_and_vanished_devices(tmp_path: Path) -> None:
    """The parsed mount table is reused while /proc/self/mounts is unchanged, and only then."""
    (tmp_path / "proc/self").mkdir(parents=True)
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    mounts = tmp_path / "proc/self/mounts"
    mounts.write_text(f"/dev/sdz1 {a} ext4 rw 0 0\n")
    line = "8 {mn} {name} 1 0 8 1 1 0 8 1 0 1 0 0 0 0 0 0 0\n"
    (tmp_path / "proc/diskstats").write_text(line.format(mn=0, name="sdz") + line.format(mn=16, name="sdy"))
    c = DiskCollector(root=str(tmp_path))
    c.start()
    m = c.collect().metrics
    assert f"disk.total_bytes[{a}]" in m
    assert f"disk.total_bytes[{b}]" not in m
    assert "disk.read_iops[sdy]" in m
    assert c.collect().metrics.keys() == m.keys()

    mounts.write_text(f"/dev/sdz1 {a} ext4 rw 0 0\n/dev/sdy1 {b} ext4 rw 0 0\n")
    (tmp_path / "proc/diskstats").write_text(line.format(mn=0, name="sdz"))
    m = c.collect().metrics
    assert f"disk.total_bytes[{b}]" in m
    assert "disk.read_iops[sdy]" not in m  # the device is gone: absent, its baselines dropped
    assert "disk.read_iops[sdz]" in m
