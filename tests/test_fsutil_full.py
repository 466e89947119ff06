"""write_small_state on a really full filesystem (a tmpfs this test mounts and fills): in place
within the file's blocks, never a torn file past them, and ENOSPC (not FileNotFoundError) when
there is no file to reuse. The cost history, too big for it, is saved atomically."""

from __future__ import annotations

import errno
import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_degraded_storage import Tmpfs, mount_tmpfs, unmount

from agent.features.cost import CostMeter, CostSettings
from agent.fsutil import write_small_state

pytestmark = pytest.mark.root


@pytest.fixture
def full(tmp_path: Path) -> Iterator[Tmpfs]:
    mnt = tmp_path / "mnt"
    mount_tmpfs(mnt, size="1m")
    try:
        yield Tmpfs(mnt)
    finally:
        unmount(mnt)


def test_a_counter_growing_a_digit_is_written_in_its_block(full: Tmpfs) -> None:
    counter = full.path / "seq"
    write_small_state(counter, b"99\n")
    full.fill()
    write_small_state(counter, b"100\n")
    assert counter.read_bytes() == b"100\n"
    write_small_state(counter, b"7\n")  # shorter: blanked with spaces, read back as 7
    assert int(counter.read_bytes()) == 7


def test_past_its_blocks_the_old_content_stays_whole(full: Tmpfs) -> None:
    state = full.path / "rows.json"
    old = json.dumps([{"hour": i} for i in range(100)]).encode()
    write_small_state(state, old)
    full.fill()
    bigger = json.dumps([{"hour": i} for i in range(2000)]).encode()  # far past one 4 KiB block
    assert len(bigger) > os.stat(state).st_blocks * 512
    with pytest.raises(OSError, match="No space left") as err:
        write_small_state(state, bigger)
    assert err.value.errno == errno.ENOSPC
    assert state.read_bytes() == old  # not torn: the old rows, whole


def test_no_file_to_reuse_says_enospc(full: Tmpfs) -> None:
    full.fill()
    with pytest.raises(OSError, match="No space left") as err:
        write_small_state(full.path / "new", b"1\n")
    assert err.value.errno == errno.ENOSPC
    assert not isinstance(err.value, FileNotFoundError)


def test_the_cost_history_on_a_full_disk_keeps_its_saved_hours(full: Tmpfs) -> None:
    meter = CostMeter(CostSettings(), full.path)
    meter.hours.extend({"start": 3600.0 * i, "seconds": 3600.0, "idle_core_h": 0.5} for i in range(10))
    meter.save()
    saved = meter.path.read_bytes() if meter.path else b""
    full.fill()
    meter.hours.extend({"start": 3600.0 * i, "seconds": 3600.0, "idle_core_h": 0.25} for i in range(10, 300))
    meter.save()  # logged, not raised
    assert meter.path is not None
    assert meter.path.read_bytes() == saved
    assert len(CostMeter(CostSettings(), full.path).hours) == 10  # the next start loads them
