"""disk.readonly means the filesystem went read-only, not that this process sees a read-only bind.

Under the shipped unit (ProtectSystem=strict) / is a read-only bind mount for heald; the metric
must stay 0 there, and become 1 (with an event) when the filesystem itself is remounted ro.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.collect.disk import DiskCollector, parse_mountinfo
from agent.collect.settings import DiskSettings

pytestmark = pytest.mark.root

MOUNTINFO = (
    "25 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw,errors=remount-ro\n"
    "26 25 8:1 /usr /usr ro,relatime shared:1 - ext4 /dev/sda1 rw,errors=remount-ro\n"
    "27 25 0:5 / /mnt/my\\040disk rw - xfs /dev/sdb1 ro,attr2\n"
)


def test_mountinfo_uses_superblock_options() -> None:
    mounts = {m.mountpoint: m for m in parse_mountinfo(MOUNTINFO)}
    assert not mounts["/usr"].readonly  # read-only bind of a read-write filesystem
    assert mounts["/mnt/my disk"].readonly
    assert mounts["/mnt/my disk"].device == "/dev/sdb1"
    assert mounts["/"].fstype == "ext4"


def _sh(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True, timeout=30)


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    fs, bind = tmp_path / "fs", tmp_path / "bind"
    fs.mkdir()
    bind.mkdir()
    _sh("mount", "-t", "tmpfs", "-o", "size=4m", "heald-ro-test", str(fs))
    try:
        _sh("mount", "--bind", str(fs), str(bind))
        _sh("mount", "-o", "remount,bind,ro", str(bind))
        yield fs, bind
    finally:
        subprocess.run(["umount", "-l", str(bind)], check=False, capture_output=True, timeout=30)
        subprocess.run(["umount", "-l", str(fs)], check=False, capture_output=True, timeout=30)


def test_readonly_bind_is_not_readonly_but_a_ro_remount_is(tmpfs: tuple[Path, Path]) -> None:
    fs, bind = tmpfs
    c = DiskCollector(DiskSettings())
    c.start()
    r = c.collect()
    assert r.metrics[f"disk.readonly[{bind}]"] == 0.0
    assert r.metrics[f"disk.readonly[{fs}]"] == 0.0
    _sh("mount", "-o", "remount,ro", str(fs))
    r = c.collect()
    assert r.metrics[f"disk.readonly[{fs}]"] == 1.0
    assert any(e.kind == "disk.readonly" and e.labels["mount"] == str(fs) for e in r.events)
    c.close()
