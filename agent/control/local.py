"""The local control channel: ``heald status`` and root's controls, on a Unix socket.

``<paths.runtime_dir>/control.sock``, mode 0600, owned by the daemon's user: only that user and
root can connect (the file permissions are the first gate). The server checks the caller's uid
again with ``SO_PEERCRED``: ``status`` is answered to anyone who got through, the controls only to
root or the daemon's own user. A control goes through the same
:meth:`~agent.control.dispatcher.CommandDispatcher.execute` as a coordinator's command, so it is
audited the same way, with ``origin: local`` and the caller's uid.

The protocol is JSON lines, one request and one response a connection::

    -> {"command": "silence", "args": {"duration_s": 600}}
    <- {"status": "done", "message": "...", "result": {...}}

``status`` is ``done``, ``failed`` (the daemon could not do it) or ``rejected`` (bad input: an
unknown playbook or command, a malformed request, a caller who may not).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import pwd
import socket
import struct
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import structlog

from agent import wire
from agent.control.dispatcher import BREAKER_RESET, CommandDispatcher

log = structlog.get_logger("heald.control.local")

SOCKET_NAME = "control.sock"
#: The commands the socket takes besides ``status``.
CONTROLS = frozenset({wire.CommandName.RUN_PLAYBOOK, wire.CommandName.SILENCE, wire.CommandName.UNSILENCE,
                      BREAKER_RESET})
MAX_REQUEST_BYTES = 64 * 1024
READ_TIMEOUT_S = 5.0


def socket_path(runtime_dir: str | Path) -> Path:
    return Path(runtime_dir) / SOCKET_NAME


def peer_uid(sock: socket.socket) -> int:
    """The connecting process's uid, as the kernel saw it at connect()."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return int(uid)


def _user(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


class NoCoordinator:
    """The dispatcher's outbox on a node without MQTT: local commands are answered on the socket."""

    @property
    def connected(self) -> bool:
        return False

    def submit(self, message: wire.Envelope) -> bool:
        return False


class LocalControl:
    """The socket server (the daemon's ``local-control`` task)."""

    def __init__(self, path: Path, dispatcher: CommandDispatcher,
                 status: Callable[[], Awaitable[dict[str, Any]]]) -> None:
        self.path = path
        self.dispatcher = dispatcher
        self.status = status
        self.own_uid = os.geteuid()
        self._inode: int | None = None  # our socket file's, so that we never remove another's

    def _listened(self) -> bool:
        """Whether some process listens on the socket path now (another daemon on this runtime dir)."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            probe.settimeout(1.0)
            try:
                probe.connect(str(self.path))
            except OSError:
                return False
            return True

    def _bind(self) -> socket.socket:
        """Bind under a temporary name, set the mode, then rename: never a moment with wider access."""
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
        if self._listened():
            raise OSError(errno.EADDRINUSE, f"another process listens on {self.path} (a second heald?)")
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}")
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(str(tmp))
            tmp.chmod(0o600)
            tmp.replace(self.path)  # a stale socket of an earlier run is replaced
            self._inode = self.path.stat().st_ino
        except OSError:
            sock.close()
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        return sock

    async def serve(self) -> None:
        """Serve until cancelled; a socket that cannot be made is logged and the daemon goes on."""
        try:
            sock = self._bind()
        except OSError as exc:
            log.error("local control socket not available: heald status and local controls will not "
                      "reach the daemon", path=str(self.path), error=str(exc))
            return
        server = await asyncio.start_unix_server(self._handle, sock=sock, limit=MAX_REQUEST_BYTES)
        log.info("local control socket listening", path=str(self.path))
        try:
            await asyncio.Future()  # until cancelled
        finally:
            server.close()
            with contextlib.suppress(OSError):
                if self.path.stat().st_ino == self._inode:
                    self.path.unlink()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            uid = peer_uid(writer.get_extra_info("socket"))
            try:
                async with asyncio.timeout(READ_TIMEOUT_S):
                    line = await reader.readline()
                response = await self._answer(line, uid)
            except (TimeoutError, ValueError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
                response = {"status": "rejected", "message": "no valid request line within the time and size"}
            except Exception as exc:  # a bug here must still answer, and the daemon go on
                log.exception("local control request failed", uid=uid)
                response = {"status": "failed", "message": f"the daemon failed on this request: {exc!r}"}
            writer.write(json.dumps(response, default=str).encode() + b"\n")
            await writer.drain()
        except OSError as exc:  # the client went away
            log.info("local control client gone", error=str(exc))
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    async def _answer(self, line: bytes, uid: int) -> dict[str, Any]:
        try:
            request = json.loads(line)
        except ValueError:
            return {"status": "rejected", "message": "the request is not JSON"}
        if not isinstance(request, dict) or not isinstance(request.get("args", {}), dict):
            return {"status": "rejected", "message": 'the request must be {"command": ..., "args": {...}}'}
        name = str(request.get("command", ""))
        if name == wire.CommandName.STATUS:
            return {"status": "done", "message": "", "result": await self.status()}
        if name not in CONTROLS:
            return {"status": "rejected", "message": f"unknown command '{name}'"}
        if uid not in (0, self.own_uid):
            log.warning("local control refused: not root", command=name, uid=uid)
            return {"status": "rejected", "message": f"{name} is for root (uid 0), not uid {uid}"}
        by = f"local:{_user(uid)}"
        status, message, result = await self.dispatcher.execute(
            name, request.get("args", {}), by=by, origin="local", uid=uid,
            command_id=f"local-{uuid.uuid4().hex[:12]}")
        log.warning("local control", command=name, by=by, uid=uid, status=status, message=message)
        return {"status": status, "message": message, "result": result}
