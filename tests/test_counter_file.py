"""CounterFile: the sample number that goes on across restarts (kill -9 included) and never stops
the daemon, on a healthy disk or a full one."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from agent.fsutil import CounterFile

REPO = Path(__file__).resolve().parents[1]


def test_the_value_survives_a_reopen(tmp_path: Path) -> None:
    c = CounterFile(tmp_path / "report" / "sample.seq")
    assert (c.value, c.persistent) == (0, True)
    for v in range(1, 1001):
        c.value = v
    c.close()
    assert CounterFile(tmp_path / "report" / "sample.seq").value == 1000


def test_the_value_survives_kill_9(tmp_path: Path) -> None:
    code = ("import os, signal, sys; from agent.fsutil import CounterFile; c = CounterFile(sys.argv[1]); "
            "[setattr(c, 'value', v) for v in range(1, 5001)]; os.kill(os.getpid(), signal.SIGKILL)")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "n")], cwd=REPO, check=False,
                          timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert CounterFile(tmp_path / "n").value == 5000


@pytest.mark.root
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to mount a tmpfs")
def test_a_full_disk_never_raises_and_the_count_goes_on_in_memory() -> None:
    d = Path(tempfile.mkdtemp(prefix="heald-counter-"))
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(d)], check=True)
    try:
        fd = os.open(d / "filler", os.O_WRONLY | os.O_CREAT, 0o600)  # fill it to the last block
        try:
            while True:
                try:
                    os.write(fd, b"x" * 4096)
                except OSError:
                    break
        finally:
            os.close(fd)
        c = CounterFile(d / "report" / "sample.seq")  # the directory and the empty file still fit
        for v in range(1, 101):
            c.value = v  # the first write needs a block: ENOSPC, counted, not raised
        assert c.value == 100
        (d / "filler").unlink()
        c.value = 101  # room again: written
        c.close()
        assert CounterFile(d / "report" / "sample.seq").value == 101
    finally:
        subprocess.run(["umount", "-l", str(d)], check=False)
        d.rmdir()
