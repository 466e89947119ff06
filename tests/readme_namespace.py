"""Run the README's one-machine commands in private namespaces (a helper of tests/test_readme_system.py).

``unshare --net --mount --pid --fork --mount-proc python3 tests/readme_namespace.py SPEC.json``

Inside: its own loopback (the README's fixed ports 1883 and 8080 are free, whatever the host
runs) and its own ``/run`` (tmpfs: root's default runtime directory); only the processes started
here are visible (``/proc`` of the new PID namespace) and all of them die with this one, its PID
1. It writes ``coordinator.toml`` into the test's work directory beside a link to the
repository's ``packaging/``, runs each command line with ``sh -c`` there, starting the agent's
once the dashboard answers, logs in as the dashboard does and polls ``GET /api/nodes`` until the
node shows up. It writes what it saw to ``result.json`` in the work directory, and exits.
"""

from __future__ import annotations

import contextlib
import http.cookiejar
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

DASHBOARD = "http://127.0.0.1:8080"


def sh(*argv: str) -> None:
    subprocess.run(argv, check=True)


def tail(path: Path, n: int = 6000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return ""


def get(opener: urllib.request.OpenerDirector, path: str, data: bytes | None = None) -> tuple[int, bytes]:
    try:
        with opener.open(DASHBOARD + path, data=data, timeout=5) as resp:
            return int(resp.status), bytes(resp.read())
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.read()
    except (OSError, urllib.error.URLError):
        return 0, b""


def wait_for_dashboard(coordinator: subprocess.Popen[bytes], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while get(urllib.request.build_opener(), "/api/health")[0] != 200:
        if coordinator.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("the coordinator did not come up")
        time.sleep(0.1)


def main() -> int:
    spec: dict[str, Any] = json.loads(Path(sys.argv[1]).read_text())
    repo, work = Path(spec["repo"]), Path(spec["work"])
    sh("ip", "link", "set", "lo", "up")
    sh("mount", "--make-rprivate", "/")
    sh("mount", "-t", "tmpfs", "tmpfs", "/run")
    work.mkdir()
    (work / "coordinator.toml").write_text(spec["coordinator_toml"])
    (work / "packaging").symlink_to(repo / "packaging")
    env = dict(os.environ) | spec["env"]
    result: dict[str, Any] = {"hostname": socket.gethostname(), "node_seen_after_s": None, "nodes": None}
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for i, line in enumerate(spec["commands"]):
            with (work / f"command-{i}.log").open("wb") as log:
                procs.append(subprocess.Popen(["sh", "-c", line], cwd=work, env=env, stdin=subprocess.DEVNULL,
                                              stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
            started = time.monotonic()
            if i == 0:  # the coordinator: the agent's line is run once the dashboard answers
                wait_for_dashboard(procs[0], spec["coordinator_timeout_s"])
                result["coordinator_up_after_s"] = round(time.monotonic() - started, 2)
        opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()))
        login = urllib.parse.urlencode({"secret": spec["password"]}).encode()
        status, _ = get(opener, "/login", login)
        result["login_status"] = status
        while time.monotonic() - started < spec["node_timeout_s"]:
            status, body = get(opener, "/api/nodes")
            if status == 200 and (items := json.loads(body)["items"]):
                result["node_seen_after_s"] = round(time.monotonic() - started, 2)
                result["nodes"] = items
                break
            if any(p.poll() is not None for p in procs):
                break
            time.sleep(0.1)
        result["exited"] = [p.poll() for p in procs]
    except Exception as exc:  # noqa: BLE001 - reported to the test, with the logs
        result["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        result["logs"] = [tail(work / f"command-{i}.log") for i in range(len(procs))]
        (work / "result.json").write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
