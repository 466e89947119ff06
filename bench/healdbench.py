"""What every bench script that starts ``heald run`` shares: a confined agent, and proof afterwards.

A benchmark must never remediate the host. Every ``heald run`` a bench starts goes through
:func:`start_heald`, which locks the playbooks into dry-run three times over (the config file's
``[playbooks] force_mode = "dry-run"``, ``$HEALD_PLAYBOOKS__FORCE_MODE`` and ``--dry-run``), keeps
``/etc/heald/playbooks.d`` out (only the shipped library is loaded), never lets the stop remove
an nftables table (``[security] keep_blocks_on_stop = true``, ``nft = ["false"]``) and keeps the
state, runtime socket and audit log in the bench's own temporary directory. After the run,
:func:`check_agent` reads the agent's start summary (``playbooks_mode`` must be ``dry-run`` and
``acting`` empty) and its audit log (``audit.jsonl``): any ``run.start`` with ``dry_run`` false
fails the bench loudly (:class:`Unsafe`, exit 3), whatever the figures.

Fleet-like agent (:func:`write_config`): MQTT on to a private mosquitto on a free loopback port
(:class:`Mosquitto`), the detector fitted before the agent starts (:func:`fit_detector`: the
recorded fault-free samples of ``bench/faults/data`` through ``heald model train``, the daemon's
own fit command, into ``<state>/models/detector.npz``, which the daemon loads at start: scoring is
live from the first sample), the shipped playbooks loaded (dry-run).
"""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
MOSQUITTO = os.environ.get("HEALD_TEST_MOSQUITTO", "/usr/sbin/mosquitto")
RECORDING = ROOT / "bench" / "faults" / "data" / "faultfree-71min.npz"
FORCE_ENV = "HEALD_PLAYBOOKS__FORCE_MODE"
#: When set, a directory: every audit log a check read is copied there (tests/test_bench_smoke.py
#: reads them again on its own), as ``<n>-audit.jsonl`` (empty when the agent wrote none).
AUDIT_COPY_ENV = "HEALD_BENCH_AUDIT_DIR"


class Unsafe(SystemExit):
    """The agent could have acted (or did act) on the host: the bench's figures are void."""

    def __init__(self, message: str) -> None:
        print(f"\nBENCH UNSAFE: {message}", file=sys.stderr, flush=True)
        super().__init__(3)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Mosquitto:
    """A private broker on 127.0.0.1, a free port, anonymous, no persistence; stopped by its PID."""

    def __init__(self, directory: Path) -> None:
        if not Path(MOSQUITTO).exists():
            raise SystemExit(f"{MOSQUITTO} is missing: apt-get install mosquitto")
        self.port = free_port()
        conf = directory / "mosquitto.conf"
        user = "user root\n" if os.geteuid() == 0 else ""
        conf.write_text(f"{user}listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
                        "log_dest none\n")
        self.proc = subprocess.Popen([MOSQUITTO, "-c", str(conf)], stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(200):
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), 0.2):
                return
            time.sleep(0.05)
        self.stop()
        raise SystemExit("mosquitto did not start")

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)

    def __enter__(self) -> Mosquitto:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def recording_features(recording: Path, rows: int | None = None) -> tuple[Any, Any]:
    """The feature rows of a fault-free recording as the daemon's history holds them: each sample
    through a fresh feature window, float32. ``recording``: whatever ``heald replay`` reads
    (:func:`agent.decide.replay.samples`: a ``bench/faults`` ``.npz`` or a ``.jsonl`` of raw
    samples, as ``bench/faultfree_load.py --samples`` keeps them), or that ``.jsonl`` gzipped.
    Returns (x, wall) of the first ``rows`` samples by sequence number (all where None)."""
    sys.path.insert(0, str(ROOT))
    import tempfile  # noqa: PLC0415

    import numpy as np  # noqa: PLC0415

    from agent.decide.replay import samples  # noqa: PLC0415
    from agent.features.schema import FeatureSchema  # noqa: PLC0415
    from agent.features.window import FeatureWindow  # noqa: PLC0415

    with tempfile.TemporaryDirectory(prefix="heald-bench-rec-") as tmp:
        path = recording
        if recording.name.endswith(".gz"):  # heald replay reads it unzipped
            path = Path(tmp) / recording.name.removesuffix(".gz")
            path.write_bytes(gzip.decompress(recording.read_bytes()))
        recorded = sorted(samples(path), key=lambda smp: smp.seq)[:rows]
    schema = FeatureSchema()
    fw = FeatureWindow(schema)
    x = np.empty((len(recorded), schema.dim))
    for i, smp in enumerate(recorded):
        x[i] = fw.push_metrics(smp.metrics, smp.mono)
    wall = np.asarray([smp.wall for smp in recorded], dtype=np.float64)
    return x.astype(np.float32).astype(np.float64), wall


