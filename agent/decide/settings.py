"""Settings of the decide/act stages (``[playbooks]`` in agent.toml)."""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec


class PlaybookSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    # Operator playbooks; the shipped library (remediations/) is always loaded first.
    dirs: tuple[str, ...] = ("/etc/heald/playbooks.d",)
    load_shipped: bool = True
    # Forces every playbook into dry-run regardless of its own mode.
    force_mode: Literal["", "dry-run", "off"] = ""
    max_concurrent: Annotated[int, msgspec.Meta(ge=1, le=64)] = 2
    # Roots under which clean actions may delete; nothing outside is ever touched.
    clean_roots: tuple[str, ...] = ("/var/tmp", "/tmp", "/var/cache")  # noqa: S108 - deletion roots, not temp files
    # Processes never killed by any action (names or argv[0] basenames).
    protected_processes: tuple[str, ...] = (
        "systemd", "init", "sshd", "heald", "journald", "systemd-journald", "dbus-daemon", "containerd",
    )
    # --- tools, always argv lists (never a shell); PATH in the unit decides where a bare name resolves.
    systemctl: tuple[str, ...] = ("systemctl",)
    journalctl: tuple[str, ...] = ("journalctl",)
    logrotate: tuple[str, ...] = ("logrotate",)
    # GPU actions; ``{gpu}`` (index) and ``{pci}`` (bus id) are replaced as whole argv elements only.
    gpu_reset_argv: tuple[str, ...] = ("nvidia-smi", "--gpu-reset", "-i", "{gpu}")
    gpu_drain_argv: tuple[str, ...] = ("nvidia-smi", "drain", "-p", "{pci}", "-m", "1")
    gpu_undrain_argv: tuple[str, ...] = ("nvidia-smi", "drain", "-p", "{pci}", "-m", "0")
    # Run root-only steps (drop caches, GPU drain/undrain/reset) in `heald-action@<what>.service`
    # instead of in-process, so the daemon itself needs fewer capabilities. The shipped
    # heald.service (user heald, no CAP_SYS_ADMIN) requires true; false suits only an agent run as root.
    use_helper_units: bool = False
    # The cordon action runs this argv; ``{node}`` is replaced as a whole element. Empty: not configured.
    cordon_argv: tuple[str, ...] = ()
    # Environment variables passed from the daemon to commands it runs (run_command, tools).
    command_env_allowlist: tuple[str, ...] = ("PATH", "LANG", "LC_ALL", "TZ")
    drop_caches_path: str = "/proc/sys/vm/drop_caches"
    # Where raise_limit writes a sysctl (net.netfilter.nf_conntrack_max -> ROOT/net/netfilter/...).
    sysctl_root: str = "/proc/sys"
    # cgroup_limit asks systemd (`systemctl set-property --runtime UNIT MemoryMax=...`) for a process
    # in a system unit's own cgroup (a .service or .scope under slices) and refuses any other.
    # true: for processes outside a unit, write memory.max/cpu.max (or the v1 files) directly
    # instead -- for hosts without systemd; it fails under heald.service (ProtectControlGroups=yes).
    cgroup_direct_write: bool = False
    # cgroup v2 mount; empty: detected (/sys/fs/cgroup, or /sys/fs/cgroup/unified on hybrid hosts).
    cgroup_root: str = ""
    # Longest time an approval request stays pending before it is dropped.
    approval_ttl_s: Annotated[float, msgspec.Meta(gt=0, le=7 * 86400)] = 3600.0


class SecuritySettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    # Addresses and networks (CIDR, IPv4 or IPv6) block_address never blocks, besides loopback, the
    # node's own addresses and the MQTT broker's (always refused).
    allow_list: tuple[str, ...] = ()
    # Keep heald's nftables table (`inet heald`: the blocked addresses) when the daemon stops. false:
    # the table is deleted on `systemctl stop heald`, SIGTERM or Ctrl-C; each block expires by itself anyway.
    keep_blocks_on_stop: bool = False
    # How long block_address blocks an address when its step gives no `timeout` (the element's
    # nftables timeout, so the block ends by itself).
    block_timeout_s: Annotated[float, msgspec.Meta(ge=1, le=30 * 86400)] = 3600.0
    # The nft executable (an argv list, never a shell).
    nft: tuple[str, ...] = ("nft",)
    # Priority of heald's input chain: lower runs first; the operator's filter chains are at 0.
    chain_priority: Annotated[int, msgspec.Meta(ge=-1000, le=0)] = -200
