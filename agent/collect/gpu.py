"""GPU collector: NVIDIA GPU health through NVML (``pynvml``, imported lazily in ``start()``).

``start()`` raises :class:`CollectorUnavailable` when libnvidia-ml is missing or ``nvmlInit``
fails for any other reason, or when NVML sees no device. Every NVML query is wrapped on its own:
``NVMLError_NotSupported`` (or a function the driver lacks) makes that metric absent for the
device from then on, ``NVMLError_GpuIsLost`` marks the device lost, any other NVMLError gives None.

Metrics per device index ``I`` (``gpu.util_pct[0]``, ...):

================================== ==================================================================
``gpu.util_pct[I]``                GPU (SM) utilisation, %
``gpu.mem_util_pct[I]``            memory controller utilisation, %
``gpu.mem_used_bytes[I]``          framebuffer memory used, bytes
``gpu.mem_total_bytes[I]``         framebuffer memory total, bytes
``gpu.temp_c[I]``                  GPU temperature, Celsius
``gpu.power_w[I]``                 power draw, W
``gpu.sm_clock_mhz[I]``            SM clock, MHz
``gpu.mem_clock_mhz[I]``           memory clock, MHz
``gpu.throttle_reasons[I]``        clocks throttle (event) reasons bitmask, as NVML reports it
``gpu.throttle_hw_slowdown[I]``    1 when HW slowdown is active (any HW cause), else 0
``gpu.throttle_sw_thermal[I]``     1 when SW thermal slowdown is active
``gpu.throttle_hw_thermal[I]``     1 when HW thermal slowdown is active
``gpu.throttle_power_brake[I]``    1 when the external power brake is asserted
``gpu.throttle_sw_power_cap[I]``   1 when clocks are held down by the power cap
``gpu.ecc_sbe_volatile[I]``        corrected (single-bit) ECC errors since the last driver load
``gpu.ecc_dbe_volatile[I]``        uncorrected (double-bit) ECC errors since the last driver load
``gpu.ecc_sbe_aggregate[I]``       corrected ECC errors over the board's lifetime
``gpu.ecc_dbe_aggregate[I]``       uncorrected ECC errors over the board's lifetime
``gpu.retired_pages_sbe[I]``       pages retired for multiple single-bit errors (pre-Ampere)
``gpu.retired_pages_dbe[I]``       pages retired for a double-bit error (pre-Ampere)
``gpu.retired_pages_pending[I]``   1 when a page retirement waits for a reboot
``gpu.remap_correctable[I]``       rows remapped for correctable errors (Ampere and later)
``gpu.remap_uncorrectable[I]``     rows remapped for uncorrectable errors
``gpu.remap_pending[I]``           1 when a row remap waits for a GPU reset
``gpu.remap_failure[I]``           1 when a row remap failed (the GPU needs service)
``gpu.pcie_replays[I]``            PCIe replay counter
``gpu.nvlink_crc_errors[I]``       NVLink CRC errors (flit + data), summed over links
``gpu.nvlink_replay_errors[I]``    NVLink replay errors, summed over links
``gpu.nvlink_recovery_errors[I]``  NVLink recovery errors, summed over links
``gpu.xid_count[I]``               XID critical errors seen since the collector started
``gpu.lost[I]``                    1 when the GPU has fallen off the bus (NVML: GPU is lost), else 0
``gpu.reset_required[I]``          1 when NVML answers "GPU reset required", else 0
``gpu.mig_mode[I]``                1 when MIG is enabled on the GPU, 0 when not (absent: no MIG)
``gpu.mig_mem_used_bytes[M]``      memory used by MIG instance ``M`` (``I/giG/ciC``), bytes
``gpu.mig_mem_total_bytes[M]``     memory of MIG instance ``M``, bytes
================================== ==================================================================

Events:

* ``gpu.xid`` (labels ``gpu`` index, ``uuid``, ``pci`` bus id, ``source`` "nvml" or "kmsg",
  ``resolution`` the XID's bucket in :mod:`agent.collect.gpu_xid`'s catalog, and ``mig`` /
  ``mig_uuid`` when NVML names a MIG instance; ``value`` the XID).
  Read from an NVML event set registered for ``nvmlEventTypeXidCriticalError`` and polled with a
  0 ms wait each pass; for devices where the event set is not supported (and when
  ``kernel_log_fallback``), from ``/dev/kmsg`` (``NVRM: Xid (PCI:...): NN,`` lines), read without
  blocking from where the log ended when the collector started.
* ``gpu.lost`` (labels ``gpu``, ``uuid``, ``pci``) when a device becomes lost.
* ``gpu.reset_required`` (labels ``gpu``, ``uuid``, ``pci``) when NVML first answers a query
  about a device with ``NVMLError_ResetRequired``.

NVML errors never leave ``collect()``: a lost GPU or one that needs a reset becomes an event and
a metric, an unsupported query is remembered per device (and never asked again), anything else
makes that value None for the pass.

Indices shift when a GPU is drained or lost, so every event also names the GPU by PCI bus id
(NVML's ``busId``, ``00000000:3B:00.0``) and UUID; the guard keys of GPU playbooks use the bus id.

Detail: ``devices``: ``{I: {uuid, name, pci, mig}}`` (``mig``: ``{M: {uuid, gi, ci}}``),
``xid_source``: "nvml", "kmsg", "nvml+kmsg" or "none".
"""

