"""Shared fixtures. Keep this file tiny: fixtures live in their own modules and are registered here."""

from collections.abc import Iterator

import pytest
import structlog
from broker import mosquitto, mosquitto_factory, tls_certs
from exclusive import exclusive_lock

__all__ = ["exclusive_lock", "mosquitto", "mosquitto_factory", "structlog_defaults", "tls_certs"]

#: The suite runs on several pytest-xdist workers at once (``--dist loadgroup``, pyproject.toml): most
#: of its time is spent waiting on real daemons, brokers and timers, not on a core. Files whose
#: tests share one host-wide resource run on one worker, one test after another.
SHARED = {
    # heald's own freezer group (/sys/fs/cgroup/freezer/heald-frozen): its records and its removal
    "test_security_proc.py": "freezer",
    "test_security_edges.py": "freezer",
    # both count "heald-zombie-maker" zombies host-wide
    "test_act_actions.py": "zombies",
    "test_playbooks_shipped.py": "zombies",
    # its module fixture builds the .deb when HEALD_DEB is unset (minutes): once, not once a worker
    "test_deb.py": "deb",
}
#: The files of the longest tests (minutes each, by the --durations of the last runs), started
#: first in this order: one of them started last would be the whole suite's tail.
LONGEST = ("test_faultfree_load.py", "test_fleet_chaos.py", "test_degraded_daemon.py",
           "test_report_transport.py", "test_memory_predicted.py", "test_predictive_heal_bench.py",
           "test_demand_e2e.py")


@pytest.hookimpl(tryfirst=True)  # before xdist's own, which reads the xdist_group marks
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The slow tests of the LONGEST files, then the other slow tests, then the rest (a long test
    started last would be the suite's tail), then the exclusive ones (tests/exclusive.py: when
    only short tests are left to wait for); the order within each is the files' own."""
    for item in items:
        group = SHARED.get(item.path.name)
        if group is not None:
            if item.get_closest_marker("exclusive") is not None:
                # a group is scheduled by its first test: an exclusive one in it would start early,
                # wait for a long test to end and stall every worker behind the turnstile
                raise pytest.UsageError(f"{item.nodeid}: an exclusive test cannot be in group {group!r}")
            item.add_marker(pytest.mark.xdist_group(group))

    def rank(item: pytest.Item) -> tuple[int, int]:
        if item.get_closest_marker("exclusive") is not None:
            return (3, 0)
        if item.get_closest_marker("slow") is None:
            return (2, 0)
        name = item.path.name
        return (0, LONGEST.index(name)) if name in LONGEST else (1, 0)

    items.sort(key=rank)


@pytest.fixture(autouse=True)
def structlog_defaults() -> Iterator[None]:
    """Each test starts from structlog's defaults: a CLI entry point run in-process (quiet_logging
    sets a warning-level filter) must not hide another test's info records from capture_logs."""
    yield
    structlog.reset_defaults()
