"""Ed25519 signing and verification of coordinator commands.

The coordinator signs every :class:`~agent.wire.messages.Command`; an agent holds the
coordinator's public key(s) and runs :meth:`CommandVerifier.verify` on each command before acting.

What is signed (:func:`canonical_bytes`): a msgpack array, in this fixed order, of a domain
separator and every field of the command except ``signature`` and ``mono``::

    ["heald-command-v1", v, site, node, seq, ts, id, issuer, issued_at, expires_at, nonce, name, args]

``args`` is encoded with its keys sorted, so the bytes do not depend on dict order. A field
added to :class:`Command` later is *not* covered until the domain separator changes (a new
signing version) — an old verifier therefore never accepts a signature over fields it ignores.

Verification order (cheap and unauthenticated checks never touch the nonce cache):
unsigned → bad signature (no trusted key verifies it) → other node → expired → issued-at outside
the window → replayed nonce. Only a command that passes every check records its nonce. Each
rejection is a :class:`CommandRejected` subclass with a stable :attr:`~CommandRejected.reason`
string the agent can log and count.

The nonce cache is bounded: it keeps a nonce until its command expires (plus the allowed clock
skew) and, when full, evicts the entry issued earliest and raises a *floor*: any command issued
at or before the floor is refused as outside the window, so an evicted nonce can never be
replayed. The cache is persisted atomically (write, fsync, rename) in a file the agent gives; an
unreadable file is replaced by a floor at "now", which refuses every command issued before the
agent started — safe, never permissive.

When the file cannot be written (a full or read-only state dir, issue 17), nothing is refused and
nothing raises: the cache goes on in memory, so replay protection within the running process is
whole, and the save is tried again with the next accepted command. What a crash would lose is
the nonces accepted since the last good save; so the stale file is emptied (an ``O_TRUNC`` needs
no free space), and an empty file reads as unreadable: a restart puts the floor at "now" and
refuses every command issued before it, replays included. Only where even emptying fails (a
read-only filesystem) does a restart trust the stale file: a command accepted since its last
save could then be replayed after a restart until it expires (``expires_at`` + skew, at most
:data:`DEFAULT_MAX_LIFETIME_S` + :data:`DEFAULT_MAX_SKEW_S`).

This module imports only the stdlib, msgspec, cryptography and :mod:`agent.wire`.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import secrets
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import msgspec
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from agent.errors import HealdError, WireError
from agent.wire.messages import ANY_TARGET, PROTOCOL_VERSION, Args, Command

DOMAIN: Final = "heald-command-v1"
#: Default tolerated difference between the coordinator's and the agent's wall clocks.
DEFAULT_MAX_SKEW_S: Final = 30.0
#: A command may not live longer than this (expires_at - issued_at).
DEFAULT_MAX_LIFETIME_S: Final = 3600.0
DEFAULT_NONCE_CAPACITY: Final = 10_000
NONCE_BYTES: Final = 16

_canonical_encoder = msgspec.msgpack.Encoder(order="sorted")


# --------------------------------------------------------------------------- errors


class CommandRejected(WireError):
    """A command the agent must not execute. :attr:`reason` is a stable counter label."""

    reason: str = "rejected"

    def __init__(self, message: str, *, command_id: str = "") -> None:
        self.command_id = command_id
        super().__init__(
            f"command {command_id!r} rejected ({self.reason}): {message}"
            if command_id
            else f"command rejected ({self.reason}): {message}"
        )


class CommandUnsigned(CommandRejected):
    reason = "unsigned"


class CommandBadSignature(CommandRejected):
    reason = "bad_signature"


class CommandExpired(CommandRejected):
    reason = "expired"


class CommandOutsideWindow(CommandRejected):
    """issued_at in the future, too old, before the nonce floor, or a lifetime that is too long."""

    reason = "issued_at_window"


class CommandReplayed(CommandRejected):
    reason = "replayed"


class CommandOtherNode(CommandRejected):
    reason = "other_node"


#: Every rejection reason, for pre-creating counters.
REJECTION_REASONS: Final = tuple(
    cls.reason
    for cls in (
        CommandUnsigned,
        CommandBadSignature,
        CommandOtherNode,
        CommandExpired,
        CommandOutsideWindow,
        CommandReplayed,
    )
)


class SigningKeyError(HealdError):
    """A key file or key string cannot be read."""


# --------------------------------------------------------------------------- keys


def key_id(public_key: Ed25519PublicKey) -> str:
    """A short stable id for a public key (first 8 bytes of SHA-256 of the raw key, hex)."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def public_key_text(public_key: Ed25519PublicKey) -> str:
    """The raw public key as base64: what goes into the agent's config."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return base64.b64encode(raw).decode("ascii")


def parse_public_key(text: str) -> Ed25519PublicKey:
    """A public key from base64 of the 32 raw bytes, or from PEM (SubjectPublicKeyInfo)."""
    text = text.strip()
    if text.startswith("-----BEGIN"):
        try:
            key = serialization.load_pem_public_key(text.encode("ascii"))
        except ValueError as exc:
            raise SigningKeyError(f"not a PEM public key: {exc}") from None
        if not isinstance(key, Ed25519PublicKey):
            raise SigningKeyError(f"PEM public key is {type(key).__name__}, not Ed25519")
        return key
    try:
        raw = base64.b64decode(text, validate=True)
    except ValueError:
        raise SigningKeyError("public key is neither PEM nor base64") from None
    if len(raw) != 32:
        raise SigningKeyError(f"an Ed25519 public key has 32 bytes, got {len(raw)}")
    return Ed25519PublicKey.from_public_bytes(raw)


def load_public_key(path: Path) -> Ed25519PublicKey:
    try:
        text = path.read_text(encoding="ascii")
    except (OSError, UnicodeDecodeError) as exc:
        raise SigningKeyError(f"{path}: cannot read public key: {exc}") from None
    try:
        return parse_public_key(text)
    except SigningKeyError as exc:
        raise SigningKeyError(f"{path}: {exc}") from None


def load_private_key(path: Path) -> Ed25519PrivateKey:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise SigningKeyError(f"{path}: cannot read private key: {exc}") from None
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise SigningKeyError(f"{path}: not an unencrypted PEM private key: {exc}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise SigningKeyError(f"{path}: private key is {type(key).__name__}, not Ed25519")
    return key


def load_or_create_private_key(path: Path) -> Ed25519PrivateKey:
    """Load the signing key, creating it (mode 0600, atomically) on first use."""
    if path.exists():
        return load_private_key(path)
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, pem)
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.link(tmp, path)  # never overwrite a key another process created meanwhile
    except FileExistsError:
        tmp.unlink()
        return load_private_key(path)
    tmp.unlink()
    return key


# --------------------------------------------------------------------------- signing


def canonical_bytes(command: Command) -> bytes:
    """The bytes a command's signature covers (see the module docstring)."""
    return _canonical_encoder.encode(
        [
            DOMAIN,
            command.v,
            command.site,
            command.node,
            command.seq,
            command.ts,
            command.id,
            command.issuer,
            command.issued_at,
            command.expires_at,
            command.nonce,
            command.name,
            command.args,
        ]
    )


