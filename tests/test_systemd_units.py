"""The systemd units, the action helper, sysusers/tmpfiles, the polkit rule and `heald install-units`.

systemd is installed here but is not PID 1, so the units are checked offline:

* ``systemd-analyze verify --root=R`` loads a unit the way PID 1 would, including that every
  ``ExecStart=`` binary exists and is executable -- looked up *below R*. R is a throwaway root
  holding a copy of the host's own units (sysinit.target & co.), stand-in executables at the
  packaged paths (/usr/bin/heald, /usr/bin/heald-coordinator, /bin/kill) and the real
  heald-action helper. verify exits 0 even for an unknown key, so its output must be empty too.
* ``systemd-analyze security --offline=true`` rates heald.service; the bar is exposure <= 3.0.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from agent.decide.settings import PlaybookSettings
from agent.runtime.units import helper_for

TOP = Path(__file__).resolve().parents[1]
SYSTEMD = TOP / "systemd"
ACTION = TOP / "packaging" / "heald-action"
UNITS = ("heald.service", "heald-coordinator.service", "heald-action@.service")
ANALYZE = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(ANALYZE is None,
                                   reason="systemd-analyze is not installed (apt-get install systemd)")
MAX_EXPOSURE = 3.0


def host_unit_dir() -> Path:
    for d in ("/usr/lib/systemd/system", "/lib/systemd/system"):
        if Path(d, "sysinit.target").exists():
            return Path(d)
    pytest.skip("the host has no systemd unit directory with sysinit.target")


def _exe(path: Path, text: str = "#!/bin/sh\nexit 0\n") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(0o755)


def fake_root(tmp_path: Path) -> Path:
    """A root that systemd-analyze verify --root can load heald's units from."""
    root = tmp_path / "root"
    shutil.copytree(host_unit_dir(), root / "usr/lib/systemd/system", symlinks=True)
    (root / "bin").symlink_to("usr/bin")
    (root / "sbin").symlink_to("usr/sbin")
    (root / "lib").symlink_to("usr/lib")
    for name in ("heald", "heald-coordinator", "kill"):
        _exe(root / "usr/bin" / name)
    _exe(root / "usr/lib/heald/heald-action", ACTION.read_text())
    return root


def verify(root: Path, unit_path: Path) -> subprocess.CompletedProcess[str]:
    assert ANALYZE is not None
    return subprocess.run([ANALYZE, "verify", f"--root={root}", "--man=no", str(unit_path)],
                          capture_output=True, text=True, timeout=120, check=False)


@needs_analyze
@pytest.mark.parametrize("unit", UNITS)
def test_unit_verifies(tmp_path: Path, unit: str) -> None:
    root = fake_root(tmp_path)
    dest = root / "etc/systemd/system" / unit
    dest.parent.mkdir(parents=True)
    shutil.copy(SYSTEMD / unit, dest)
    result = verify(root, dest)
    assert result.returncode == 0, result.stderr
    # verify only warns (exit 0) about unknown keys, bad values, missing binaries: none allowed.
    assert (result.stdout + result.stderr).strip() == "", result.stdout + result.stderr


@needs_analyze
def test_verify_catches_a_bad_unit(tmp_path: Path) -> None:
    """The check above is not vacuous: a typo and a missing binary are both reported."""
    root = fake_root(tmp_path)
    dest = root / "etc/systemd/system/heald.service"
    dest.parent.mkdir(parents=True)
    text = (SYSTEMD / "heald.service").read_text().replace("NoNewPrivileges=yes", "NoNewPrivilege=yes")
    dest.write_text(text)
    (root / "usr/bin/heald").unlink()
    result = verify(root, dest)
    out = result.stdout + result.stderr
    assert "NoNewPrivilege" in out
    assert "/usr/bin/heald" in out


def exposure(unit: Path) -> tuple[float, str, str]:
    assert ANALYZE is not None
    result = subprocess.run([ANALYZE, "security", "--offline=true", "--no-pager", str(unit)],
                            capture_output=True, text=True, timeout=120, check=False)
    m = re.search(r"Overall exposure level for \S+: ([0-9.]+) (\w+)", result.stdout + result.stderr)
    assert m, result.stdout + result.stderr
    return float(m.group(1)), m.group(2), result.stdout


@needs_analyze
def test_heald_service_exposure(capsys: pytest.CaptureFixture[str]) -> None:
    figure, rating, report = exposure(SYSTEMD / "heald.service")
    with capsys.disabled():  # shown in the CI log whatever -s says
        sys.stderr.write(f"\n[systemd-analyze security] heald.service: exposure {figure} {rating}\n")
    assert figure <= MAX_EXPOSURE, report
    assert rating == "OK", report


