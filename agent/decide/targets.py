"""What a playbook run is about: the playbook and the labels its trigger bound (its target).

A trigger like ``disk.used_pct[{mount}] >= 90`` matches once per mount; each mount is a target of
its own, with its own guards (cooldown, backoff, runs per window, circuit breaker, one run at a
time): a mount that cannot be cleaned must not hold the playbook for every other mount. A playbook
whose trigger binds nothing has one target, the playbook itself.

The guard key (:attr:`Target.key`) names the target stably across restarts. GPUs are keyed by
PCI bus id where the sample's GPU table knows it, not by index: indices shift when a GPU is
drained or falls off the bus, a bus id does not.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

#: Binding variables that name a GPU by index; their guard key uses the PCI bus id instead.
GPU_VARS = frozenset({"gpu"})


@dataclass(frozen=True, slots=True)
class Target:
    playbook: str
    bindings: tuple[tuple[str, str], ...] = ()  # sorted (variable, value)
    key: str = ""  # the guard key: see :func:`target`

    @property
    def labels(self) -> dict[str, str]:
        return dict(self.bindings)

    def __str__(self) -> str:
        return self.key


def _gpu_pci(detail: Mapping[str, Any], index: str) -> str | None:
    gpu = detail.get("gpu")
    devices = gpu.get("devices") if isinstance(gpu, Mapping) else None
    device = devices.get(index) if isinstance(devices, Mapping) else None
    pci = device.get("pci") if isinstance(device, Mapping) else None
    return str(pci) if pci else None


def target(playbook: str, bindings: Mapping[str, str], detail: Mapping[str, Any] | None = None) -> Target:
    """The target of a match: ``playbook`` or ``playbook[var=value,...]`` (variables sorted)."""
    pairs = tuple(sorted((str(k), str(v)) for k, v in bindings.items()))
    if not pairs:
        return Target(playbook, (), playbook)
    parts = []
    for var, value in pairs:
        pci = _gpu_pci(detail or {}, value) if var in GPU_VARS else None
        parts.append(f"{var}=pci:{pci}" if pci else f"{var}={value}")
    return Target(playbook, pairs, f"{playbook}[{','.join(parts)}]")
