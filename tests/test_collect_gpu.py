"""GPU collector against FakeNVML (every failure signal) and against the real pynvml on this host."""

from __future__ import annotations

import os
from pathlib import Path

import pynvml
import pytest

from agent.collect.gpu import GpuCollector
from agent.collect.settings import GpuSettings
from agent.errors import CollectorUnavailable
from devtools.fake_nvml import FakeNVML


def _started(fake: FakeNVML, **kw: object) -> GpuCollector:
    c = GpuCollector(GpuSettings(**kw), nvml=fake, root="/nonexistent-root")  # type: ignore[arg-type]
    c.start()
    return c


def test_real_pynvml_is_default_and_unavailable_without_gpu() -> None:
    c = GpuCollector()
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        pass
    else:
        pynvml.nvmlShutdown()
        pytest.skip("this host has libnvidia-ml")
    with pytest.raises(CollectorUnavailable, match="no libnvidia-ml"):
        c.start()
    c.close()


def test_library_not_found() -> None:
    c = GpuCollector(nvml=FakeNVML(library_found=False))
    with pytest.raises(CollectorUnavailable, match="no libnvidia-ml"):
        c.start()


def test_other_init_failure_and_no_devices() -> None:
    with pytest.raises(CollectorUnavailable, match="Driver Not Loaded"):
        GpuCollector(nvml=FakeNVML(init_error=pynvml.NVML_ERROR_DRIVER_NOT_LOADED)).start()
    fake = FakeNVML(0)
    with pytest.raises(CollectorUnavailable, match="no GPU"):
        GpuCollector(nvml=fake).start()
    assert fake.init_count == 0  # shut down again


def test_fake_matches_real_module_surface() -> None:
    fake = FakeNVML()
    for name in dir(fake):
        if name.startswith("nvml") and callable(getattr(fake, name)):
            assert hasattr(pynvml, name), name
    assert fake.NVMLError_GpuIsLost is pynvml.NVMLError_GpuIsLost
    assert fake.NVML_NVLINK_MAX_LINKS == pynvml.NVML_NVLINK_MAX_LINKS


def test_levels_and_close() -> None:
    fake = FakeNVML(2)
    gpu = fake.device(1)
    gpu.util_gpu, gpu.util_mem, gpu.mem_used, gpu.temp_c, gpu.power_mw = 97, 40, 3 << 30, 83, 350_500
    c = _started(fake)
    m = c.collect().metrics
    assert m["gpu.util_pct[1]"] == 97
    assert m["gpu.mem_util_pct[1]"] == 40
    assert m["gpu.mem_used_bytes[1]"] == 3 << 30
    assert m["gpu.mem_total_bytes[1]"] == 80 << 30
    assert m["gpu.temp_c[1]"] == 83
    assert m["gpu.power_w[1]"] == pytest.approx(350.5)
    assert m["gpu.sm_clock_mhz[0]"] == 1980
    assert m["gpu.lost[0]"] == m["gpu.lost[1]"] == 0.0
    assert "gpu.nvlink_crc_errors[0]" not in m  # no NVLink: absent
    c.close()
    assert fake.init_count == 0


def test_xid_event_from_event_set() -> None:
    fake = FakeNVML(2)
    c = _started(fake)
    assert not c.collect().events
    fake.inject_xid(1, 48)
    fake.inject_xid(0, 13)
    r = c.collect()
    got = sorted((e.kind, e.labels["gpu"], e.labels["uuid"], e.value) for e in r.events)
    assert got == [
        ("gpu.xid", "0", fake.device(0).uuid, 13.0),
        ("gpu.xid", "1", fake.device(1).uuid, 48.0),
    ]
    assert r.metrics["gpu.xid_count[1]"] == 1
    assert r.detail["xid_source"] == "nvml"
    assert not c.collect().events  # drained


