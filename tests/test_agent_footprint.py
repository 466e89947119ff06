"""What the agent loads and reads, checked where it is decided: no optional import heald never uses,
no cryptography without command keys, no pynvml without NVIDIA's library, and an fd count that
is the kernel's own (the size of /proc/PID/fd) equal to the listing it replaces."""

from __future__ import annotations

import ctypes
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from agent.cli.base import NEVER_IMPORT
from agent.collect.limits import LimitCollector

ROOT = Path(__file__).resolve().parents[1]


def _modules_after(code: str) -> set[str]:
    """The modules (really imported, not blocked) after running ``code`` in a fresh interpreter."""
    probe = f"{code}\nimport sys\nprint(' '.join(m for m, v in sys.modules.items() if v is not None))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60,
                         cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, check=True)
    return set(out.stdout.split())


def test_the_daemon_imports_none_of_the_optional_modules_heald_never_uses() -> None:
    installed = [m for m in NEVER_IMPORT if importlib.util.find_spec(m) is not None]
    if not installed:
        pytest.skip(f"none of {NEVER_IMPORT} is installed here: nothing to keep out")
    # as `heald run` does: the command line first (its modules import structlog), then the daemon
    loaded = _modules_after("import agent.cli.main\nimport agent.runtime.daemon")
    assert not loaded & set(installed)


def test_no_command_keys_no_cryptography(tmp_path: Path) -> None:
    loaded = _modules_after(
        "from pathlib import Path\nfrom agent.control.keys import build_verifier\n"
        "from agent.control.settings import CoordinatorSettings\n"
        f"d = Path({str(tmp_path)!r})\n"
        "assert build_verifier(CoordinatorSettings(), node='n', site='s', state_dir=d) is None")
    assert "cryptography" not in loaded
    assert "agent.wire.signing" not in loaded


def test_gpu_collector_without_the_library_never_imports_pynvml() -> None:
    try:
        ctypes.CDLL("libnvidia-ml.so.1")
    except OSError:
        pass
    else:
        pytest.skip("this host has libnvidia-ml")
    loaded = _modules_after(
        "from agent.collect.gpu import GpuCollector\nfrom agent.errors import CollectorUnavailable\n"
        "try:\n    GpuCollector().start()\nexcept CollectorUnavailable as e:\n"
        "    assert 'no libnvidia-ml' in str(e), e\nelse:\n    raise SystemExit('started')")
    assert "pynvml" not in loaded


def test_fd_count_is_the_listing_of_the_process(tmp_path: Path) -> None:
    # A child close to its own RLIMIT_NOFILE (60 of 64): one of the processes the collector watches.
    code = ("import os, resource, sys\nresource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))\n"
            f"fds = [os.open({str(tmp_path)!r}, os.O_RDONLY) for _ in range(50)]\n"
            "print('ready', flush=True)\nsys.stdin.read()")
    with subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                          text=True) as child:
        _check_fd_count(child)


def _check_fd_count(child: subprocess.Popen[str]) -> None:
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "ready"
        listed = len(os.listdir(f"/proc/{child.pid}/fd"))
        c = LimitCollector()
        assert c._count_fds(str(child.pid)) == listed
        m = c.collect().metrics
        assert m[f"proc.fd.count[{child.pid}]"] == float(listed)
        assert m[f"proc.fd.headroom[{child.pid}]"] == float(64 - listed)
    finally:
        assert child.stdin is not None
        child.stdin.close()
        child.wait(timeout=10)