def sign(command: Command, private_key: Ed25519PrivateKey) -> Command:
    """The command with its ``signature`` set."""
    return msgspec.structs.replace(command, signature=private_key.sign(canonical_bytes(command)))


@dataclass
class CommandSigner:
    """Builds and signs commands (the coordinator's side)."""

    private_key: Ed25519PrivateKey
    issuer: str = ""
    ttl_s: float = 300.0
    clock: Callable[[], float] = time.time
    _seq: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        if not self.issuer:
            self.issuer = key_id(self.private_key.public_key())
        # Commands are never deduplicated by (node, seq) on the agent (the nonce is the replay
        # key), but keep seq increasing across restarts anyway: start from the clock in µs.
        self._seq = int(self.clock() * 1_000_000)

    @property
    def public_key(self) -> Ed25519PublicKey:
        return self.private_key.public_key()

    def make(
        self,
        *,
        node: str,
        site: str,
        name: str,
        args: Args | None = None,
        command_id: str = "",
        ttl_s: float | None = None,
    ) -> Command:
        now = self.clock()
        self._seq += 1
        command = Command(
            v=PROTOCOL_VERSION,
            node=node,
            site=site,
            seq=self._seq,
            ts=now,
            id=command_id or secrets.token_hex(8),
            issuer=self.issuer,
            issued_at=now,
            expires_at=now + (self.ttl_s if ttl_s is None else ttl_s),
            nonce=secrets.token_bytes(NONCE_BYTES),
            name=name,
            args=dict(args or {}),
        )
        return sign(command, self.private_key)


