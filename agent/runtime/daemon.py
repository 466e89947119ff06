"""The daemon's lifecycle: one root TaskGroup, signals, sd_notify, SIGHUP reload.

Tasks (all named, all children of the root TaskGroup):
  collect:<name>  one per collector, at its own interval
  sample          assembles a Sample every ``sample.interval_s`` and runs it through the
                  pipeline (features -> score -> decide -> report), marks the loop alive
  fast            the fast path: while a limited cgroup heads for its memory limit within
                  seconds, its memory is read again every ``collect.cgroups.fast_interval_s``
                  and the playbooks evaluated on it (:meth:`Sampler.fast_pass`); idle otherwise
  watchdog        WATCHDOG=1 to systemd only while ``sample`` is alive
  reload          applies SIGHUP reloads (an invalid config keeps the old one, logged)
  stop            waits for SIGTERM/SIGINT and ends the group
Stages that need their own long-running task (reporter, playbook engine, commands, /metrics, the
model refit) add it through :meth:`Daemon.add_task`; :func:`build_daemon` composes them.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import signal
import time
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import structlog

from agent import __version__
from agent.collect.sample import Sample
from agent.errors import ConfigError, InputError
from agent.fsutil import CounterFile
from agent.runtime import reload as policy
from agent.runtime.config import LoadedConfig, Settings, load_config
from agent.runtime.paths import resolve_state_dir
from agent.runtime.pipeline import Pipeline
from agent.runtime.sampler import Sampler, build_sampler
from agent.runtime.sdnotify import Notifier
from agent.runtime.stopdeadline import STOP_DEADLINE_S, StopDeadline

if TYPE_CHECKING:
    from agent.act.engine import Engine
    from agent.report.transport import Reporter
    from agent.score.demand_stage import DemandStage

log = structlog.get_logger("heald.daemon")


class _Stop(Exception):
    """Raised inside the root group to end it cleanly."""


class Reloadable(Protocol):
    """A component that takes new settings on SIGHUP without losing its state."""

    def reload(self, settings: Settings) -> None: ...


class Daemon:
    def __init__(self, loaded: LoadedConfig, config_path: Path | None = None,
                 *, nvml: object | None = None) -> None:
        self.loaded = loaded
        self.settings = loaded.settings
        self.config_path = config_path
        self._nvml = nvml
        self.notifier = Notifier()
        self.state_dir = resolve_state_dir(self.settings.paths.state_dir)
        self.pipeline = Pipeline()
        self.reloadables: list[Reloadable] = []
        self._appliers: dict[str, list[Callable[[Settings], Awaitable[None]]]] = {}
        self._restart_note = ""  # "; restart required for ..." while the config asks for what runs not
        self.last_sample: Sample | None = None
        self._last_tick = time.monotonic()
        self._stop = asyncio.Event()
        self.interrupted = False
        # A stop signal arms the deadline (see :mod:`agent.runtime.stopdeadline`); `heald run` keeps it
        # armed until the process exits (the interpreter's join of executor threads included).
        self.stop_deadline_s = STOP_DEADLINE_S
        self.deadline_past_run = False
        self._deadline: StopDeadline | None = None
        self._reload = asyncio.Event()
        self._tg: asyncio.TaskGroup | None = None
        self._collector_tasks: dict[str, asyncio.Task[None]] = {}
        self._extra: list[tuple[str, Callable[[], Coroutine[Any, Any, None]]]] = []
        self.sampler = self._build_sampler(self.settings)
        # Sample numbers go on across restarts (a pwrite a sample, kept through kill -9), so the
        # coordinator can count every sample that was taken and never arrived as a gap.
        self._sample_seq = CounterFile(self.state_dir / "report" / "sample.seq")
        self.sampler.seq = self._sample_seq.value

    # --- construction -------------------------------------------------------------------------
    def _build_sampler(self, s: Settings) -> Sampler:
        return build_sampler(s.node.id, s.collect, stale_after=s.sample.stale_after, nvml=self._nvml,
                             state_dir=str(self.state_dir))

    def add_task(self, name: str, factory: Callable[[], Coroutine[Any, Any, None]]) -> None:
        """Register a long-running coroutine to run in the root group (before run())."""
        self._extra.append((name, factory))

    def on_reload(self, section: str, apply: Callable[[Settings], Awaitable[None]]) -> None:
        """On SIGHUP, ``apply(new settings)`` when ``[section]`` changed; raising keeps its old values."""
        self._appliers.setdefault(section, []).append(apply)

    # --- signals ------------------------------------------------------------------------------
    def request_stop(self) -> None:
        self._stop.set()

    def _interrupt(self) -> None:
        """SIGINT (Ctrl-C): stop as on SIGTERM, but exit 130 (interrupted)."""
        self.interrupted = True
        self._stop.set()

    def request_reload(self) -> None:
        self._reload.set()

    def _signalled(self, interrupt: bool) -> None:
        """SIGTERM or SIGINT: the first stops (and arms the deadline), a second exits at once."""
        deadline = self._deadline
        if self._stop.is_set() and deadline is not None:
            name = "SIGINT" if interrupt else "SIGTERM"
            deadline.force(f"a second {name} while stopping", code=130 if interrupt else 1)
            return
        if deadline is not None:
            deadline.arm()
        if interrupt:
            self._interrupt()
        else:
            self.request_stop()

    def _install_signals(self, loop: asyncio.AbstractEventLoop) -> None:
        loop.add_signal_handler(signal.SIGTERM, self._signalled, False)
        loop.add_signal_handler(signal.SIGINT, self._signalled, True)
        loop.add_signal_handler(signal.SIGHUP, self.request_reload)

    def _remove_signals(self, loop: asyncio.AbstractEventLoop) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)

    # --- tasks --------------------------------------------------------------------------------
    async def _sample_loop(self) -> None:
        interval = self.settings.sample.interval_s
        next_at = time.monotonic() + interval
        while True:
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
            next_at += self.settings.sample.interval_s
            if next_at < time.monotonic():
                next_at = time.monotonic() + self.settings.sample.interval_s
            sample = self.sampler.assemble()
            self.last_sample = sample
            self._sample_seq.value = sample.seq
            await self.pipeline.process(sample)
            self._last_tick = time.monotonic()

    async def _fast_loop(self) -> None:
        while True:
            sampler = self.sampler
            await sampler.hot.wait()
            sampler.hot.clear()
            while (sampler is self.sampler and (interval := self.settings.collect.cgroups.fast_interval_s) > 0
                   and sampler.fast_pass()):
                await self.pipeline.process_fast(sampler.assemble(fast=True))
                await asyncio.sleep(interval)

    async def _watchdog_loop(self) -> None:
        interval = self.notifier.watchdog_interval()
        if interval is None:
            return
        while True:
            await asyncio.sleep(interval)
            # Only while the sampling loop is alive: a hung pipeline lets systemd restart us.
            if time.monotonic() - self._last_tick < max(3 * self.settings.sample.interval_s, 2.0):
                self.notifier.notify(WATCHDOG=1)

    async def _status_loop(self) -> None:
        while True:
            await asyncio.sleep(30)
            s = self.last_sample
            if s is None:
                continue
            ok = sum(1 for c in s.collectors.values() if c.status == "ok")
            self.notifier.notify(
                STATUS=f"seq {s.seq}; {ok}/{len(s.collectors)} collectors ok{self._restart_note}")

    async def _reload_loop(self) -> None:
        while True:
            await self._reload.wait()
            self._reload.clear()
            await self.reload()

    async def _ready(self) -> None:
        """READY=1 once every collector has started (each start is bounded by its own timeout):
        from then on the node is watched, e.g. an auth log is followed from where it ended then,
        so a caller that waits for READY (``systemctl start``) or for "heald ready" in the log
        knows that what it writes next is seen. We do not wait for the network or the broker."""
        await self.sampler.wait_started()
        statuses = self.sampler.statuses()
        log.info("heald ready", collectors_ok=sorted(n for n, st in statuses.items() if st == "ok"),
                 collectors_not_ok={n: st for n, st in statuses.items() if st != "ok"})
        self.notifier.notify(READY=1, STATUS="sampling", MAINPID=os.getpid())

    async def _stop_waiter(self) -> None:
        await self._stop.wait()
        raise _Stop

    def _start_collectors(self) -> None:
        if self._tg is None:
            raise RuntimeError("collectors start inside run()")
        for names in self.sampler.task_groups():
            label = "+".join(names)
            self._collector_tasks[label] = self._tg.create_task(
                self.sampler.run_collector(*names), name=f"collect:{label}")

    async def _stop_collectors(self) -> None:
        tasks = list(self._collector_tasks.values())
        self._collector_tasks.clear()
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        self.sampler.close()

    async def reload(self) -> bool:
        """Re-read the config; apply it only if valid. Sequence numbers and stage state survive."""
        log.info("reloading configuration", path=str(self.config_path))
        try:
            loaded = await asyncio.to_thread(load_config, self.config_path)
        except ConfigError as exc:
            log.error("reload refused: invalid configuration, keeping the running one",
                      problems=[str(p) for p in exc.problems])
            self.notifier.notify(STATUS="reload refused: invalid configuration")
            return False
        old = self.settings
        new, sections, refused = policy.plan(old, loaded.settings)
        if new.collect != old.collect or new.sample.stale_after != old.sample.stale_after:
            seq = self.sampler.seq
            await self._stop_collectors()
            old_hot = self.sampler.hot
            self.sampler = self._build_sampler(new)
            self.sampler.seq = seq
            old_hot.set()  # the fast path waits on the new sampler from now on
            self._start_collectors()
        failed = []
        for section in sections:
            for apply in self._appliers.get(section, ()):
                try:
                    await apply(new)
                except Exception as exc:  # noqa: BLE001 - any failure: that section keeps its running settings
                    log.error("reload.section_failed", section=section, error=str(exc) or type(exc).__name__)
                    failed.append(section)
                    break
        new = policy.keep_sections(new, old, failed)
        self.loaded, self.settings = dataclasses.replace(loaded, settings=new), new
        for part in self.reloadables:
            try:
                part.reload(new)
            except Exception:  # a part that cannot reload keeps its old settings
                log.exception("reload failed", part=type(part).__name__)
        self._restart_note = "; restart required for " + ", ".join(refused) if refused else ""
        status = "configuration reloaded" + self._restart_note
        if refused:
            log.error("reload.restart_required", keys=refused,
                      detail="kept the running values; restart heald to change these keys")
        if failed:
            status += "; not applied: " + ", ".join(f"[{s}]" for s in failed)
        log.info("configuration reloaded", applied=[s for s in sections if s not in failed])
        self.notifier.notify(STATUS=status)
        return not failed

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        structlog.contextvars.bind_contextvars(node=self.settings.node.id)
        self._deadline = StopDeadline(loop, self.stop_deadline_s)
        self._install_signals(loop)
        log.info("heald starting", version=__version__, site=self.settings.node.site,
                 collectors=self.sampler.names, config=[str(f) for f in self.loaded.files])
        try:
            async with asyncio.TaskGroup() as tg:
                self._tg = tg
                self._start_collectors()
                tg.create_task(self._sample_loop(), name="sample")
                tg.create_task(self._fast_loop(), name="fast")
                tg.create_task(self._watchdog_loop(), name="watchdog")
                tg.create_task(self._status_loop(), name="status")
                tg.create_task(self._reload_loop(), name="reload")
                for name, factory in self._extra:
                    tg.create_task(factory(), name=name)
                tg.create_task(self._stop_waiter(), name="stop")
                tg.create_task(self._ready(), name="ready")
        except* _Stop:
            pass
        finally:
            self._tg = None
            self.notifier.notify(STOPPING=1)
            self._remove_signals(loop)
            self.sampler.close()
            self._sample_seq.flush()
            self._sample_seq.close()
            log.info("heald stopped")
            self.notifier.close()
            if not self.deadline_past_run:
                self._deadline.disarm()
        return 130 if self.interrupted else 0


class PlaybookReloader:
    """On SIGHUP: load the playbooks again; an invalid set is refused and the running one kept."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def reload(self, settings: Settings) -> None:
        from agent.decide.loader import load_playbooks  # noqa: PLC0415 - YAML + jsonschema, lazily

        try:
            playbooks = load_playbooks(settings.playbooks)
        except InputError as exc:
            log.error("playbook reload refused, keeping the running set",
                      problems=[str(p) for p in exc.problems])
            return
        self.engine.settings = settings.playbooks
        self.engine.reload(playbooks)
        log.info("playbooks reloaded", count=len(playbooks))


