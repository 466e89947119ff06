"""Failure classifier (placeholder while being written)."""

from __future__ import annotations

FAILURE_CLASSES: tuple[str, ...] = (
    "disk_full", "memory_exhaustion", "cpu_runaway", "network_degradation", "gpu_fault", "service_down",
)
