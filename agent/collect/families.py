"""The metric families the collectors produce: the schema ``heald check`` holds triggers against.

A key is ``family`` or ``family[label]`` (:func:`agent.collect.sample.key`); labels are the
host's (mounts, interfaces, CPUs, units, GPUs), families are fixed by the collectors' code.
``tests/test_check_one_pass.py`` takes a real sample (and a FakeNVML GPU's) and fails when a
collector produces a family missing here.
"""

from __future__ import annotations

from typing import Final

_DISK_FS = ("total_bytes", "used_bytes", "free_bytes", "used_pct", "inodes_used_pct", "inodes_free",
            "readonly")
_DISK_DEV = ("read_iops", "write_iops", "read_bytes_per_s", "write_bytes_per_s", "read_await_ms",
             "write_await_ms", "util_pct")
_NET = ("rx_bytes", "tx_bytes", "rx_packets", "tx_packets", "rx_errors", "tx_errors", "rx_drops", "tx_drops")
_PSI = ("some_avg10", "some_avg60", "full_avg10", "full_avg60")

METRIC_FAMILIES: Final[frozenset[str]] = frozenset({
    # cpu
    "cpu.util_pct", "cpu.user_pct", "cpu.system_pct", "cpu.iowait_pct", "cpu.steal_pct", "cpu.count",
    "cpu.ctx_switches_per_s", "cpu.interrupts_per_s", "cpu.load1", "cpu.load5", "cpu.load15",
    "cpu.freq_mhz", "cpu.freq_max_mhz", "cpu.temp_c", "cpu.temp_max_c", "cpu.core_throttle_count",
    "cpu.core_throttle_per_s", "cpu.package_throttle_count", "cpu.package_throttle_per_s",
    # memory, pressure, cgroups
    "mem.total_bytes", "mem.used_bytes", "mem.available_bytes", "mem.used_pct", "mem.swap_total_bytes",
    "mem.swap_used_pct", "mem.page_faults_per_s", "mem.major_faults_per_s", "mem.oom_kills",
    "mem.growth_bytes_per_s", "mem.eta_s",
    *(f"psi.{f}_pct" for f in _PSI),
    "cgroup.mem.used_bytes", "cgroup.mem.limit_bytes", "cgroup.mem.used_pct", "cgroup.mem.headroom_bytes",
    "cgroup.mem.growth_bytes_per_s", "cgroup.mem.eta_s", "cgroup.mem.eta_now_s",
    "cgroup.mem.oom_kills", "cgroup.cpu.throttled_pct",
    "cgroup.pids.used_pct", "cgroup.pids.headroom", "cgroup.pids.eta_s", "cgroup.psi.mem_some_avg10_pct",
    # kernel tables vs their limits (agent.collect.limits)
    "fd.used_pct", "fd.headroom", "fd.eta_s", "proc.fd.count", "proc.fd.used_pct", "proc.fd.headroom",
    "proc.fd.eta_s", "proc.tasks.used_pct", "proc.tasks.headroom", "proc.tasks.eta_s",
    "net.conntrack.used_pct", "net.conntrack.headroom", "net.conntrack.max", "net.conntrack.eta_s",
    "fd.growth_per_s", "proc.tasks.growth_per_s", "net.conntrack.growth_per_s",
    # disk
    *(f"disk.{f}" for f in _DISK_FS), *(f"disk.{f}" for f in _DISK_DEV),
    # network
    *(f"net.{f}_per_s" for f in _NET), "net.link_up", "net.tcp_curr_estab", "net.tcp_retrans_segs",
    "net.tcp_retrans_per_s", "net.tcp_attempt_fails_per_s", "net.tcp_out_rsts_per_s", "net.probe_ms",
    "net.probe_ok",
    # processes and systemd units
    "proc.count", "proc.running", "proc.blocked", "proc.threads", "proc.zombies", "proc.top_cpu_pct",
    "proc.top_rss_bytes", "unit.active", "unit.failed", "unit.restarts",
    # NVIDIA GPUs
    "gpu.util_pct", "gpu.mem_util_pct", "gpu.mem_used_bytes", "gpu.mem_total_bytes", "gpu.temp_c",
    "gpu.power_w", "gpu.sm_clock_mhz", "gpu.mem_clock_mhz", "gpu.ecc_sbe_volatile", "gpu.ecc_dbe_volatile",
    "gpu.ecc_sbe_aggregate", "gpu.ecc_dbe_aggregate", "gpu.retired_pages_sbe", "gpu.retired_pages_dbe",
    "gpu.retired_pages_pending", "gpu.remap_correctable", "gpu.remap_uncorrectable", "gpu.remap_pending",
    "gpu.remap_failure", "gpu.pcie_replays", "gpu.nvlink_crc_errors", "gpu.nvlink_replay_errors",
    "gpu.nvlink_recovery_errors", "gpu.throttle_reasons", "gpu.throttle_hw_slowdown",
    "gpu.throttle_hw_thermal", "gpu.throttle_power_brake", "gpu.throttle_sw_power_cap",
    "gpu.throttle_sw_thermal", "gpu.xid_count", "gpu.lost", "gpu.reset_required", "gpu.mig_mode",
    "gpu.mig_mem_used_bytes", "gpu.mig_mem_total_bytes",
    # security, network side (agent.collect.security_net)
    "sec.auth_failures", "sec.auth_failures_recent", "sec.auth_failures_other", "sec.auth_failures_local",
    "sec.auth_sources", "sec.auth_failures_total", "sec.auth_sources_forgotten", "sec.listeners",
    "sec.listeners_new", "sec.listener_new",
    # security, process side (agent.collect.security_proc)
    "sec.suspects", "sec.exe_unreadable", "sec.suspect_cpu_pct", "sec.suspect_frozen",
    "sec.egress_bytes_per_s", "sec.egress_conns", "sec.egress_spike", "sec.files_watched",
})
