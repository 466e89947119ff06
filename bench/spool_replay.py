"""Replay one hour of spooled reports into a real mosquitto after an outage.

    python bench/spool_replay.py [--seconds-of-data 3600]

One hour at 1 Hz: 3600 samples of 80 metrics, batched as the daemon does (10 a message) and in
the worst case (1 a message), an event every 30 s and an action every 60 s, spooled while the
broker is down. Then the broker comes back; we time from
the reporter's reconnect to the moment a subscriber (QoS 1) has every message. Runs the default
settings (``max_publish_per_s`` 200, ``max_inflight`` 8) and variations, prints a table and writes
bench/results/spool_replay.json. Needs /usr/sbin/mosquitto.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import aiomqtt
import structlog

from agent import wire
from agent.collect.sample import Sample
from agent.report import build
from agent.report.settings import MqttSettings, SpoolSettings
from agent.report.transport import Reporter

RESULTS = Path(__file__).resolve().parent / "results" / "spool_replay.json"
MOSQUITTO = os.environ.get("HEALD_MOSQUITTO", "/usr/sbin/mosquitto")
# (name, settings overrides, samples per metrics message). The daemon batches metrics every
# metrics_interval_s (10 s by default): 10 samples a message. One a message is the worst case
# (metrics_interval_s = 1).
VARIANTS: list[tuple[str, dict[str, Any], int]] = [
    ("defaults (200/s, inflight 8, 10 s batches)", {}, 10),
    ("defaults, 1 sample a message", {}, 1),
    ("unlimited rate, inflight 10, 1 a message", {"max_publish_per_s": 1e6, "max_inflight": 10}, 1),
    ("unlimited rate, inflight 1, 1 a message", {"max_publish_per_s": 1e6, "max_inflight": 1}, 1),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_broker(workdir: Path, port: int) -> subprocess.Popen[bytes]:
    conf = workdir / "mosquitto.conf"
    user = "user root\n" if os.geteuid() == 0 else ""
    conf.write_text(f"{user}listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
                    "max_queued_messages 0\n")
    proc = subprocess.Popen([MOSQUITTO, "-c", str(conf)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return proc
        time.sleep(0.02)
    proc.kill()
    proc.wait()
    raise RuntimeError("mosquitto did not start")


async def fill(reporter: Reporter, seconds: int, batch: int) -> tuple[int, float]:
    """Submit an hour of reports while offline; returns (messages, seconds spent)."""
    started = time.perf_counter()
    n = 0
    base = time.time() - seconds
    pending: list[Sample] = []
    for i in range(seconds):
        pending.append(Sample(node=reporter.node, seq=i, wall=base + i, mono=float(i),
                              metrics={f"m{j}[{j % 8}]": float(i * j % 997) for j in range(80)}))
        if len(pending) >= batch or i == seconds - 1:
            n += reporter.submit(build.metrics(pending))
            pending = []
        if i % 30 == 0:
            n += reporter.submit(build.report_event("bench.tick", value=float(i)))
        if i % 60 == 0:
            n += reporter.submit(build.action(phase="finished", run_id=f"r{i}", playbook="bench", step="s",
                                              action="noop", dry_run=True, outcome="ok"))
        if i % 200 == 0:
            await asyncio.sleep(0)
    while reporter.queued:  # noqa: ASYNC110  (polls a public gauge; no event for "written to disk")
        await asyncio.sleep(0.01)
    return n, time.perf_counter() - started


async def run_variant(name: str, over: dict[str, Any], batch: int, seconds: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="heald-bench-") as tmp:
        work = Path(tmp)
        port = free_port()
        settings = MqttSettings(enabled=True, port=port, backoff_initial_s=0.05, backoff_max_s=0.2,
                                spool=SpoolSettings(fsync_interval_s=1.0), **over)
        reporter = Reporter(settings, node="bench", site="lab", state_dir=work / "state")
        received: set[int] = set()
        async with asyncio.TaskGroup() as tg:
            running = tg.create_task(reporter.run(), name="bench-reporter")
            messages, fill_s = await fill(reporter, seconds, batch)
            spool_bytes = reporter.spool.used_bytes
            broker = start_broker(work, port)
            try:
                async with aiomqtt.Client("127.0.0.1", port, timeout=5) as sub:
                    await sub.subscribe(f"{wire.ROOT}/lab/bench/+", qos=1)
                    await reporter.wait_connected()
                    t0 = time.perf_counter()
                    async for m in sub.messages:
                        msg = wire.decode(m.payload if isinstance(m.payload, bytes) else b"")
                        if not isinstance(msg, wire.Status | wire.Birth):
                            received.add(msg.seq)
                        if len(received) >= messages:
                            break
                    replay_s = time.perf_counter() - t0
            finally:
                running.cancel()
                broker.terminate()
                broker.wait(10)
        return {"variant": name, "samples_per_message": batch, "messages": messages,
                "spool_bytes": spool_bytes, "fill_s": fill_s,
                "replay_s": replay_s, "msgs_per_s": messages / replay_s,
                "replayed": reporter.counters.replayed,
                **{k: getattr(settings, k) for k in ("max_publish_per_s", "max_inflight")}}


async def amain(seconds: int) -> list[dict[str, Any]]:
    return [await run_variant(name, over, batch, seconds) for name, over, batch in VARIANTS]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds-of-data", type=int, default=3600)
    p.add_argument("--smoke", action="store_true", help="60 s of data, no results file")
    args = p.parse_args()
    if args.smoke:
        args.seconds_of_data = 60
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(40))  # errors only
    rows = asyncio.run(amain(args.seconds_of_data))
    head = f"{'variant':<44} {'msgs':>6} {'spool MiB':>9} {'fill s':>7} {'replay s':>9} {'msgs/s':>8}"
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['variant']:<44} {r['messages']:>6} {r['spool_bytes'] / 2**20:>9.2f} {r['fill_s']:>7.2f} "
              f"{r['replay_s']:>9.2f} {r['msgs_per_s']:>8.0f}")
    if args.smoke:
        print(f"smoke run: {RESULTS} left as it was")
        return 0
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({
        "bench": "spool_replay", "python": platform.python_version(), "cpus": os.cpu_count(),
        "loadavg_1m": os.getloadavg()[0], "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "seconds_of_data": args.seconds_of_data, "rows": rows,
    }, indent=2) + "\n")
    print(f"\nwrote {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