from __future__ import annotations

import contextlib
import ctypes
import enum
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final, SupportsFloat, TypeAlias

from agent.collect import gpu_xid
from agent.collect.base import BaseCollector
from agent.collect.sample import Detail, Event, Metrics, Reading, key
from agent.collect.settings import GpuSettings
from agent.errors import CollectorUnavailable

# pynvml ships no type information (and tests hand in a stand-in module), so what NVML returns
# (structs, ints, handles) is Any below; _Absent is what the collector adds to it.


class _Absent(enum.Enum):
    """Marks "this device does not have it": the query is not supported here (None, by contrast,
    is "it could not be read this time")."""

    ABSENT = enum.auto()


_ABSENT: Final = _Absent.ABSENT
# What one NVML query gives: NVML's value, None (unreadable now) or _ABSENT.
_Queried: TypeAlias = Any | _Absent
# A value put into a metric: a number, None or _ABSENT (the metric is left out).
_Value: TypeAlias = SupportsFloat | _Absent | None
_NO_INSTANCE = 0xFFFFFFFF  # NVML's "no MIG instance" id

# Throttle flags: metric family -> nvml constant name (the same bit for the "Event" spelling).
_THROTTLE_FLAGS = (
    ("gpu.throttle_hw_slowdown", "nvmlClocksThrottleReasonHwSlowdown"),
    ("gpu.throttle_sw_thermal", "nvmlClocksThrottleReasonSwThermalSlowdown"),
    ("gpu.throttle_hw_thermal", "nvmlClocksThrottleReasonHwThermalSlowdown"),
    ("gpu.throttle_power_brake", "nvmlClocksThrottleReasonHwPowerBrakeSlowdown"),
    ("gpu.throttle_sw_power_cap", "nvmlClocksThrottleReasonSwPowerCap"),
)
_THROTTLE_BITS = {  # the documented values, used when the module lacks a name
    "nvmlClocksThrottleReasonHwSlowdown": 0x8,
    "nvmlClocksThrottleReasonSwThermalSlowdown": 0x20,
    "nvmlClocksThrottleReasonHwThermalSlowdown": 0x40,
    "nvmlClocksThrottleReasonHwPowerBrakeSlowdown": 0x80,
    "nvmlClocksThrottleReasonSwPowerCap": 0x4,
}


def _text(value: object) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