def build_daemon(loaded: LoadedConfig, config_path: Path | None = None,
                 *, nvml: object | None = None) -> Daemon:
    """The daemon with every pipeline stage the config enables, wired in flow order.

    This is the composition root: the one place that knows every stage. Heavy modules (numpy
    models, aiomqtt, prometheus_client, cryptography) are imported only when their stage is
    enabled. Invalid playbooks at start are an InputError (exit 2).
    """
    # Imports are local so that a disabled stage costs nothing at start-up or in RSS.
    from agent.act.engine import Engine  # noqa: PLC0415
    from agent.decide.loader import load_playbooks  # noqa: PLC0415
    from agent.report import build  # noqa: PLC0415

    daemon = Daemon(loaded, config_path, nvml=nvml)
    s = daemon.settings
    pipe = daemon.pipeline
    model_version = ""
    demand: DemandStage | None = None
    if s.model.enabled:
        from agent.score.stage import RiskStage  # noqa: PLC0415

        stage = RiskStage(s.model, daemon.state_dir, sample_interval_s=s.sample.interval_s)
        pipe.scorer = stage
        model_version = stage.model_version
        daemon.add_task("score-refit", stage.refit_loop)
        daemon.on_reload("model", lambda new: asyncio.to_thread(stage.reconfigure, new.model))
        if s.demand.enabled:
            from agent.score.demand_stage import DemandStage  # noqa: PLC0415

            demand = stage.demand = DemandStage(s.demand, daemon.state_dir)
            daemon.add_task("demand", demand.run)
    exposition = None
    if s.prometheus.enabled:
        from agent.runtime import prometheus  # noqa: PLC0415

        exposition = prometheus.Exposition(s.node.id)
        pipe.exposition = exposition
        endpoint = prometheus.Endpoint(exposition, s.prometheus.listen)
        daemon.add_task("prometheus", endpoint.run)
        daemon.on_reload("prometheus", lambda new: endpoint.rebind(new.prometheus.listen))
    reporter = None
    if s.mqtt.enabled:
        from agent.report.transport import Reporter  # noqa: PLC0415

        reporter = Reporter(s.mqtt, node=s.node.id, site=s.node.site, state_dir=daemon.state_dir,
                            labels=s.node.labels, collectors=daemon.sampler.names,
                            model_version=model_version,
                            capabilities=["playbooks", "spool", "signed-commands"])
        pipe.reporter = reporter
        daemon.add_task("report", reporter.run)
        daemon.on_reload("mqtt", _mqtt_applier(reporter))

    def on_action(record: dict[str, Any]) -> None:
        if exposition is not None and record.get("type") == "run.end":
            exposition.record_run(str(record.get("playbook")), str(record.get("outcome", "")))
        if reporter is not None:
            reporter.submit(build.playbook_record(record))

    def on_event(event: dict[str, Any]) -> None:
        log.warning("playbook event", **{k: v for k, v in event.items() if k != "event"})
        if reporter is not None:
            reporter.submit(build.playbook_event(event))

    if s.cost.enabled:
        from agent.features.cost import CostMeter  # noqa: PLC0415

        meter = CostMeter(s.cost, daemon.state_dir)
        pipe.cost = meter
        if demand is not None:
            meter.demand = demand.summaries
        send: Callable[[Any], object] = reporter.submit if reporter is not None else (lambda _m: None)
        daemon.add_task("cost", lambda: meter.run(send))
    engine = Engine(s.playbooks, daemon.state_dir, s.node.id, load_playbooks(s.playbooks),
                    on_action=on_action, on_event=on_event)
    pipe.decider = engine
    daemon.add_task("playbooks", engine.run)
    daemon.reloadables.append(PlaybookReloader(engine))
    _wire_control(daemon, engine, reporter)
    _wire_security(daemon, engine)
    return daemon


