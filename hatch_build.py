"""Hatch build hook: compile heald's native scoring kernels (``agent/native/*.c``).

The kernels are plain C99 with no Python API, loaded with ctypes, so the wheel is tagged
``py3-none-<platform>``. The C files of :data:`SOURCES` (with their shared header
``agent/native/kernels.h``) are compiled and linked in one compiler call into one library,
written next to them (``agent/native/``), where an editable install finds it too; rebuild it
there with ``HEALD_REQUIRE_KERNELS=1 python3 -m pip install --no-deps --no-build-isolation -e .``.
Without a C compiler the build goes on without it and heald scores with its numpy path (about
3x the CPU per sample, see bench/pipeline_cost.py), unless ``HEALD_REQUIRE_KERNELS=1`` (CI and
packaging/build-deb) makes a failed compile fail the build. ``CC`` and ``CFLAGS`` are honoured.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sysconfig
from pathlib import Path
from typing import Any

from hatchling.builders.hooks.plugin.interface import BuildHookInterface

# One file per scoring step (kernels.h says which); kernels.c holds the ABI version.
SOURCES = ("agent/native/kernels.c", "agent/native/window.c", "agent/native/trend.c",
           "agent/native/detector.c", "agent/native/classifier.c")
LIB = "agent/native/libheald_kernels.so"


def compile_kernels(root: Path) -> Path:
    """Compile ``SOURCES`` into ``LIB`` under ``root`` (atomically); return the library's path."""
    cc = shlex.split(os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc")
    cflags = shlex.split(os.environ.get("CFLAGS", ""))
    out = root / LIB
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    cmd = [*cc, "-O2", "-std=c99", "-Wall", "-Wextra", "-Werror", "-fPIC", "-shared", *cflags,
           "-o", str(tmp), *(str(root / src) for src in SOURCES), "-lm"]
    try:
        subprocess.run(cmd, check=True, stdin=subprocess.DEVNULL)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


class KernelsBuildHook(BuildHookInterface):  # type: ignore[type-arg]
    PLUGIN_NAME = "custom"

    def initialize(self, version: str, build_data: dict[str, Any]) -> None:
        if self.target_name != "wheel":
            return
        try:
            compile_kernels(Path(self.root))
        except (OSError, subprocess.CalledProcessError):
            if os.environ.get("HEALD_REQUIRE_KERNELS") == "1":
                raise
            return
        build_data["pure_python"] = False
        build_data["tag"] = "py3-none-" + sysconfig.get_platform().replace("-", "_").replace(".", "_")
        if version != "editable":
            build_data["artifacts"].append(f"/{LIB}")
