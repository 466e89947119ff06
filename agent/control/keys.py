"""The command verifier from ``[coordinator]``: the coordinator's public keys and a nonce cache."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import structlog

from agent.control.settings import CoordinatorSettings
from agent.fsutil import FailureStreak, describe

if TYPE_CHECKING:
    from agent.wire.signing import CommandVerifier

log = structlog.get_logger("heald.control")


def build_verifier(settings: CoordinatorSettings, *, node: str, site: str, state_dir: Path,
                   nonces_from: CommandVerifier | None = None) -> CommandVerifier | None:
    """None when no key is configured: every command is then rejected (``no_key``).

    ``nonces_from``: the running verifier, on a key rotation (SIGHUP); its nonce cache is kept, so
    a command seen before the rotation is still a replay after it.
    """
    if not settings.public_keys and not settings.public_key_files:
        return None  # before the import: cryptography (~6 MiB of RSS) only when commands are in use
    from agent.wire import signing  # noqa: PLC0415 - cryptography only when commands are in use

    keys = [signing.parse_public_key(k) for k in settings.public_keys]
    keys += [signing.load_public_key(Path(p)) for p in settings.public_key_files]
    if not keys:
        return None
    if nonces_from is not None:
        return signing.CommandVerifier(keys, node=node, site=site, nonces=nonces_from.nonces,
                                       max_skew_s=settings.max_clock_skew_s)
    path = state_dir / "report" / "nonces.msgpack"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # the cache works from memory; its saves say so (below)
        log.error("nonce cache directory unusable", dir=str(path.parent), **describe(exc))
    failures = FailureStreak(
        "command nonce cache not saved; replay protection goes on in memory", log, file=str(path),
        consequence="a restart before the next good save refuses every command issued before it")

    def on_persist(error: OSError | None) -> None:
        if error is None:
            failures.succeeded()
        else:
            failures.failed(error)

    return signing.CommandVerifier(keys, node=node, site=site,
                                   nonces=signing.NonceCache(path, on_persist=on_persist),
                                   max_skew_s=settings.max_clock_skew_s)
