"""CPU seconds per engine stage (STT, LLM, TTS), from the kernel's per-thread accounting.

The engines do their work in native threads that Python never sees (ctranslate2 for whisper,
ggml for llama.cpp, onnxruntime for piper), so timing Python calls would miss most of it. On
Linux a new thread inherits its creator's name (``comm``), so the agent names the threads that
load and run each engine (``pbx-stt``, ``pbx-llm``, ``pbx-tts``) with :func:`name_thread`, and
every worker pool the engine library creates from them carries the same name.
:class:`StageCpu` sums ``utime + stime`` from ``/proc/self/task/*/stat`` by that name; the rest
of the process (protocol I/O, dialog, VAD, the simulator when in-process) is ``other``. The
sums are monotonic: a thread that exits keeps its last reading. Elsewhere than Linux everything
is ``other``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import threading
from collections.abc import Callable
from typing import Any, TypeVar

_LOGGER = logging.getLogger(__name__)

STAGES = ("stt", "llm", "tts")
_PREFIX = "pbx-"
_PR_SET_NAME = 15
_T = TypeVar("_T")

_libc: Any = None


def name_thread(name: str) -> None:
    """Give the calling thread the OS name ``name`` (≤ 15 bytes; Linux only, else a no-op)."""
    global _libc
    if not os.path.exists("/proc/self/task"):
        return
    try:
        if _libc is None:
            _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        _libc.prctl(_PR_SET_NAME, ctypes.c_char_p(name.encode()[:15]), 0, 0, 0)
    except (OSError, AttributeError) as exc:  # not fatal: the CPU just counts as `other`
        _LOGGER.debug("cannot name thread %s: %r", name, exc)


def stage_thread_name(stage: str) -> str:
    """The OS thread name of a stage's threads (``pbx-stt``...)."""
    return f"{_PREFIX}{stage}"


def run_named(stage: str, fn: Callable[[], _T]) -> _T:
    """Run ``fn`` in a fresh thread named for ``stage`` and return its result (or raise).

    Used to load a model, so that the native worker pools it creates carry the stage's name.
    """
    box: list[Any] = []

    def body() -> None:
        name_thread(stage_thread_name(stage))
        try:
            box.append((True, fn()))
        except BaseException as exc:  # re-raised in the caller's thread
            box.append((False, exc))

    thread = threading.Thread(target=body, name=f"load-{stage}")
    thread.start()
    thread.join()
    ok, value = box[0]
    if not ok:
        raise value
    return value


def pool_initializer(stage: str) -> Callable[[], None]:
    """A ThreadPoolExecutor ``initializer`` naming its workers for ``stage``."""
    name = stage_thread_name(stage)
    return lambda: name_thread(name)


def _read_task(path: str) -> tuple[str, int] | None:
    try:
        with open(path, "rb") as fh:
            raw = fh.read().decode("ascii", "replace")
    except OSError:
        return None
    # the name is in parentheses and may itself hold spaces or parentheses
    open_at, close_at = raw.find("("), raw.rfind(")")
    fields = raw[close_at + 2:].split()
    # fields[0] is field 3 (state); utime and stime are fields 14 and 15
    return raw[open_at + 1:close_at], int(fields[11]) + int(fields[12])


class StageCpu:
    """Cumulative CPU seconds of this process by stage: stt, llm, tts, other."""

    def __init__(self, task_dir: str = "/proc/self/task", stat_path: str = "/proc/self/stat"
                 ) -> None:
        self.task_dir = task_dir
        self.stat_path = stat_path
        self._tick = float(os.sysconf("SC_CLK_TCK")) if hasattr(os, "sysconf") else 100.0
        self._lock = threading.Lock()
        self._live: dict[str, tuple[str, int]] = {}
        self._retired = dict.fromkeys(STAGES, 0)

    def read(self) -> dict[str, float]:
        """{stage: CPU seconds since start}; ``other`` is the rest of the process."""
        if not os.path.isdir(self.task_dir):
            return {**dict.fromkeys(STAGES, 0.0), "other": _process_cpu_s()}
        with self._lock:
            seen: dict[str, tuple[str, int]] = {}
            for tid in os.listdir(self.task_dir):
                task = _read_task(os.path.join(self.task_dir, tid, "stat"))
                if task is not None:
                    seen[tid] = task
            for tid, (comm, ticks) in self._live.items():
                if tid not in seen:  # the thread ended: keep what it used
                    stage = _stage_of(comm)
                    if stage is not None:
                        self._retired[stage] += ticks
            self._live = seen
            totals = dict(self._retired)
            for comm, ticks in seen.values():
                stage = _stage_of(comm)
                if stage is not None:
                    totals[stage] += ticks
            process = _read_task(self.stat_path)
        out = {stage: totals[stage] / self._tick for stage in STAGES}
        whole = process[1] / self._tick if process is not None else sum(out.values())
        out["other"] = max(0.0, whole - sum(out.values()))
        return out


def _stage_of(comm: str) -> str | None:
    if comm.startswith(_PREFIX):
        stage = comm[len(_PREFIX):len(_PREFIX) + 3]
        if stage in STAGES:
            return stage
    return None


def _process_cpu_s() -> float:
    times = os.times()
    return times.user + times.system
