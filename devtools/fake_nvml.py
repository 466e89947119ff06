"""FakeNVML: a stand-in for the ``pynvml`` module, for hosts (and tests) without an NVIDIA GPU.

A test double, so it lives in ``devtools/`` and is not shipped: the agent always uses the real
``pynvml`` unless a caller hands it another module object (``GpuCollector(nvml=FakeNVML())`` or
``agent.collect.registry.build(..., nvml=FakeNVML())``).

An instance behaves like the module object the GPU collector uses: the same function names and
signatures (``nvmlInit``, ``nvmlDeviceGetHandleByIndex``, ``nvmlDeviceGetTotalEccErrors``,
``nvmlEventSetWait``, ...), the same constants (``NVML_*``, ``nvmlClocksThrottleReason*``,
``nvmlEventType*``) and the very same exception classes (``NVMLError``, ``NVMLError_NotSupported``,
``NVMLError_GpuIsLost``, ... are taken from the real pynvml module, which is pure Python and loads
libnvidia-ml only in ``nvmlInit``), so ``except nvml.NVMLError_GpuIsLost`` behaves identically.

It models N devices with settable state and the failure signals that matter to an operator:

* ``inject_xid(dev, xid)``: an XID critical error, delivered through every event set the device
  is registered with (``nvmlEventSetWait``); ``kmsg_line(dev, xid)`` is the matching kernel log line
  for testing the ``/dev/kmsg`` fallback;
* ``add_ecc(dev, corrected=, uncorrected=)``: volatile and aggregate ECC counts increase;
* ``set_throttle(dev, mask)``: current clock throttle (event) reasons bitmask;
* ``set_row_remap(dev, correctable=, uncorrectable=, pending=, failure=)``;
* ``retire_page(dev, cause, address)``, ``set_retired_pages_pending(dev, pending)``;
* ``add_pcie_replays(dev, n)``, ``add_nvlink_errors(dev, link, counter, n)``;
* ``fall_off_bus(dev)``: every later call about the device, ``nvmlDeviceGetHandleByIndex``
  included, raises ``NVMLError_GpuIsLost`` (and XID 79 is delivered, as the driver does);
* ``FakeNVML(library_found=False)``: ``nvmlInit`` raises ``NVMLError_LibraryNotFound``;
  ``init_error=NVML_ERROR_DRIVER_NOT_LOADED`` and the like for other init failures;
* ``require_reset(dev)``: every query but the identity ones (UUID, name, PCI info, index) raises
  ``NVMLError_ResetRequired``, as after an error only a GPU reset clears;
* ``enable_mig(dev, [(gi, ci, mem_bytes), ...])``: MIG mode on with those MIG devices, as on an
  H100 (``nvmlDeviceGetMigMode`` [1, 1], 7 slots, ``nvmlDeviceGetMigDeviceHandleByIndex`` raises
  ``NVMLError_NotFound`` for an empty slot, utilisation of the parent GPU is not supported);
  ``inject_xid(dev, xid, gpu_instance=G, compute_instance=C)`` names a MIG instance; a GPU
  without ``enable_mig`` answers the MIG queries with ``NVMLError_NotSupported`` (``mig_capable``
  True: MIG supported but disabled);
* ``set_unsupported(dev, "nvmlDeviceGetRetiredPages", ...)``: those queries raise
  ``NVMLError_NotSupported`` (as retired pages do on Ampere and later);
  ``set_events_supported(dev, False)``: ``nvmlDeviceRegisterEvents`` raises ``NotSupported``.

``calls`` counts the calls per function name, for checking that a pass stays cheap.
"""

from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any, NoReturn

import pynvml as _pynvml

_GIB = 1 << 30
# Queries NVML still answers about a GPU that needs a reset.
_IDENTITY = frozenset(
    {"nvmlDeviceGetUUID", "nvmlDeviceGetName", "nvmlDeviceGetPciInfo", "nvmlDeviceGetIndex"}
)


@dataclass(frozen=True, slots=True)
class FakeHandle:
    """Opaque device handle (the real one is a ctypes pointer)."""

    index: int