def fit_detector(state_dir: Path, rows: int | None = 1800, recording: Path = RECORDING) -> Path:
    """Fit the node's anomaly detector before the agent starts: the first ``rows`` recorded
    fault-free samples (all where None; :func:`recording_features`) through the feature window
    (as the daemon's history holds them), the daemon's usable-column rule, then
    ``python -m agent model train`` (what the daemon's refit runs, with its fit options) into
    ``<state_dir>/models/detector.npz``. Returns the artifact's path."""
    import numpy as np  # noqa: PLC0415

    from agent.features.history import usable_columns  # noqa: PLC0415
    from agent.features.schema import FeatureSchema  # noqa: PLC0415
    from agent.score.stage import DEFAULT_FIT_OPTIONS, DETECTOR_FILE  # noqa: PLC0415

    x, _wall = recording_features(recording, rows)
    schema = FeatureSchema()
    keep = usable_columns(x)
    work = state_dir / "models" / "work"
    work.mkdir(parents=True, exist_ok=True)
    train = work / "bench-train.npz"
    np.savez(train, train=x[:, keep], feature_names=np.asarray([schema.names[j] for j in keep]),
             units=np.asarray([schema.units[j] for j in keep]))
    out = state_dir / "models" / DETECTOR_FILE
    proc = subprocess.run([sys.executable, "-m", "agent", "model", "train", "--input", str(train),
                           "--output", str(out), "--options", json.dumps(DEFAULT_FIT_OPTIONS)],
                          capture_output=True, text=True, timeout=600, check=False, cwd=ROOT,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)))
    train.unlink()
    if proc.returncode != 0 or not out.exists():
        raise SystemExit(f"heald model train failed (exit {proc.returncode}): {proc.stderr.strip()[-2000:]}")
    return out


def seed_history(state_dir: Path, recording: Path, end_wall: float | None = None) -> int:
    """Put a fault-free recording into the node's feature history (``<state_dir>/history``, the
    daemon's own on-disk format, :class:`agent.features.history.HistoryWriter`), re-timed to end
    one second before ``end_wall`` (default now) with its spacing kept: the agent then starts as a
    node that has lived through that recording, and its own refits (at start, on its schedule,
    on drift) fit on it plus what it sees next, as a long-running node's 24-h window holds its
    usual workloads. Returns the rows written; all of them or SystemExit (a full disk)."""
    from agent.features.history import HistoryWriter  # noqa: PLC0415
    from agent.features.schema import FeatureSchema  # noqa: PLC0415
    from agent.score.settings import ModelSettings  # noqa: PLC0415

    x, wall = recording_features(recording)
    end = time.time() if end_wall is None else end_wall
    shift = end - 1.0 - float(wall[-1])
    hist = HistoryWriter(state_dir / "history", FeatureSchema(), ModelSettings().window_s)
    for w, row in zip(wall.tolist(), x, strict=True):
        hist.append(w + shift, row)
    hist.flush()
    if hist.rows_on_disk < len(x):  # a full or read-only state dir: the node would not have this past
        raise SystemExit(f"the feature history in {hist.dir} took {hist.rows_on_disk} of {len(x)} rows "
                         "(full or read-only?): not seeded")
    return hist.rows_on_disk


