"""heald's native scoring kernels (the C files beside this one), loaded with ctypes.

Every per-sample step of the score stage has a C twin here: the feature window's update
(``window.c``, :class:`agent.features.window.FeatureWindow`), the forecaster's periodic trend fit
(``trend.c``, :class:`agent.score.forecast.Forecaster`), the anomaly detector's score and
explanation (``detector.c``, :class:`agent.score.detector.StreamingDetector`) and the failure
classifier (``classifier.c``, :class:`agent.score.classifier.Scorer`); ``kernels.h`` declares the
structs mirrored below and the ABI version, and ``hatch_build.py`` links the files into the one
library :data:`LIB_PATH`. The numpy code they port stays the reference: the
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

import numpy as np
import numpy.typing as npt
import structlog

ABI = 6  # must equal HEALD_KERNELS_ABI in kernels.h
LIB_PATH = Path(__file__).with_name("libheald_kernels.so")
ENV = "HEALD_KERNELS"

log = structlog.get_logger("heald.native")

_I64, _F64, _PTR = ctypes.c_int64, ctypes.c_double, ctypes.c_void_p


class FwCtx(ctypes.Structure):
    """``fw_ctx`` in kernels.h: the feature window's buffers, bound by the window."""

    _fields_ = [
        ("g", _I64), ("ntrans", _I64), ("window", _I64),
        ("vbuf", _PTR), ("perm", _PTR), ("scale", _PTR), ("lo", _PTR), ("hi", _PTR),
        ("is_sum", _PTR), ("sign", _PTR), ("tsel", _PTR),
        ("x", _PTR), ("sums", _PTR), ("ring", _PTR), ("tring", _PTR), ("xref", _PTR), ("last", _PTR),
        ("tlast", _PTR), ("ewma", _PTR), ("out", _PTR),
        ("alpha", _F64), ("tiny", _F64), ("despike", _I64), ("dring", _PTR),
    ]


class DetCtx(ctypes.Structure):
    """``det_ctx`` in kernels.h: a streaming anomaly detector's model and state buffers."""

    _fields_ = [
        ("d", _I64), ("nc", _I64), ("npca", _I64), ("top_k", _I64),
        ("vec", _PTR), ("idx", _PTR), ("med", _PTR), ("inv_scale", _PTR), ("centroids", _PTR),
        ("c2", _PTR), ("pca_mean", _PTR), ("pca_w", _PTR), ("fac", _PTR), ("use", _PTR),
        ("x", _PTR), ("missing", _PTR), ("prev", _PTR), ("last_ref", _PTR), ("z", _PTR),
        ("km", _PTR), ("pc", _PTR), ("contrib", _PTR),
        ("has_prev", _I64), ("any_missing", _I64),
    ]


class TrendCtx(ctypes.Structure):
    """``trend_ctx`` in kernels.h: a forecaster's ring and per-window results."""

    _fields_ = [
        ("k", _I64), ("cap", _I64), ("pos", _I64), ("n", _I64), ("nspans", _I64), ("max_points", _I64),
        ("ring", _PTR), ("tring", _PTR), ("spans", _PTR), ("due", _PTR), ("sign", _PTR), ("limit", _PTR),
        ("min_points", _F64), ("max_eta", _F64), ("now", _F64), ("res", _PTR), ("best", _PTR),
    ]


class Kernels:
    """The loaded library's entry points, with their signatures declared."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        self.path = str(getattr(lib, "_name", LIB_PATH))
        self.fw_push = lib.heald_fw_push
        self.fw_push.argtypes = [ctypes.POINTER(FwCtx), _I64, _F64, _F64, _I64]
        self.fw_push.restype = ctypes.c_int
        self.trend_update = lib.heald_trend_update
        self.trend_update.argtypes = [ctypes.POINTER(TrendCtx)]
        self.trend_update.restype = ctypes.c_int
        self.fw_rebase = lib.heald_fw_rebase
        self.fw_rebase.argtypes = [ctypes.POINTER(FwCtx), _F64, _F64]
        self.fw_rebase.restype = ctypes.c_int
        self.det_score = lib.heald_det_score
        self.det_score.argtypes = [ctypes.POINTER(DetCtx)]
        self.det_score.restype = _F64
        self.det_explain = lib.heald_det_explain
        self.det_explain.argtypes = [ctypes.POINTER(DetCtx), _I64, _PTR]
        self.det_explain.restype = _I64
        self.clf_score = lib.heald_clf_score
        self.clf_score.argtypes = [_PTR, _PTR, _I64, _PTR, _PTR, _PTR, _PTR, _PTR, _I64, _PTR, _PTR]
        self.clf_score.restype = ctypes.c_int


def ptr(arr: npt.NDArray[np.generic], dtype: type[np.generic]) -> int:
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
