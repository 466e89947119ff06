"""The collectors a node runs, built from ``[collect.*]`` settings.

:func:`build` returns one configured collector per enabled section, in a fixed order (cpu, memory,
disk, network, processes, gpu, cgroups,
limits, security_proc). It does not start them: the daemon calls ``start()`` on each and
disables (and logs once) those that raise :class:`agent.errors.CollectorUnavailable`.
"""

from __future__ import annotations

from agent.collect.base import Collector
from agent.collect.cgroups import CgroupCollector
from agent.collect.cpu import CpuCollector
from agent.collect.disk import DiskCollector
from agent.collect.gpu import GpuCollector
from agent.collect.limits import LimitCollector
from agent.collect.memory import MemoryCollector
from agent.collect.network import NetworkCollector
from agent.collect.processes import ProcessCollector
from agent.collect.security_net import SecurityNetCollector
from agent.collect.security_proc import SecurityProcCollector
from agent.collect.settings import CollectSettings

__all__ = ["build"]


def build(settings: CollectSettings, *, root: str = "/", nvml: object | None = None,
          state_dir: str | None = None) -> list[Collector]:
    """The enabled collectors. ``root`` prefixes /proc, /sys and /dev paths (tests use fixture
    trees); ``nvml`` replaces the ``pynvml`` module (tests pass ``devtools.fake_nvml.FakeNVML``,
    which is not shipped), ``None`` meaning the real pynvml, imported when the GPU collector starts;
    ``state_dir`` is where collectors that learn a baseline keep it (None: in memory only)."""
    out: list[Collector] = []
    if settings.cpu.enabled:
        out.append(CpuCollector(settings.cpu, root=root))
    if settings.memory.enabled:
        out.append(MemoryCollector(settings.memory, root=root))
    if settings.disk.enabled:
        out.append(DiskCollector(settings.disk, root=root))
    if settings.network.enabled:
        out.append(NetworkCollector(settings.network, root=root))
    if settings.processes.enabled:
        out.append(ProcessCollector(settings.processes, root=root))
    if settings.gpu.enabled:
        out.append(GpuCollector(settings.gpu, root=root, nvml=nvml))
    if settings.cgroups.enabled:
        out.append(CgroupCollector(settings.cgroups, root=root))
    if settings.limits.enabled:
        out.append(LimitCollector(settings.limits, root=root))
    if settings.security_net.enabled:
        out.append(SecurityNetCollector(settings.security_net, root=root, state_dir=state_dir))
    if settings.security_proc.enabled:
        out.append(SecurityProcCollector(settings.security_proc, root=root, state_dir=state_dir))
    return out