@dataclass(slots=True)
class _Mig:
    """One MIG device (a GPU instance's compute instance) of a GPU with MIG enabled."""

    label: str  # "I/giG/ciC"
    handle: Any
    uuid: str
    gi: int
    ci: int


@dataclass(slots=True)
class _Device:
    index: int
    label: str
    handle: Any = None  # NVML's opaque device handle (a ctypes pointer), None until looked up
    uuid: str = ""
    name: str = ""
    pci: tuple[int, int, int] | None = None  # (domain, bus, device)
    bus_id: str = ""  # NVML's busId, "00000000:3B:00.0"
    lost: bool = False
    lost_reported: bool = False
    reset_required: bool = False
    reset_reported: bool = False
    migs: list[_Mig] = field(default_factory=list)
    events: bool = False  # registered with the NVML event set
    nvlinks: list[int] = field(default_factory=list)
    unsupported: set[tuple[object, ...]] = field(default_factory=set)
    xids: int = 0


#: The library pynvml loads on Linux (``CDLL("libnvidia-ml.so.1")``, by the loader's search path).
NVML_LIBRARY: Final = "libnvidia-ml.so.1"


def _probe_library() -> None:
    """CollectorUnavailable when the NVIDIA management library cannot be loaded: checked before
    pynvml is imported, so a node without the driver never pays for the bindings (the same
    ``dlopen`` that pynvml's ``nvmlInit`` does; the handle stays with the process, as pynvml's)."""
    try:
        ctypes.CDLL(NVML_LIBRARY)
    except OSError as e:
        raise CollectorUnavailable(f"no libnvidia-ml: NVML Shared Library Not Found ({e})") from e


