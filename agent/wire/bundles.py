"""Bundles: a versioned, content-hashed, Ed25519-signed set of files the coordinator ships to nodes.

A bundle is a map of file names to texts (for now a playbook set: ``*.yaml`` files). Its bytes are
the msgpack encoding of that map with the names sorted (:func:`pack`), its content hash the SHA-256
of those bytes, and its signature the coordinator's command key over :data:`DOMAIN`, the version
and the hash (:func:`signing_bytes`), so a node verifies what it assembled with the keys it
already trusts for commands. The bytes travel base64-encoded in :data:`CHUNK_CHARS`-character
pieces, one signed ``bundle_chunk`` command each (:func:`chunks`).
"""

from __future__ import annotations

import base64
import hashlib
import re
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Final

import msgspec

from agent.errors import WireError

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

DOMAIN: Final = b"heald-bundle-v1\x00"
#: base64 characters of one chunk (a command's text argument holds at most 4096)
CHUNK_CHARS: Final = 3072
#: the largest bundle a node assembles (bytes before base64)
MAX_BUNDLE_BYTES: Final = 4 * 1024 * 1024
VERSION_RE: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
FILE_RE: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}\.ya?ml$")


class BundleError(WireError):
    """A bundle that is malformed, does not match its hash or is not signed by a trusted key."""


def check_version(version: str) -> str:
    if not VERSION_RE.match(version):
        raise BundleError(f"bundle version {version!r}: letters, digits, '.', '_', '-' (at most 64)")
    return version


def check_files(files: Mapping[str, str]) -> dict[str, str]:
    if not files:
        raise BundleError("a bundle needs at least one file")
    for name in files:
        if not FILE_RE.match(name):
            raise BundleError(f"bundle file {name!r}: a plain *.yaml name (no directories)")
    return {name: files[name] for name in sorted(files)}


def pack(files: Mapping[str, str]) -> bytes:
    """The bundle's bytes: its files, names sorted, as msgpack."""
    return msgspec.msgpack.encode(check_files(files))


def unpack(data: bytes) -> dict[str, str]:
    try:
        files = msgspec.msgpack.decode(data, type=dict[str, str])
    except msgspec.DecodeError as exc:
        raise BundleError(f"bundle bytes do not decode: {exc}") from None
    return check_files(files)


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def signing_bytes(version: str, sha256: str) -> bytes:
    return DOMAIN + check_version(version).encode() + b"\x00" + sha256.encode()


def sign(private_key: Ed25519PrivateKey, version: str, sha256: str) -> str:
    """The bundle's signature, hex."""
    return private_key.sign(signing_bytes(version, sha256)).hex()


def verify(keys: Iterable[Ed25519PublicKey], version: str, sha256: str, signature: str) -> None:
    """Raise :class:`BundleError` unless one of ``keys`` signed (version, sha256)."""
    from cryptography.exceptions import InvalidSignature  # noqa: PLC0415 - cryptography, lazily

    try:
        raw = bytes.fromhex(signature)
    except ValueError:
        raise BundleError(f"bundle {version}: the signature is not hex") from None
    body = signing_bytes(version, sha256)
    for key in keys:
        try:
            key.verify(raw, body)
        except InvalidSignature:
            continue
        return
    raise BundleError(f"bundle {version}: the signature does not verify with any trusted coordinator key")


def chunks(data: bytes) -> list[str]:
    text = base64.b64encode(data).decode()
    return [text[i:i + CHUNK_CHARS] for i in range(0, len(text), CHUNK_CHARS)] or [""]


def join(pieces: Iterable[str]) -> bytes:
    try:
        data = base64.b64decode("".join(pieces), validate=True)
    except ValueError:
        raise BundleError("bundle chunks are not base64") from None
    if len(data) > MAX_BUNDLE_BYTES:
        raise BundleError(f"bundle of {len(data)} bytes is over {MAX_BUNDLE_BYTES}")
    return data


__all__ = ["CHUNK_CHARS", "BundleError", "check_files", "check_version", "chunks", "digest", "join", "pack",
           "sign", "signing_bytes", "unpack", "verify"]
