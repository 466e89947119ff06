"""``[coordinator]``: how this node checks that a command really comes from its coordinator."""

from __future__ import annotations

from typing import Annotated

import msgspec


class CoordinatorSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    # Ed25519 public keys of the coordinator (base64, as `heald-coordinator` prints them). Commands
    # signed by none of them are rejected; with no key at all, every command is rejected.
    public_keys: tuple[str, ...] = ()
    # Files holding such keys (PEM or base64), e.g. /etc/heald/coordinator.pub.
    public_key_files: tuple[str, ...] = ()
    # Tolerated difference between the coordinator's clock and this node's, for command windows.
    max_clock_skew_s: Annotated[float, msgspec.Meta(ge=0, le=3600)] = 30.0
