"""``python -m devtools.emit``: run a Reporter that emits synthetic reports.

For tests (a real process to ``kill -9``), the spool-replay benchmark and checking a broker
setup by hand::

    python -m devtools.emit --host 127.0.0.1 --port 1883 --state-dir /tmp/h --node n1 \\
        --interval 1 --count 0 --kinds event,action,metrics

It prints one JSON line per submitted message (``{"seq": ..., "kind": ...}``) and logs as JSON.
Exit: 0 after ``--count`` messages were delivered (``--count 0``: run until SIGTERM/SIGINT).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
import time
from pathlib import Path

import structlog

from agent import wire
from agent.collect.sample import Sample
from agent.report import build
from agent.report.settings import MqttSettings, SpoolSettings, TlsSettings
from agent.report.transport import Reporter

KINDS = ("event", "action", "metrics")


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m devtools.emit", description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=1883)
    p.add_argument("--state-dir", type=Path, required=True)
    p.add_argument("--node", default="emit-node")
    p.add_argument("--site", default="lab")
    p.add_argument("--interval", type=float, default=1.0, help="seconds between rounds")
    p.add_argument("--count", type=int, default=0, help="rounds, 0 = until stopped")
    p.add_argument("--kinds", default="event,action,metrics")
    p.add_argument("--backoff-max", type=float, default=2.0)
    p.add_argument("--quota-bytes", type=int, default=64 * 1024 * 1024)
    p.add_argument("--tls-ca")
    p.add_argument("--tls-cert")
    p.add_argument("--tls-key")
    p.add_argument("--no-publish", action="store_true", help="only spool (broker considered absent)")
    return p.parse_args(argv)


def _settings(args: argparse.Namespace) -> MqttSettings:
    tls = TlsSettings(enabled=bool(args.tls_ca), ca_file=args.tls_ca, cert_file=args.tls_cert,
                      key_file=args.tls_key)
    return MqttSettings(enabled=True, host=args.host, port=args.port, tls=tls, backoff_initial_s=0.2,
                        backoff_max_s=args.backoff_max, max_publish_per_s=10000.0,
                        spool=SpoolSettings(quota_bytes=args.quota_bytes, fsync_interval_s=0.2))


def _emit_round(reporter: Reporter, kinds: list[str], n: int) -> None:
    for kind in kinds:
        msg: wire.Envelope
        if kind == "event":
            msg = build.report_event("emit.tick", value=float(n), labels={"round": str(n)})
        elif kind == "action":
            msg = build.action(phase="finished", run_id=f"run-{n}", playbook="emit", step="tick",
                               action="noop", dry_run=True, outcome="ok", result={"round": n})
        else:
            msg = build.metrics([Sample(node=reporter.node, seq=n, wall=time.time(), mono=time.monotonic(),
                                        metrics={"cpu.util_pct": float(n % 100)})])
        reporter.submit(msg)
        print(json.dumps({"round": n, "kind": kind, "backlog": reporter.backlog}), flush=True)  # noqa: T201


async def _main(args: argparse.Namespace) -> int:
    kinds = [k for k in args.kinds.split(",") if k]
    unknown = sorted(set(kinds) - set(KINDS))
    if unknown:
        print(f"unknown kinds: {', '.join(unknown)}", file=sys.stderr)  # noqa: T201
        return 2
    reporter = Reporter(_settings(args), node=args.node, site=args.site, state_dir=args.state_dir)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    async def produce() -> None:
        n = 0
        while args.count == 0 or n < args.count:
            n += 1
            _emit_round(reporter, kinds, n)
            await asyncio.sleep(args.interval)
        if not args.no_publish:
            await reporter.wait_drained()
        stop.set()

    async with asyncio.TaskGroup() as tg:
        producer = tg.create_task(produce(), name="emit-produce")
        running = None if args.no_publish else tg.create_task(reporter.run(), name="emit-reporter")
        await stop.wait()
        producer.cancel()
        if running is not None:
            running.cancel()
    if running is None:
        reporter.spool.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    processors: list[structlog.typing.Processor] = [
        structlog.processors.add_log_level, structlog.processors.TimeStamper("iso"),
        structlog.processors.JSONRenderer(),
    ]
    structlog.configure(processors=processors, logger_factory=structlog.PrintLoggerFactory(sys.stderr))
    return asyncio.run(_main(_parse(argv)))


if __name__ == "__main__":
    sys.exit(main())
