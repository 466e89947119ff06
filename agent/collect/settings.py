"""Settings of the collect stage (``[collect.*]`` in agent.toml)."""

from __future__ import annotations

from typing import Annotated, Literal

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
    # How often the hierarchy is walked again for new and removed cgroups (with watch_changes, also
    # at the next pass after one is created or removed, and again settle_s later).
    rescan_s: Seconds = 30.0
    # inotify watches on the walked directories: a new cgroup is found within a pass or two.
    watch_changes: bool = True
    settle_s: Annotated[float, msgspec.Meta(ge=0, le=60)] = 2.0
    # How deep below the cgroup root the walk goes.
    max_depth: Annotated[int, msgspec.Meta(ge=1, le=16)] = 6
    # How many cgroups a pass reads at most: those named in include, then the smallest memory
    # limits (they run out first).
    max_cgroups: Annotated[int, msgspec.Meta(ge=1, le=1000)] = 64
    # The window of the working set's growth rate (cgroup.mem.growth_bytes_per_s, cgroup.mem.eta_s).
    slope_window_s: Annotated[float, msgspec.Meta(ge=2, le=600)] = 8.0
    # The fast path: a cgroup whose working set would reach its limit within fast_eta_s at its
    # present rate is read again every fast_interval_s (its memory files only), and the playbooks
    # are evaluated on each such reading, not only once a sample: a leak that fills a small limit
    # in a few seconds is seen while there is time to act (0 turns the fast path off).
    fast_interval_s: Annotated[float, msgspec.Meta(ge=0, le=1)] = 0.1
    fast_eta_s: Annotated[float, msgspec.Meta(ge=1, le=600)] = 30.0


class LimitSettings(CollectorSettings, frozen=True, forbid_unknown_fields=True, kw_only=True):
    # How often every process's open files are counted to pick the fd holders watched each pass
    # (those closest to their own RLIMIT_NOFILE).
    fd_rescan_s: Seconds = 10.0
    # How many processes' file descriptors are counted each pass.
    fd_top_n: Annotated[int, msgspec.Meta(ge=1, le=100)] = 5
    # The window of the growth rates behind the *.eta_s metrics (fds, tasks, conntrack entries).
    slope_window_s: Annotated[float, msgspec.Meta(ge=2, le=600)] = 8.0


