"""Load sensors: latency windows with a fake clock, the NVML probe, and real host readings."""

from __future__ import annotations

import importlib.util
import logging
import random
import sys
from dataclasses import dataclass
from typing import Any

import numpy as np
import psutil
import pytest

from agent.capacity import sensors
from agent.capacity.sensors import SENSOR_HELP, SENSORS, GpuProbe, LatencyWindow, SensorReader


class FakeClock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 500.0

    def __call__(self) -> float:
        return self.now


def test_sensor_names_and_help() -> None:
    assert SENSORS == ("cpu_percent", "load1", "mem_available_mib", "mem_used_percent",
                       "gpu_util_percent", "gpu_mem_percent", "latency_p95_ms",
                       "llm_queue_wait_ms", "llm_queue_depth")
    assert set(SENSOR_HELP) == set(SENSORS)
    assert all(text and "\n" not in text for text in SENSOR_HELP.values())


# ---------------------------------------------------------------------------------------------
# LatencyWindow

def test_empty_window_has_no_percentile() -> None:
    window = LatencyWindow(clock=FakeClock())
    assert window.p95() is None
    assert window.percentile(50) is None
    assert len(window) == 0


@pytest.mark.parametrize("q", [0, 5, 50, 90, 95, 99, 100])
def test_percentiles_match_numpy(q: float) -> None:
    rng = random.Random(q)
    values = [rng.uniform(50, 3000) for _ in range(257)]
    window = LatencyWindow(clock=FakeClock())
    for v in values:
        window.add(v)
    assert window.percentile(q) == pytest.approx(float(np.percentile(values, q)))


def test_p95_of_known_samples() -> None:
    window = LatencyWindow(clock=FakeClock())
    for ms in range(1, 101):  # 1..100 ms, added out of order
        window.add(float(101 - ms))
    assert window.p95() == pytest.approx(95.05)
    assert window.percentile(50) == pytest.approx(50.5)
    single = LatencyWindow(clock=FakeClock())
    single.add(700.0)
    assert single.p95() == 700.0


def test_samples_expire_after_the_window() -> None:
    clock = FakeClock()
    window = LatencyWindow(window_s=60.0, clock=clock)
    window.add(5000.0)          # t=0, slow
    clock.now += 30
    window.add(100.0)           # t=30
    window.add(200.0)
    assert window.percentile(100) == 5000.0
    clock.now += 30             # t=60: the first sample is exactly window_s old, still inside
    assert len(window) == 3
    clock.now += 0.001          # now it has aged out
    assert window.percentile(100) == 200.0
    assert len(window) == 2
    clock.now += 30             # t=90.001: everything has aged out
    assert window.p95() is None


def test_max_samples_keeps_the_newest() -> None:
    window = LatencyWindow(clock=FakeClock(), max_samples=10)
    for ms in range(20):
        window.add(float(ms))
    assert len(window) == 10
    assert window.percentile(0) == 10.0
    assert window.percentile(100) == 19.0


def test_window_ignores_nan_and_checks_arguments() -> None:
    window = LatencyWindow(clock=FakeClock())
    window.add(float("nan"))
    assert len(window) == 0
    with pytest.raises(ValueError):
        window.percentile(101)
    with pytest.raises(ValueError):
        window.percentile(-1)
    with pytest.raises(ValueError):
        LatencyWindow(window_s=0)
    with pytest.raises(ValueError):
        LatencyWindow(max_samples=0)


# ---------------------------------------------------------------------------------------------
# GpuProbe

@dataclass
class _Util:
    gpu: int


@dataclass
class _Mem:
    used: int
    total: int


class FakeNvml:
    """Stands in for the pynvml module: a list of (util %, used, total) per device."""

    class NVMLError(Exception):
        pass

    def __init__(self, devices: list[tuple[int | None, int, int]], init_fails: bool = False,
                 count_fails: bool = False) -> None:
        self.devices = devices
        self.init_fails = init_fails
        self.count_fails = count_fails
        self.inits = 0
        self.shutdowns = 0

    def nvmlInit(self) -> None:
        self.inits += 1
        if self.init_fails:
            raise self.NVMLError("Driver Not Loaded")

    def nvmlShutdown(self) -> None:
        self.shutdowns += 1

    def nvmlDeviceGetCount(self) -> int:
        if self.count_fails:
            raise self.NVMLError("Unknown Error")
        return len(self.devices)

    def nvmlDeviceGetHandleByIndex(self, i: int) -> int:
        return i

    def nvmlDeviceGetUtilizationRates(self, handle: int) -> _Util:
        util = self.devices[handle][0]
        if util is None:
            raise self.NVMLError("Not Supported")  # e.g. a MIG device
        return _Util(util)

    def nvmlDeviceGetMemoryInfo(self, handle: int) -> _Mem:
        _, used, total = self.devices[handle]
        return _Mem(used, total)


def test_gpu_probe_without_pynvml_reads_none(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)  # makes `import pynvml` raise ImportError
    probe = GpuProbe()
    assert not probe.available
    assert probe.read() == (None, None)
    probe.close()
    assert probe.read() == (None, None)


def test_gpu_probe_takes_the_busiest_and_fullest_device() -> None:
    nvml = FakeNvml([(70, 45, 100), (30, 180, 200)])
    probe = GpuProbe(nvml=nvml)
    assert probe.available
    assert probe.read() == (70.0, 90.0)
    nvml.devices[0] = (10, 99, 100)
    assert probe.read() == (30.0, 99.0)
    assert nvml.inits == 1


def test_gpu_probe_init_failure_is_tried_once_and_never_raises() -> None:
    nvml = FakeNvml([(50, 1, 2)], init_fails=True)
    probe = GpuProbe(nvml=nvml)
    assert not probe.available
    assert [probe.read() for _ in range(3)] == [(None, None)] * 3
    assert nvml.inits == 1