# --------------------------------------------------------------------------- nonce cache


class _NonceFile(msgspec.Struct, frozen=True):
    floor: float
    entries: list[tuple[bytes, float, float]]  # (nonce, issued_at, forget_after)


_nonce_encoder = msgspec.msgpack.Encoder()
_nonce_decoder = msgspec.msgpack.Decoder(_NonceFile)


class NonceCache:
    """Bounded set of seen nonces, optionally persisted in ``path``.

    ``floor``: commands issued at or before it are refused (see the module docstring).
    ``on_persist``: called after every save with the error that stopped it, or None (the caller
    logs: this module has no logger).
    """

    def __init__(
        self,
        path: Path | None = None,
        *,
        capacity: int = DEFAULT_NONCE_CAPACITY,
        clock: Callable[[], float] = time.time,
        on_persist: Callable[[OSError | None], None] | None = None,
    ) -> None:
        if capacity < 1:
            raise ValueError("nonce cache capacity must be at least 1")
        self.path = path
        self.capacity = capacity
        self.clock = clock
        self.on_persist = on_persist
        self.floor = float("-inf")
        self.recovered_from_corruption = False
        self.persist_error: OSError | None = None  # why the last save failed; None once one succeeds
        self.file_emptied = False  # the last failed save emptied the stale file (see the module docstring)
        self._entries: dict[bytes, tuple[float, float]] = {}  # nonce -> (issued_at, forget_after)
        if path is not None:
            self._load(path)

    def _load(self, path: Path) -> None:
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return
        except OSError:
            data = b""
        try:
            saved = _nonce_decoder.decode(data)
        except (msgspec.DecodeError, msgspec.ValidationError):
            # Unknown history: refuse everything issued before now rather than risk a replay.
            self.floor = self.clock()
            self.recovered_from_corruption = True
            return
        self.floor = saved.floor
        for nonce, issued_at, forget_after in saved.entries:
            self._entries[nonce] = (issued_at, forget_after)
        self._prune()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, nonce: object) -> bool:
        return nonce in self._entries

    def _prune(self) -> None:
        now = self.clock()
        for nonce in [n for n, (_, forget) in self._entries.items() if forget < now]:
            del self._entries[nonce]
        while len(self._entries) > self.capacity:
            oldest = min(self._entries, key=lambda n: self._entries[n][0])
            issued_at, _ = self._entries.pop(oldest)
            self.floor = max(self.floor, issued_at)

    def add(self, nonce: bytes, issued_at: float, forget_after: float) -> None:
        """Remember ``nonce`` until ``forget_after``; persist when a path is set."""
        self._entries[nonce] = (issued_at, forget_after)
        if len(self._entries) > self.capacity:
            self._prune()
        self.save()

    def save(self) -> bool:
        """Persist the cache; False when the file could not be written (never raises for it: see
        the module docstring)."""
        if self.path is None:
            return True
        body = _nonce_encoder.encode(
            _NonceFile(floor=self.floor, entries=[(n, i, f) for n, (i, f) in self._entries.items()])
        )
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                view = memoryview(body)
                while view:  # a short write on a nearly full disk must not leave a torn file
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            finally:
                os.close(fd)
            tmp.replace(self.path)
        except OSError as exc:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            self.file_emptied = self._empty_file(self.path)
            self.persist_error = exc
        else:
            self.persist_error = None
        if self.on_persist is not None:
            self.on_persist(self.persist_error)
        return self.persist_error is None

    @staticmethod
    def _empty_file(path: Path) -> bool:
        """Leave an empty file at ``path``, which a restart reads as "history unknown"."""
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except OSError:
            return False
        return True


