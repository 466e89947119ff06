"""The node's bundle store under ``<state_dir>/bundles``.

Chunks are written to ``partial/<sha256>/`` as they arrive, so a transfer cut by a restart or a
lost connection resumes where it stopped (the coordinator sends again; chunks already held are
not rewritten). A complete bundle must match its SHA-256 and carry a signature by a coordinator
key this node trusts; only then is it written to ``versions/<version>/`` (a temporary directory
renamed into place). The last :attr:`BundleStore.keep` versions are kept, plus the active ones;
``active.json`` names the live and the shadow version.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from agent.fsutil import atomic_write
from agent.wire import bundles
from agent.wire.bundles import BundleError

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

log = structlog.get_logger("heald.bundle")

_SHA = re.compile(r"^[0-9a-f]{64}$")
MAX_CHUNKS = 2048


def _int(args: Mapping[str, Any], key: str, lo: int, hi: int) -> int:
    value = args.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise BundleError(f"bundle_chunk: {key} must be an integer {lo}..{hi}")
    return value


def _check_digest(version: str, raw: bytes, sha: str) -> None:
    if bundles.digest(raw) != sha:
        raise BundleError(f"bundle {version}: content does not match its sha256 (tampered or corrupt)")


class BundleStore:
    def __init__(self, root: Path, keys: Callable[[], Iterable[Ed25519PublicKey]], *, keep: int = 3) -> None:
        self.root = Path(root)
        self.keys = keys
        self.keep = keep
        (self.root / "versions").mkdir(parents=True, exist_ok=True)
        (self.root / "partial").mkdir(parents=True, exist_ok=True)

    # ------------------------------------------------------------------ transfer

    def add_chunk(self, args: Mapping[str, Any]) -> dict[str, Any]:
        """Take one ``bundle_chunk``; when it completes the bundle, verify and keep it."""
        version = bundles.check_version(str(args.get("bundle") or ""))
        sha = str(args.get("sha256") or "")
        if not _SHA.match(sha):
            raise BundleError("bundle_chunk: sha256 must be 64 lower-case hex digits")
        total = _int(args, "total", 1, MAX_CHUNKS)
        index = _int(args, "index", 0, total - 1)
        data = args.get("data")
        if not isinstance(data, str):
            raise BundleError("bundle_chunk: data must be text")
        if self.manifest(version) is not None:
            return {"bundle": version, "complete": True, "missing": 0}
        part = self.root / "partial" / sha
        part.mkdir(exist_ok=True)
        piece = part / f"{index:05d}"
        if not piece.exists():
            atomic_write(piece, data.encode())
        have = sorted(p for p in part.iterdir() if p.name.isdigit())
        if len(have) < total:
            return {"bundle": version, "complete": False, "missing": total - len(have)}
        try:
            raw = bundles.join(p.read_text() for p in have[:total])
            _check_digest(version, raw, sha)
            bundles.verify(self.keys(), version, sha, str(args.get("signature") or ""))
            files = bundles.unpack(raw)
        except BundleError:
            shutil.rmtree(part, ignore_errors=True)
            raise
        meta = {"version": version, "sha256": sha, "signature": str(args.get("signature")),
                "publisher": str(args.get("publisher") or ""), "reason": str(args.get("reason") or ""),
                "received": time.time()}
        self._keep(version, files, meta)
        shutil.rmtree(part, ignore_errors=True)
        log.info("bundle received", bundle=version, sha256=sha, files=len(files))
        self.prune()
        return {"bundle": version, "complete": True, "missing": 0}

    def _keep(self, version: str, files: Mapping[str, str], meta: Mapping[str, Any]) -> None:
        tmp = self.root / "versions" / f".{version}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        for name, text in files.items():
            atomic_write(tmp / name, text.encode())
        atomic_write(tmp / "manifest.json", json.dumps(meta).encode())
        os.replace(tmp, self.root / "versions" / version)

    # ------------------------------------------------------------------ versions

    def manifest(self, version: str) -> dict[str, Any] | None:
        try:
            data = json.loads((self.root / "versions" / version / "manifest.json").read_text())
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    def checked_dir(self, version: str) -> Path:
        """The directory of a kept version, its files hashed and the signature checked again."""
        meta = self.manifest(bundles.check_version(version))
        if meta is None:
            raise BundleError(f"bundle {version} is not on this node")
        d = self.root / "versions" / version
        files = {p.name: p.read_text() for p in d.iterdir() if p.suffix in (".yaml", ".yml")}
        sha = bundles.digest(bundles.pack(files))
        if sha != meta.get("sha256"):
            raise BundleError(f"bundle {version}: the files on disk do not match its sha256")
        bundles.verify(self.keys(), version, sha, str(meta.get("signature")))
        return d

    def versions(self) -> list[dict[str, Any]]:
        out = [m for d in (self.root / "versions").iterdir()
               if not d.name.startswith(".") and (m := self.manifest(d.name)) is not None]
        return sorted(out, key=lambda m: float(m.get("received") or 0))

    def prune(self) -> None:
        active = set(self.active().values())
        for meta in self.versions()[:-self.keep]:
            if meta["version"] not in active:
                shutil.rmtree(self.root / "versions" / str(meta["version"]), ignore_errors=True)

    # ------------------------------------------------------------------ active versions

    def active(self) -> dict[str, str]:
        try:
            data = json.loads((self.root / "active.json").read_text())
        except (OSError, ValueError):
            data = {}
        return {role: str(data.get(role) or "") for role in ("live", "shadow")}

    def set_active(self, role: str, version: str) -> dict[str, str]:
        state = self.active() | {role: version}
        atomic_write(self.root / "active.json", json.dumps(state).encode())
        return state
