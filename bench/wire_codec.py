"""Wire codec cost per message kind: msgpack (the wire format) vs JSON, via agent.wire.

    python bench/wire_codec.py [--seconds 0.3]

Prints a table (µs per encode, µs per validating decode, bytes per message) and writes
bench/results/wire_codec.json. Messages are realistic: a metrics batch is 10 one-second samples
of 80 metrics (the default metrics_interval_s), the rest are typical single reports.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import timeit
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agent import __version__, wire

RESULTS = Path(__file__).resolve().parent / "results" / "wire_codec.json"


def envelope(seq: int) -> dict[str, Any]:
    return {"v": 1, "node": "gpu-node-0042", "site": "dc1", "seq": seq, "ts": time.time(),
            "mono": time.monotonic()}


def messages() -> dict[str, wire.Envelope]:
    now = time.time()
    keys = [f"{fam}[{lbl}]" for fam in ("disk.used_pct", "net.rx_bytes_per_s", "gpu.temp_c", "gpu.util_pct")
            for lbl in range(8)] + [f"cpu.m{i}" for i in range(48)]
    samples = [wire.MetricSample(seq=1000 + i, wall=now + i, mono=1e5 + i,
                                 metrics={k: (None if j % 29 == 0 else 12.345 * j + i)
                                          for j, k in enumerate(keys)})
               for i in range(10)]
    return {
        "birth": wire.Birth(**envelope(1), bdseq=7, agent_version=__version__, model_version="m-2024.06.1",
                            labels={"rack": "r12", "role": "trainer"},
                            collectors=["cpu", "memory", "disk", "net", "processes", "gpu"],
                            capabilities=["restart_service", "drain_gpu", "clear_cache"],
                            hostname="gpu-node-0042", boot_ts=now - 3600),
        "status": wire.Status(**envelope(2), state="online", bdseq=7, spool_pending=0),
        "metrics": wire.Metrics(**envelope(3), samples=samples),
        "risk": wire.Risk(**envelope(4), sample_seq=1009, anomaly=1.37, alert=True, cold=False,
                          model_version="m-2024.06.1",
                          explanation=[wire.Contribution("gpu.temp_c[3]", 0.61),
                                       wire.Contribution("gpu.ecc", 0.2)],
                          failure={"gpu.xid": 0.31, "disk.full": 0.02, "mem.oom": 0.05},
                          forecasts=[wire.Forecast(resource="disk.used_bytes[/]", eta_s=86400.0,
                                                   confidence=0.8, rate_per_s=1200.0)]),
        "event": wire.Event(**envelope(5), name="gpu.xid", source="gpu", wall=now, labels={"gpu": "3"},
                            value=79.0, message="GPU has fallen off the bus"),
        "action": wire.Action(**envelope(6), phase="finished", run_id="run-8f2c", playbook="gpu-xid-79",
                              step="drain", action="drain_gpu", dry_run=False, outcome="ok",
                              result={"gpu": 3, "drained": True}, duration_s=4.2),
        "command": wire.Command(**envelope(7), id="cmd-1234", issuer="coordinator", issued_at=now,
                                expires_at=now + 60, nonce=b"\x01" * 16, name="restart_service",
                                args={"unit": "nvidia-persistenced"}, signature=b"\x02" * 64),
        "command_ack": wire.CommandAck(**envelope(8), command_id="cmd-1234", status="done",
                                       message="restarted"),
    }


def per_call_us(fn: Callable[[], object], seconds: float) -> float:
    timer = timeit.Timer(fn)
    if seconds <= 0:  # --smoke: a fixed small count, no calibration
        return min(timer.repeat(repeat=3, number=20)) / 20 * 1e6
    n, _ = timer.autorange()
    runs = max(1, int(seconds / max(1e-9, timer.timeit(n) / n)))
    number = max(1, runs // 7)
    return min(timer.repeat(repeat=7, number=number)) / number * 1e6  # min: least disturbed by other load


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=0.3, help="time budget per measurement")
    p.add_argument("--smoke", action="store_true", help="60 calls per measurement, no results file")
    args = p.parse_args()
    if args.smoke:
        args.seconds = 0.0
    rows: list[dict[str, Any]] = []
    for kind, msg in messages().items():
        packed, as_json = wire.encode(msg), wire.encode_json(msg)
        assert wire.decode(packed) == msg
        rows.append({
            "kind": kind,
            "msgpack_bytes": len(packed), "json_bytes": len(as_json),
            "msgpack_encode_us": per_call_us(partial(wire.encode, msg), args.seconds),
            "msgpack_decode_us": per_call_us(partial(wire.decode, packed), args.seconds),
            "json_encode_us": per_call_us(partial(wire.encode_json, msg), args.seconds),
            "json_decode_us": per_call_us(partial(wire.decode_json, as_json), args.seconds),
        })
    head = (f"{'kind':<12} {'mp bytes':>9} {'json bytes':>10} {'mp enc µs':>10} {'mp dec µs':>10} "
            f"{'json enc µs':>11} {'json dec µs':>11}")
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['kind']:<12} {r['msgpack_bytes']:>9} {r['json_bytes']:>10} "
              f"{r['msgpack_encode_us']:>10.2f} {r['msgpack_decode_us']:>10.2f} "
              f"{r['json_encode_us']:>11.2f} {r['json_decode_us']:>11.2f}")
    if args.smoke:
        print(f"smoke run: {RESULTS} left as it was")
        return 0
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({
        "bench": "wire_codec", "python": platform.python_version(), "machine": platform.machine(),
        "processor": platform.processor(), "cpus": os.cpu_count(), "loadavg_1m": os.getloadavg()[0],
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "notes": "decode = msgspec typed decode + validation (agent.wire.decode / decode_json)", "rows": rows,
    }, indent=2) + "\n")
    print(f"\nwrote {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