@pytest.mark.parametrize("nvml", [FakeNvml([]), FakeNvml([(1, 1, 2)], count_fails=True)])
def test_gpu_probe_without_a_device_is_off_and_shuts_nvml_down(nvml: FakeNvml) -> None:
    probe = GpuProbe(nvml=nvml)
    assert not probe.available
    assert probe.read() == (None, None)
    assert nvml.shutdowns == 1


def test_gpu_probe_failing_query_reads_none_for_that_value(
        caplog: pytest.LogCaptureFixture) -> None:
    nvml = FakeNvml([(None, 50, 100)])
    probe = GpuProbe(nvml=nvml)
    with caplog.at_level(logging.WARNING, logger="agent.capacity.sensors"):
        assert probe.read() == (None, 50.0)
        assert probe.read() == (None, 50.0)
    assert len(caplog.records) == 1  # warned once, not every second
    probe.close()
    assert nvml.shutdowns == 1
    assert probe.read() == (None, None)


PYNVML_MISSING = importlib.util.find_spec("pynvml") is None
needs_no_pynvml = pytest.mark.skipif(not PYNVML_MISSING,
                                     reason="nvidia-ml-py is installed: a GPU may be present")


@needs_no_pynvml
def test_gpu_probe_on_this_box() -> None:
    # the real import, not a stand-in: nvidia-ml-py is an optional extra
    probe = GpuProbe()
    assert not probe.available
    assert probe.read() == (None, None)


# ---------------------------------------------------------------------------------------------
# SensorReader

def no_gpu() -> GpuProbe:
    return GpuProbe(nvml=FakeNvml([]))


def test_reader_returns_every_sensor_with_real_host_values() -> None:
    reader = SensorReader(gpu=no_gpu())
    readings = reader.read()
    assert tuple(readings) == SENSORS
    cpu = readings["cpu_percent"]
    assert cpu is not None and 0.0 <= cpu <= 100.0
    load1 = readings["load1"]
    assert load1 is not None and load1 >= 0.0
    total_mib = psutil.virtual_memory().total / (1024 * 1024)
    avail = readings["mem_available_mib"]
    assert avail is not None and 0.0 < avail <= total_mib
    used = readings["mem_used_percent"]
    assert used is not None and 0.0 < used < 100.0
    # not wired, or no GPU: unknown
    for name in ("gpu_util_percent", "gpu_mem_percent", "latency_p95_ms", "llm_queue_wait_ms",
                 "llm_queue_depth"):
        assert readings[name] is None, name


@needs_no_pynvml
def test_reader_default_gpu_probe_reads_none_here() -> None:
    readings = SensorReader().read()
    assert readings["gpu_util_percent"] is None
    assert readings["gpu_mem_percent"] is None


def test_reader_primes_cpu_percent(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[Any] = []

    def fake_cpu_percent(interval: float | None = None) -> float:
        calls.append(interval)
        return 0.0 if len(calls) == 1 else 42.0  # psutil's first call returns a meaningless 0.0

    monkeypatch.setattr(sensors.psutil, "cpu_percent", fake_cpu_percent)
    reader = SensorReader(gpu=no_gpu())
    assert calls == [None]  # primed, non-blocking
    assert reader.read()["cpu_percent"] == 42.0
    assert calls == [None, None]


def test_reader_reports_latency_windows_and_queue_depth() -> None:
    clock = FakeClock()
    latency = LatencyWindow(clock=clock)
    llm_wait = LatencyWindow(clock=clock)
    depth = [0]
    reader = SensorReader(latency=latency, llm_wait=llm_wait, llm_depth=lambda: depth[0],
                          gpu=no_gpu())
    # nothing in the windows and nothing queued: nobody waited
    readings = reader.read()
    assert readings["latency_p95_ms"] == 0.0
    assert readings["llm_queue_wait_ms"] == 0.0
    assert readings["llm_queue_depth"] == 0.0
    # requests queued but none started within the window: the wait is unknown, not zero
    depth[0] = 3
    readings = reader.read()
    assert readings["llm_queue_wait_ms"] is None
    assert readings["llm_queue_depth"] == 3.0
    for ms in range(1, 101):
        latency.add(float(ms))
        llm_wait.add(float(ms * 10))
    readings = reader.read()
    assert readings["latency_p95_ms"] == pytest.approx(95.05)
    assert readings["llm_queue_wait_ms"] == pytest.approx(950.5)
    # once the samples age out, latency reads 0 again
    clock.now += 61
    depth[0] = 0
    readings = reader.read()
    assert readings["latency_p95_ms"] == 0.0
    assert readings["llm_queue_wait_ms"] == 0.0


def test_reader_llm_wait_without_depth_is_unknown_when_empty() -> None:
    reader = SensorReader(llm_wait=LatencyWindow(clock=FakeClock()), gpu=no_gpu())
    assert reader.read()["llm_queue_wait_ms"] is None


def test_reader_failing_sensor_reads_none_and_warns_once(
        caplog: pytest.LogCaptureFixture) -> None:
    def broken_depth() -> int:
        raise RuntimeError("scheduler closed")

    reader = SensorReader(llm_depth=broken_depth, gpu=no_gpu())
    with caplog.at_level(logging.WARNING, logger="agent.capacity.sensors"):
        first = reader.read()
        second = reader.read()
    assert first["llm_queue_depth"] is None and second["llm_queue_depth"] is None
    assert first["cpu_percent"] is not None
    assert [r.getMessage() for r in caplog.records] == [
        "sensor llm_queue_depth failed (reported as unknown): scheduler closed"]
