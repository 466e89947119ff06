"""Actions, each for real: recording tools stand in for systemctl/journalctl/nvidia-smi/kubectl."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from agent.act.actions import REGISTRY
from agent.act.actions.cgroups import cgroup_v2_root, systemd_unit_of, unit_cgroup_path, unit_properties
from agent.act.base import ActionContext, ActionResult
from agent.act.runner import substitute
from agent.act.supervisor import Supervisor
from agent.decide.schema import action_names
from agent.decide.settings import PlaybookSettings

PY = sys.executable


def recorder(tmp: Path, name: str, stdout: str = "", rc: int = 0) -> tuple[str, Path]:
    """An executable that appends its argv (one line, NUL-separated) to a file."""
    log = tmp / f"{name}.argv"
    script = tmp / name
    script.write_text(
        f"#!{PY}\nimport sys\nopen({str(log)!r}, 'a').write('\\0'.join(sys.argv[1:]) + '\\n')\n"
        f"sys.stdout.write({stdout!r})\nsys.exit({rc})\n"
    )
    script.chmod(0o755)
    return str(script), log


def calls(log: Path) -> list[list[str]]:
    return [line.split("\0") for line in log.read_text().splitlines()] if log.exists() else []


def ctx(
    settings: PlaybookSettings,
    *,
    dry: bool = False,
    bindings: dict[str, str] | None = None,
    events: list[dict[str, Any]] | None = None,
) -> ActionContext:
    sup = Supervisor(
        lambda coro, name: asyncio.get_running_loop().create_task(coro, name=name), lambda *_: None
    )
    return ActionContext(
        settings=settings,
        node="node-7",
        playbook="pb",
        run_id="r1",
        dry_run=dry,
        supervisor=sup,
        emit=(events if events is not None else []).append,
        bindings=bindings or {},
    )


async def act(name: str, params: dict[str, Any], c: ActionContext) -> ActionResult:
    return await REGISTRY[name](params, c)


class Children(list[subprocess.Popen[bytes]]):
    """Starts test processes (from async tests too) and reaps every one at teardown."""

    def start(self, argv: list[str], **kw: Any) -> subprocess.Popen[bytes]:
        p = subprocess.Popen(argv, **kw)
        self.append(p)
        return p


@pytest.fixture
def children() -> Iterator[Children]:
    procs = Children()
    yield procs
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait()  # reap our own children
        if p.stdout is not None:
            p.stdout.close()


def test_registry_matches_schema() -> None:
    assert set(REGISTRY) == set(action_names())


def test_substitute_whole_argv_elements_only() -> None:
    vals = {"node": "n; rm -rf /", "mount": "/var"}
    out = substitute({"argv": ["kubectl", "cordon", "{node}", "--x={node}"], "on_mount": "{mount}/tmp"}, vals)
    assert out["argv"] == ["kubectl", "cordon", "n; rm -rf /", "--x={node}"]
    assert out["on_mount"] == "/var/tmp"


@pytest.mark.asyncio
async def test_restart_unit_through_recording_systemctl(tmp_path: Path) -> None:
    sc, log = recorder(tmp_path, "systemctl")
    s = PlaybookSettings(systemctl=(sc, "--no-ask-password"))
    dry = await act("restart_unit", {"unit": "nginx.service"}, ctx(s, dry=True))
    assert dry.ok
    assert "would run" in dry.detail
    assert not calls(log)
    res = await act("restart_unit", {"unit": "nginx.service"}, ctx(s))
    assert res.ok
    assert res.changed
    assert calls(log) == [["--no-ask-password", "restart", "nginx.service"]]
    bad, _ = recorder(tmp_path, "systemctl-fail", "Job failed", rc=1)
    res = await act("restart_unit", {"unit": "x.service"}, ctx(PlaybookSettings(systemctl=(bad,))))
    assert not res.ok
    assert "exited 1" in res.detail


@pytest.mark.asyncio
async def test_stop_process_term_then_kill_after_grace(tmp_path: Path, children: Children) -> None:
    stubborn = children.start(
        [
            PY,
            "-c",
            (
                "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                "print('ready', flush=True); time.sleep(60)"
            ),
            "heald-stubborn",
        ],
        stdout=subprocess.PIPE,
    )
    assert stubborn.stdout is not None
    stubborn.stdout.readline()
    params = {"target": {"cmdline": "heald-stubborn"}, "grace": "300ms"}
    dry = await act("stop_process", params, ctx(PlaybookSettings(), dry=True))
    assert dry.ok
    assert f"pid {stubborn.pid}" in dry.detail
    assert stubborn.poll() is None
    t0 = time.monotonic()
    res = await act("stop_process", params, ctx(PlaybookSettings()))
    assert res.ok, res.detail
    assert res.data["killed"] == [stubborn.pid]
    assert time.monotonic() - t0 >= 0.3
    assert await asyncio.to_thread(stubborn.wait, 5) == -signal.SIGKILL


@pytest.mark.asyncio
async def test_never_pid1_self_or_protected(tmp_path: Path, children: Children) -> None:
    s = PlaybookSettings(protected_processes=("heald-precious",))
    for target in ({"pid": 1}, {"pid": os.getpid()}, {"pid": os.getppid()}):
        res = await act("stop_process", {"target": target}, ctx(s))
        assert not res.ok
        assert "never touched" in res.detail
    link = tmp_path / "heald-precious"
    link.symlink_to("/bin/sleep")
    p2 = children.start([str(link), "30"])
    await asyncio.sleep(0.1)
    res = await act("stop_process", {"target": {"pid": p2.pid}}, ctx(s))
    assert not res.ok
    assert "protected" in res.detail
    assert p2.poll() is None
    res = await act("stop_process", {"target": {"top": "memory", "name": "heald-precious"}}, ctx(s))
    assert not res.ok


@pytest.mark.asyncio
async def test_stop_by_unit_main_pid(tmp_path: Path, children: Children) -> None:
    victim = children.start(["/bin/sleep", "30"])
    sc, log = recorder(tmp_path, "systemctl", stdout=f"{victim.pid}\n")
    res = await act(
        "stop_process",
        {"target": {"unit": "app.service"}, "grace": "2s"},
        ctx(PlaybookSettings(systemctl=(sc,))),
    )
    assert res.ok, res.detail
    assert calls(log) == [["show", "--property=MainPID", "--value", "app.service"]]
    assert await asyncio.to_thread(victim.wait, 5) == -signal.SIGTERM


@pytest.mark.asyncio
async def test_signal_zombie_parent(children: Children) -> None:
    code = (
        "import os, signal, time\n"
        "signal.signal(signal.SIGUSR1, lambda *a: [os.waitpid(-1, os.WNOHANG) for _ in range(10)])\n"
        "for _ in range(5):\n    os.fork() or os._exit(0)\n"
        "print('ok', flush=True)\ntime.sleep(30)\n"
    )
    parent = children.start([PY, "-c", code, "heald-zombie-maker"], stdout=subprocess.PIPE)
    assert parent.stdout is not None
    parent.stdout.readline()
    await asyncio.sleep(0.2)
    zombies = [c for c in psutil.Process(parent.pid).children() if c.status() == psutil.STATUS_ZOMBIE]
    assert len(zombies) == 5
    res = await act(
        "signal_process",
        {"target": {"zombie_parent": True, "cmdline": "heald-zombie-maker"}, "signal": "USR1"},
        ctx(PlaybookSettings()),
    )
    assert res.ok
    assert res.data["pids"] == [parent.pid]
    await asyncio.sleep(0.3)
    assert not psutil.Process(parent.pid).children()


def _tree(root: Path) -> None:
    old = time.time() - 3 * 86400
    (root / "cache" / "deep").mkdir(parents=True)
    for i, p in enumerate([root / "a.tmp", root / "cache" / "b.bin", root / "cache" / "deep" / "c.bin"]):
        p.write_bytes(b"x" * (1000 * (i + 1)))
        os.utime(p, (old, old))
    fresh = root / "fresh.tmp"
    fresh.write_bytes(b"y" * 10)


@pytest.mark.asyncio
async def test_clean_paths_age_policy_and_never_follows_symlinks(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    precious = outside / "precious.db"
    precious.write_bytes(b"z" * 5000)
    old = time.time() - 9 * 86400
    os.utime(precious, (old, old))
    _tree(root)
    (root / "link-to-outside").symlink_to(outside)
    (root / "link-to-file").symlink_to(precious)
    s = PlaybookSettings(clean_roots=(str(root),))
    dry = await act("clean_paths", {"older_than": "1d"}, ctx(s, dry=True))
    assert dry.ok
    assert dry.data["candidates"] == 3
    assert (root / "a.tmp").exists()
    res = await act("clean_paths", {"older_than": "1d"}, ctx(s))
    assert res.ok
    assert res.data["deleted"] == 3
    assert res.data["freed_bytes"] == 6000
    assert precious.exists(), "a symlink out of the root is never followed"
    assert (root / "link-to-file").is_symlink()
    assert (root / "fresh.tmp").exists()
    assert (root / "cache" / "deep").is_dir()
    # paths outside clean_roots are refused even when asked for explicitly
    res = await act("clean_paths", {"paths": [str(outside)]}, ctx(s))
    assert res.data["deleted"] == 0
    assert "outside clean_roots" in res.data["notes"][0]
    assert precious.exists()
    # a symlink given as the path itself is resolved and must still be inside a root
    res = await act("clean_paths", {"paths": [str(root / "link-to-outside")]}, ctx(s))
    assert res.data["deleted"] == 0
    assert precious.exists()


@pytest.mark.asyncio
async def test_clean_paths_skips_other_services_private_tmp(tmp_path: Path) -> None:
    root = tmp_path / "tmp"
    root.mkdir()
    _tree(root)
    old = time.time() - 9 * 86400
    private = root / "systemd-private-0123abcd-nginx.service-XyZ12" / "tmp"
    nested = root / "cache" / "systemd-private-4567-foo.service-abc" / "tmp"
    keep = [private / "upload.bin", nested / "x.bin"]
    for f in keep:
        f.parent.mkdir(parents=True)
        f.write_bytes(b"p" * 4000)
        os.utime(f, (old, old))
    s = PlaybookSettings(clean_roots=(str(root),))
    dry = await act("clean_paths", {"older_than": "1d"}, ctx(s, dry=True))
    assert dry.data["candidates"] == 3
    assert "systemd-private" not in dry.detail
    res = await act("clean_paths", {"older_than": "1d"}, ctx(s))
    assert res.data["deleted"] == 3
    assert all(f.exists() for f in keep)
    assert sum("PrivateTmp" in n for n in res.data["notes"]) == 2
    # not even when named explicitly
    res = await act("clean_paths", {"paths": [str(private)]}, ctx(s))
    assert res.data["deleted"] == 0
    assert "PrivateTmp" in res.data["notes"][0]
    assert all(f.exists() for f in keep)


@pytest.mark.asyncio
async def test_clean_paths_size_policy(tmp_path: Path) -> None:
    root = tmp_path / "r"
    root.mkdir()
    _tree(root)
    res = await act("clean_paths", {"larger_than": "1500"}, ctx(PlaybookSettings(clean_roots=(str(root),))))
    assert res.data["deleted"] == 2
    assert (root / "a.tmp").exists()


@pytest.mark.asyncio
async def test_vacuum_journal_and_logrotate(tmp_path: Path) -> None:
    jc, jlog = recorder(tmp_path, "journalctl")
    lr, llog = recorder(tmp_path, "logrotate")
    s = PlaybookSettings(journalctl=(jc,), logrotate=(lr,))
    assert (await act("vacuum_journal", {"max_size": "200M", "max_age": "2d"}, ctx(s))).ok
    assert calls(jlog) == [["--vacuum-size=209715200", "--vacuum-time=172800s"]]
    assert (await act("rotate_logs", {"config": "/etc/logrotate.d/app"}, ctx(s))).ok
    assert calls(llog) == [["-f", "/etc/logrotate.d/app"]]


@pytest.mark.asyncio
async def test_rotate_logs_copytruncate_refuses_symlinks(tmp_path: Path) -> None:
    log = tmp_path / "app.log"
    log.write_text("line\n" * 100)
    with log.open("a") as writer:  # a writer keeps its fd, as with copytruncate in logrotate
        res = await act("rotate_logs", {"files": [str(log)]}, ctx(PlaybookSettings()))
        assert res.ok, res.detail
        writer.write("after\n")
    assert (tmp_path / "app.log.1").read_text() == "line\n" * 100
    assert log.read_text().endswith("after\n")
    link = tmp_path / "evil.log"
    link.symlink_to(tmp_path / "app.log.1")
    res = await act("rotate_logs", {"files": [str(link)]}, ctx(PlaybookSettings()))
    assert not res.ok
    assert (tmp_path / "app.log.1").read_text() == "line\n" * 100


@pytest.mark.asyncio
async def test_drop_caches_file_and_helper_unit(tmp_path: Path) -> None:
    target = tmp_path / "drop_caches"
    target.write_text("0\n")
    res = await act("drop_caches", {"level": 3}, ctx(PlaybookSettings(drop_caches_path=str(target))))
    assert res.ok
    assert target.read_text() == "3\n"
    sc, log = recorder(tmp_path, "systemctl")
    res = await act("drop_caches", {}, ctx(PlaybookSettings(systemctl=(sc,), use_helper_units=True)))
    assert res.ok
    assert calls(log) == [["start", "heald-action@drop-caches.service"]]


@pytest.mark.asyncio
async def test_gpu_actions_argv_and_helper_unit(tmp_path: Path) -> None:
    smi, log = recorder(tmp_path, "nvidia-smi")
    s = PlaybookSettings(
        gpu_reset_argv=(smi, "--gpu-reset", "-i", "{gpu}"),
        gpu_drain_argv=(smi, "drain", "-p", "{pci}", "-m", "1"),
        gpu_undrain_argv=(smi, "drain", "-p", "{pci}", "-m", "0"),
    )
    b = {"gpu": "3", "pci": "0000:3b:00.0"}
    assert (await act("gpu_drain", {}, ctx(s, bindings=b))).ok
    assert (await act("gpu_reset", {}, ctx(s, bindings=b))).ok
    assert (await act("gpu_drain", {"undo": True}, ctx(s, bindings=b))).ok
    assert calls(log) == [
        ["drain", "-p", "0000:3b:00.0", "-m", "1"],
        ["--gpu-reset", "-i", "3"],
        ["drain", "-p", "0000:3b:00.0", "-m", "0"],
    ]
    res = await act("gpu_drain", {}, ctx(s))
    assert not res.ok
    assert "{pci}" in res.detail
    sc, slog = recorder(tmp_path, "systemctl")
    res = await act("gpu_reset", {"gpu": 5}, ctx(PlaybookSettings(systemctl=(sc,), use_helper_units=True)))
    assert res.ok
    assert calls(slog) == [["start", "heald-action@gpu-reset-5.service"]]


@pytest.mark.asyncio
async def test_gpu_drain_and_undrain_through_helper_units(tmp_path: Path) -> None:
    # heald.service has no CAP_SYS_ADMIN: with use_helper_units nvidia-smi never runs in the agent
    smi, smi_log = recorder(tmp_path, "nvidia-smi")
    sc, log = recorder(tmp_path, "systemctl")
    s = PlaybookSettings(
        systemctl=(sc,),
        use_helper_units=True,
        gpu_drain_argv=(smi, "drain", "-p", "{pci}", "-m", "1"),
        gpu_undrain_argv=(smi, "drain", "-p", "{pci}", "-m", "0"),
    )
    b = {"gpu": "3", "pci": "0000:3b:00.0"}
    dry = await act("gpu_drain", {}, ctx(s, dry=True, bindings=b))
    assert dry.ok
    assert dry.detail == f"would run: {sc} start heald-action@gpu-drain-3.service"
    assert not calls(log)
    assert (await act("gpu_drain", {}, ctx(s, bindings=b))).ok
    assert (await act("gpu_drain", {"undo": True}, ctx(s, bindings=b))).ok
    assert calls(log) == [
        ["start", "heald-action@gpu-drain-3.service"],
        ["start", "heald-action@gpu-undrain-3.service"],
    ]
    assert not calls(smi_log)
    # no index, or one the helper would refuse anyway: nothing is started
    res = await act("gpu_drain", {"pci": "0000:3b:00.0"}, ctx(s))
    assert not res.ok
    assert "gpu index" in res.detail
    for bad in ("3.service", "64", "01", "-1"):
        res = await act("gpu_drain", {"gpu": bad}, ctx(s))
        assert not res.ok, bad
        assert "not a GPU index" in res.detail
    assert len(calls(log)) == 2


@pytest.mark.asyncio
async def test_cordon_substitutes_node_as_one_element(tmp_path: Path) -> None:
    kc, log = recorder(tmp_path, "kubectl")
    res = await act("cordon", {}, ctx(PlaybookSettings(cordon_argv=(kc, "cordon", "{node}"))))
    assert res.ok
    assert calls(log) == [["cordon", "node-7"]]
    assert not (await act("cordon", {}, ctx(PlaybookSettings()))).ok


@pytest.mark.asyncio
async def test_run_command_env_allowlist_no_shell(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SECRET_TOKEN", "hunter2")
    monkeypatch.setenv("LANG", "C.UTF-8")
    out = tmp_path / "env"
    code = f"import os, sys; open({str(out)!r}, 'w').write(repr((sorted(os.environ), sys.argv[1:])))"
    res = await act(
        "run_command",
        {"argv": [PY, "-c", code, "a; touch /tmp/pwned", "$HOME"], "env": {"APP_MODE": "fix"}},
        ctx(PlaybookSettings()),
    )
    assert res.ok, res.detail
    names, argv = eval(out.read_text())  # noqa: S307 - reading back our own repr
    assert "SECRET_TOKEN" not in names
    assert "APP_MODE" in names
    assert "LANG" in names
    assert argv == ["a; touch /tmp/pwned", "$HOME"]
    res = await act("run_command", {"argv": ["/nonexistent/tool"]}, ctx(PlaybookSettings()))
    assert not res.ok
    assert "cannot run" in res.detail


@pytest.mark.asyncio
async def test_notify_and_renice(children: Children) -> None:
    events: list[dict[str, Any]] = []
    res = await act(
        "notify", {"message": "disk cleaned", "severity": "info"}, ctx(PlaybookSettings(), events=events)
    )
    assert res.ok
    assert events[0]["message"] == "disk cleaned"
    assert events[0]["playbook"] == "pb"
    p = children.start(["/bin/sleep", "30"])
    res = await act(
        "renice", {"target": {"pid": p.pid}, "nice": 10, "ionice_class": "idle"}, ctx(PlaybookSettings())
    )
    assert res.ok, res.detail
    assert psutil.Process(p.pid).nice() == 10


@pytest.mark.asyncio
async def test_restart_process_supervisor_reaps_and_does_not_duplicate(tmp_path: Path) -> None:
    exits: list[tuple[str, int, int | None]] = []
    loop = asyncio.get_running_loop()
    tasks: set[asyncio.Task[None]] = set()

    def spawn(coro: Any, name: str) -> object:
        t = loop.create_task(coro, name=name)
        tasks.add(t)
        return t

    sup = Supervisor(spawn, lambda n, pid, rc: exits.append((n, pid, rc)))
    c = ActionContext(
        settings=PlaybookSettings(),
        node="n",
        playbook="pb",
        run_id="r",
        dry_run=False,
        supervisor=sup,
        emit=lambda e: None,
    )
    params = {
        "name": "worker",
        "argv": [PY, "-c", "import time; time.sleep(30)"],
        "output": str(tmp_path / "o"),
    }
    res = await act("restart_process", params, c)
    assert res.ok
    assert res.changed
    again = await act("restart_process", params, c)
    assert again.ok
    assert not again.changed
    assert "already running" in again.detail
    os.kill(res.data["pid"], signal.SIGKILL)
    await asyncio.gather(*tasks)
    assert exits == [("worker", res.data["pid"], -signal.SIGKILL)]
    with pytest.raises(ChildProcessError):
        os.waitpid(res.data["pid"], os.WNOHANG)  # noqa: ASYNC222 - already reaped, returns at once


def _cgroup_v1_memory() -> Path | None:
    base = Path("/sys/fs/cgroup/memory")
    return base if (base / "memory.limit_in_bytes").exists() else None


@pytest.mark.root
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root for cgroups")
@pytest.mark.asyncio
async def test_cgroup_limit_writes_the_process_cgroup(children: Children) -> None:
    v2 = Path("/sys/fs/cgroup") if os.path.exists("/sys/fs/cgroup/cgroup.controllers") else None  # noqa: ASYNC240 - a sysfs stat
    if v2 is not None and "memory" in (v2 / "cgroup.subtree_control").read_text():
        cg, limit_file, procs = v2 / f"heald-test-{os.getpid()}", "memory.max", "cgroup.procs"
    elif _cgroup_v1_memory() is not None:
        cg, limit_file, procs = (
            _cgroup_v1_memory() / f"heald-test-{os.getpid()}",
            "memory.limit_in_bytes",
            "cgroup.procs",
        )  # type: ignore[operator]
    else:
        pytest.skip("no memory cgroup controller")
    cg.mkdir()
    try:
        p = children.start(["/bin/sleep", "30"])
        (cg / procs).write_text(str(p.pid))
        direct = PlaybookSettings(cgroup_direct_write=True)
        res = await act("cgroup_limit", {"target": {"pid": p.pid}, "memory_max": "64M"}, ctx(direct))
        assert res.ok, res.detail
        assert int((cg / limit_file).read_text()) == 64 * 2**20
        # the root cgroup is never limited
        res = await act(
            "cgroup_limit",
            {"target": {"pid": os.getpid()}, "memory_max": "64M"},
            ctx(PlaybookSettings(protected_processes=(), cgroup_direct_write=True)),
        )
        assert not res.ok
    finally:
        p.kill()
        p.wait()
        cg.rmdir()


@pytest.mark.parametrize(
    ("path", "unit"),
    [
        ("/system.slice/nginx.service", "nginx.service"),
        ("/system.slice/system-getty.slice/getty@tty1.service", "getty@tty1.service"),
        ("/user.slice/user-1000.slice/session-4.scope", "session-4.scope"),
        ("/machine.slice/libpod-8f1c.scope", "libpod-8f1c.scope"),
        ("/system.slice/foo\\x2dbar.service", "foo\\x2dbar.service"),
        ("/", None),
        ("/nginx", None),
        ("/system.slice", None),
        ("/init.scope/../x.service", None),
        # below a unit the names belong to whoever the subtree is delegated to
        ("/system.slice/docker-1.scope/sshd.service", None),
        ("/system.slice/app.service/worker", None),
        ("/user.slice/user-1000.slice/user@1000.service/app.slice/foo.service", None),
        # never something systemctl would read as an option
        ("/system.slice/--force.service", None),
        ("/system.slice/a b.service", None),
        ("/system.slice/gone.service (deleted)", None),
    ],
)
def test_systemd_unit_of_cgroup_path(path: str, unit: str | None) -> None:
    assert systemd_unit_of(path) == unit


def test_unit_cgroup_path_and_properties() -> None:
    assert unit_cgroup_path({"": "/system.slice/a.service", "memory": "/x"}) == "/system.slice/a.service"
    assert unit_cgroup_path({"": "/", "name=systemd": "/system.slice/b.service"}) == "/system.slice/b.service"
    assert unit_cgroup_path({"memory": "/x"}) == "/"
    assert unit_properties({"memory_high": "48M", "memory_max": "64M", "cpu_pct": 50}) == [
        "MemoryHigh=50331648",
        "MemoryMax=67108864",
        "CPUQuota=50%",
    ]
    assert unit_properties({"cpu_pct": 0.2}) == ["CPUQuota=1%"]
    assert unit_properties({"cpu_pct": 250}) == ["CPUQuota=250%"]


@pytest.mark.asyncio
async def test_cgroup_limit_outside_a_unit_fails_clearly(tmp_path: Path, children: Children) -> None:
    sc, log = recorder(tmp_path, "systemctl")
    p = children.start(["/bin/sleep", "30"])  # in our own cgroup: no unit of its own
    s = PlaybookSettings(systemctl=(sc,))
    res = await act("cgroup_limit", {"target": {"pid": p.pid}, "memory_max": "64M"}, ctx(s))
    assert not res.ok
    assert f"pid {p.pid}" in res.detail
    assert "cgroup_direct_write" in res.detail or "own unit" in res.detail
    assert not calls(log)


@pytest.fixture
def unit_cgroup(children: Children) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """A sleeping child in a cgroup shaped like a system unit's: /heald-test.slice/heald-test-PID.service."""
    v2 = cgroup_v2_root("")
    if os.geteuid() != 0 or v2 is None or not os.access(v2, os.W_OK):
        pytest.skip("needs root and a writable cgroup v2 hierarchy")
    unit = f"heald-test-{os.getpid()}.service"
    slice_dir = v2 / "heald-test.slice"
    cg = slice_dir / unit
    cg.mkdir(parents=True)
    p = children.start(["/bin/sleep", "30"])
    try:
        (cg / "cgroup.procs").write_text(str(p.pid))
        yield p, unit
    finally:
        p.kill()
        p.wait()
        cg.rmdir()
        with contextlib.suppress(OSError):
            slice_dir.rmdir()