@dataclass(frozen=True, slots=True)
class FakeMigHandle:
    """Handle of a MIG device: its parent GPU's index and its slot."""

    index: int
    slot: int


@dataclass(slots=True)
class FakeMig:
    gpu_instance: int
    compute_instance: int
    mem_total: int
    mem_used: int = 0
    uuid: str = ""


@dataclass(slots=True)
class FakeUtilization:
    gpu: int
    memory: int


@dataclass(slots=True)
class FakeMemory:
    total: int
    free: int
    used: int


@dataclass(slots=True)
class FakePciInfo:
    domain: int
    bus: int
    device: int
    busId: str  # noqa: N815 - the field name of nvmlPciInfo_t


@dataclass(slots=True)
class FakeEventData:
    """Mirror of pynvml.c_nvmlEventData_t."""

    device: FakeHandle | FakeMigHandle
    eventType: int  # noqa: N815 - pynvml field names
    eventData: int  # noqa: N815
    gpuInstanceId: int = 0xFFFFFFFF  # noqa: N815
    computeInstanceId: int = 0xFFFFFFFF  # noqa: N815


@dataclass(slots=True)
class FakeEventSet:
    id: int
    registered: dict[int, int] = field(default_factory=dict)  # device index -> event type mask
    queue: deque[FakeEventData] = field(default_factory=deque)
    freed: bool = False


@dataclass(slots=True)
class FakeGpu:
    """Settable state of one fake device."""

    index: int
    name: str = "NVIDIA H100 80GB HBM3"
    uuid: str = ""
    pci_bus: int = 0
    util_gpu: int = 0
    util_mem: int = 0
    mem_total: int = 80 * _GIB
    mem_used: int = 0
    temp_c: int = 35
    power_mw: int = 70_000
    sm_clock_mhz: int = 1980
    mem_clock_mhz: int = 2619
    throttle_reasons: int = 0
    # (memory error type, counter type) -> count
    ecc: dict[tuple[int, int], int] = field(default_factory=dict)
    # page retirement cause -> addresses
    retired_pages: dict[int, list[int]] = field(default_factory=dict)
    retired_pages_pending: int = 0
    remap_correctable: int = 0
    remap_uncorrectable: int = 0
    remap_pending: int = 0
    remap_failure: int = 0
    pcie_replays: int = 0
    nvlink_links: int = 0
    # (link, counter) -> count
    nvlink_errors: dict[tuple[int, int], int] = field(default_factory=dict)
    lost: bool = False
    reset_required: bool = False
    events_supported: bool = True
    unsupported: set[str] = field(default_factory=set)
    mig_capable: bool = False
    mig_mode: int = 0
    migs: list[FakeMig | None] = field(default_factory=list)  # by slot; None: empty slot


