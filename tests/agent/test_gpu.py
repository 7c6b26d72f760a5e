"""agent/gpu.py: the real NVML path of this machine, and a FAKE pynvml for the available path.

The fake NVML module below is the one mock the house rules allow (no GPU on the CI machines);
every test that uses it says so in its name.
"""
from __future__ import annotations

import math
import re
import sys
import threading
import time
from types import SimpleNamespace

import pytest

from headroom_sidecar.agent import gpu
from headroom_sidecar.agent.records import GpuSample

STATUS_RE = re.compile(r"^(available: .+ x \d+(, .+ x \d+)*|unavailable: .+)$")


class Collector:
    def __init__(self):
        self.samples: list[GpuSample] = []
        self.lock = threading.Lock()

    def __call__(self, sample: GpuSample) -> None:
        with self.lock:
            self.samples.append(sample)

    def wait_for(self, n: int, timeout_s: float = 5.0) -> list[GpuSample]:
        deadline = time.monotonic() + timeout_s
        while len(self.samples) < n and time.monotonic() < deadline:
            time.sleep(0.01)
        with self.lock:
            return list(self.samples)


# ------------------------------------------------------------------ FAKE pynvml (mock)
class FakeNVMLError(Exception):
    pass


class FakeNotSupported(FakeNVMLError):
    pass


def fake_nvml(names=("FakeGPU H100", "FakeGPU H100"), init_error: str = "",
              power_supported: bool = True) -> SimpleNamespace:
    """A FAKE pynvml: the functions agent/gpu.py calls, with fixed readings and call counts."""
    state = SimpleNamespace(inits=0, shutdowns=0, reads=0)

    def init():
        if init_error:
            raise FakeNVMLError(init_error)
        state.inits += 1

    def memory(handle):
        state.reads += 1
        return SimpleNamespace(used=(handle + 1) * 2**30, total=80 * 2**30)

    def power(handle):
        if not power_supported:
            raise FakeNotSupported("Not Supported")
        return 250_000 + handle   # milliwatts

    return SimpleNamespace(
        state=state, NVMLError=FakeNVMLError, NVML_CLOCK_SM=1,
        nvmlInit=init, nvmlShutdown=lambda: setattr(state, "shutdowns", state.shutdowns + 1),
        nvmlDeviceGetCount=lambda: len(names), nvmlDeviceGetHandleByIndex=lambda i: i,
        nvmlDeviceGetName=lambda h: names[h].encode(),   # old pynvml returns bytes
        nvmlDeviceGetMemoryInfo=memory,
        nvmlDeviceGetUtilizationRates=lambda h: SimpleNamespace(gpu=40 + h, memory=10),
        nvmlDeviceGetPowerUsage=power,
        nvmlDeviceGetClockInfo=lambda h, clock: 1980 if clock == 1 else 0)


# ------------------------------------------------------------------ the real machine
def test_real_status_and_sampler_agree():
    """This machine's real NVML: status is well formed and the sampler behaves accordingly."""
    status = gpu.gpu_status()
    assert STATUS_RE.match(status), status
    got = Collector()
    sampler = gpu.start_gpu_sampler(got, interval_ms=20)
    try:
        if status.startswith("unavailable"):
            assert not sampler.running
            assert sampler.status.startswith("unavailable: ")
            samples = got.wait_for(1, timeout_s=0.3)
            assert len(samples) == 1 and samples[0].available is False
        else:
            assert sampler.running
            samples = got.wait_for(2)
            assert samples and all(s.available and s.mem_total_bytes > 0 for s in samples)
    finally:
        sampler.stop()
    assert not sampler.running


def test_pynvml_missing_is_unavailable(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)   # `import pynvml` now raises ImportError
    assert gpu.gpu_status() == "unavailable: pynvml missing (pip install nvidia-ml-py)"
    got = Collector()
    assert gpu.GpuSampler(got, 10).start() is False
    assert [s.available for s in got.samples] == [False]


# ------------------------------------------------------------------ FAKE NVML (mock)
@pytest.mark.parametrize("names, expected", [
    (("FakeGPU H100", "FakeGPU H100"), "available: FakeGPU H100 x 2"),
    (("FakeGPU A", "FakeGPU B", "FakeGPU A"), "available: FakeGPU A x 2, FakeGPU B x 1"),
    ((), "unavailable: no NVIDIA GPU"),
])
def test_fake_nvml_status(names, expected):
    nv = fake_nvml(names)
    assert gpu.gpu_status(nv) == expected
    assert nv.state.inits == nv.state.shutdowns   # every init is paired with a shutdown


def test_fake_nvml_init_failure_is_unavailable():
    status = gpu.gpu_status(fake_nvml(init_error="Driver Not Loaded"))
    assert status == "unavailable: NVML init failed: Driver Not Loaded (no NVIDIA driver?)"


def test_fake_nvml_sampler_reads_every_device_each_interval():
    nv = fake_nvml(power_supported=False)
    got = Collector()
    sampler = gpu.start_gpu_sampler(got, interval_ms=20, nvml=nv)
    assert sampler.running and sampler.status == "sampling 2 device(s)"
    samples = got.wait_for(6)
    sampler.stop()
    assert not sampler.running and nv.state.inits == nv.state.shutdowns == 1
    assert len(samples) >= 6
    first = {s.device_index: s for s in samples[:2]}
    assert sorted(first) == [0, 1]
    dev1 = first[1]
    assert dev1.available and dev1.mem_used_bytes == 2 * 2**30 and dev1.mem_total_bytes == 80 * 2**30
    assert dev1.util_pct == 41 and dev1.sm_clock_mhz == 1980
    assert math.isnan(dev1.power_w)   # unsupported metric: NaN, the other metrics still read
    # Samples stop with the sampler.
    n = len(got.samples)
    time.sleep(0.1)
    assert len(got.samples) == n


def test_fake_nvml_power_is_watts():
    s = gpu.read_device(fake_nvml(), 1, ts_unix_us=123)
    assert s.power_w == pytest.approx(250.001) and s.ts_unix_us == 123


def test_sampler_rejects_bad_interval():
    with pytest.raises(ValueError, match="interval_ms=0"):
        gpu.GpuSampler(Collector(), 0)