class SecurityProcSettings(CollectorSettings, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """``[collect.security_proc]``: suspicious processes, their egress, watched files (docs/security.md)."""

    interval_s: Seconds = 2.0
    timeout_s: Seconds = 1.5
    # An executable below one of these directories is suspicious ("temp_path").
    temp_dirs: tuple[str, ...] = ("/tmp", "/var/tmp", "/dev/shm")  # noqa: S108 - paths watched, not written
    # An executable in any world-writable directory is suspicious ("world_writable").
    world_writable: bool = True
    # Executables below these prefixes are trusted as installed (root-owned, not world-writable):
    # their hash is not checked. Elsewhere a sha256 never seen on this node is "unknown_hash".
    trusted_prefixes: tuple[str, ...] = ("/usr/", "/bin/", "/sbin/", "/lib/", "/lib64/", "/opt/", "/snap/")
    # sha256 digests (hex) never reported as suspicious, wherever they run from.
    allow_sha256: tuple[str, ...] = ()
    # For this long after the baseline is first created, unknown hashes are learned, not reported.
    learn_s: Annotated[float, msgspec.Meta(ge=0, le=30 * 86400)] = 3600.0
    # Binary hashes kept in the baseline (least recently seen dropped first).
    max_hashes: Annotated[int, msgspec.Meta(ge=16, le=100_000)] = 10_000
    # A binary larger than this is not hashed (its reason says so).
    hash_max_bytes: Annotated[int, msgspec.Meta(ge=1, le=1 << 32)] = 256 << 20
    # Suspicious processes reported per pass (the busiest first): the labelled series' cardinality.
    max_suspects: Annotated[int, msgspec.Meta(ge=1, le=256)] = 16
    # Egress per suspicious process from `ss -tine` (the sockets' bytes_acked), every egress_interval_s.
    egress: bool = True
    egress_interval_s: Seconds = 4.0
    ss: tuple[str, ...] = ("ss",)
    # A spike: at least this rate and egress_factor times the process's own average so far.
    egress_min_bytes_per_s: Annotated[float, msgspec.Meta(ge=0)] = 1_048_576.0
    egress_factor: Annotated[float, msgspec.Meta(ge=1, le=1000)] = 5.0
    # ... or at least this many new outbound connections in one egress pass.
    egress_min_new_conns: Annotated[int, msgspec.Meta(ge=1, le=1_000_000)] = 100
    # Watched files: authorized_keys of every user in passwd_file, and these files (a directory:
    # the files in it), hashed every files_interval_s; a change is a sec.file_changed event.
    authorized_keys: bool = True
    passwd_file: str = "/etc/passwd"  # noqa: S105 - the user database, not a secret
    watch_files: tuple[str, ...] = (
        "/etc/sudoers", "/etc/sudoers.d", "/etc/heald/agent.toml", "/etc/heald/conf.d",
    )
    files_interval_s: Seconds = 10.0


class SecurityNetSettings(CollectorSettings, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """``[collect.security_net]``: authentication failures per source, new listeners (docs/security.md)."""

    # Where authentication failures are read: the systemd journal (a `journalctl --follow` child,
    # resumed at its cursor), the auth log files below, or auto: the journal when journald runs.
    auth_source: Literal["auto", "journal", "files"] = "auto"
    # Syslog auth log files, tailed (rotation and truncation safe) when the journal is not used.
    auth_files: tuple[str, ...] = ("/var/log/auth.log", "/var/log/secure")
    journalctl: tuple[str, ...] = ("journalctl",)
    # journalctl matches for the auth facilities (auth, authpriv): sshd, sudo, su, PAM.
    journal_match: tuple[str, ...] = ("SYSLOG_FACILITY=4", "SYSLOG_FACILITY=10")
    # sec.auth_failures[SRC] counts a source's failures over this window ...
    window_s: Annotated[float, msgspec.Meta(ge=5, le=3600)] = 60.0
    # ... and sec.auth_failures_recent[SRC] over this one (did the failures stop?).
    recent_s: Annotated[float, msgspec.Meta(ge=1, le=600)] = 10.0
    # Sources reported as labelled series (the most failures first); the rest add up in
    # sec.auth_failures_other.
    max_series: Annotated[int, msgspec.Meta(ge=1, le=256)] = 32
    # Sources remembered at most (the least recently failing forgotten first): bounded memory
    # under a flood of distinct addresses.
    max_sources: Annotated[int, msgspec.Meta(ge=16, le=100_000)] = 4096
    # A longer log line is cut to this many bytes before it is parsed.
    max_line_bytes: Annotated[int, msgspec.Meta(ge=256, le=1 << 20)] = 8192
    # At most this much log is read in one pass; the rest waits for the next.
    max_read_bytes: Annotated[int, msgspec.Meta(ge=4096, le=1 << 30)] = 1 << 20
    # Listening TCP sockets (and bound UDP ones with "udp"), both families, every listener_interval_s.
    listeners: bool = True
    listener_protocols: tuple[Literal["tcp", "udp"], ...] = ("tcp",)
    listener_interval_s: Seconds = 5.0
    # Listeners (protocol, port, binary) seen in this long after the collector starts are the
    # node's baseline; one seen later for the first time is a sec.new_listener event.
    baseline_s: Annotated[float, msgspec.Meta(ge=0, le=30 * 86400)] = 600.0
    # Listeners remembered at most.
    max_listeners: Annotated[int, msgspec.Meta(ge=16, le=100_000)] = 4096
    # A listener bound only to loopback addresses (unreachable from other hosts; development
    # tools and local helpers on random ports) is never reported new.
    listener_ignore_loopback: bool = True


class CollectSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    cpu: CpuSettings = CpuSettings()
    memory: MemorySettings = MemorySettings()
    disk: DiskSettings = DiskSettings()
    network: NetworkSettings = NetworkSettings()
    processes: ProcessSettings = ProcessSettings()
    gpu: GpuSettings = GpuSettings()
    cgroups: CgroupSettings = CgroupSettings()
    limits: LimitSettings = LimitSettings()
    security_proc: SecurityProcSettings = SecurityProcSettings()
    security_net: SecurityNetSettings = SecurityNetSettings()
