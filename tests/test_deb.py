"""The Debian package: control data, layout, conffiles, and a bundled venv that runs where it lies.

Builds dist/heald_<version>_<arch>.deb with packaging/build-deb (a few minutes: the scientific
wheels are large), or takes a prebuilt one from $HEALD_DEB so CI builds it once. The package is
never installed on this machine: it is unpacked with `dpkg -x` into a throwaway root, and the
venv must run from there (/opt/heald is not hard-coded into its scripts).
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest

from agent import __version__

TOP = Path(__file__).resolve().parents[1]
pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(1800),  # the first test also pays for building the package
    pytest.mark.skipif(shutil.which("dpkg-deb") is None or shutil.which("dpkg") is None,
                       reason="dpkg-deb is not installed (apt-get install dpkg-dev)"),
]
TARGET_PYTHON = Path("/usr/bin/python3.11")


@dataclass(frozen=True)
class Built:
    deb: Path
    out_dir: Path
    log: str


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    prebuilt = os.environ.get("HEALD_DEB")
    if prebuilt:
        deb = Path(prebuilt)
        assert deb.is_file(), f"HEALD_DEB={prebuilt} does not exist"
        return Built(deb, deb.parent, "")
    if not TARGET_PYTHON.exists():
        pytest.skip(f"{TARGET_PYTHON} (the package's target interpreter) is not on this machine")
    out = tmp_path_factory.mktemp("dist")
    result = subprocess.run([str(TOP / "packaging/build-deb"), "--coordinator", "--out", str(out)],
                            capture_output=True, text=True, timeout=1700, check=False)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    arch = subprocess.run(["dpkg", "--print-architecture"], capture_output=True, text=True,
                          check=True).stdout.strip()
    deb = out / f"heald_{__version__}_{arch}.deb"
    assert deb.is_file(), result.stderr[-4000:]
    return Built(deb, out, result.stdout + result.stderr)


@pytest.fixture(scope="module")
def root(built: Built, tmp_path_factory: pytest.TempPathFactory) -> Path:
    r = tmp_path_factory.mktemp("root")
    subprocess.run(["dpkg", "-x", str(built.deb), str(r)], check=True, timeout=600)
    return r


def field(deb: Path, name: str) -> str:
    return subprocess.run(["dpkg-deb", "--field", str(deb), name], capture_output=True, text=True,
                          check=True, timeout=60).stdout.strip()


def contents(deb: Path) -> dict[str, tuple[str, str, str]]:
    """path -> (mode string, owner/group, link target or '')."""
    out = subprocess.run(["dpkg-deb", "-c", str(deb)], capture_output=True, text=True, check=True,
                         timeout=120).stdout
    entries = {}
    for line in out.splitlines():
        parts = line.split(None, 5)
        mode, owner, name = parts[0], parts[1], parts[5]
        target = ""
        if " -> " in name:
            name, target = name.split(" -> ", 1)
        entries[name.removeprefix(".").rstrip("/") or "/"] = (mode, owner, target)
    return entries


def test_control_fields(built: Built) -> None:
    info = subprocess.run(["dpkg-deb", "-I", str(built.deb)], capture_output=True, text=True,
                          check=True, timeout=60).stdout
    assert "Package: heald" in info
    assert field(built.deb, "Version") == __version__
    arch = subprocess.run(["dpkg", "--print-architecture"], capture_output=True, text=True,
                          check=True).stdout.strip()
    assert field(built.deb, "Architecture") == arch
    depends = field(built.deb, "Depends")
    assert "python3.11" in depends
    assert "systemd" in depends
    assert "polkitd" in field(built.deb, "Recommends")
    assert re.fullmatch(r".+ <[^>]+>", field(built.deb, "Maintainer"))
    assert int(field(built.deb, "Installed-Size")) > 1000
    assert "systemctl enable --now heald" in field(built.deb, "Description")
    for script in ("postinst", "prerm", "postrm"):
        assert re.search(rf"\b{script}\b", info), script


def test_conffiles(built: Built, tmp_path: Path) -> None:
    subprocess.run(["dpkg-deb", "-e", str(built.deb), str(tmp_path / "DEBIAN")], check=True, timeout=60)
    assert (tmp_path / "DEBIAN/conffiles").read_text().split() == ["/etc/heald/agent.toml"]
    for script in ("postinst", "prerm", "postrm"):
        mode = (tmp_path / "DEBIAN" / script).stat().st_mode
        assert mode & stat.S_IXUSR, script
    postinst = (tmp_path / "DEBIAN/postinst").read_text()
    # Debian practice: nothing is enabled or started without the operator.
    code = "\n".join(line for line in postinst.splitlines()
                     if not line.lstrip().startswith(("#", "echo ")))  # comments and the advice printed
    assert not re.search(r"systemctl\s+(--\S+\s+)*(enable|start|restart)\b", code)
    assert not re.search(r"deb-systemd-(helper|invoke)\s+(enable|start)", code)
    assert "systemd-sysusers" in code
    assert "update-state" in code
    postrm = (tmp_path / "DEBIAN/postrm").read_text()
    assert "rm -rf /var/lib/heald" in postrm


def test_layout(built: Built) -> None:
    files = contents(built.deb)
    for path in (
        "/opt/heald/bin/heald", "/opt/heald/pyvenv.cfg",
        "/lib/systemd/system/heald.service", "/lib/systemd/system/heald-action@.service",
        "/usr/lib/sysusers.d/heald.conf", "/usr/lib/tmpfiles.d/heald.conf",
        "/usr/share/polkit-1/rules.d/60-heald.rules", "/usr/lib/heald/heald-action",
        "/etc/heald/agent.toml", "/etc/heald/conf.d", "/etc/heald/playbooks.d",
        "/usr/share/heald/remediations", "/usr/share/doc/heald/copyright",
        "/usr/share/doc/heald/examples/mosquitto-acl.example",
    ):
        assert path in files, path
    assert files["/usr/bin/heald"][0].startswith("l")
    assert files["/usr/bin/heald"][2] == "/opt/heald/bin/heald"
    assert files["/opt/heald/bin/python3.11"][2] == "/usr/bin/python3.11"
    assert files["/usr/lib/heald/heald-action"][0] == "-rwxr-xr-x"
    assert files["/lib/systemd/system/heald.service"][0] == "-rw-r--r--"
    assert files["/etc/heald/agent.toml"][0] == "-rw-r--r--"
    assert {owner for _, owner, _ in files.values()} == {"root/root"}
    # The service runs as user heald: everything must be world-readable, nothing group/world-writable.
    for path, (mode, _, _) in files.items():
        if mode.startswith("l"):
            continue
        assert mode[7] == "r", (path, mode)
        assert mode[5] == "-", (path, mode)
        assert mode[8] == "-", (path, mode)
    assert not any("/tests/" in p for p in files), "dependency test suites should be stripped"
    assert not any(p.startswith("/opt/heald/bin/pip") for p in files)
    library = TOP / "remediations"
    shipped = {str(p.relative_to(library)) for p in library.rglob("*") if p.is_file()}
    packaged = {p.removeprefix("/usr/share/heald/remediations/") for p in files
                if p.startswith("/usr/share/heald/remediations/") and files[p][0].startswith("-")}
    assert shipped <= packaged


def test_packaged_files_match_the_tree(root: Path) -> None:
    for src, dest in (("systemd/heald.service", "lib/systemd/system/heald.service"),
                      ("systemd/heald-action@.service", "lib/systemd/system/heald-action@.service"),
                      ("packaging/heald-action", "usr/lib/heald/heald-action"),
                      ("packaging/agent.toml", "etc/heald/agent.toml"),
                      ("systemd/polkit/60-heald.rules", "usr/share/polkit-1/rules.d/60-heald.rules")):
        assert (root / dest).read_bytes() == (TOP / src).read_bytes(), dest


def _needs_target_python() -> None:
    if not TARGET_PYTHON.exists():
        pytest.skip(f"the unpacked venv runs on {TARGET_PYTHON}, which this machine lacks")


def test_venv_runs_from_the_unpacked_tree(root: Path) -> None:
    _needs_target_python()
    heald = root / "opt/heald/bin/heald"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV", "HEALD_"))}
    version = subprocess.run([str(heald), "--version"], capture_output=True, text=True, timeout=120,
                             env=env, check=False)
    assert version.returncode == 0, version.stderr
    assert version.stdout.strip() == f"heald {__version__}"
    check = subprocess.run([str(heald), "check", "--config", str(root / "etc/heald/agent.toml")],
                           capture_output=True, text=True, timeout=300, env=env, check=False)
    assert check.returncode == 0, check.stdout + check.stderr
    # It is the bundled venv that runs, not this checkout or the test interpreter's packages.
    where = subprocess.run([str(root / "opt/heald/bin/python3"), "-c",
                            "import agent, sys; print(agent.__file__); print(sys.prefix)"],
                           capture_output=True, text=True, timeout=120, env=env, cwd="/", check=True)
    agent_file, prefix = where.stdout.split()
    assert agent_file.startswith(str(root / "opt/heald/lib/"))
    assert prefix == str(root / "opt/heald")
    # The package carries the native scoring kernels, and they load from the unpacked tree.
    kern = subprocess.run([str(root / "opt/heald/bin/python3"), "-c",
                           "import agent.native as n; k = n.load(); print(k.path if k else 'none')"],
                          capture_output=True, text=True, timeout=120, env=env, cwd="/", check=True)
    assert kern.stdout.strip().startswith(str(root / "opt/heald/lib/")), kern.stdout + kern.stderr


def test_no_file_names_the_build_directory(root: Path) -> None:
    cfg = (root / "opt/heald/pyvenv.cfg").read_text()
    assert "home = /usr/bin" in cfg
    assert re.search(r"^command = .* /opt/heald$", cfg, re.MULTILINE), cfg
    for script in (root / "opt/heald/bin").iterdir():
        if script.is_symlink() or not script.is_file():
            continue
        head = script.read_bytes()[:200]
        assert head.startswith(b"#!/bin/sh\n'''exec' "), script


def test_model_fitting_works_without_writable_executable_memory(root: Path, tmp_path: Path) -> None:
    """heald.service sets MemoryDenyWriteExecute=yes: numpy/OpenBLAS, scikit-learn and ctypes
    must work under it. The kernel's PR_SET_MDWE (Linux >= 6.3) enforces the same rule."""
    _needs_target_python()
    probe = tmp_path / "mdwe.py"
    probe.write_text(
        "import ctypes, mmap, sys\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        "if libc.prctl(65, 1, 0, 0, 0) != 0:\n"  # PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN
        "    sys.exit(77)\n"
        "try:\n"
        "    mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)\n"
        "    sys.exit('W+X mapping was allowed: MDWE not in force')\n"
        "except OSError:\n"
        "    pass\n"
        "import numpy as np\n"
        "a = np.random.default_rng(0).random((200, 200)); assert (a @ a).shape == (200, 200)\n"
        "from sklearn.cluster import KMeans\n"
        "KMeans(n_clusters=3, n_init=2).fit(a)\n"
        "cb = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int)(lambda x: x + 1)\n"
        "assert cb(41) == 42\n"
        "import agent.cli, agent.runtime.prometheus, pynvml\n"
        "print('ok')\n")
    result = subprocess.run([str(root / "opt/heald/bin/python3"), str(probe)], capture_output=True,
                            text=True, timeout=300, check=False)
    if result.returncode == 77:
        pytest.skip("this kernel has no PR_SET_MDWE (Linux < 6.3)")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_packaged_units_verify_against_the_package(root: Path, tmp_path: Path) -> None:
    """verify --root resolves /usr/bin/heald -> /opt/heald/bin/heald inside the unpacked tree."""
    vroot = tmp_path / "vroot"
    shutil.copytree(root, vroot, symlinks=True)
    host_units = next(Path(d) for d in ("/usr/lib/systemd/system", "/lib/systemd/system")
                      if Path(d, "sysinit.target").exists())
    shutil.copytree(host_units, vroot / "usr/lib/systemd/system", symlinks=True, dirs_exist_ok=True)
    kill = vroot / "bin/kill"
    kill.parent.mkdir(parents=True, exist_ok=True)
    kill.write_text("#!/bin/sh\n")
    kill.chmod(0o755)
    for unit in ("heald.service", "heald-action@.service"):
        result = subprocess.run(["systemd-analyze", "verify", f"--root={vroot}", "--man=no",
                                 str(vroot / "lib/systemd/system" / unit)],
                                capture_output=True, text=True, timeout=120, check=False)
        assert result.returncode == 0, result.stderr
        assert not result.stderr.strip(), result.stderr


def test_coordinator_package_built_when_the_entry_point_exists(built: Built) -> None:
    if not built.log:
        pytest.skip("prebuilt package from $HEALD_DEB: the coordinator build was not run here")
    scripts = tomllib.loads((TOP / "pyproject.toml").read_text())["project"].get("scripts", {})
    debs = list(built.out_dir.glob("heald-coordinator_*.deb"))
    if "heald-coordinator" in scripts:
        assert len(debs) == 1, built.log[-3000:]
        files = contents(debs[0])
        assert "/lib/systemd/system/heald-coordinator.service" in files
        assert files["/usr/bin/heald-coordinator"][2] == "/opt/heald/bin/heald-coordinator"
        assert f"heald (= {__version__})" in field(debs[0], "Depends")
    else:
        assert debs == []
        assert "heald-coordinator: NOT built" in built.log


def test_build_log_reports_time_and_size(built: Built) -> None:
    if not built.log:
        pytest.skip("prebuilt package")
    assert re.search(r"done in \d+ s", built.log)
    sys.stderr.write(f"\n[build-deb] {built.deb.name}: {built.deb.stat().st_size / 2**20:.1f} MiB\n")
