"""Pacing of the MQTT transport: the publish rate limit and the reconnect backoff."""

from __future__ import annotations

import asyncio
import random
import time


class TokenBucket:
    """``rate`` tokens per second, bursts of up to ``burst``."""

    def __init__(self, rate: float, burst: float | None = None) -> None:
        self.rate = rate
        self.burst = max(1.0, burst if burst is not None else rate)
        self._tokens = self.burst
        self._stamp = time.monotonic()

    async def take(self) -> None:
        while True:
            now = time.monotonic()
            self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate)
            self._stamp = now
            if self._tokens >= 1.0:
                self._tokens -= 1.0
                return
            await asyncio.sleep((1.0 - self._tokens) / self.rate)


def full_jitter(attempt: int, initial: float, cap: float, rng: random.Random) -> float:
    """AWS-style full jitter: uniform in [0, min(cap, initial * 2**attempt)]."""
    return rng.uniform(0.0, min(cap, initial * (2 ** min(attempt, 30))))
