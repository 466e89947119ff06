"""Tests marked ``exclusive`` run with no other test at once, also on pytest-xdist's workers.

Their premise is a quiet host (a model fitted on the host's own CPU, then a CPU hog that must look
anomalous; idle core-hours above zero; CPU accounting against stress-ng; a count of reports a
starved agent does not reach; a block verified before its short test timeout runs out): with other
workers busy it does not hold, and each of these failed in a 4-worker run. Every test
takes a shared lock for its run, an exclusive one the exclusive lock; a turnstile in front stops new
tests from starting while an exclusive one waits, so it is not starved. tests/conftest.py orders
the exclusive tests last, when the other workers only have short tests left (pytest-timeout counts
the wait).
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator

import pytest


@pytest.fixture(autouse=True)
def exclusive_lock(request: pytest.FixtureRequest,
                   tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    if os.environ.get("PYTEST_XDIST_WORKER") is None:  # one process: nothing runs beside a test
        yield
        return
    shared = tmp_path_factory.getbasetemp().parent  # pytest-N/, above every worker's popen-gwX/
    exclusive = request.node.get_closest_marker("exclusive") is not None
    with (shared / "suite.turnstile").open("a") as gate, (shared / "suite.lock").open("a") as lock:
        fcntl.flock(gate, fcntl.LOCK_EX)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        finally:
            fcntl.flock(gate, fcntl.LOCK_UN)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