class FakeNVML:
    """Drop-in for the ``pynvml`` module object; see the module docstring."""

    # The exception classes and constants are the real module's (copied in __init__ too, so that
    # every NVMLError_* and NVML_* name the real module has is present).
    NVMLError = _pynvml.NVMLError

    def __init__(
        self,
        n_devices: int = 1,
        *,
        library_found: bool = True,
        init_error: int | None = None,
        nvlink_links: int = 0,
    ) -> None:
        for name in dir(_pynvml):
            if name.startswith(("NVML_", "NVMLError", "nvmlClocks", "nvmlEventType")):
                setattr(self, name, getattr(_pynvml, name))
        self.library_found = library_found
        self.init_error = init_error
        self.init_count = 0
        self.calls: Counter[str] = Counter()
        self.devices = [
            FakeGpu(
                index=i,
                uuid=f"GPU-fa4e0000-0000-4000-8000-{i:012x}",
                pci_bus=0x18 + 0x10 * i,
                nvlink_links=nvlink_links,
            )
            for i in range(n_devices)
        ]
        self._event_sets: list[FakeEventSet] = []

    # -- failure signals and state -------------------------------------------------------------

    def device(self, dev: int) -> FakeGpu:
        return self.devices[dev]

    def inject_xid(
        self, dev: int, xid: int, *, gpu_instance: int | None = None, compute_instance: int | None = None
    ) -> None:
        mask = _pynvml.nvmlEventTypeXidCriticalError
        none = 0xFFFFFFFF
        for es in self._event_sets:
            if not es.freed and es.registered.get(dev, 0) & mask:
                es.queue.append(FakeEventData(
                    device=FakeHandle(dev), eventType=mask, eventData=xid,
                    gpuInstanceId=none if gpu_instance is None else gpu_instance,
                    computeInstanceId=none if compute_instance is None else compute_instance,
                ))

    def require_reset(self, dev: int, required: bool = True) -> None:
        self.devices[dev].reset_required = required

    def enable_mig(self, dev: int, instances: list[tuple[int, int, int]], slots: int = 7) -> None:
        gpu = self.devices[dev]
        gpu.mig_capable, gpu.mig_mode = True, int(_pynvml.NVML_DEVICE_MIG_ENABLE)
        gpu.migs = [None] * slots
        for slot, (gi, ci, mem) in enumerate(instances):
            gpu.migs[slot] = FakeMig(gi, ci, mem, uuid=f"MIG-fa4e{dev:04x}-{gi:04x}-4000-8000-{ci:012x}")

    def kmsg_line(self, dev: int, xid: int, seq: int = 1) -> str:
        """The /dev/kmsg record the driver writes for this XID."""
        gpu = self.devices[dev]
        return (
            f"4,{seq},123456789,-;NVRM: Xid (PCI:0000:{gpu.pci_bus:02x}:00): {xid}, "
            f"pid=1234, name=python3, Ch 00000008\n"
        )

    def add_ecc(self, dev: int, *, corrected: int = 0, uncorrected: int = 0) -> None:
        gpu = self.devices[dev]
        for counter in (_pynvml.NVML_VOLATILE_ECC, _pynvml.NVML_AGGREGATE_ECC):
            for etype, n in (
                (_pynvml.NVML_MEMORY_ERROR_TYPE_CORRECTED, corrected),
                (_pynvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED, uncorrected),
            ):
                gpu.ecc[(etype, counter)] = gpu.ecc.get((etype, counter), 0) + n

    def set_throttle(self, dev: int, mask: int) -> None:
        self.devices[dev].throttle_reasons = mask

    def set_row_remap(
        self,
        dev: int,
        *,
        correctable: int | None = None,
        uncorrectable: int | None = None,
        pending: bool | None = None,
        failure: bool | None = None,
    ) -> None:
        gpu = self.devices[dev]
        if correctable is not None:
            gpu.remap_correctable = correctable
        if uncorrectable is not None:
            gpu.remap_uncorrectable = uncorrectable
        if pending is not None:
            gpu.remap_pending = int(pending)
        if failure is not None:
            gpu.remap_failure = int(failure)

    def retire_page(self, dev: int, cause: int, address: int) -> None:
        self.devices[dev].retired_pages.setdefault(cause, []).append(address)

    def set_retired_pages_pending(self, dev: int, pending: bool) -> None:
        self.devices[dev].retired_pages_pending = int(pending)

    def add_pcie_replays(self, dev: int, n: int = 1) -> None:
        self.devices[dev].pcie_replays += n

    def add_nvlink_errors(self, dev: int, link: int, counter: int, n: int = 1) -> None:
        errs = self.devices[dev].nvlink_errors
        errs[(link, counter)] = errs.get((link, counter), 0) + n

    def fall_off_bus(self, dev: int, *, xid: bool = True) -> None:
        if xid:
            self.inject_xid(dev, 79)
        self.devices[dev].lost = True

    def set_unsupported(self, dev: int, *function_names: str) -> None:
        self.devices[dev].unsupported.update(function_names)

    def set_events_supported(self, dev: int, supported: bool) -> None:
        self.devices[dev].events_supported = supported

    # -- helpers -----------------------------------------------------------------------------------

    @staticmethod
    def _raise(code: int) -> NoReturn:
        raise _pynvml.NVMLError(code)

    def _enter(self, fn: str) -> None:
        self.calls[fn] += 1
        if self.init_count <= 0:
            self._raise(_pynvml.NVML_ERROR_UNINITIALIZED)

    def _gpu(self, fn: str, handle: object) -> FakeGpu:
        self._enter(fn)
        if not isinstance(handle, FakeHandle) or not 0 <= handle.index < len(self.devices):
            self._raise(_pynvml.NVML_ERROR_INVALID_ARGUMENT)
        gpu = self.devices[handle.index]
        if gpu.lost:
            self._raise(_pynvml.NVML_ERROR_GPU_IS_LOST)
        if fn in gpu.unsupported:
            self._raise(_pynvml.NVML_ERROR_NOT_SUPPORTED)
        if gpu.reset_required and fn not in _IDENTITY:
            self._raise(_pynvml.NVML_ERROR_RESET_REQUIRED)
        return gpu

    def _mig(self, fn: str, handle: FakeMigHandle) -> FakeMig:
        gpu = self._gpu(fn, FakeHandle(handle.index))
        mig = gpu.migs[handle.slot] if gpu.mig_mode and 0 <= handle.slot < len(gpu.migs) else None
        if mig is None:
            self._raise(_pynvml.NVML_ERROR_INVALID_ARGUMENT)
        return mig

    def _mig_parent(self, fn: str, handle: object) -> FakeGpu:
        gpu = self._gpu(fn, handle)
        if not gpu.mig_capable:
            self._raise(_pynvml.NVML_ERROR_NOT_SUPPORTED)
        return gpu

    # -- the pynvml API ----------------------------------------------------------------------------

    def nvmlInit(self) -> None:  # noqa: N802 - pynvml names
        self.calls["nvmlInit"] += 1
        if not self.library_found:
            self._raise(_pynvml.NVML_ERROR_LIBRARY_NOT_FOUND)
        if self.init_error is not None:
            self._raise(self.init_error)
        self.init_count += 1

    def nvmlShutdown(self) -> None:  # noqa: N802
        self._enter("nvmlShutdown")
        self.init_count -= 1

    def nvmlDeviceGetCount(self) -> int:  # noqa: N802
        self._enter("nvmlDeviceGetCount")
        return len(self.devices)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> FakeHandle:  # noqa: N802
        self._enter("nvmlDeviceGetHandleByIndex")
        if not 0 <= index < len(self.devices):
            self._raise(_pynvml.NVML_ERROR_INVALID_ARGUMENT)
        if self.devices[index].lost:
            self._raise(_pynvml.NVML_ERROR_GPU_IS_LOST)
        return FakeHandle(index)

    def nvmlDeviceGetIndex(self, handle: object) -> int:  # noqa: N802
        return self._gpu("nvmlDeviceGetIndex", handle).index

    def nvmlDeviceGetUUID(self, handle: object) -> str:  # noqa: N802
        if isinstance(handle, FakeMigHandle):
            return self._mig("nvmlDeviceGetUUID", handle).uuid
        return self._gpu("nvmlDeviceGetUUID", handle).uuid

    def nvmlDeviceGetName(self, handle: object) -> str:  # noqa: N802
        return self._gpu("nvmlDeviceGetName", handle).name

    def nvmlDeviceGetPciInfo(self, handle: object) -> FakePciInfo:  # noqa: N802
        gpu = self._gpu("nvmlDeviceGetPciInfo", handle)
        return FakePciInfo(domain=0, bus=gpu.pci_bus, device=0, busId=f"00000000:{gpu.pci_bus:02X}:00.0")

    def nvmlDeviceGetUtilizationRates(self, handle: object) -> FakeUtilization:  # noqa: N802
        gpu = self._gpu("nvmlDeviceGetUtilizationRates", handle)
        if gpu.mig_mode:
            self._raise(_pynvml.NVML_ERROR_NOT_SUPPORTED)  # per-instance utilisation is DCGM's
        return FakeUtilization(gpu=gpu.util_gpu, memory=gpu.util_mem)

    def nvmlDeviceGetMemoryInfo(self, handle: object, version: int | None = None) -> FakeMemory:  # noqa: N802
        if isinstance(handle, FakeMigHandle):
            mig = self._mig("nvmlDeviceGetMemoryInfo", handle)
            return FakeMemory(total=mig.mem_total, free=mig.mem_total - mig.mem_used, used=mig.mem_used)
        gpu = self._gpu("nvmlDeviceGetMemoryInfo", handle)
        return FakeMemory(total=gpu.mem_total, free=gpu.mem_total - gpu.mem_used, used=gpu.mem_used)

    def nvmlDeviceGetTemperature(self, handle: object, sensor: int) -> int:  # noqa: N802
        gpu = self._gpu("nvmlDeviceGetTemperature", handle)
        if sensor != _pynvml.NVML_TEMPERATURE_GPU:
            self._raise(_pynvml.NVML_ERROR_INVALID_ARGUMENT)
        return gpu.temp_c

    def nvmlDeviceGetPowerUsage(self, handle: object) -> int:  # noqa: N802
        return self._gpu("nvmlDeviceGetPowerUsage", handle).power_mw

    def nvmlDeviceGetClockInfo(self, handle: object, type: int) -> int:  # noqa: N802, A002
        gpu = self._gpu("nvmlDeviceGetClockInfo", handle)
        if type == _pynvml.NVML_CLOCK_SM:
            return gpu.sm_clock_mhz
        if type == _pynvml.NVML_CLOCK_MEM:
            return gpu.mem_clock_mhz
        return self._raise(_pynvml.NVML_ERROR_NOT_SUPPORTED)

    def nvmlDeviceGetCurrentClocksThrottleReasons(self, handle: object) -> int:  # noqa: N802
        return self._gpu("nvmlDeviceGetCurrentClocksThrottleReasons", handle).throttle_reasons

    def nvmlDeviceGetCurrentClocksEventReasons(self, handle: object) -> int:  # noqa: N802
        return self._gpu("nvmlDeviceGetCurrentClocksEventReasons", handle).throttle_reasons

    def nvmlDeviceGetTotalEccErrors(self, handle: object, errorType: int, counterType: int) -> int:  # noqa: N802, N803
        return self._gpu("nvmlDeviceGetTotalEccErrors", handle).ecc.get((errorType, counterType), 0)

    def nvmlDeviceGetRetiredPages(self, device: object, sourceFilter: int) -> list[int]:  # noqa: N802, N803
        return list(self._gpu("nvmlDeviceGetRetiredPages", device).retired_pages.get(sourceFilter, []))

    def nvmlDeviceGetRetiredPagesPendingStatus(self, device: object) -> int:  # noqa: N802
        return self._gpu("nvmlDeviceGetRetiredPagesPendingStatus", device).retired_pages_pending

    def nvmlDeviceGetRemappedRows(self, device: object) -> tuple[int, int, int, int]:  # noqa: N802
        gpu = self._gpu("nvmlDeviceGetRemappedRows", device)
        return (gpu.remap_correctable, gpu.remap_uncorrectable, gpu.remap_pending, gpu.remap_failure)

    def nvmlDeviceGetPcieReplayCounter(self, handle: object) -> int:  # noqa: N802
        return self._gpu("nvmlDeviceGetPcieReplayCounter", handle).pcie_replays

    def nvmlDeviceGetNvLinkState(self, device: object, link: int) -> int:  # noqa: N802
        gpu = self._gpu("nvmlDeviceGetNvLinkState", device)
        if gpu.nvlink_links == 0:
            self._raise(_pynvml.NVML_ERROR_NOT_SUPPORTED)
        if not 0 <= link < gpu.nvlink_links:
            self._raise(_pynvml.NVML_ERROR_INVALID_ARGUMENT)
        return int(_pynvml.NVML_FEATURE_ENABLED)

    def nvmlDeviceGetNvLinkErrorCounter(self, device: object, link: int, counter: int) -> int:  # noqa: N802
        gpu = self._gpu("nvmlDeviceGetNvLinkErrorCounter", device)
        if not 0 <= link < gpu.nvlink_links:
            self._raise(_pynvml.NVML_ERROR_INVALID_ARGUMENT)
        return gpu.nvlink_errors.get((link, counter), 0)

    def nvmlDeviceGetMigMode(self, device: object) -> list[int]:  # noqa: N802
        gpu = self._mig_parent("nvmlDeviceGetMigMode", device)
        return [gpu.mig_mode, gpu.mig_mode]

    def nvmlDeviceGetMaxMigDeviceCount(self, device: object) -> int:  # noqa: N802
        return len(self._mig_parent("nvmlDeviceGetMaxMigDeviceCount", device).migs)

    def nvmlDeviceGetMigDeviceHandleByIndex(self, device: object, index: int) -> FakeMigHandle:  # noqa: N802
        gpu = self._mig_parent("nvmlDeviceGetMigDeviceHandleByIndex", device)
        if not gpu.mig_mode or not 0 <= index < len(gpu.migs):
            self._raise(_pynvml.NVML_ERROR_INVALID_ARGUMENT)
        if gpu.migs[index] is None:
            self._raise(_pynvml.NVML_ERROR_NOT_FOUND)
        return FakeMigHandle(gpu.index, index)

    def nvmlDeviceGetGpuInstanceId(self, device: object) -> int:  # noqa: N802
        if not isinstance(device, FakeMigHandle):
            self._gpu("nvmlDeviceGetGpuInstanceId", device)
            self._raise(_pynvml.NVML_ERROR_INVALID_ARGUMENT)
        return self._mig("nvmlDeviceGetGpuInstanceId", device).gpu_instance

    def nvmlDeviceGetComputeInstanceId(self, device: object) -> int:  # noqa: N802
        if not isinstance(device, FakeMigHandle):
            self._gpu("nvmlDeviceGetComputeInstanceId", device)
            self._raise(_pynvml.NVML_ERROR_INVALID_ARGUMENT)
        return self._mig("nvmlDeviceGetComputeInstanceId", device).compute_instance

    def nvmlDeviceGetSupportedEventTypes(self, handle: object) -> int:  # noqa: N802
        gpu = self._gpu("nvmlDeviceGetSupportedEventTypes", handle)
        return int(_pynvml.nvmlEventTypeXidCriticalError) if gpu.events_supported else 0

    def nvmlEventSetCreate(self) -> FakeEventSet:  # noqa: N802
        self._enter("nvmlEventSetCreate")
        es = FakeEventSet(id=len(self._event_sets))
        self._event_sets.append(es)
        return es

    def nvmlDeviceRegisterEvents(self, handle: object, eventTypes: int, eventSet: Any) -> None:  # noqa: N802, N803
        gpu = self._gpu("nvmlDeviceRegisterEvents", handle)
        if not gpu.events_supported:
            self._raise(_pynvml.NVML_ERROR_NOT_SUPPORTED)
        if not isinstance(eventSet, FakeEventSet) or eventSet.freed:
            self._raise(_pynvml.NVML_ERROR_INVALID_ARGUMENT)
        eventSet.registered[gpu.index] = eventSet.registered.get(gpu.index, 0) | eventTypes

    def nvmlEventSetWait(self, eventSet: Any, timeoutms: int) -> FakeEventData:  # noqa: N802, N803
        return self.nvmlEventSetWait_v2(eventSet, timeoutms)

    def nvmlEventSetWait_v2(self, eventSet: Any, timeoutms: int) -> FakeEventData:  # noqa: N802, N803
        self._enter("nvmlEventSetWait")
        if not isinstance(eventSet, FakeEventSet) or eventSet.freed:
            self._raise(_pynvml.NVML_ERROR_INVALID_ARGUMENT)
        if not eventSet.queue:
            self._raise(_pynvml.NVML_ERROR_TIMEOUT)
        return eventSet.queue.popleft()

    def nvmlEventSetFree(self, eventSet: Any) -> None:  # noqa: N802, N803
        self._enter("nvmlEventSetFree")
        if isinstance(eventSet, FakeEventSet):
            eventSet.freed = True

    def __getattr__(self, name: str) -> Any:
        # Only reached for names not set above: fail like a module would.
        raise AttributeError(f"FakeNVML has no attribute {name!r}")