class GpuCollector(BaseCollector[GpuSettings]):
    """See the module docstring for the metrics and events."""

    name = "gpu"

    def __init__(
        self, settings: GpuSettings | None = None, *, root: str = "/", nvml: object | None = None
    ) -> None:
        super().__init__(settings or GpuSettings(), root=root)
        self._nvml_arg = nvml  # a stand-in for the pynvml module; None: the real one, in start()
        self._nv: Any = None  # the module in use, untyped (see above)
        self._devs: list[_Device] = []
        self._event_set: Any = None  # NVML's event set handle, None when XIDs do not come from NVML
        self._kmsg = gpu_xid.KmsgXids()
        self._xid_mask = 0
        self._initialised = False

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self) -> None:
        nv: Any = self._nvml_arg
        if nv is None:
            _probe_library()  # no library, no pynvml import: ~2 MiB and 16 ms saved on a node without
            try:
                import pynvml  # noqa: PLC0415 - lazy: only nodes with the NVIDIA library need it

                nv = pynvml
            except ImportError as e:
                raise CollectorUnavailable(f"no pynvml (nvidia-ml-py): {e}") from e
        self._nv = nv
        try:
            nv.nvmlInit()
        except nv.NVMLError_LibraryNotFound as e:
            raise CollectorUnavailable(f"no libnvidia-ml: {e}") from e
        except nv.NVMLError as e:
            raise CollectorUnavailable(f"no libnvidia-ml: nvmlInit failed: {e}") from e
        self._initialised = True
        try:
            count = int(nv.nvmlDeviceGetCount())
        except nv.NVMLError as e:
            self.close()
            raise CollectorUnavailable(f"NVML cannot count devices: {e}") from e
        if count == 0:
            self.close()
            raise CollectorUnavailable("NVML sees no GPU")
        self._xid_mask = int(getattr(nv, "nvmlEventTypeXidCriticalError", 0x8))
        self._devs = [_Device(index=i, label=str(i)) for i in range(count)]
        for dev in self._devs:
            self._open_device(dev)
        self._setup_events()

    def _open_device(self, dev: _Device) -> bool:
        nv = self._nv
        try:
            dev.handle = nv.nvmlDeviceGetHandleByIndex(dev.index)
        except nv.NVMLError_GpuIsLost:
            dev.lost = True
            return False
        except nv.NVMLError:
            return False
        uuid = self._q(dev, "nvmlDeviceGetUUID", dev.handle)
        dev.uuid = _text(uuid) if uuid is not None and uuid is not _ABSENT else ""
        name = self._q(dev, "nvmlDeviceGetName", dev.handle)
        dev.name = _text(name) if name is not None and name is not _ABSENT else ""
        pci = self._q(dev, "nvmlDeviceGetPciInfo", dev.handle)
        if pci is not None and pci is not _ABSENT:
            dev.pci = (int(pci.domain), int(pci.bus), int(pci.device))
            dev.bus_id = _text(getattr(pci, "busId", "")) or _pci_str(dev.pci)
        self._open_migs(dev)
        dev.nvlinks = []
        max_links = int(getattr(nv, "NVML_NVLINK_MAX_LINKS", 0))
        for link in range(max_links):
            try:
                nv.nvmlDeviceGetNvLinkState(dev.handle, link)
            except nv.NVMLError_NotSupported:
                if link == 0:
                    break  # no NVLink on this device
                continue
            except nv.NVMLError:
                continue
            dev.nvlinks.append(link)
        return True

    def _open_migs(self, dev: _Device) -> None:
        """The MIG devices of a GPU with MIG enabled (none where MIG is unsupported or off)."""
        nv = self._nv
        dev.migs = []
        mode = self._q(dev, "nvmlDeviceGetMigMode", dev.handle)
        if mode is None or mode is _ABSENT or int(mode[0]) != int(getattr(nv, "NVML_DEVICE_MIG_ENABLE", 1)):
            return
        count = self._q(dev, "nvmlDeviceGetMaxMigDeviceCount", dev.handle)
        for i in range(0 if count is None or count is _ABSENT else int(count)):
            try:
                h = nv.nvmlDeviceGetMigDeviceHandleByIndex(dev.handle, i)
                gi = int(nv.nvmlDeviceGetGpuInstanceId(h))
                ci = int(nv.nvmlDeviceGetComputeInstanceId(h))
                uuid = _text(nv.nvmlDeviceGetUUID(h))
            except nv.NVMLError:
                continue  # NotFound: no MIG device in this slot
            dev.migs.append(_Mig(f"{dev.label}/gi{gi}/ci{ci}", h, uuid, gi, ci))

    def _setup_events(self) -> None:
        nv = self._nv
        try:
            self._event_set = nv.nvmlEventSetCreate()
        except (nv.NVMLError, AttributeError):
            self._event_set = None
        if self._event_set is not None:
            for dev in self._devs:
                if dev.handle is None:
                    continue
                try:
                    nv.nvmlDeviceRegisterEvents(dev.handle, self._xid_mask, self._event_set)
                    dev.events = True
                except nv.NVMLError:
                    dev.events = False
        if self.settings.kernel_log_fallback and not all(d.events for d in self._devs):
            self._kmsg.open(self._p("dev/kmsg"))

    def close(self) -> None:
        nv = self._nv
        self._kmsg.close()
        if nv is None or not self._initialised:
            return
        if self._event_set is not None:
            with contextlib.suppress(nv.NVMLError):
                nv.nvmlEventSetFree(self._event_set)
            self._event_set = None
        with contextlib.suppress(nv.NVMLError):
            nv.nvmlShutdown()
        self._initialised = False

    # -- one pass --------------------------------------------------------------------------------

    def collect(self) -> Reading:
        m: Metrics = {}
        events: list[Event] = []
        for dev in self._devs:
            if dev.lost or dev.handle is None:
                self._reprobe(dev)
            if dev.handle is not None and not dev.lost:
                self._device(dev, m)
            if dev.lost:
                self._mark_unreadable(dev, m)
            m[key("gpu.lost", dev.label)] = 1.0 if dev.lost else 0.0
            m[key("gpu.reset_required", dev.label)] = 1.0 if dev.reset_required else 0.0
            if dev.lost and not dev.lost_reported:
                events.append(self._event("gpu.lost", f"GPU {dev.label} ({dev.uuid}) has fallen off the bus",
                                          value=1.0, labels=_labels(dev)))
            if dev.reset_required and not dev.reset_reported:
                events.append(self._event("gpu.reset_required", f"GPU {dev.label} ({dev.uuid}) needs a reset",
                                          value=1.0, labels=_labels(dev)))
            dev.lost_reported = dev.lost
            dev.reset_reported = dev.reset_required
        self._nvml_events(events)
        self._kmsg_events(events)
        for dev in self._devs:
            m[key("gpu.xid_count", dev.label)] = float(dev.xids)
        return Reading(metrics=m, events=events, detail=self._detail())

    def _detail(self) -> Detail:
        nvml_ok = any(d.events for d in self._devs)
        source = "+".join(s for s, on in (("nvml", nvml_ok), ("kmsg", self._kmsg.fd is not None)) if on)
        return {
            "devices": {
                d.label: {
                    "uuid": d.uuid, "name": d.name, "pci": d.bus_id,
                    "mig": {g.label: {"uuid": g.uuid, "gi": g.gi, "ci": g.ci} for g in d.migs},
                }
                for d in self._devs
            },
            "xid_source": source or "none",
        }

    def _reprobe(self, dev: _Device) -> None:
        """A lost device (or one without a handle) is looked up again; lost until a query works."""
        nv = self._nv
        try:
            handle = nv.nvmlDeviceGetHandleByIndex(dev.index)
            nv.nvmlDeviceGetTemperature(handle, nv.NVML_TEMPERATURE_GPU)
        except nv.NVMLError_GpuIsLost:
            dev.lost = True
            return
        except nv.NVMLError_NotSupported:
            pass
        except nv.NVMLError:
            return
        if dev.handle is None or dev.lost:
            dev.lost = False
            self._open_device(dev)

    def _q(self, dev: _Device, fn_name: str, *args: object) -> _Queried:
        """One NVML query: its value, _ABSENT (not supported here) or None (unreadable now)."""
        query_key = (fn_name, *args[1:])
        if query_key in dev.unsupported:
            return _ABSENT
        if dev.lost:
            return None
        nv = self._nv
        fn: Callable[..., Any] | None = getattr(nv, fn_name, None)
        if fn is None:
            dev.unsupported.add(query_key)
            return _ABSENT
        try:
            return fn(*args)
        except (nv.NVMLError_NotSupported, nv.NVMLError_FunctionNotFound):
            dev.unsupported.add(query_key)
            return _ABSENT
        except nv.NVMLError_GpuIsLost:
            dev.lost = True
            return None
        except nv.NVMLError as e:
            if isinstance(e, getattr(nv, "NVMLError_ResetRequired", ())):
                dev.reset_required = True
            return None

    def _device(self, dev: _Device, m: Metrics) -> None:
        nv, h, lbl = self._nv, dev.handle, dev.label

        def put(family: str, value: _Value, scale: float = 1.0) -> None:
            if value is _ABSENT:
                return
            m[key(family, lbl)] = None if value is None else float(value) * scale

        util = self._q(dev, "nvmlDeviceGetUtilizationRates", h)
        put("gpu.util_pct", _attr(util, "gpu"))
        put("gpu.mem_util_pct", _attr(util, "memory"))
        mem = self._q(dev, "nvmlDeviceGetMemoryInfo", h)
        put("gpu.mem_used_bytes", _attr(mem, "used"))
        put("gpu.mem_total_bytes", _attr(mem, "total"))
        put("gpu.temp_c", self._q(dev, "nvmlDeviceGetTemperature", h, nv.NVML_TEMPERATURE_GPU))
        put("gpu.power_w", self._q(dev, "nvmlDeviceGetPowerUsage", h), 0.001)
        put("gpu.sm_clock_mhz", self._q(dev, "nvmlDeviceGetClockInfo", h, nv.NVML_CLOCK_SM))
        put("gpu.mem_clock_mhz", self._q(dev, "nvmlDeviceGetClockInfo", h, nv.NVML_CLOCK_MEM))

        reasons = self._q(dev, "nvmlDeviceGetCurrentClocksEventReasons", h)
        if reasons is _ABSENT:
            reasons = self._q(dev, "nvmlDeviceGetCurrentClocksThrottleReasons", h)
        put("gpu.throttle_reasons", reasons)
        for family, const in _THROTTLE_FLAGS:
            bit = int(getattr(nv, const, _THROTTLE_BITS[const]))
            put(family, reasons if reasons is None or reasons is _ABSENT else int(bool(int(reasons) & bit)))

        corrected, uncorrected = nv.NVML_MEMORY_ERROR_TYPE_CORRECTED, nv.NVML_MEMORY_ERROR_TYPE_UNCORRECTED
        for family, etype, counter in (
            ("gpu.ecc_sbe_volatile", corrected, nv.NVML_VOLATILE_ECC),
            ("gpu.ecc_dbe_volatile", uncorrected, nv.NVML_VOLATILE_ECC),
            ("gpu.ecc_sbe_aggregate", corrected, nv.NVML_AGGREGATE_ECC),
            ("gpu.ecc_dbe_aggregate", uncorrected, nv.NVML_AGGREGATE_ECC),
        ):
            put(family, self._q(dev, "nvmlDeviceGetTotalEccErrors", h, etype, counter))

        for family, cause in (
            ("gpu.retired_pages_sbe", nv.NVML_PAGE_RETIREMENT_CAUSE_MULTIPLE_SINGLE_BIT_ECC_ERRORS),
            ("gpu.retired_pages_dbe", nv.NVML_PAGE_RETIREMENT_CAUSE_DOUBLE_BIT_ECC_ERROR),
        ):
            pages = self._q(dev, "nvmlDeviceGetRetiredPages", h, cause)
            put(family, pages if pages is None or pages is _ABSENT else len(pages))
        put("gpu.retired_pages_pending", self._q(dev, "nvmlDeviceGetRetiredPagesPendingStatus", h))

        remap = self._q(dev, "nvmlDeviceGetRemappedRows", h)
        for i, family in enumerate(
            ("gpu.remap_correctable", "gpu.remap_uncorrectable", "gpu.remap_pending", "gpu.remap_failure")
        ):
            put(family, remap if remap is None or remap is _ABSENT else remap[i])

        put("gpu.pcie_replays", self._q(dev, "nvmlDeviceGetPcieReplayCounter", h))
        if dev.nvlinks:
            self._nvlink(dev, put)
        mode = self._q(dev, "nvmlDeviceGetMigMode", h)
        put("gpu.mig_mode", mode if mode is None or mode is _ABSENT else int(mode[0]))
        for mig in dev.migs:
            mem = self._q(dev, "nvmlDeviceGetMemoryInfo", mig.handle)
            for family, attr in (("gpu.mig_mem_used_bytes", "used"), ("gpu.mig_mem_total_bytes", "total")):
                v = _attr(mem, attr)
                m[key(family, mig.label)] = None if v is None or v is _ABSENT else float(v)

    def _nvlink(self, dev: _Device, put: Callable[[str, _Value], None]) -> None:
        nv = self._nv
        groups = (
            ("gpu.nvlink_crc_errors", (nv.NVML_NVLINK_ERROR_DL_CRC_FLIT, nv.NVML_NVLINK_ERROR_DL_CRC_DATA)),
            ("gpu.nvlink_replay_errors", (nv.NVML_NVLINK_ERROR_DL_REPLAY,)),
            ("gpu.nvlink_recovery_errors", (nv.NVML_NVLINK_ERROR_DL_RECOVERY,)),
        )
        for family, counters in groups:
            total: int | _Absent | None = _ABSENT
            for link in dev.nvlinks:
                for counter in counters:
                    v = self._q(dev, "nvmlDeviceGetNvLinkErrorCounter", dev.handle, link, counter)
                    if v is _ABSENT:
                        continue
                    if v is None or total is None:
                        total = None
                    else:
                        total = (0 if total is _ABSENT else total) + int(v)
            put(family, total)

    def _mark_unreadable(self, dev: _Device, m: Metrics) -> None:
        """A lost device's metrics (those it had) are None: they cannot be read."""
        prefix_lbl = f"[{dev.label}]"
        for k in m:
            if k.endswith(prefix_lbl) and k.startswith("gpu."):
                m[k] = None
        for family in ("gpu.util_pct", "gpu.mem_used_bytes", "gpu.temp_c", "gpu.power_w"):
            m.setdefault(key(family, dev.label), None)

    # -- XIDs ------------------------------------------------------------------------------------

    def _xid_event(self, dev: _Device | None, xid: int, source: str, extra: str = "",
                   mig: _Mig | None = None) -> Event:
        if dev is not None:
            dev.xids += 1
        label = dev.label if dev is not None else "unknown"
        labels = _labels(dev) if dev is not None else {"gpu": label, "uuid": "", "pci": ""}
        labels |= {"source": source, "resolution": gpu_xid.bucket(xid)}
        if mig is not None:
            labels |= {"mig": mig.label, "mig_uuid": mig.uuid}
        return self._event("gpu.xid", f"XID {xid} on GPU {label}{extra}", value=float(xid), labels=labels)

    def _nvml_events(self, events: list[Event]) -> None:
        if self._event_set is None:
            return
        for got in gpu_xid.poll_event_set(self._nv, self._event_set, self._xid_mask):
            dev = self._device_of(got.handle)
            mig = None
            if dev is not None and got.gpu_instance is not None:
                mig = next((g for g in dev.migs if g.gi == got.gpu_instance
                            and got.compute_instance in (None, g.ci)), None)
            events.append(self._xid_event(dev, got.xid, "nvml", mig=mig))

    def _device_of(self, handle: object) -> _Device | None:
        nv = self._nv
        try:
            idx = int(nv.nvmlDeviceGetIndex(handle))
        except nv.NVMLError:
            idx = -1
        if 0 <= idx < len(self._devs):
            return self._devs[idx]
        for dev in self._devs:  # a lost device cannot be asked its index: compare the handles
            if _same_handle(dev.handle, handle):
                return dev
        return None

    def _kmsg_events(self, events: list[Event]) -> None:
        by_pci = {d.pci: d for d in self._devs if d.pci is not None}
        for pci, xid in self._kmsg.read():
            dev = by_pci.get(pci)
            if dev is not None and dev.events:
                continue  # already reported through NVML
            where = "" if dev is not None else f" (PCI {_pci_str(pci)})"
            events.append(self._xid_event(dev, xid, "kmsg", where))


def _labels(dev: _Device) -> dict[str, str]:
    return {"gpu": dev.label, "uuid": dev.uuid, "pci": dev.bus_id}


def _attr(obj: _Queried, name: str) -> _Queried:
    """A field of an NVML struct that was queried, passing None and _ABSENT through."""
    if obj is None or obj is _ABSENT:
        return obj
    return getattr(obj, name)


def _pci_str(pci: tuple[int, int, int] | None) -> str:
    return "" if pci is None else f"{pci[0]:04x}:{pci[1]:02x}:{pci[2]:02x}"


def _same_handle(a: Any, b: Any) -> bool:  # Any: ctypes.cast is typed for ctypes objects only
    if a is None or b is None:
        return False
    if a == b:
        return True
    try:  # real NVML handles are ctypes pointers: compare the addresses
        return bool(ctypes.cast(a, ctypes.c_void_p).value == ctypes.cast(b, ctypes.c_void_p).value)
    except (TypeError, ctypes.ArgumentError):
        return False