def _wire_security(daemon: Daemon, engine: Engine) -> None:
    """[security] for block_address (the allow list, the broker's host never blocked), and heald's
    nftables table removed when the daemon stops unless ``keep_blocks_on_stop``."""

    def configure(new: Settings) -> None:
        engine.security = new.security
        engine.protected_hosts = (new.mqtt.host,) if new.mqtt.enabled else ()

    async def apply(new: Settings) -> None:
        configure(new)

    configure(daemon.settings)
    daemon.on_reload("security", apply)
    daemon.on_reload("mqtt", apply)

    async def cleanup_on_stop() -> None:
        try:
            await asyncio.Event().wait()  # until the root group is cancelled: the daemon stops
        except asyncio.CancelledError:
            security = daemon.settings.security
            if not security.keep_blocks_on_stop:
                from agent.act.actions.nftables import remove_table  # noqa: PLC0415

                if await asyncio.to_thread(remove_table, security):
                    log.info("removed heald's nftables table on stop", table="inet heald")
            raise

    daemon.add_task("security-cleanup", cleanup_on_stop)


def _wire_control(daemon: Daemon, engine: Engine, reporter: Reporter | None) -> None:
    """Operators' commands: the coordinator's on the reporter's MQTT session when MQTT is on (see
    :mod:`agent.control`), and root's on the node through the local control socket, both through
    one dispatcher."""
    from agent.control.dispatcher import CommandDispatcher  # noqa: PLC0415
    from agent.control.local import LocalControl, NoCoordinator, socket_path  # noqa: PLC0415
    from agent.control.silence import Silence  # noqa: PLC0415
    from agent.control.status import live_status  # noqa: PLC0415

    s = daemon.settings
    silence = Silence()
    daemon.pipeline.hold = silence
    if reporter is None:
        dispatcher = CommandDispatcher(None, engine, NoCoordinator(), silence=silence)
    else:
        from agent.control.keys import build_verifier  # noqa: PLC0415
        from agent.control.leases import CoordinatorLeases  # noqa: PLC0415
        from agent.control.receiver import CommandReceiver  # noqa: PLC0415

        leases = CoordinatorLeases(reporter)
        verifier = build_verifier(s.coordinator, node=s.node.id, site=s.node.site, state_dir=daemon.state_dir)
        dispatcher = CommandDispatcher(verifier, engine, reporter, leases=leases, silence=silence)
        reporter.inbound = CommandReceiver(node=s.node.id, site=s.node.site,
                                           max_payload_bytes=s.mqtt.max_payload_bytes, handler=dispatcher)
        engine.lease_gate = leases
        daemon.add_task("commands", dispatcher.run)
        from agent.bundle.control import attach  # noqa: PLC0415 - signed bundles over the same session

        daemon.pipeline.decider = attach(daemon.state_dir, s.node.id, s.playbooks, engine,
                                         dispatcher=dispatcher, reporter=reporter)

        async def rekey(new: Settings) -> None:  # a key rotation: the next command uses the new keys
            dispatcher.verifier = await asyncio.to_thread(
                build_verifier, new.coordinator, node=s.node.id, site=s.node.site, state_dir=daemon.state_dir,
                nonces_from=dispatcher.verifier)

        daemon.on_reload("coordinator", rekey)
    local = LocalControl(socket_path(s.paths.runtime_dir), dispatcher,
                         lambda: live_status(engine, silence, reporter, model_enabled=s.model.enabled))
    daemon.add_task("local-control", local.serve)


def _mqtt_applier(reporter: Reporter) -> Callable[[Settings], Awaitable[None]]:
    """[mqtt] on SIGHUP: the reporter reconnects if need be, the command receiver takes the new limit."""
    from agent.control.receiver import CommandReceiver  # noqa: PLC0415

    async def apply(new: Settings) -> None:
        reporter.reconfigure(new.mqtt)
        if isinstance(reporter.inbound, CommandReceiver):
            reporter.inbound.max_payload_bytes = new.mqtt.max_payload_bytes
    return apply