@pytest.mark.root
@pytest.mark.asyncio
async def test_cgroup_limit_asks_systemd_for_the_unit(
    tmp_path: Path, unit_cgroup: tuple[subprocess.Popen[bytes], str]
) -> None:
    p, unit = unit_cgroup
    sc, log = recorder(tmp_path, "systemctl")
    s = PlaybookSettings(systemctl=(sc, "--no-ask-password"))
    params = {"target": {"pid": p.pid}, "memory_high": "48M", "memory_max": "64M", "cpu_pct": 50}
    argv = ["set-property", "--runtime", unit, "MemoryHigh=50331648", "MemoryMax=67108864", "CPUQuota=50%"]
    dry = await act("cgroup_limit", params, ctx(s, dry=True))
    assert dry.ok, dry.detail
    assert dry.detail.endswith(f"would run: {sc} --no-ask-password {' '.join(argv)}")
    assert not calls(log)
    res = await act("cgroup_limit", params, ctx(s))
    assert res.ok, res.detail
    assert res.changed
    assert res.data["unit"] == unit
    assert calls(log) == [["--no-ask-password", *argv]]
    # the unit path wins over cgroup_direct_write: cgroupfs is never written for a unit
    res = await act(
        "cgroup_limit",
        {"target": {"pid": p.pid}, "cpu_pct": 10},
        ctx(PlaybookSettings(systemctl=(sc,), cgroup_direct_write=True)),
    )
    assert res.ok, res.detail
    assert calls(log)[-1] == ["set-property", "--runtime", unit, "CPUQuota=10%"]
    bad, _ = recorder(tmp_path, "systemctl-denied", "Interactive authentication required.", rc=1)
    res = await act("cgroup_limit", params, ctx(PlaybookSettings(systemctl=(bad,))))
    assert not res.ok
    assert "Interactive authentication required" in res.detail


def test_recorder_is_executable(tmp_path: Path) -> None:
    sc, _ = recorder(tmp_path, "x")
    assert os.stat(sc).st_mode & stat.S_IXUSR
