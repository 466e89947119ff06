"""The declared feature schema: which metrics feed the models, in which unit, with which transforms.

A model must know exactly what it was trained on, so the schema is data (a frozen msgspec
struct stored in every model artifact), not code. It lists *inputs*; each input is

* an exact metric key (``cpu.util_pct``, ``disk.used_pct[/]``), or
* a family with a wildcard label (``disk.used_pct[*]``) reduced over every label the node has
  *at each sample* with ``agg`` = ``max``, ``min`` or ``sum`` — label-agnostic, so a model trained
  on one host applies to another whose mounts or interfaces are named differently, or
* a wildcard with ``agg = "each"``: expanded by :meth:`FeatureSchema.resolve` at fit time into
  one exact input per label present then; the labels are then fixed in the schema.

Every input gets the same transforms over a sliding window of ``window`` samples (see
:mod:`agent.features.window`): ``value``, ``delta`` (change since the previous sample),
``rate`` (delta per second), ``ewma``, ``std`` (rolling standard deviation) and ``slope``
(least-squares trend, unit per second). A feature is named ``INPUT:TRANSFORM``, where INPUT is
the key for exact inputs and ``AGG(KEY)`` for reduced ones: ``cpu.util_pct:slope``,
``max(disk.used_pct[*]):slope`` (in %/s). Missing metrics give NaN, handled downstream.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from typing import Annotated, Literal

import msgspec

from agent.collect.sample import split_key
from agent.errors import Problem

SCHEMA_VERSION = 2  # 2: inputs are despiked (``despike``) before the transforms
TRANSFORMS: tuple[str, ...] = ("value", "delta", "rate", "ewma", "std", "slope")
_PER_SECOND = frozenset({"rate", "slope"})
Agg = Literal["max", "min", "sum", "each"]


class InputSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    key: str  # exact key, or "family[*]"
    agg: Agg = "max"  # for wildcard keys
    unit: str = ""  # unit after scaling
    scale: float = 1.0  # multiplies the raw metric (e.g. 1e-6: bytes/s -> MB/s)

    @property
    def wildcard(self) -> bool:
        return self.key.endswith("[*]")

    @property
    def family(self) -> str:
        return split_key(self.key)[0]

    @property
    def name(self) -> str:
        return f"{self.agg}({self.key})" if self.wildcard else self.key


def _pct(key: str, agg: Agg = "max") -> InputSpec:
    return InputSpec(key=key, agg=agg, unit="%")


# The default allow-list: label-agnostic, scaled to readable units so that no feature dwarfs
# the others by 10 orders of magnitude.
DEFAULT_INPUTS: tuple[InputSpec, ...] = (
    _pct("cpu.util_pct"),
    _pct("cpu.iowait_pct"),
    _pct("cpu.steal_pct"),
    InputSpec(key="cpu.load1"),
    _pct("mem.used_pct"),
    InputSpec(key="mem.available_bytes", unit="GB", scale=1e-9),
    _pct("mem.swap_used_pct"),
    InputSpec(key="mem.page_faults_per_s", unit="kfaults/s", scale=1e-3),
    InputSpec(key="mem.major_faults_per_s", unit="faults/s"),
    InputSpec(key="mem.oom_kills", unit="kills"),
    _pct("psi.some_avg10_pct[memory]"),
    _pct("psi.full_avg10_pct[memory]"),
    _pct("psi.some_avg10_pct[io]"),
    _pct("psi.some_avg10_pct[cpu]"),
    _pct("disk.used_pct[*]"),
    _pct("disk.inodes_used_pct[*]"),
    InputSpec(key="disk.free_bytes[*]", agg="min", unit="GB", scale=1e-9),
    _pct("disk.util_pct[*]"),
    InputSpec(key="disk.write_bytes_per_s[*]", agg="sum", unit="MB/s", scale=1e-6),
    InputSpec(key="disk.write_await_ms[*]", unit="ms"),
    InputSpec(key="disk.readonly[*]"),
    InputSpec(key="net.rx_errors_per_s[*]", agg="sum", unit="1/s"),
    InputSpec(key="net.tx_errors_per_s[*]", agg="sum", unit="1/s"),
    InputSpec(key="net.rx_drops_per_s[*]", agg="sum", unit="1/s"),
    InputSpec(key="net.link_up[*]", agg="min"),
    InputSpec(key="net.tcp_retrans_per_s", unit="seg/s"),
    InputSpec(key="net.tcp_attempt_fails_per_s", unit="1/s"),
    InputSpec(key="net.tcp_out_rsts_per_s", unit="1/s"),
    InputSpec(key="net.probe_ok[*]", agg="min"),
    InputSpec(key="proc.running", unit="tasks"),
    InputSpec(key="proc.blocked", unit="tasks"),
    InputSpec(key="proc.zombies", unit="procs"),
    _pct("proc.top_cpu_pct"),
    InputSpec(key="proc.count[*]", agg="min", unit="procs"),
    InputSpec(key="unit.active[*]", agg="min"),
    InputSpec(key="unit.failed[*]", agg="max"),
    _pct("gpu.util_pct[*]"),
    InputSpec(key="gpu.temp_c[*]", unit="C"),
    InputSpec(key="gpu.xid_count[*]", agg="sum", unit="xids"),
    InputSpec(key="gpu.ecc_dbe_volatile[*]", agg="sum", unit="errors"),
    InputSpec(key="gpu.lost[*]", agg="max"),
    # GPU health (issue 24). Counters (summed over GPUs) are read through their rate/delta/slope:
    # their level is a GPU's history, so the detector leaves their value and ewma out
    # (GPU_COUNTER_LEVELS); flags are the max over GPUs (1 when any GPU has it).
    InputSpec(key="gpu.ecc_sbe_volatile[*]", agg="sum", unit="errors"),
    InputSpec(key="gpu.ecc_dbe_aggregate[*]", agg="sum", unit="errors"),
    InputSpec(key="gpu.remap_uncorrectable[*]", agg="sum", unit="rows"),
    InputSpec(key="gpu.pcie_replays[*]", agg="sum", unit="replays"),
    InputSpec(key="gpu.nvlink_crc_errors[*]", agg="sum", unit="errors"),
    InputSpec(key="gpu.nvlink_replay_errors[*]", agg="sum", unit="errors"),
    InputSpec(key="gpu.nvlink_recovery_errors[*]", agg="sum", unit="errors"),
    InputSpec(key="gpu.remap_pending[*]", agg="max"),
    InputSpec(key="gpu.remap_failure[*]", agg="max"),
    InputSpec(key="gpu.retired_pages_pending[*]", agg="max"),
    InputSpec(key="gpu.reset_required[*]", agg="max"),
    InputSpec(key="gpu.throttle_hw_slowdown[*]", agg="max"),
    InputSpec(key="gpu.throttle_sw_thermal[*]", agg="max"),
    InputSpec(key="gpu.throttle_hw_thermal[*]", agg="max"),
    InputSpec(key="gpu.throttle_power_brake[*]", agg="max"),
)
#: The GPU counters' level features (a count since the driver loaded or over the board's life):
#: a GPU that once had an error keeps the level, so models read their change, not their level.
GPU_COUNTER_LEVELS: tuple[str, ...] = tuple(
    f"sum({k}[*]):{t}"
    for k in ("gpu.xid_count", "gpu.ecc_dbe_volatile", "gpu.ecc_sbe_volatile", "gpu.ecc_dbe_aggregate",
              "gpu.remap_uncorrectable", "gpu.pcie_replays", "gpu.nvlink_crc_errors",
              "gpu.nvlink_replay_errors", "gpu.nvlink_recovery_errors")
    for t in ("value", "ewma")
)


class FeatureSchema(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    inputs: tuple[InputSpec, ...] = DEFAULT_INPUTS
    transforms: tuple[str, ...] = TRANSFORMS
    window: Annotated[int, msgspec.Meta(ge=3, le=3600)] = 60  # samples
    ewma_alpha: Annotated[float, msgspec.Meta(gt=0, le=1)] = 0.1
    # Each input is replaced by the median of its last ``despike`` values (odd; 1 = off) before
    # any transform: a one-second blip (one slow write, one burst of page faults) would otherwise
    # live on for a whole window in the input's std, ewma and slope.
    despike: Annotated[int, msgspec.Meta(ge=1, le=9)] = 3
    version: int = SCHEMA_VERSION

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(f"{i.name}:{t}" for i in self.inputs for t in self.transforms)

    @property
    def units(self) -> tuple[str, ...]:
        return tuple(f"{i.unit or '1'}/s" if t in _PER_SECOND else i.unit
                     for i in self.inputs for t in self.transforms)

    @property
    def dim(self) -> int:
        return len(self.inputs) * len(self.transforms)

    def to_json(self) -> bytes:
        return msgspec.json.encode(self, order="sorted")

    @property
    def digest(self) -> str:
        """Short content hash: two schemas with the same digest produce the same features."""
        return hashlib.sha256(self.to_json()).hexdigest()[:16]

    def resolve(self, keys: Iterable[str]) -> FeatureSchema:
        """Expand ``agg = "each"`` wildcards into one exact input per label in ``keys`` (sorted)."""
        present = sorted(set(keys))
        out: list[InputSpec] = []
        for spec in self.inputs:
            if spec.wildcard and spec.agg == "each":
                fam = spec.family
                out.extend(
                    InputSpec(key=k, unit=spec.unit, scale=spec.scale)
                    for k in present
                    if split_key(k)[0] == fam and split_key(k)[1] is not None
                )
            else:
                out.append(spec)
        return msgspec.structs.replace(self, inputs=tuple(out))

    def problems(self, where: str = "feature schema") -> list[Problem]:
        """What is wrong with this schema (empty when it is usable)."""
        probs: list[Problem] = []
        bad = [t for t in self.transforms if t not in TRANSFORMS]
        if bad:
            probs.append(Problem(where, "transforms", f"unknown transforms {bad}; known: {list(TRANSFORMS)}"))
        if not self.transforms:
            probs.append(Problem(where, "transforms", "at least one transform is needed"))
        if not self.inputs:
            probs.append(Problem(where, "inputs", "at least one input is needed"))
        names = [i.name for i in self.inputs]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            probs.append(Problem(where, "inputs", f"duplicate inputs {dup[:5]}"))
        probs.extend(
            Problem(where, "inputs", f"{i.key}: agg 'each' must be resolved before use")
            for i in self.inputs if i.agg == "each" and i.wildcard
        )
        if self.despike % 2 == 0:
            probs.append(Problem(where, "despike", f"despike must be odd (a median of 1, 3, 5 ... values), "
                                                   f"not {self.despike}"))
        if self.version != SCHEMA_VERSION:
            probs.append(Problem(where, "version", f"schema version {self.version}, this heald uses "
                                                   f"{SCHEMA_VERSION}"))
        return probs


def default_schema(families: Iterable[str] | None = None) -> FeatureSchema:
    """The default schema, optionally restricted to an allow-list of families (``cpu.util_pct``,
    ``disk.used_pct``, or a prefix ending in ``.``/``*`` such as ``net.*``)."""
    if families is None:
        return FeatureSchema()
    allow = list(families)

    def ok(fam: str) -> bool:
        return any(fam == a or (a.endswith(("*", ".")) and fam.startswith(a.rstrip("*"))) for a in allow)

    return FeatureSchema(inputs=tuple(i for i in DEFAULT_INPUTS if ok(i.family)))


def decode_schema(data: bytes | str) -> FeatureSchema:
    return msgspec.json.decode(data, type=FeatureSchema)
