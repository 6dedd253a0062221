"""Load sensors read by the shedding monitor: host CPU and memory, GPU, and the agent's latencies.

Every reading is a float, or None when the sensor is not available on this box (no GPU, no
NVML) or not wired (no latency window given). The shedding rules name sensors from
:data:`SENSORS`; see :mod:`agent.capacity.shedding`.
"""

from __future__ import annotations

import collections
import logging
import math
import os
import threading
import time
from collections.abc import Callable
from types import ModuleType
from typing import Any

import psutil

_LOGGER = logging.getLogger(__name__)

SENSOR_HELP: dict[str, str] = {
    "cpu_percent": "host CPU use in percent, all cores, averaged since the previous reading",
    "load1": "1-minute load average (runnable threads); compare with the core count",
    "mem_available_mib": "memory available to new processes without swapping, in MiB",
    "mem_used_percent": "host memory in use, in percent",
    "gpu_util_percent": "GPU compute utilisation in percent, the busiest GPU (None without NVML)",
    "gpu_mem_percent": "GPU memory used in percent, the fullest GPU (None without NVML)",
    "latency_p95_ms": "95th percentile of turn response latency over the window, in ms "
                      "(0 when no turn finished in the window)",
    "llm_queue_wait_ms": "95th percentile of LLM queue wait over the window, in ms "
                         "(0 when the LLM queue is idle and no request started in the window)",
    "llm_queue_depth": "LLM requests waiting to start (the running one not counted)",
}
#: The sensor names a shedding rule may use, in a stable order.
SENSORS: tuple[str, ...] = tuple(SENSOR_HELP)

_MIB = 1024.0 * 1024.0


class LatencyWindow:
    """Thread-safe sliding window of latency samples (ms); percentiles over the last window_s."""

    def __init__(self, window_s: float = 60.0, clock: Callable[[], float] = time.monotonic,
                 max_samples: int = 10000) -> None:
        if window_s <= 0:
            raise ValueError(f"window_s must be positive, got {window_s}")
        if max_samples < 1:
            raise ValueError(f"max_samples must be at least 1, got {max_samples}")
        self.window_s = window_s
        self._clock = clock
        self._lock = threading.Lock()
        # (time, ms), oldest first; maxlen bounds memory when samples arrive faster than they expire
        self._samples: collections.deque[tuple[float, float]] = collections.deque(
            maxlen=max_samples)

    def add(self, ms: float) -> None:
        """Record one sample (ms) at the clock's current time; NaN is ignored."""
        if math.isnan(ms):
            return
        with self._lock:
            now = self._clock()
            self._expire(now)
            self._samples.append((now, float(ms)))

    def __len__(self) -> int:
        """Samples within the window now."""
        with self._lock:
            self._expire(self._clock())
            return len(self._samples)

    def percentile(self, q: float) -> float | None:
        """The q-th percentile (0..100, linear interpolation) of samples in the window, or None."""
        if not 0.0 <= q <= 100.0:
            raise ValueError(f"percentile must be between 0 and 100, got {q}")
        with self._lock:
            self._expire(self._clock())
            values = sorted(ms for _, ms in self._samples)
        if not values:
            return None
        # the same interpolation as numpy.percentile's default ("linear")
        pos = (len(values) - 1) * q / 100.0
        low = math.floor(pos)
        high = min(low + 1, len(values) - 1)
        return values[low] + (values[high] - values[low]) * (pos - low)

    def p95(self) -> float | None:
        """The 95th percentile of samples in the window, or None when there are none."""
        return self.percentile(95.0)

    def _expire(self, now: float) -> None:
        cutoff = now - self.window_s
        while self._samples and self._samples[0][0] < cutoff:
            self._samples.popleft()


def _import_nvml() -> ModuleType | None:
    try:
        import pynvml
    except ImportError:
        return None
    return pynvml


