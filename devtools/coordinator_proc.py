"""Helpers to run real coordinator processes (tests, the ingest benchmark, demos).

:class:`CoordinatorProcess` starts ``python -m coordinator`` as a child, waits until its API
answers and its MQTT connection is up, and always stops *and reaps* it.

The dashboard password and API token in the configs :func:`write_config` writes are made fresh
for each run (each interpreter), so no secret is written down in the repository; tests that log
in import :data:`PASSWORD` and :data:`TOKEN` from here.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Final

#: The repository root: the child coordinator runs from here, with it on PYTHONPATH.
REPO_ROOT: Final = Path(__file__).resolve().parent.parent


def _secret(nbytes: int) -> str:
    """A URL-safe secret that does not start with "-" (argparse would read `--token -x...` as
    two options: a test calling `heald fleet --token TOKEN` failed once in 64 runs)."""
    while (secret := secrets.token_urlsafe(nbytes)).startswith("-"):
        pass
    return secret


#: The API token and dashboard password of every config written by this process (URL-safe
#: characters only, so they go into TOML strings and HTTP headers as they are).
TOKEN: Final = _secret(24)
PASSWORD: Final = _secret(18)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_config(
    directory: Path,
    *,
    mqtt_port: int | None,
    web_port: int,
    mqtt_host: str = "127.0.0.1",
    store_url: str = "",
    share_group: str = "",
    replica_id: str = "r1",
    budget: dict[str, Any] | None = None,
    store: dict[str, Any] | None = None,
    embedded_port: int | None = None,
    web: dict[str, Any] | None = None,
) -> Path:
    """A coordinator.toml for tests; ``mqtt_port=None`` means the embedded broker."""
    directory.mkdir(parents=True, exist_ok=True)
    lines = [
        "[coordinator]",
        f'state_dir = "{directory / "state"}"',
        f'replica_id = "{replica_id}"',
        "[mqtt]",
    ]
    if mqtt_port is None:
        lines.append(f'embedded_listen = "127.0.0.1:{embedded_port or free_port()}"')
    else:
        lines += [f'host = "{mqtt_host}"', f"port = {mqtt_port}"]
    if share_group:
        lines.append(f'share_group = "{share_group}"')
    lines += ["[store]", f'url = "{store_url}"']
    lines += [f"{k} = {json.dumps(v)}" for k, v in ({"batch_interval_s": 0.02} | (store or {})).items()]
    lines += [
        "[web]",
        f'listen = "127.0.0.1:{web_port}"',
        f'password = "{PASSWORD}"',
        f'tokens = ["{TOKEN}"]',
        "stream_poll_s = 0.2",
    ]
    lines += [f"{k} = {json.dumps(v)}" for k, v in (web or {}).items()]
    if budget:
        lines.append("[budget]")
        lines += [f"{k} = {json.dumps(v)}" for k, v in budget.items()]
    lines += ["[log]", 'level = "info"']
    path = directory / "coordinator.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


class CoordinatorProcess:
    def __init__(self, config: Path, web_port: int, *, log_path: Path | None = None) -> None:
        self.config = config
        self.web_port = web_port
        self.log_path = log_path or config.with_suffix(".log")
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.web_port}"

    def start(self, timeout: float = 30.0, *, wait_mqtt: bool = True) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH", "")]))
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "coordinator", "--config", str(self.config)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env=env,
                cwd=REPO_ROOT,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                code = self.proc.returncode
                self.proc = None
                raise RuntimeError(f"coordinator exited with {code} at start:\n{self.log_text()}")
            with contextlib.suppress(OSError, ValueError):
                status, body = self.api("GET", "/api/health", token=None)
                if status == 200 and (body.get("mqtt_connected") or not wait_mqtt):
                    return
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"coordinator not ready in {timeout}s:\n{self.log_text()}")

    def stop(self, timeout: float = 10.0) -> int | None:
        proc, self.proc = self.proc, None
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        return proc.returncode

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def api(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        token: str | None = TOKEN,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, Any]:
        data = None if body is None else json.dumps(body).encode()
        h = {"Content-Type": "application/json"} | (headers or {})
        if token:
            h["Authorization"] = f"Bearer {token}"
        req = urllib.request.Request(self.url + path, data=data, method=method, headers=h)  # noqa: S310
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:  # noqa: S310 - local test URL
                raw = resp.read()
                return resp.status, json.loads(raw) if raw.startswith((b"{", b"[")) else raw.decode()
        except urllib.error.HTTPError as exc:
            with exc:  # an HTTPError holds the response socket open
                raw = exc.read()
            try:
                return exc.code, json.loads(raw)
            except ValueError:
                return exc.code, raw.decode(errors="replace")

    def wait_for(self, predicate: Any, timeout: float = 20.0, interval: float = 0.1) -> Any:
        """Poll ``predicate(self)`` until it returns something truthy; return it."""
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            last = predicate(self)
            if last:
                return last
            time.sleep(interval)
        raise AssertionError(f"condition not met in {timeout}s (last: {last!r})\n{self.log_text()[-3000:]}")

    def __enter__(self) -> CoordinatorProcess:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