def write_config(d: Path, *, mqtt_port: int | None = None, prometheus_port: int | None = None,
                 node: str = "bench") -> Path:
    """The bench agent's agent.toml in ``d`` (state in ``d/state``, socket in ``d/run``)."""
    (d / "state").mkdir(exist_ok=True)
    (d / "run").mkdir(exist_ok=True)
    mqtt = (f'[mqtt]\nenabled = true\nhost = "127.0.0.1"\nport = {mqtt_port}\n' if mqtt_port is not None
            else "[mqtt]\nenabled = false\n")
    prom = (f'[prometheus]\nenabled = true\nlisten = "127.0.0.1:{prometheus_port}"\n'
            if prometheus_port is not None else "[prometheus]\nenabled = false\n")
    path = d / "agent.toml"
    path.write_text(f"""# written by bench/healdbench.py: a benchmark never remediates
[node]
id = "{node}"
[paths]
state_dir = "{d / 'state'}"
runtime_dir = "{d / 'run'}"
[log]
format = "json"
[playbooks]
force_mode = "dry-run"
dirs = []
load_shipped = true
[security]
keep_blocks_on_stop = true
nft = ["false"]
{mqtt}{prom}""")
    return path


def heald_argv(config: Path) -> list[str]:
    return [sys.executable, "-m", "agent", "run", "--dry-run", "--config", str(config)]


def unit_environment(unit: Path = ROOT / "systemd" / "heald.service") -> dict[str, str]:
    """The ``Environment=`` assignments of the shipped unit (MALLOC_ARENA_MAX, OpenBLAS's threads):
    a bench measures heald as systemd starts it, not as the caller's shell would."""
    env: dict[str, str] = {}
    for line in unit.read_text(encoding="utf-8").splitlines():
        if line.startswith("Environment="):
            for word in shlex.split(line.removeprefix("Environment=")):
                key, _, value = word.partition("=")
                env[key] = value
    return env


def heald_env(d: Path) -> dict[str, str]:
    return dict(os.environ, **unit_environment(), HEALD_PATHS__STATE_DIR=str(d / "state"),
                PYTHONPATH=str(ROOT), **{FORCE_ENV: "dry-run"})


def start_heald(d: Path, config: Path, log: Path, *, cwd: Path | None = None) -> subprocess.Popen[bytes]:
    """``heald run --dry-run`` with the bench's config, its own session, output into ``log``."""
    with log.open("wb") as out:
        return subprocess.Popen(heald_argv(config), stdout=out, stderr=subprocess.STDOUT, env=heald_env(d),
                                cwd=cwd or d, start_new_session=True)


def stop(proc: subprocess.Popen[bytes], timeout: float = 30.0) -> float:
    """SIGTERM, then SIGKILL after ``timeout``; returns the seconds the stop took."""
    t0 = time.monotonic()
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
    return time.monotonic() - t0


def log_records(log: Path) -> Iterator[dict[str, Any]]:
    for line in log.read_text(errors="replace").splitlines():
        start = line.find("{")
        if start < 0:
            continue
        with contextlib.suppress(ValueError):
            rec = json.loads(line[start:])
            if isinstance(rec, dict):
                yield rec


def start_summary(log: Path) -> dict[str, Any] | None:
    return next((r for r in log_records(log) if r.get("event") == "heald start summary"), None)


def model_loaded(log: Path) -> bool:
    return any(r.get("event") == "anomaly model loaded" for r in log_records(log))


def audit_entries(state_dir: Path) -> list[dict[str, Any]]:
    """The records of ``<state_dir>/audit.jsonl`` (rotated files too)."""
    out = []
    for path in sorted(state_dir.glob("audit.jsonl*")):
        if path.name.endswith(".head"):
            continue
        for line in path.read_text(errors="replace").splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                raise Unsafe(f"{path}: unreadable audit line {line[:200]!r}") from None
            record = entry.get("record") if isinstance(entry, dict) else None
            if isinstance(record, dict):
                out.append(record)
    return out


def keep_audit(state_dir: Path) -> None:
    """Copy the audit log for whoever asked (``$HEALD_BENCH_AUDIT_DIR``), before the temp dir goes."""
    where = os.environ.get(AUDIT_COPY_ENV)
    if not where:
        return
    dest = Path(where)
    dest.mkdir(parents=True, exist_ok=True)
    target = dest / f"{len(list(dest.glob('*-audit.jsonl')))}-audit.jsonl"
    src = state_dir / "audit.jsonl"
    target.write_bytes(src.read_bytes() if src.exists() else b"")