class GpuProbe:
    """GPU utilisation and memory through NVML (package nvidia-ml-py), when present.

    NVML is initialised once, in the constructor. Without the package, without a driver or
    without a device, :attr:`available` is False and :meth:`read` returns ``(None, None)``;
    nothing here raises. ``nvml`` replaces the ``pynvml`` module (tests).
    """

    def __init__(self, nvml: Any | None = None) -> None:
        self._lock = threading.Lock()
        self._nvml: Any | None = nvml if nvml is not None else _import_nvml()
        self._handles: list[Any] = []
        self._failed_once = False
        if self._nvml is None:
            _LOGGER.info("GPU sensors off: nvidia-ml-py (pynvml) is not installed")
            return
        try:
            self._nvml.nvmlInit()
        except Exception as exc:  # NVMLError: no driver, no libnvidia-ml.so, ...
            _LOGGER.info("GPU sensors off: NVML init failed: %s", exc)
            self._nvml = None
            return
        try:
            count = int(self._nvml.nvmlDeviceGetCount())
            self._handles = [self._nvml.nvmlDeviceGetHandleByIndex(i) for i in range(count)]
        except Exception as exc:
            _LOGGER.info("GPU sensors off: NVML lists no usable device: %s", exc)
            self._handles = []
        if not self._handles:
            self.close()
            return
        _LOGGER.info("GPU sensors on: %d device(s) through NVML", len(self._handles))

    @property
    def available(self) -> bool:
        """True when NVML initialised and found at least one device."""
        with self._lock:
            return self._nvml is not None and bool(self._handles)

    def read(self) -> tuple[float | None, float | None]:
        """(utilisation %, memory used %) of the busiest and fullest device; None where unknown."""
        with self._lock:
            nvml, handles = self._nvml, list(self._handles)
        if nvml is None or not handles:
            return None, None
        utils: list[float] = []
        mems: list[float] = []
        for handle in handles:
            try:
                utils.append(float(nvml.nvmlDeviceGetUtilizationRates(handle).gpu))
            except Exception as exc:  # e.g. not supported on a MIG device, or the GPU is lost
                self._note_failure(exc)
            try:
                info = nvml.nvmlDeviceGetMemoryInfo(handle)
                if info.total:
                    mems.append(100.0 * float(info.used) / float(info.total))
            except Exception as exc:
                self._note_failure(exc)
        return (max(utils) if utils else None), (max(mems) if mems else None)

    def close(self) -> None:
        """Shut NVML down; later reads return (None, None)."""
        with self._lock:
            nvml, self._nvml, self._handles = self._nvml, None, []
        if nvml is not None:
            try:
                nvml.nvmlShutdown()
            except Exception as exc:
                _LOGGER.debug("NVML shutdown failed: %s", exc)

    def _note_failure(self, exc: Exception) -> None:
        # a failing query repeats every second: warn once, then keep quiet
        if not self._failed_once:
            self._failed_once = True
            _LOGGER.warning("GPU sensor query failed (reported as unknown): %s", exc)
        else:
            _LOGGER.debug("GPU sensor query failed: %s", exc)


class SensorReader:
    """Reads every sensor of :data:`SENSORS` at once; unwired or failing sensors read None.

    ``latency`` gets each turn's response latency, ``llm_wait`` each LLM request's queue wait,
    ``llm_depth`` returns the LLM queue depth; ``gpu`` defaults to a :class:`GpuProbe` (which
    reads None where there is no NVML or GPU).

    An empty latency window reads 0.0, not None: no turn finished in the window means nobody
    waited, and a rule tripped on latency must be able to recover when calls stop (with None
    it would keep its tripped state). The LLM wait window reads 0.0 when empty only while the
    LLM queue is empty; with requests queued but none started in the window it reads None.
    """

    def __init__(self, latency: LatencyWindow | None = None,
                 llm_wait: LatencyWindow | None = None,
                 llm_depth: Callable[[], int] | None = None,
                 gpu: GpuProbe | None = None) -> None:
        self.latency = latency
        self.llm_wait = llm_wait
        self.llm_depth = llm_depth
        self.gpu = gpu if gpu is not None else GpuProbe()
        self._warned: set[str] = set()
        # psutil's first non-blocking cpu_percent() returns a meaningless 0.0: prime it here so
        # the first read() covers the time since construction
        psutil.cpu_percent(interval=None)

    def read(self) -> dict[str, float | None]:
        """One reading of every sensor, keyed by the names in :data:`SENSORS`."""
        out: dict[str, float | None] = dict.fromkeys(SENSORS)
        out["cpu_percent"] = self._guard("cpu_percent", lambda: psutil.cpu_percent(interval=None))
        out["load1"] = self._guard("load1", lambda: os.getloadavg()[0])
        mem = self._guard_any("memory", psutil.virtual_memory)
        if mem is not None:
            out["mem_available_mib"] = float(mem.available) / _MIB
            out["mem_used_percent"] = float(mem.percent)
        gpu_util, gpu_mem = self.gpu.read()
        out["gpu_util_percent"] = gpu_util
        out["gpu_mem_percent"] = gpu_mem
        llm_depth = self.llm_depth
        depth = (self._guard("llm_queue_depth", lambda: float(llm_depth()))
                 if llm_depth is not None else None)
        out["llm_queue_depth"] = depth
        if self.latency is not None:
            p95 = self.latency.p95()
            out["latency_p95_ms"] = 0.0 if p95 is None else p95
        if self.llm_wait is not None:
            p95 = self.llm_wait.p95()
            if p95 is None and depth == 0.0:
                p95 = 0.0
            out["llm_queue_wait_ms"] = p95
        return out

    def _guard(self, name: str, fn: Callable[[], float]) -> float | None:
        value = self._guard_any(name, fn)
        return None if value is None else float(value)

    def _guard_any(self, name: str, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except Exception as exc:
            if name not in self._warned:
                self._warned.add(name)
                _LOGGER.warning("sensor %s failed (reported as unknown): %s", name, exc)
            return None

