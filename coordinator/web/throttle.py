"""Login throttling: failed credentials per client back off exponentially, in bounded memory.

Every way of presenting a secret (``POST /login``, ``Authorization: Bearer``) guesses the same
set of secrets, so both share one :class:`LoginThrottle`, keyed by the client's address
(:func:`client_key`; an IPv6 client by its /64, which one host usually holds whole). There is
one account, so the address is the only key.

* ``max_failures`` failures in a row start a lockout of ``lockout_s``; each further failure
  after a lockout ends starts the next one, twice as long, capped at ``lockout_max_s``.
* While locked, every attempt is refused (HTTP 429, ``Retry-After``) *before* the secret is
  looked at: the refusal cannot tell a right secret from a wrong one, and takes the same time.
  Refused attempts do not lengthen the lockout (the operator's own retries do not lock them
  out for longer).
* A success forgets the client; so does ``window_s`` without a failure after the last one (or
  after the lockout's end).
* At most ``max_clients`` clients are tracked: the least recently seen is forgotten first
  (a flood of distinct addresses costs bounded memory; the one client hammering a lockout
  stays near the top and is not the one forgotten).

The tracker is this replica's alone (memory, not the store): behind a load balancer that
spreads one client over *n* replicas, the client gets *n* times the budget.

Callers must check, compare and record without awaiting in between, so that concurrent
requests from one client cannot all pass the check before the first failure is recorded.
"""

from __future__ import annotations

import ipaddress
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Final

from coordinator.config import WebSection

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

#: IPv6 clients are keyed by their /64: one host normally owns a whole /64 and could rotate
#: addresses inside it for free.
IPV6_PREFIX: Final = 64


@dataclass(slots=True)
class _Client:
    failures: int = 0
    last_failure: float = 0.0
    locked_until: float = 0.0

    def expired(self, now: float, window_s: float) -> bool:
        return now >= max(self.last_failure, self.locked_until) + window_s


@dataclass(frozen=True, slots=True)
class Failure:
    """What one recorded failure did: ``lockout_s`` > 0 when it started a lockout."""

    failures: int
    lockout_s: float


@dataclass(slots=True)
class ThrottleStats:
    failures: int = 0
    lockouts: int = 0
    refused: int = 0
    evicted: int = 0


class LoginThrottle:
    """Failed-credential tracker with exponential lockouts; see the module docstring."""

    def __init__(
        self,
        *,
        max_failures: int,
        window_s: float,
        lockout_s: float,
        lockout_max_s: float,
        max_clients: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_failures < 1 or max_clients < 1 or lockout_s <= 0 or lockout_max_s < lockout_s:
            raise ValueError("invalid login throttle settings")
        self.max_failures = max_failures
        self.window_s = window_s
        self.lockout_s = lockout_s
        self.lockout_max_s = lockout_max_s
        self.max_clients = max_clients
        self.clock = clock
        self.stats = ThrottleStats()
        self._clients: OrderedDict[str, _Client] = OrderedDict()

    def __len__(self) -> int:
        return len(self._clients)

    def _get(self, key: str, now: float) -> _Client | None:
        client = self._clients.get(key)
        if client is not None and client.expired(now, self.window_s):
            del self._clients[key]
            return None
        return client

    def retry_after(self, key: str) -> float:
        """Seconds ``key`` is still locked out (0: it may try). A refusal is counted."""
        now = self.clock()
        client = self._get(key, now)
        if client is None or client.locked_until <= now:
            return 0.0
        self._clients.move_to_end(key)  # the client hammering a lockout is the last one forgotten
        self.stats.refused += 1
        return client.locked_until - now

    def failure(self, key: str) -> Failure:
        """Record a failed attempt by ``key``; the result says whether it started a lockout."""
        now = self.clock()
        client = self._get(key, now)
        if client is None:
            self._evict(now)
            client = self._clients[key] = _Client(last_failure=now)
        else:
            self._clients.move_to_end(key)
        client.failures += 1
        client.last_failure = now
        self.stats.failures += 1
        over = client.failures - self.max_failures
        if over < 0:
            return Failure(client.failures, 0.0)
        lockout = min(self.lockout_s * 2.0 ** min(over, 64), self.lockout_max_s)
        client.locked_until = now + lockout
        self.stats.lockouts += 1
        return Failure(client.failures, lockout)

    def success(self, key: str) -> None:
        """``key`` presented a right secret: forget its failures."""
        self._clients.pop(key, None)

    def _evict(self, now: float) -> None:
        # First whatever has expired at the old end (cheap, usually enough), then the least
        # recently seen, until the cap holds.
        while self._clients:
            oldest_key, oldest = next(iter(self._clients.items()))
            if not oldest.expired(now, self.window_s):
                break
            del self._clients[oldest_key]
        while len(self._clients) >= self.max_clients:  # room for the one about to be added
            self._clients.popitem(last=False)
            self.stats.evicted += 1

    def info(self) -> dict[str, int]:
        """Counters for ``/api/info``."""
        return {
            "tracked": len(self._clients),
            "max_tracked": self.max_clients,
            "failures": self.stats.failures,
            "lockouts": self.stats.lockouts,
            "refused": self.stats.refused,
            "evicted": self.stats.evicted,
        }


def retry_after_header(seconds: float) -> str:
    """``Retry-After`` in whole seconds, rounded up, at least 1."""
    return str(max(1, math.ceil(seconds)))


def _address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        address = ipaddress.ip_address(text.strip())
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def client_address(
    peer: str | None, forwarded_for: Iterable[str], trusted_proxies: tuple[IPNetwork, ...]
) -> str:
    """The client's address: the TCP peer, unless the peer is a trusted proxy.

    From a trusted proxy, ``X-Forwarded-For`` is read right to left (each proxy appends the
    address it got the request from) past every trusted proxy; the first other address is
    the client. An entry that is not an IP address ends the walk at the last trusted hop,
    so a forged or mangled header never picks the client's key. With no trusted proxies (the
    default) the header is ignored.
    """
    current = _address(peer or "")
    if current is None:
        return peer or "?"
    if not trusted_proxies:
        return str(current)
    hops = [h for value in forwarded_for for h in value.split(",") if h.strip()]
    while any(current in net for net in trusted_proxies) and hops:
        nxt = _address(hops.pop())
        if nxt is None:
            break
        current = nxt
    return str(current)


def client_key(address: str) -> str:
    """The throttle key of an address: IPv4 as it is, IPv6 by its /64."""
    parsed = _address(address)
    if isinstance(parsed, ipaddress.IPv6Address):
        return str(ipaddress.IPv6Network((parsed, IPV6_PREFIX), strict=False))
    return str(parsed) if parsed is not None else address


def parse_networks(values: Iterable[str]) -> tuple[IPNetwork, ...]:
    """``[web] trusted_proxies`` as networks (config validation has checked each)."""
    return tuple(ipaddress.ip_network(v.strip(), strict=False) for v in values)


def throttle_from(web: WebSection) -> LoginThrottle:
    """The tracker ``[web]``'s ``login_*`` keys describe."""
    return LoginThrottle(
        max_failures=web.login_max_failures,
        window_s=web.login_window_s,
        lockout_s=web.login_lockout_s,
        lockout_max_s=web.login_lockout_max_s,
        max_clients=web.login_tracked_max,
    )