def test_xid_from_kmsg_when_events_unsupported(tmp_path: Path) -> None:
    (tmp_path / "dev").mkdir()
    kmsg = tmp_path / "dev/kmsg"
    fake = FakeNVML(2)
    kmsg.write_text(fake.kmsg_line(1, 31, seq=1))  # logged before start: not reported
    fake.set_events_supported(1, False)
    c = GpuCollector(GpuSettings(), nvml=fake, root=str(tmp_path))
    c.start()
    assert c.collect().detail["xid_source"] == "nvml+kmsg"
    assert not c.collect().events
    with kmsg.open("a") as f:
        f.write("6,2,1,-;usb 1-1: new device\n")
        f.write(fake.kmsg_line(1, 79, seq=3))
        f.write(" SUBSYSTEM=pci\n")
    r = c.collect()
    assert [(e.kind, e.labels["gpu"], e.labels["source"], e.value) for e in r.events] == [
        ("gpu.xid", "1", "kmsg", 79.0)
    ]
    # An XID of a device that the event set covers is not reported twice.
    with kmsg.open("a") as f:
        f.write(fake.kmsg_line(0, 13, seq=4))
    assert not c.collect().events
    c.close()


def test_kmsg_fallback_disabled(tmp_path: Path) -> None:
    (tmp_path / "dev").mkdir()
    (tmp_path / "dev/kmsg").write_text("")
    fake = FakeNVML(1)
    fake.set_events_supported(0, False)
    c = GpuCollector(GpuSettings(kernel_log_fallback=False), nvml=fake, root=str(tmp_path))
    c.start()
    assert c.collect().detail["xid_source"] == "none"


def test_ecc_counts_increase() -> None:
    fake = FakeNVML(1)
    c = _started(fake)
    assert c.collect().metrics["gpu.ecc_dbe_volatile[0]"] == 0
    fake.add_ecc(0, corrected=5, uncorrected=1)
    fake.add_ecc(0, corrected=2)
    m = c.collect().metrics
    assert m["gpu.ecc_sbe_volatile[0]"] == 7
    assert m["gpu.ecc_dbe_volatile[0]"] == 1
    assert m["gpu.ecc_sbe_aggregate[0]"] == 7
    assert m["gpu.ecc_dbe_aggregate[0]"] == 1


def test_throttle_decode() -> None:
    fake = FakeNVML(1)
    c = _started(fake)
    mask = pynvml.nvmlClocksThrottleReasonHwThermalSlowdown | pynvml.nvmlClocksThrottleReasonSwPowerCap
    fake.set_throttle(0, mask | pynvml.nvmlClocksThrottleReasonGpuIdle)
    m = c.collect().metrics
    assert m["gpu.throttle_reasons[0]"] == mask | 1
    assert m["gpu.throttle_hw_thermal[0]"] == 1
    assert m["gpu.throttle_sw_power_cap[0]"] == 1
    assert m["gpu.throttle_hw_slowdown[0]"] == 0
    assert m["gpu.throttle_sw_thermal[0]"] == 0
    assert m["gpu.throttle_power_brake[0]"] == 0
    # A driver without the "event reasons" call: the older throttle-reasons call is used.
    fake.set_unsupported(0, "nvmlDeviceGetCurrentClocksEventReasons")
    fake.set_throttle(0, pynvml.nvmlClocksThrottleReasonHwPowerBrakeSlowdown)
    m = c.collect().metrics
    assert m["gpu.throttle_power_brake[0]"] == 1
    assert m["gpu.throttle_hw_thermal[0]"] == 0


