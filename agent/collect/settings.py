"""Settings of the collect stage (``[collect.*]`` in agent.toml)."""

from __future__ import annotations

from typing import Annotated

import msgspec

Seconds = Annotated[float, msgspec.Meta(gt=0, le=3600)]


class CollectorSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    enabled: bool = True
    interval_s: Seconds = 1.0
    # A pass that takes longer than this is abandoned and its metrics reported missing.
    timeout_s: Seconds = 0.8


class Probe(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """A TCP reachability probe: connect to host:port within timeout_s."""

    name: str
    host: str
    port: Annotated[int, msgspec.Meta(ge=1, le=65535)]
    timeout_s: Annotated[float, msgspec.Meta(gt=0, le=30)] = 1.0


class CpuSettings(CollectorSettings, frozen=True, forbid_unknown_fields=True, kw_only=True):
    per_cpu: bool = True


class MemorySettings(CollectorSettings, frozen=True, forbid_unknown_fields=True, kw_only=True):
    # Window of the used-memory growth behind ``mem.eta_s`` (a least-squares slope; 8 s as the
    # cgroup and kernel-table ETAs: long enough to ignore one allocation, short enough for a leak).
    slope_window_s: Annotated[float, msgspec.Meta(ge=2, le=600)] = 8.0


class DiskSettings(CollectorSettings, frozen=True, forbid_unknown_fields=True, kw_only=True):
    # Pseudo and overlay filesystems are not interesting for capacity.
    exclude_fstypes: tuple[str, ...] = (
        "proc", "sysfs", "devtmpfs", "devpts", "cgroup", "cgroup2", "securityfs", "debugfs",
        "tracefs", "pstore", "bpf", "autofs", "mqueue", "hugetlbfs", "configfs", "fusectl",
        "binfmt_misc", "nsfs", "squashfs", "overlay", "efivarfs", "rpc_pipefs", "ramfs",
    )
    # Mount points to watch even when their fstype is excluded.
    include_mounts: tuple[str, ...] = ()
    exclude_mounts: tuple[str, ...] = ()


class NetworkSettings(CollectorSettings, frozen=True, forbid_unknown_fields=True, kw_only=True):
    exclude_interfaces: tuple[str, ...] = ()
    probes: tuple[Probe, ...] = ()
    probe_interval_s: Seconds = 10.0


class ProcessSettings(CollectorSettings, frozen=True, forbid_unknown_fields=True, kw_only=True):
    interval_s: Seconds = 2.0
    top_n: Annotated[int, msgspec.Meta(ge=0, le=100)] = 5
    # systemd units whose state is reported (ActiveState/SubState/NRestarts).
    units: tuple[str, ...] = ()
    # Processes watched by name (comm or argv[0] basename): count and pids reported.
    watch: tuple[str, ...] = ()
    # The systemctl executable used to read unit states (argv list, never a shell). Tests point it
    # at a recording fake; on a node the default finds /usr/bin/systemctl through PATH.
    systemctl: str = "systemctl"
    # Seconds a single ``systemctl show`` may take before the unit metrics are reported as None.
    systemctl_timeout_s: Annotated[float, msgspec.Meta(gt=0, le=30)] = 0.5


class GpuSettings(CollectorSettings, frozen=True, forbid_unknown_fields=True, kw_only=True):
    interval_s: Seconds = 2.0
    timeout_s: Seconds = 1.5
    # Read XIDs from the kernel log (/dev/kmsg) when the NVML event set is unavailable.
    kernel_log_fallback: bool = True


class CgroupSettings(CollectorSettings, frozen=True, forbid_unknown_fields=True, kw_only=True):
    # Cgroups watched besides every one with a memory or PIDs limit, as /proc/PID/cgroup shows them
    # ("/system.slice/x.service").
    include: tuple[str, ...] = ()
    # How often the hierarchy is walked again for new and removed cgroups.
    rescan_s: Seconds = 30.0
    # How deep below the cgroup root the walk goes.
    max_depth: Annotated[int, msgspec.Meta(ge=1, le=16)] = 6
    # How many cgroups a pass reads at most: those named in include, then the smallest memory
    # limits (they run out first).
    max_cgroups: Annotated[int, msgspec.Meta(ge=1, le=1000)] = 64
    # The window of the working set's growth rate (cgroup.mem.growth_bytes_per_s, cgroup.mem.eta_s).
    slope_window_s: Annotated[float, msgspec.Meta(ge=2, le=600)] = 8.0


class LimitSettings(CollectorSettings, frozen=True, forbid_unknown_fields=True, kw_only=True):
    # How often every process's open files are counted to pick the fd holders watched each pass
    # (those closest to their own RLIMIT_NOFILE).
    fd_rescan_s: Seconds = 10.0
    # How many processes' file descriptors are counted each pass.
    fd_top_n: Annotated[int, msgspec.Meta(ge=1, le=100)] = 5
    # The window of the growth rates behind the *.eta_s metrics (fds, tasks, conntrack entries).
    slope_window_s: Annotated[float, msgspec.Meta(ge=2, le=600)] = 8.0


class CollectSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    cpu: CpuSettings = CpuSettings()
    memory: MemorySettings = MemorySettings()
    disk: DiskSettings = DiskSettings()
    network: NetworkSettings = NetworkSettings()
    processes: ProcessSettings = ProcessSettings()
    gpu: GpuSettings = GpuSettings()
    cgroups: CgroupSettings = CgroupSettings()
    limits: LimitSettings = LimitSettings()
