"""Coordinator errors; all are :class:`agent.errors.HealdError` so the CLI maps them to exit codes."""

from __future__ import annotations

from agent.errors import HealdError, InputError


class CoordinatorConfigError(InputError):
    """coordinator.toml is invalid (exit 2); every problem names the file, line and key."""


class StoreError(HealdError):
    """The store (SQLite or PostgreSQL) cannot be opened or used."""


class BrokerUnavailable(HealdError):
    """The embedded broker was asked for but cannot be started (amqtt missing or port taken)."""


class BadRequest(HealdError):
    """An API request with invalid parameters or body (HTTP 400)."""


class NotFound(HealdError):
    """An API object (node, approval, escalation) does not exist."""


class Conflict(HealdError):
    """An API request conflicts with the object's state (approving a decided approval)."""