# --------------------------------------------------------------------------- verification


class CommandVerifier:
    """Checks commands for one node (the agent's side)."""

    def __init__(
        self,
        public_keys: Iterable[Ed25519PublicKey],
        *,
        node: str,
        site: str,
        nonces: NonceCache | None = None,
        max_skew_s: float = DEFAULT_MAX_SKEW_S,
        max_lifetime_s: float = DEFAULT_MAX_LIFETIME_S,
        allow_broadcast: bool = True,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.keys: dict[str, Ed25519PublicKey] = {key_id(k): k for k in public_keys}
        if not self.keys:
            raise ValueError("a command verifier needs at least one trusted public key")
        self.node = node
        self.site = site
        self.nonces = nonces if nonces is not None else NonceCache(clock=clock)
        self.max_skew_s = max_skew_s
        self.max_lifetime_s = max_lifetime_s
        self.allow_broadcast = allow_broadcast
        self.clock = clock

    def _check_signature(self, command: Command) -> None:
        if not command.signature:
            raise CommandUnsigned("no signature", command_id=command.id)
        body = canonical_bytes(command)
        # The issuer names the key; an unknown issuer still gets every trusted key tried.
        keys = [self.keys[command.issuer]] if command.issuer in self.keys else list(self.keys.values())
        for key in keys:
            try:
                key.verify(command.signature, body)
            except InvalidSignature:
                continue
            return
        raise CommandBadSignature(
            "signature does not verify with any trusted coordinator key", command_id=command.id
        )

    def _check_target(self, command: Command) -> None:
        site_ok = command.site == self.site or (self.allow_broadcast and command.site == ANY_TARGET)
        node_ok = command.node == self.node or (self.allow_broadcast and command.node == ANY_TARGET)
        if not (site_ok and node_ok):
            raise CommandOtherNode(
                f"addressed to {command.site}/{command.node}, this is {self.site}/{self.node}",
                command_id=command.id,
            )

    def _check_time(self, command: Command, now: float) -> None:
        skew = self.max_skew_s
        if now > command.expires_at + skew:
            raise CommandExpired(f"expired {now - command.expires_at:.1f}s ago", command_id=command.id)
        if command.issued_at > now + skew:
            raise CommandOutsideWindow(
                f"issued {command.issued_at - now:.1f}s in the future", command_id=command.id
            )
        lifetime = command.expires_at - command.issued_at
        if lifetime < 0 or lifetime > self.max_lifetime_s:
            raise CommandOutsideWindow(
                f"lifetime {lifetime:.1f}s is outside 0..{self.max_lifetime_s:.0f}s", command_id=command.id
            )
        if command.issued_at <= self.nonces.floor:
            raise CommandOutsideWindow(
                "issued before the replay-protection floor (nonce history evicted or lost)",
                command_id=command.id,
            )

    def verify(self, command: Command) -> Command:
        """Return ``command`` if it may be executed, else raise a :class:`CommandRejected` subclass.

        On success the nonce is recorded (and persisted): the same command verifies only once.
        """
        self._check_signature(command)
        self._check_target(command)
        now = self.clock()
        self._check_time(command, now)
        if len(command.nonce) < 8:
            raise CommandReplayed("nonce shorter than 8 bytes", command_id=command.id)
        if command.nonce in self.nonces:
            raise CommandReplayed("nonce already used", command_id=command.id)
        self.nonces.add(command.nonce, command.issued_at, command.expires_at + self.max_skew_s)
        return command


__all__ = [
    "DEFAULT_MAX_LIFETIME_S",
    "DEFAULT_MAX_SKEW_S",
    "DOMAIN",
    "REJECTION_REASONS",
    "CommandBadSignature",
    "CommandExpired",
    "CommandOtherNode",
    "CommandOutsideWindow",
    "CommandRejected",
    "CommandReplayed",
    "CommandSigner",
    "CommandUnsigned",
    "CommandVerifier",
    "NonceCache",
    "SigningKeyError",
    "canonical_bytes",
    "key_id",
    "load_or_create_private_key",
    "load_private_key",
    "load_public_key",
    "parse_public_key",
    "public_key_text",
    "sign",
]
