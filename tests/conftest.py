"""Shared fixtures. Keep this file tiny: fixtures live in their own modules and are registered here."""

from collections.abc import Iterator

import pytest
import structlog
from broker import mosquitto, mosquitto_factory, tls_certs

__all__ = ["mosquitto", "mosquitto_factory", "structlog_defaults", "tls_certs"]


@pytest.fixture(autouse=True)
def structlog_defaults() -> Iterator[None]:
    """Each test starts from structlog's defaults: a CLI entry point run in-process (quiet_logging
    sets a warning-level filter) must not hide another test's info records from capture_logs."""
    yield
    structlog.reset_defaults()