def test_row_remap_retired_pages_pcie_nvlink() -> None:
    fake = FakeNVML(1, nvlink_links=4)
    c = _started(fake)
    fake.set_row_remap(0, correctable=2, uncorrectable=1, pending=True)
    fake.retire_page(0, pynvml.NVML_PAGE_RETIREMENT_CAUSE_DOUBLE_BIT_ECC_ERROR, 0x1000)
    fake.retire_page(0, pynvml.NVML_PAGE_RETIREMENT_CAUSE_MULTIPLE_SINGLE_BIT_ECC_ERRORS, 0x2000)
    fake.retire_page(0, pynvml.NVML_PAGE_RETIREMENT_CAUSE_MULTIPLE_SINGLE_BIT_ECC_ERRORS, 0x3000)
    fake.set_retired_pages_pending(0, True)
    fake.add_pcie_replays(0, 12)
    fake.add_nvlink_errors(0, 0, pynvml.NVML_NVLINK_ERROR_DL_CRC_FLIT, 3)
    fake.add_nvlink_errors(0, 3, pynvml.NVML_NVLINK_ERROR_DL_CRC_DATA, 2)
    fake.add_nvlink_errors(0, 2, pynvml.NVML_NVLINK_ERROR_DL_REPLAY, 1)
    fake.add_nvlink_errors(0, 1, pynvml.NVML_NVLINK_ERROR_DL_RECOVERY, 6)
    m = c.collect().metrics
    assert (m["gpu.remap_correctable[0]"], m["gpu.remap_uncorrectable[0]"]) == (2, 1)
    assert (m["gpu.remap_pending[0]"], m["gpu.remap_failure[0]"]) == (1, 0)
    assert (m["gpu.retired_pages_sbe[0]"], m["gpu.retired_pages_dbe[0]"]) == (2, 1)
    assert m["gpu.retired_pages_pending[0]"] == 1
    assert m["gpu.pcie_replays[0]"] == 12
    assert m["gpu.nvlink_crc_errors[0]"] == 5
    assert m["gpu.nvlink_replay_errors[0]"] == 1
    assert m["gpu.nvlink_recovery_errors[0]"] == 6
    fake.set_row_remap(0, pending=False, failure=True)
    assert c.collect().metrics["gpu.remap_failure[0]"] == 1


def test_not_supported_is_absent_and_not_asked_again() -> None:
    fake = FakeNVML(1)
    fake.set_unsupported(0, "nvmlDeviceGetRetiredPages", "nvmlDeviceGetRetiredPagesPendingStatus",
                         "nvmlDeviceGetPowerUsage")
    c = _started(fake)
    for _ in range(3):
        m = c.collect().metrics
        assert "gpu.retired_pages_sbe[0]" not in m
        assert "gpu.retired_pages_pending[0]" not in m
        assert "gpu.power_w[0]" not in m
        assert m["gpu.temp_c[0]"] is not None
    assert fake.calls["nvmlDeviceGetPowerUsage"] == 1


def test_other_errors_give_none() -> None:
    fake = FakeNVML(1)
    c = _started(fake)

    def broken(handle: object) -> int:
        raise pynvml.NVMLError(pynvml.NVML_ERROR_UNKNOWN)

    fake.nvmlDeviceGetPcieReplayCounter = broken  # type: ignore[method-assign]
    m = c.collect().metrics
    assert m["gpu.pcie_replays[0]"] is None
    assert m["gpu.lost[0]"] == 0


def test_fall_off_the_bus() -> None:
    fake = FakeNVML(2)
    c = _started(fake)
    c.collect()
    fake.fall_off_bus(1)
    r = c.collect()
    assert r.metrics["gpu.lost[1]"] == 1.0
    assert r.metrics["gpu.lost[0]"] == 0.0
    assert r.metrics["gpu.temp_c[1]"] is None
    assert r.metrics["gpu.temp_c[0]"] is not None
    kinds = sorted((e.kind, e.labels["gpu"]) for e in r.events)
    assert kinds == [("gpu.lost", "1"), ("gpu.xid", "1")]
    xid = next(e for e in r.events if e.kind == "gpu.xid")
    assert xid.value == 79
    r = c.collect()
    assert r.metrics["gpu.lost[1]"] == 1.0
    assert not r.events  # the loss is reported once


def test_lost_at_start() -> None:
    fake = FakeNVML(1)
    fake.fall_off_bus(0, xid=False)
    c = _started(fake)
    r = c.collect()
    assert r.metrics["gpu.lost[0]"] == 1.0
    assert [e.kind for e in r.events] == ["gpu.lost"]


def test_kmsg_real_device_opens_nonblocking() -> None:
    """On this host /dev/kmsg (when readable) is opened at its end and a pass does not block."""
    if not os.access("/dev/kmsg", os.R_OK):
        pytest.skip("/dev/kmsg not readable")
    fake = FakeNVML(1)
    fake.set_events_supported(0, False)
    c = GpuCollector(nvml=fake)
    c.start()
    r = c.collect()
    assert r.detail["xid_source"] == "kmsg"
    assert not [e for e in r.events if e.kind == "gpu.xid"]
    c.close()
