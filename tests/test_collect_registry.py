"""registry.build: enabled collectors, configured from settings, all honouring the Collector protocol."""

from __future__ import annotations

import msgspec

from agent.collect.base import Collector
from agent.collect.registry import build
from agent.collect.settings import CollectSettings, CpuSettings, GpuSettings
from devtools.fake_nvml import FakeNVML


def test_build_all_enabled_with_fake_gpu() -> None:
    fake = FakeNVML(1)
    collectors = build(CollectSettings(), nvml=fake)
    assert [c.name for c in collectors] == ["cpu", "memory", "disk", "network", "processes", "gpu", "cgroups",
                                              "limits", "security_net", "security_proc"]
    for c in collectors:
        assert isinstance(c, Collector)
        c.start()
        reading = c.collect()
        assert reading.metrics or c.name == "cgroups", c.name  # a host may have no limited cgroup
        assert all(isinstance(v, float | None) for v in reading.metrics.values()), c.name
        msgspec.msgpack.encode(reading)  # what the report stage will do
        c.close()
    assert fake.init_count == 0


def test_disabled_sections_and_settings_are_applied() -> None:
    settings = CollectSettings(
        cpu=CpuSettings(interval_s=5.0, timeout_s=2.0),
        gpu=GpuSettings(enabled=False),
    )
    collectors = build(settings, root="/")
    assert "gpu" not in [c.name for c in collectors]
    cpu = collectors[0]
    assert (cpu.name, cpu.interval_s, cpu.timeout_s) == ("cpu", 5.0, 2.0)
    procs = next(c for c in collectors if c.name == "processes")
    assert procs.interval_s == 2.0  # ProcessSettings' own default


def test_processes_settings_decode_systemctl_key() -> None:
    raw = {"processes": {"systemctl": "/opt/bin/systemctl", "units": ["a.service"]}}
    s = msgspec.convert(raw, CollectSettings)
    assert s.processes.systemctl == "/opt/bin/systemctl"
    assert CollectSettings().processes.systemctl == "systemctl"