@needs_analyze
def test_other_units_exposure(capsys: pytest.CaptureFixture[str]) -> None:
    for unit, bar in (("heald-coordinator.service", 2.0), ("heald-action@.service", 5.0)):
        figure, rating, report = exposure(SYSTEMD / unit)
        with capsys.disabled():
            sys.stderr.write(f"\n[systemd-analyze security] {unit}: exposure {figure} {rating}\n")
        assert figure <= bar, report


def _directives(unit: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in (SYSTEMD / unit).read_text().splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            k, _, v = line.partition("=")
            out.setdefault(k.strip(), []).append(v.strip())
    return out


def test_heald_service_contract() -> None:
    d = _directives("heald.service")
    assert d["Type"] == ["notify"]
    assert d["NotifyAccess"] == ["main"]
    assert d["ExecStart"] == ["/usr/bin/heald run --config /etc/heald/agent.toml"]
    assert d["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert d["WatchdogSec"] == ["30"]
    assert d["User"] == ["heald"]
    assert d["NoNewPrivileges"] == ["yes"]
    assert d["ProtectSystem"] == ["strict"]
    assert d["OOMScoreAdjust"] == ["-900"]
    caps = set(d["CapabilityBoundingSet"][0].split())
    assert caps == set(d["AmbientCapabilities"][0].split())
    assert "CAP_SYS_ADMIN" not in caps
    assert "CAP_KILL" in caps
    assert "CAP_SYS_NICE" in caps
    assert "CAP_NET_ADMIN" in caps  # block_address (nft, heald's own table)
    # The clean action's roots (playbooks.clean_roots defaults) are writable.
    writable = {p.lstrip("-") for p in d["ReadWritePaths"][0].split()}
    assert set(PlaybookSettings().clean_roots) <= writable


# --- the action helper ----------------------------------------------------------------------

@pytest.mark.parametrize(("name", "expected"), [
    ("drop-caches", "echo 3 > /proc/sys/vm/drop_caches"),
    ("gpu-reset-0", "nvidia-smi --gpu-reset -i 0"),
    ("gpu-reset-63", "nvidia-smi --gpu-reset -i 63"),
    ("gpu-drain-7", "nvidia-smi drain -p"),
    ("gpu-drain-7", "-m 1"),
    ("gpu-undrain-7", "nvidia-smi drain -p"),
    ("gpu-undrain-0", "-m 0"),
    ("sysctl-conntrack-max-262144", "echo 262144 > /proc/sys/net/netfilter/nf_conntrack_max"),
    ("sysctl-file-max-16777216", "echo 16777216 > /proc/sys/fs/file-max"),
    ("sysctl-pid-max-4194304", "echo 4194304 > /proc/sys/kernel/pid_max"),
    ("sysctl-threads-max-200000", "echo 200000 > /proc/sys/kernel/threads-max"),
])
def test_action_allows(name: str, expected: str) -> None:
    result = subprocess.run([str(ACTION), "--dry-run", name], capture_output=True, text=True,
                            timeout=30, check=False)
    assert result.returncode == 0, result.stderr
    assert expected in result.stdout


@pytest.mark.parametrize("name", [
    "", "drop-caches;id", "drop-caches ", " drop-caches", "drop_caches", "DROP-CACHES",
    "gpu-reset-", "gpu-reset-64", "gpu-reset-01", "gpu-reset--1", "gpu-reset-1\n", "gpu-reset-1 2",
    "gpu-reset-$(id)", "gpu-reset-`id`", "../../bin/sh", "gpu-drain-x", "gpu-undrain-64",
    "gpu-undrain-01", "gpu-redrain-0", "gpu-drain-undrain-0", "--dry-run",
    # raise_limit's tables: only the four, a decimal without a leading zero, at most the ceiling
    "sysctl-file-max-0", "sysctl-file-max-01000", "sysctl-file-max-", "sysctl-file-max--5",
    "sysctl-file-max-1e9", "sysctl-file-max-12345678901", "sysctl-pid-max-4194305",
    "sysctl-conntrack-max-16777217", "sysctl-vm.drop_caches-3", "sysctl-drop-caches-3",
    "sysctl-file-max-2 ", "sysctl-file-max-$(id)", "sysctl-../../fs/file-max-9",
])
def test_action_rejects(tmp_path: Path, name: str) -> None:
    # A poisoned PATH proves nothing runs: the helper resets PATH, and rejects before running.
    marker = tmp_path / "ran"
    for tool in ("nvidia-smi", "sync", "id", "sh"):
        _exe(tmp_path / "bin" / tool, f"#!/bin/sh\ntouch {marker}\n")
    env = {**os.environ, "PATH": f"{tmp_path / 'bin'}:{os.environ.get('PATH', '')}"}
    result = subprocess.run([str(ACTION), name], capture_output=True, text=True, timeout=30,
                            env=env, check=False)
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert not marker.exists()


def test_action_rejects_extra_arguments() -> None:
    for argv in ([], ["drop-caches", "gpu-reset-0"], ["--dry-run"], ["--dry-run", "x", "y"]):
        result = subprocess.run([str(ACTION), *argv], capture_output=True, text=True, timeout=30, check=False)
        assert result.returncode == 2, argv


# --- sysusers.d / tmpfiles.d ----------------------------------------------------------------

@pytest.mark.skipif(shutil.which("systemd-sysusers") is None or shutil.which("systemd-tmpfiles") is None,
                    reason="systemd-sysusers/systemd-tmpfiles are not installed")
def test_sysusers_and_tmpfiles(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    shutil.copytree(SYSTEMD / "sysusers.d", root / "usr/lib/sysusers.d")
    shutil.copytree(SYSTEMD / "tmpfiles.d", root / "usr/lib/tmpfiles.d")
    subprocess.run(["systemd-sysusers", f"--root={root}"], check=True, capture_output=True, timeout=60)
    passwd = {line.split(":")[0]: line.split(":") for line in (root / "etc/passwd").read_text().splitlines()}
    assert "heald" in passwd
    uid = int(passwd["heald"][2])
    assert passwd["heald"][6] == "/usr/sbin/nologin"
    subprocess.run(["systemd-tmpfiles", f"--root={root}", "--create", "heald.conf"], check=True,
                   capture_output=True, timeout=60)
    state = (root / "var/lib/heald").stat()
    assert state.st_uid == uid
    assert oct(state.st_mode & 0o777) == oct(0o750)
    assert (root / "etc/heald/conf.d").is_dir()
    assert (root / "etc/heald/playbooks.d").is_dir()


# --- polkit rule ----------------------------------------------------------------------------

POLKIT_HARNESS = """
const fs = require("fs");
let rule;
const polkit = {Result: {YES: "yes", NO: "no", NOT_HANDLED: "not_handled"}, addRule: (f) => { rule = f; }};
eval(fs.readFileSync(process.argv[2], "utf8"));
const cases = JSON.parse(process.argv[3]);
const out = cases.map(([id, user, verb, unit]) => rule(
    {id: id, lookup: (k) => ({verb: verb, unit: unit})[k]}, {user: user}));
console.log(JSON.stringify(out));
"""


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed to evaluate the polkit rule")
def test_polkit_rule(tmp_path: Path) -> None:
    manage = "org.freedesktop.systemd1.manage-units"
    cases = [
        ([manage, "heald", "restart", "nginx.service"], "yes"),
        ([manage, "heald", "try-restart", "nginx.service"], "yes"),
        ([manage, "heald", "reset-failed", "nginx.service"], "yes"),
        ([manage, "heald", "set-property", "batch.slice"], "yes"),
        ([manage, "heald", "start", "heald-action@drop-caches.service"], "yes"),
        ([manage, "heald", "start", "heald-action@gpu-reset-0.service"], "yes"),
        ([manage, "heald", "start", "nginx.service"], "not_handled"),
        ([manage, "heald", "start", "heald-action@x.service.d/../evil.service"], "not_handled"),
        ([manage, "heald", "stop", "sshd.service"], "not_handled"),
        ([manage, "alice", "restart", "nginx.service"], "not_handled"),
        (["org.freedesktop.systemd1.manage-unit-files", "heald", "enable", "x.service"], "not_handled"),
        (["org.freedesktop.login1.reboot", "heald", None, None], "not_handled"),
    ]
    harness = tmp_path / "harness.js"
    harness.write_text(POLKIT_HARNESS)
    result = subprocess.run(["node", str(harness), str(SYSTEMD / "polkit/60-heald.rules"),
                             json.dumps([c for c, _ in cases])],
                            capture_output=True, text=True, timeout=60, check=True)
    assert json.loads(result.stdout) == [want for _, want in cases]


# --- heald install-units --------------------------------------------------------------------

def install_units(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "agent", "install-units", *args],
                          capture_output=True, text=True, timeout=120, cwd=TOP, check=False)


def test_install_units_dry_run_writes_nothing(tmp_path: Path) -> None:
    _exe(tmp_path / "target/opt/venv/bin/heald")
    result = install_units("--root", str(tmp_path / "target"), "--executable", "/opt/venv/bin/heald",
                           "--dry-run", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["dry_run"] is True
    assert {f["status"] for f in report["files"]} == {"new"}
    assert not (tmp_path / "target/etc").exists()


@needs_analyze
def test_install_units_then_verify(tmp_path: Path) -> None:
    root = fake_root(tmp_path)
    (root / "usr/bin/heald").unlink()
    _exe(root / "opt/venv/bin/heald")
    result = install_units("--root", str(root), "--executable", "/opt/venv/bin/heald")
    assert result.returncode == 0, result.stderr
    assert "Nothing was started or enabled" in result.stdout
    unit = root / "etc/systemd/system/heald.service"
    text = unit.read_text()
    assert "ExecStart=/opt/venv/bin/heald run --config /etc/heald/agent.toml" in text
    action_unit = (root / "etc/systemd/system/heald-action@.service").read_text()
    assert "ExecStart=/usr/local/lib/heald/heald-action %i" in action_unit
    assert os.access(root / "usr/local/lib/heald/heald-action", os.X_OK)
    assert (root / "etc/sysusers.d/heald.conf").is_file()
    assert (root / "etc/polkit-1/rules.d/60-heald.rules").is_file()
    assert not (root / "etc/systemd/system/heald-coordinator.service").exists()
    for name in ("heald.service", "heald-action@.service"):
        v = verify(root, root / "etc/systemd/system" / name)
        assert v.returncode == 0, v.stderr
        assert not v.stderr.strip(), v.stderr
    assert (root / "etc/heald/agent.toml").read_bytes() == (TOP / "packaging/agent.toml").read_bytes()
    (root / "etc/heald/agent.toml").write_text("[mqtt]\nenabled = true\n")  # the operator's edit
    again = install_units("--root", str(root), "--executable", "/opt/venv/bin/heald", "--json")
    statuses = {f["source"]: f["status"] for f in json.loads(again.stdout)["files"]}
    assert statuses.pop("agent.toml") == "kept"
    assert set(statuses.values()) == {"unchanged"}
    assert (root / "etc/heald/agent.toml").read_text() == "[mqtt]\nenabled = true\n"


def test_install_units_refuses_home_and_missing(tmp_path: Path) -> None:
    result = install_units("--root", str(tmp_path), "--executable", "/home/alice/.local/bin/heald")
    assert result.returncode == 2
    assert "ProtectHome" in result.stderr
    result = install_units("--root", str(tmp_path), "--executable", "/opt/nope/heald")
    assert result.returncode == 2
    assert "not an executable file" in result.stderr
    assert not any(tmp_path.iterdir())


def test_install_units_coordinator_when_present(tmp_path: Path) -> None:
    _exe(tmp_path / "opt/venv/bin/heald")
    _exe(tmp_path / "opt/venv/bin/heald-coordinator")
    result = install_units("--root", str(tmp_path), "--executable", "/opt/venv/bin/heald")
    assert result.returncode == 0, result.stderr
    text = (tmp_path / "etc/systemd/system/heald-coordinator.service").read_text()
    assert "ExecStart=/opt/venv/bin/heald-coordinator --config /etc/heald/coordinator.toml" in text


def test_install_units_points_the_helper_at_this_heald(tmp_path: Path) -> None:
    """heald-action's leakscan-* run heald's own scan with the interpreter next to heald's real
    path; for a heald installed elsewhere than /usr/bin or /usr/local/bin (a venv under /opt), the
    helper that install-units writes must find that one, not report "no heald installation"."""
    venv = tmp_path / "opt" / "venv" / "bin"
    exe = venv / "heald"
    _exe(exe)
    (venv / "python3").symlink_to(sys.executable)
    target = tmp_path / "target"
    _exe(target / str(exe).lstrip("/"))
    result = install_units("--root", str(target), "--executable", str(exe))
    assert result.returncode == 0, result.stderr
    helper = target / "usr/local/lib/heald/heald-action"
    shown = subprocess.run([str(helper), "--dry-run", "leakscan-file"], capture_output=True, text=True,
                           timeout=30, check=False)
    assert shown.returncode == 0, shown.stderr
    assert shlex.split(shown.stdout)[:5] == [str(venv / "python3"), "-I", "-m", "agent.act.procscan",
                                             "files"], shown.stdout
    # the packaged helper is unchanged for the packaged heald
    shipped = (TOP / "packaging/heald-action").read_text()
    assert helper_for(shipped, "/usr/bin/heald") == shipped