def enforced(state_dir: Path) -> list[dict[str, Any]]:
    """Audit records of runs that acted for real: ``run.start`` with ``dry_run`` not true."""
    return [r for r in audit_entries(state_dir)
            if r.get("type") == "run.start" and r.get("dry_run") is not True]


def check_agent(d: Path, log: Path) -> dict[str, Any]:
    """After a ``heald run``: the start summary says dry-run with nothing acting, and the audit log
    holds no enforced run. Raises :class:`Unsafe` otherwise; returns what it counted."""
    summary = start_summary(log)
    if summary is None:
        raise Unsafe(f"no 'heald start summary' in {log}: cannot show the agent ran in dry-run\n"
                     + log.read_text(errors="replace")[-2000:])
    if summary.get("playbooks_mode") != "dry-run" or summary.get("acting"):
        raise Unsafe(f"the agent started with playbooks_mode={summary.get('playbooks_mode')!r}, "
                     f"acting={summary.get('acting')!r}")
    keep_audit(d / "state")
    records = audit_entries(d / "state")
    bad = enforced(d / "state")
    if bad:
        raise Unsafe(f"{len(bad)} enforced run(s) in {d / 'state' / 'audit.jsonl'}: "
                     + "; ".join(f"{r.get('playbook')} on {r.get('target')!r}" for r in bad[:10]))
    starts = [r for r in records if r.get("type") == "run.start"]
    return {"audit_records": len(records), "dry_runs": len(starts), "enforced_runs": 0,
            "playbooks": len(summary.get("playbooks") or [])}


def print_safety(checked: dict[str, Any]) -> None:
    print(f"safety: every playbook dry-run ({checked['playbooks']} loaded); audit log: "
          f"{checked['audit_records']} records, {checked['dry_runs']} dry runs, 0 enforced")


# ------------------------------------------------------------------ private PID + mount namespace
NS_ENV = "HEALD_BENCH_HOST_NS"


def _ns() -> str:
    return f"{os.readlink('/proc/self/ns/pid')} {os.readlink('/proc/self/ns/mnt')}"


def confine(argv: list[str] | None = None) -> None:
    """Re-run this script in a private PID and mount namespace (``unshare --pid --fork --mount
    --mount-proc``; ``--user --map-root-user`` too when not root), unless it already runs in one.
    Returns only inside the namespace; the outer process exits with the inner one's status."""
    if os.environ.get(NS_ENV):
        if not confined():
            raise Unsafe("asked to run confined, but this process shares the host's PID or mount namespace")
        return
    unshare = shutil.which("unshare")
    if unshare is None:
        raise SystemExit("unshare (util-linux) is missing: cannot confine the bench")
    user = [] if os.geteuid() == 0 else ["--user", "--map-root-user"]
    # --kill-child (implies --fork): when unshare dies (a timeout kills it), the namespace's PID 1
    # dies too and with it every process in the namespace; unshare itself ignores SIGTERM/SIGINT.
    cmd = [unshare, *user, "--pid", "--kill-child", "--mount", "--mount-proc", "--propagation", "private",
           sys.executable, *(argv if argv is not None else sys.argv)]
    env = dict(os.environ, **{NS_ENV: _ns()})
    rc = subprocess.run(cmd, env=env, check=False).returncode
    raise SystemExit(rc)


def confined() -> bool:
    """Whether this process runs in a PID and a mount namespace other than those that started
    :func:`confine` (the host's)."""
    host = os.environ.get(NS_ENV, "").split()
    if len(host) != 2:
        return False
    pid_ns, mnt_ns = _ns().split()
    return pid_ns != host[0] and mnt_ns != host[1]


def check_confined_audit(state_dir: Path, own_playbooks: set[str]) -> int:
    """For benches that enforce their own playbooks on their own objects: runs for real only
    inside the private namespaces and only of ``own_playbooks``; raises :class:`Unsafe` otherwise.
    Returns the number of enforced runs."""
    keep_audit(state_dir)
    bad = enforced(state_dir)
    if bad and not confined():
        raise Unsafe(f"{len(bad)} enforced run(s) outside a private PID+mount namespace")
    foreign = [r for r in bad if r.get("playbook") not in own_playbooks]
    if foreign:
        raise Unsafe("enforced runs of playbooks the bench did not write: "
                     + ", ".join(sorted({str(r.get("playbook")) for r in foreign})))
    return len(bad)
