"""The embedded broker's authentication plugin (amqtt imports it by name; only with ``heald[embedded]``).

The embedded broker binds loopback only (:func:`coordinator.broker.check_loopback`), so it lets
every client in. It does so here rather than with amqtt's ``AnonymousAuthPlugin`` because that
one marks each session anonymous, and amqtt keeps neither the subscriptions nor the queued QoS 1
messages of an anonymous session while its client is away: persistent sessions (the agents'
queued commands, the coordinator's queued reports) would not exist on the embedded broker.
"""

from __future__ import annotations

from amqtt.plugins.base import BaseAuthPlugin


class LoopbackAuthPlugin(BaseAuthPlugin):  # type: ignore[misc]  # amqtt is untyped (pyproject: ignore_missing_imports)
    """Authenticates every client, as itself (not anonymous)."""

    async def authenticate(self, *, session: object) -> bool:
        return True
