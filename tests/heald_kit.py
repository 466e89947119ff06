"""A real ``heald run`` in a test (:class:`Heald`): started from this tree, waited for, killed
with SIGKILL or stopped, its log read; the audit log it leaves; and the ``kill -9`` tests' disk
(tests/test_runtime_kill_boundaries.py, tests/test_verify_within_kill.py): a config whose only
clean root and watched mount is the test's own tmpfs, full of two-day-old cache files.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


@contextlib.contextmanager
def tmpfs(size: str = "30m") -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="heald-kill-"))
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(d)], check=True)
    try:
        yield d
    finally:
        subprocess.run(["umount", "-l", str(d)], check=False)
        d.rmdir()


def fill_with_stale_files(mount: Path, to_pct: float = 94.0) -> None:
    cache = mount / "cache"
    cache.mkdir()
    i = 0
    while True:
        st = os.statvfs(mount)
        used = (st.f_blocks - st.f_bfree) / st.f_blocks * 100
        if used >= to_pct:
            return
        f = cache / f"blob-{i}.bin"
        f.write_bytes(b"s" * (1 << 20))
        old = time.time() - 2 * 86400
        os.utime(f, (old, old))
        i += 1


def write_config(tmp: Path, mount: Path, *, node: str, playbook: tuple[str, str],
                 playbooks_extra: str = "") -> Path:
    """``tmp/agent.toml``: node ``node``, state in ``tmp/state``, one sample every 0.5 s, only the
    disk collector on ``mount`` (no model), and only the playbook ``(file name, text)`` in
    ``tmp/playbooks``, with ``mount`` as the only clean root (``playbooks_extra``: more lines of
    ``[playbooks]``)."""
    playbooks = tmp / "playbooks"
    playbooks.mkdir(parents=True)
    (playbooks / playbook[0]).write_text(playbook[1])
    cfg = tmp / "agent.toml"
    cfg.write_text(f"""
[node]
id = "{node}"
[paths]
state_dir = "{tmp / 'state'}"
[sample]
interval_s = 0.5
[collect.disk]
interval_s = 0.5
include_mounts = ["{mount}"]
[collect.processes]
enabled = false
[collect.gpu]
enabled = false
[collect.network]
enabled = false
[model]
enabled = false
[playbooks]
load_shipped = false
dirs = ["{playbooks}"]
clean_roots = ["{mount}"]
{playbooks_extra}""")
    return cfg


class Heald:
    """``python3 -m agent run --config CFG [ARGS]`` of this tree, in the network namespace ``ns``
    when given (``ip netns exec``), its output appended to ``log`` (outside the state dir)."""

    def __init__(self, cfg: Path, log: Path, *, ns: str | None = None, args: tuple[str, ...] = ()) -> None:
        self.log_path = log
        self.log = log.open("ab")
        where = ["ip", "netns", "exec", ns] if ns is not None else []
        argv = [*where, sys.executable, "-m", "agent", "run", "--config", str(cfg), *args]
        self.proc = subprocess.Popen(argv, cwd=REPO, stdout=self.log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL)

    def text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def lines(self) -> list[dict[str, Any]]:
        """The log's lines (``[log] format = "json"``); a line that is not JSON as an error."""
        out = []
        for line in self.text().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                out.append({"event": "(not json)", "raw": line, "level": "error"})
        return out

    def wait_started(self) -> None:
        """Until it logs ``heald ready`` (JSON logs): every collector started (the auth log is
        followed from here on: lines written before its collector's start are history)."""
        wait("the agent's start", lambda: "heald starting" in self.text() or self.proc.poll() is not None, 60)
        assert self.proc.poll() is None, self.text()[-3000:]
        wait("the collectors' start", lambda: '"heald ready"' in self.text(), 30)

    def stop(self, sig: int = signal.SIGTERM, within: float = 30) -> int:
        """Send ``sig`` (unless it has exited) and wait ``within`` s, then SIGKILL; its exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            self.proc.wait(within)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        finally:
            self.log.close()
        return self.proc.returncode

    def kill(self) -> int:
        """``kill -9``."""
        return self.stop(signal.SIGKILL)

    def __enter__(self) -> Heald:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.kill()


def audit(state: Path) -> list[dict[str, Any]]:
    path = state / "audit.jsonl"
    if not path.exists():
        return []
    return [json.loads(line)["record"] for line in path.read_text().splitlines() if line.strip()]


def wait_for(what: str, cond: Any, limit_s: float, daemon: Heald, log: Path) -> Any:
    """Poll ``cond()`` until it is truthy (returned); fails when the daemon exits or ``limit_s``
    passes, with the end of its log."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < limit_s:
        got = cond()
        if got:
            return got
        tail = log.read_text()[-3000:] if daemon.proc.poll() is not None else ""
        assert not tail, f"heald exited while waiting for {what}:\n{tail}"
        time.sleep(0.02)
    raise AssertionError(f"{what} not reached in {limit_s}s:\n{log.read_text()[-3000:]}")


def wait(what: str, pred: Callable[[], Any], within: float, tick: float = 0.1) -> Any:
    """Poll ``pred()`` every ``tick`` s until it is truthy (returned); fails after ``within`` s."""
    deadline = time.monotonic() + within
    while True:
        got = pred()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within:g}s waiting for {what}")
        time.sleep(tick)
