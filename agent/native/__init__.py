"""heald's native scoring kernels (``kernels.c``), loaded with ctypes.

Two hot paths of the score stage have a C twin here: the feature window's per-sample update
(:class:`agent.features.window.FeatureWindow`) and the forecaster's periodic trend fit
(:class:`agent.score.forecast.Forecaster`). The numpy code they port stays the reference: the
tests run both on the same inputs and require the same results, and it is what runs when the
library is missing (a build without a C compiler), stale (ABI mismatch), or switched off with
``HEALD_KERNELS=0`` in the daemon's environment. :func:`kernels` says which, once, in the log.

The C code receives raw pointers into numpy arrays owned by the calling object, which keeps them
alive and re-binds them whenever it reallocates one. It is plain C99 without the Python API,
so the library is independent of the Python version.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import structlog

ABI = 1  # must equal HEALD_KERNELS_ABI in kernels.c
LIB_PATH = Path(__file__).with_name("libheald_kernels.so")
ENV = "HEALD_KERNELS"

log = structlog.get_logger("heald.native")

_I64, _F64, _PTR = ctypes.c_int64, ctypes.c_double, ctypes.c_void_p


class FwCtx(ctypes.Structure):
    """``fw_ctx`` in kernels.c: the feature window's buffers, bound by the window."""

    _fields_ = [  # noqa: RUF012 - ctypes reads this class attribute by name
        ("g", _I64), ("ntrans", _I64), ("window", _I64),
        ("vbuf", _PTR), ("perm", _PTR), ("scale", _PTR), ("lo", _PTR), ("hi", _PTR),
        ("is_sum", _PTR), ("sign", _PTR), ("tsel", _PTR),
        ("x", _PTR), ("sums", _PTR), ("cring", _PTR), ("xref", _PTR), ("last", _PTR),
        ("tlast", _PTR), ("ewma", _PTR), ("out", _PTR),
        ("alpha", _F64), ("tiny", _F64),
    ]


class Kernels:
    """The loaded library's entry points, with their signatures declared."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        self.path = str(getattr(lib, "_name", LIB_PATH))
        self.fw_push = lib.heald_fw_push
        self.fw_push.argtypes = [ctypes.POINTER(FwCtx), _I64, _F64, _F64]
        self.fw_push.restype = ctypes.c_int
        self.trend_fit = lib.heald_trend_fit
        self.trend_fit.argtypes = [_PTR, _PTR, _PTR, _I64, _I64, _I64, _PTR, _PTR, _F64, _F64,
                                   _PTR, _PTR, _PTR]
        self.trend_fit.restype = ctypes.c_int


def ptr(arr: npt.NDArray[Any], dtype: type[np.generic]) -> int:
    """The address of ``arr``'s data, after checking what the C side will assume of it."""
    if arr.dtype != np.dtype(dtype) or not arr.flags.c_contiguous:
        raise TypeError(f"native kernels need a C-contiguous {np.dtype(dtype)} array, got "
                        f"{arr.dtype} (contiguous={arr.flags.c_contiguous})")
    return int(arr.ctypes.data)


_cache: dict[str, Kernels | None] = {}


def load(path: Path = LIB_PATH) -> Kernels | None:
    """Load and check the library at ``path``; None (and why, in the log) when it cannot be used."""
    if np.dtype(np.intp).itemsize != 8:
        log.info("native kernels off: they assume a 64-bit platform; scoring with numpy")
        return None
    if not path.exists():
        log.info("native kernels not built; scoring with numpy", path=str(path))
        return None
    try:
        lib = ctypes.CDLL(str(path))
        abi = int(lib.heald_kernels_abi())
    except (OSError, AttributeError) as exc:
        log.warning("native kernels unusable; scoring with numpy", path=str(path), error=str(exc))
        return None
    if abi != ABI:
        log.warning("native kernels are a stale build; scoring with numpy (rebuild: pip install .)",
                    path=str(path), abi=abi, expected=ABI)
        return None
    return Kernels(lib)


def kernels() -> Kernels | None:
    """The process-wide kernels, or None when the numpy path must run (see the module doc)."""
    key = os.environ.get(ENV, "1")
    if key not in _cache:
        if key == "0":
            log.info("native kernels switched off; scoring with numpy", env=f"{ENV}=0")
            _cache[key] = None
        else:
            _cache[key] = load()
    return _cache[key]
