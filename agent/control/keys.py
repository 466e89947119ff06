"""The command verifier from ``[coordinator]``: the coordinator's public keys and a nonce cache."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from agent.control.settings import CoordinatorSettings

if TYPE_CHECKING:
    from agent.wire.signing import CommandVerifier


def build_verifier(settings: CoordinatorSettings, *, node: str, site: str,
                   state_dir: Path) -> CommandVerifier | None:
    """None when no key is configured: every command is then rejected (``no_key``)."""
    from agent.wire import signing  # noqa: PLC0415 - cryptography only when commands are in use

    keys = [signing.parse_public_key(k) for k in settings.public_keys]
    keys += [signing.load_public_key(Path(p)) for p in settings.public_key_files]
    if not keys:
        return None
    (state_dir / "report").mkdir(parents=True, exist_ok=True)
    return signing.CommandVerifier(keys, node=node, site=site,
                                   nonces=signing.NonceCache(state_dir / "report" / "nonces.msgpack"),
                                   max_skew_s=settings.max_clock_skew_s)
