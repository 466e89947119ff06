"""The README's Quickstart line in private PID and mount namespaces (helper of tests/test_first_run.py).

``unshare --pid --fork --mount --mount-proc python3 tests/first_run_namespace.py SPEC.json``

Inside: mounts are private, ``/run`` is a fresh tmpfs, and a 1 MiB tmpfs goes over ``/var/tmp``
(one of the shipped ``[playbooks] clean_roots``) for this namespace only, 95% full with one file
three days old: what the shipped ``disk-nearly-full`` playbook cleans (``clean_paths``, files
older than 2 days, after 30 s over 90%). Only the processes started here are visible, and all of
them die with this one, its PID 1. It starts the Quickstart's command line (``argv``, from the
README) in the repository, waits until the audit log has that playbook's whole run or
``timeout_s``, interrupts the agent (SIGINT, as Ctrl-C), and writes what it saw to
``result.json`` in the work directory.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

TARGET = Path("/var/tmp/heald-first-run/old.bin")
PLAYBOOK = "disk-nearly-full"


def audit(state: Path) -> list[dict[str, Any]]:
    try:
        text = (state / "audit.jsonl").read_text()
    except OSError:
        return []
    out = []
    for line in text.splitlines():
        with contextlib.suppress(ValueError, KeyError, TypeError):
            out.append(json.loads(line)["record"])  # {"seq", "ts", "prev", "hash", "record"}
    return out


def main() -> int:
    spec: dict[str, Any] = json.loads(Path(sys.argv[1]).read_text())
    work, state = Path(spec["work"]), Path(spec["work"]) / "state"
    subprocess.run(["mount", "--make-rprivate", "/"], check=True)
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", "/run"], check=True)  # the agent's runtime_dir
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", "/var/tmp"], check=True)
    TARGET.parent.mkdir()
    TARGET.write_bytes(os.urandom(int(0.95 * 1024 * 1024) - 8192))
    old = time.time() - 3 * 86400
    os.utime(TARGET, (old, old))
    st = os.statvfs("/var/tmp")
    result: dict[str, Any] = {"used_pct": round(100 * (1 - st.f_bavail / st.f_blocks), 1)}
    env = dict(os.environ) | {"HEALD_PATHS__STATE_DIR": str(state)}
    with (work / "agent.log").open("wb") as log:
        proc = subprocess.Popen(spec["argv"], cwd=spec["repo"], env=env, stdin=subprocess.DEVNULL,
                                stdout=log, stderr=subprocess.STDOUT)
    started = time.monotonic()
    try:
        while time.monotonic() - started < spec["timeout_s"] and proc.poll() is None:
            records = audit(state)
            runs = {r.get("run_id") for r in records
                    if r.get("type") == "run.start" and r.get("playbook") == PLAYBOOK}
            if any(r.get("type") == "run.end" and r.get("run_id") in runs for r in records):
                break
            time.sleep(0.5)
        result["waited_s"] = round(time.monotonic() - started, 1)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
        try:
            result["rc"] = proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            result["rc"] = proc.wait()
    result["target_exists"] = TARGET.exists()
    result["target_size"] = TARGET.stat().st_size if TARGET.exists() else None
    result["audit"] = audit(state)
    (work / "result.json").write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
