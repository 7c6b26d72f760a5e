"""GPU status and periodic GPU samples through NVML (the nvidia-ml-py package, `import pynvml`).

Nothing here needs a GPU: without one (no device, no driver, no pynvml) the status says why,
the sampler emits a single available=False sample and starts no thread.
"""
from __future__ import annotations

import logging
import math
import threading
import time
from types import ModuleType
from typing import Callable, Optional

from headroom_sidecar.agent.records import GpuSample

log = logging.getLogger("headroom.gpu")

Submit = Callable[[GpuSample], None]


class NvmlUnavailable(RuntimeError):
    """NVML cannot be used here; str() is the reason shown as "unavailable: <reason>"."""


def _import_pynvml() -> ModuleType:
    try:
        import pynvml
    except ImportError:
        raise NvmlUnavailable("pynvml missing (pip install nvidia-ml-py)") from None
    return pynvml


def _init(nvml: Optional[ModuleType]) -> ModuleType:
    """An initialised NVML module (the caller must nvmlShutdown) with at least one device."""
    nv = nvml if nvml is not None else _import_pynvml()
    try:
        nv.nvmlInit()
    except nv.NVMLError as e:
        raise NvmlUnavailable(f"NVML init failed: {e} (no NVIDIA driver?)") from None
    try:
        count = nv.nvmlDeviceGetCount()
    except nv.NVMLError as e:
        nv.nvmlShutdown()
        raise NvmlUnavailable(f"NVML device count failed: {e}") from None
    if count == 0:
        nv.nvmlShutdown()
        raise NvmlUnavailable("no NVIDIA GPU")
    return nv


def _name(nv: ModuleType, handle) -> str:
    name = nv.nvmlDeviceGetName(handle)
    return name.decode() if isinstance(name, bytes) else str(name)


def gpu_status(nvml: Optional[ModuleType] = None) -> str:
    """"available: <name> x N" (one part per distinct model) or "unavailable: <reason>"."""
    try:
        nv = _init(nvml)
    except NvmlUnavailable as e:
        return f"unavailable: {e}"
    try:
        names = [_name(nv, nv.nvmlDeviceGetHandleByIndex(i)) for i in range(nv.nvmlDeviceGetCount())]
    except nv.NVMLError as e:
        return f"unavailable: NVML query failed: {e}"
    finally:
        nv.nvmlShutdown()
    parts = [f"{n} x {names.count(n)}" for n in dict.fromkeys(names)]
    return "available: " + ", ".join(parts)


def _optional(nv: ModuleType, read: Callable[[], float]) -> float:
    """One metric, NaN where the device does not support it (MIG slices, some boards)."""
    try:
        return float(read())
    except nv.NVMLError:
        return math.nan


def read_device(nv: ModuleType, index: int, ts_unix_us: int) -> GpuSample:
    """One sample of one device; available=False if the device cannot be read at all."""
    try:
        handle = nv.nvmlDeviceGetHandleByIndex(index)
        mem = nv.nvmlDeviceGetMemoryInfo(handle)
    except nv.NVMLError as e:
        log.warning("headroom gpu: device %d unreadable: %s", index, e)
        return GpuSample(ts_unix_us=ts_unix_us, device_index=index, available=False)
    return GpuSample(
        ts_unix_us=ts_unix_us, device_index=index, available=True,
        mem_used_bytes=int(mem.used), mem_total_bytes=int(mem.total),
        util_pct=_optional(nv, lambda: nv.nvmlDeviceGetUtilizationRates(handle).gpu),
        power_w=_optional(nv, lambda: nv.nvmlDeviceGetPowerUsage(handle) / 1000.0),  # mW -> W
        sm_clock_mhz=_optional(nv, lambda: nv.nvmlDeviceGetClockInfo(handle, nv.NVML_CLOCK_SM)))


class GpuSampler:
    """Calls submit(GpuSample) for every device every interval_ms, on its own daemon thread."""

    def __init__(self, submit: Submit, interval_ms: int, nvml: Optional[ModuleType] = None):
        if interval_ms <= 0:
            raise ValueError(f"GpuSampler: interval_ms={interval_ms} must be > 0")
        self._submit, self._interval_s, self._nvml = submit, interval_ms / 1000, nvml
        self._nv: Optional[ModuleType] = None
        self._device_count = 0
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self.status = "not started"

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> bool:
        """True if sampling started; without NVML, submits one available=False sample instead."""
        try:
            self._nv = _init(self._nvml)
            self._device_count = self._nv.nvmlDeviceGetCount()
        except NvmlUnavailable as e:
            self.status = f"unavailable: {e}"
            self._submit(GpuSample(ts_unix_us=time.time_ns() // 1000, device_index=0,
                                   available=False))
            return False
        self.status = f"sampling {self._device_count} device(s)"
        self._thread = threading.Thread(target=self._run, name="headroom-gpu", daemon=True)
        self._thread.start()
        return True

    def sample_once(self) -> list[GpuSample]:
        ts_unix_us = time.time_ns() // 1000
        return [read_device(self._nv, i, ts_unix_us) for i in range(self._device_count)]

    def _run(self) -> None:
        next_at = time.monotonic()
        while not self._stop.is_set():
            try:
                for sample in self.sample_once():
                    self._submit(sample)
            except Exception:   # a sampler bug must not take the serving process down
                log.exception("headroom gpu: sampling failed; sampler stops")
                return
            # Fixed rate, not drifting by the read time; after a stall, no burst to catch up.
            next_at = max(next_at + self._interval_s, time.monotonic())
            self._stop.wait(max(0.0, next_at - time.monotonic()))

    def stop(self, timeout_s: float = 2.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
        if self._nv is not None and not self.running:
            try:
                self._nv.nvmlShutdown()
            except self._nv.NVMLError:
                pass
            self._nv = None


def start_gpu_sampler(submit: Submit, interval_ms: int,
                      nvml: Optional[ModuleType] = None) -> GpuSampler:
    """A started sampler (running only where NVML sees a GPU); stop() it at detach."""
    sampler = GpuSampler(submit, interval_ms, nvml)
    sampler.start()
    return sampler
