"""Helpers for the decide/act tests: build samples, run an engine, load playbooks from text; the
``__main__`` of the tests/*_namespace.py drivers (:func:`namespace_main`)."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import itertools
import json
import os
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any

from agent.act.engine import Engine
from agent.collect.sample import Event, Sample
from agent.decide.loader import parse_playbook
from agent.decide.model import Playbook
from agent.decide.settings import PlaybookSettings
from agent.score.types import Forecast, Risk

_seq = itertools.count(1)


def sample(
    metrics: dict[str, float | None] | None = None, events: Iterable[Event] = (), node: str = "n1"
) -> Sample:
    return Sample(
        node=node,
        seq=next(_seq),
        wall=time.time(),
        mono=time.monotonic(),
        metrics=dict(metrics or {}),
        events=tuple(events),
    )


def risk(
    *,
    anomaly: float | None = 0.1,
    cold: bool = False,
    alert: bool = False,
    failure: dict[str, float] | None = None,
    forecasts: Iterable[Forecast] = (),
) -> Risk:
    return Risk(
        seq=0,
        wall=time.time(),
        anomaly=anomaly,
        alert=alert,
        cold=cold,
        model_version="test-1",
        failure=dict(failure or {}),
        forecasts=tuple(forecasts),
    )


def xid(value: int, gpu: str = "0", wall: float | None = None) -> Event:
    return Event(
        kind="gpu.xid",
        source="gpu",
        wall=time.time() if wall is None else wall,
        labels={"gpu": gpu, "pci": f"0000:0{gpu}:00.0"},
        value=float(value),
    )


def playbook(text: str, settings: PlaybookSettings | None = None, file: str = "test.yaml") -> Playbook:
    pb, problems = parse_playbook(text, file, settings)
    assert pb is not None, [str(p) for p in problems]
    return pb


class Recorder:
    def __init__(self) -> None:
        self.actions: list[dict[str, Any]] = []
        self.events: list[dict[str, Any]] = []

    def on_action(self, r: dict[str, Any]) -> None:
        self.actions.append(r)

    def on_event(self, e: dict[str, Any]) -> None:
        self.events.append(e)

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [r for r in self.actions if r["type"] == kind]


def make_engine(
    tmp: Path,
    playbooks: list[Playbook],
    settings: PlaybookSettings | None = None,
    rec: Recorder | None = None,
) -> tuple[Engine, Recorder]:
    rec = rec or Recorder()
    eng = Engine(
        settings or PlaybookSettings(load_shipped=False, dirs=()),
        tmp / "state",
        "n1",
        playbooks,
        rec.on_action,
        rec.on_event,
    )
    return eng, rec


@contextlib.asynccontextmanager
async def running(engine: Engine) -> AsyncIterator[Engine]:
    task = asyncio.create_task(engine.run(), name="engine")
    await asyncio.sleep(0)
    try:
        yield engine
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await engine.supervisor.terminate_all()


async def drive(
    engine: Engine,
    metrics: Callable[[], dict[str, float | None]],
    until: Callable[[], bool],
    *,
    interval: float = 0.05,
    limit_s: float = 15.0,
    risk_fn: Callable[[], Risk | None] = lambda: None,
    events: Callable[[], list[Event]] = list,
) -> float:
    """Feed samples every ``interval`` until ``until()``; returns the seconds it took."""
    t0 = time.monotonic()
    while not until():
        if time.monotonic() - t0 > limit_s:
            raise AssertionError("condition not reached in time")
        await engine.evaluate(sample(metrics(), events()), risk_fn())
        await asyncio.sleep(interval)
    return time.monotonic() - t0


async def idle(engine: Engine) -> None:
    """Wait until no run is in flight."""
    for _ in range(2000):
        if not engine.status() or not any(s["running"] for s in engine.status()):
            return
        await asyncio.sleep(0.01)
    raise AssertionError("runs still in flight")


def namespace_main(
    drive: Callable[[dict[str, Any]], dict[str, Any] | Awaitable[dict[str, Any]]],
    agent: Callable[[Path], Awaitable[None]] | None = None,
) -> None:
    """The ``__main__`` of a tests/*_namespace.py driver, from ``sys.argv``:

    * ``THIS --agent DIR``: the agent's side, a process of its own: ``agent(DIR)`` until it returns
      (a KeyboardInterrupt ends it quietly);
    * ``THIS SPEC.json``: the driver, which must be PID 1 of a private PID namespace (``unshare
      --pid --kill-child --mount --mount-proc``): ``drive(spec)`` (run to its end when it is a
      coroutine), its result as JSON to the spec's ``out``, else to ``DIR/out.json`` (``dir``).
    """
    if sys.argv[1] == "--agent":
        if agent is None:
            raise SystemExit(f"{sys.argv[0]} has no agent side")
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(_awaited(agent(Path(sys.argv[2]))))
        return
    assert os.getpid() == 1, "run me in a private PID namespace (unshare --pid --fork --mount-proc)"
    spec: dict[str, Any] = json.loads(Path(sys.argv[1]).read_text())
    result = drive(spec)
    if inspect.isawaitable(result):
        result = asyncio.run(_awaited(result))
    out = Path(str(spec["out"])) if "out" in spec else Path(spec["dir"]) / "out.json"
    out.write_text(json.dumps(result, default=str))


async def _awaited(aw: Awaitable[Any]) -> Any:
    return await aw
