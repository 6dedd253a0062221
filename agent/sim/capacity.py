"""`pbx-agent capacity`: how many concurrent calls this box takes, at what latency.

The run starts the agent as a child process (`pbx-agent serve`, so its CPU is measured apart
from the simulator's) or targets one already running, then steps the number of concurrent
callers up (1, 2, 4, ...). In a step, N caller loops each place scripted calls over the real
protocol (FastAGI + AudioSocket for Asterisk, outbound ESL + unicast UDP for FreeSWITCH), one
after another, for ``step_s`` seconds; a call still in flight when the time is up finishes and
counts. Each call's script is drawn from a weighted mix (FAQ questions, open questions for the
LLM, transfer requests, silence, barge-in, early hangup) with a seeded RNG, so two runs with the
same seed place the same sequence of calls per caller loop. The callers' speech is synthesized
by piper once, before the first step: nothing CPU-heavy of the simulator's own runs during a
measured step except streaming audio in real time.

Per step it measures:

* **response latency** (ms): per caller turn, end of the caller's speech to the first
  non-silent agent frame, as the caller hears it (endpointing, STT, dialog, LLM/TTS, media
  included); p50/p95/p99 over every turn of every call of the step that got a reply;
* **completion**: the share of calls placed that ended as their script expects (the result the
  dialplan gets, ``DONE`` or ``TRANSFER``); a refused call (``BUSY``), an ``ERROR``, a call the
  simulator could not complete and a wrong result all count against it;
* **STT word error**: the mean word error rate of what the agent heard (its log) against the
  script's text, over the turns that were neither barge-ins, hangups nor silence;
* the agent process's **CPU** (user + system of the process and its children, over the step's
  wall time, as % of one core and of the whole box) and **peak RSS** (sampled every 0.5 s);
* **CPU seconds per call-minute** per engine stage (stt, llm, tts, other) from the agent's
  ``pbx_agent_engine_cpu_seconds_total`` counters, scraped before and after the step, divided
  by the minutes of calls the step placed;
* **refusals**: calls the agent answered ``BUSY``.

A step passes when its p95 ≤ the latency target, its completion ≥ the completion target and its
WER ≤ the WER target. The **safe capacity** is the largest step that passed with every smaller
step passing too: a bigger step that passes after a failed one does not count.

While measuring, the started agent's load shedding is off and its call limits are set above the
largest step: the run measures the engines, not an earlier report, the PBX's limits or the
governor reacting to the load the run creates.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import platform
import random
import re
import shutil
import statistics
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import MappingProxyType
from typing import Any

import yaml

from agent.engine.text import word_error_rate
from agent.kpi.report import percentile as report_percentile
from agent.sim.caller import (
    CallerReport,
    CallerScript,
    CallerTurn,
    ScriptedCaller,
    Synth,
    builtin_script,
    load_script,
    render_turn_audio,
)
from agent.sim.process import AgentProcess, free_port, heard_turns

_LOGGER = logging.getLogger(__name__)

PBX_KINDS = ("asterisk", "freeswitch")
DEFAULT_STEPS: tuple[int, ...] = (1, 2, 4, 6, 8, 10, 12, 16)
#: the realistic default mix: name -> weight; a name is ``agent/sim/scripts/mix_<name>.yaml``
DEFAULT_MIX: Mapping[str, float] = MappingProxyType(
    {"faq": 35, "llm": 25, "transfer": 15, "silence": 5, "bargein": 10, "hangup": 10})
#: the agent's per-stage CPU counter (Prometheus text, label ``stage``)
CPU_METRIC = "pbx_agent_engine_cpu_seconds_total"
STAGES = ("stt", "llm", "tts", "other")
DEFAULT_METRICS_URL = "http://127.0.0.1:9464/metrics"
RATE_HZ = 8000
#: results a call can end with that never count as completed
_FAILED_RESULTS = ("BUSY", "ERROR")

Progress = Callable[[str], None]

#: placed before the first step and not measured: the first call through freshly loaded models
#: pays one-off costs (allocations, thread pools, caches) that are no part of steady load
WARMUP_SCRIPT = CallerScript(
    name="warmup", turns=(CallerTurn(text="How often should I replace my toothbrush?",
                                     hangup_after_ms=1500),),
    callerid="+15550000000", calleridname="Capacity Warm-up", expect_result="DONE")


# -- options -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class CapacityOptions:
    """What to measure, against which agent, and what a passing step is."""

    pbx: str = "asterisk"
    #: concurrent calls per step (sorted, duplicates dropped)
    steps: tuple[int, ...] = DEFAULT_STEPS
    #: seconds each step keeps placing calls (calls in flight then finish and count)
    step_s: float = 120.0
    #: a step goes on past ``step_s`` until this many calls were placed, so a low step still
    #: samples the whole mix (3 calls in a minute may hold no LLM question at all)
    min_calls: int = 10
    #: response latency target: a step's p95 must be at or under it (ms)
    p95_ms: float = 1200.0
    #: completion target: share of calls placed that end as their script expects (0..1)
    completion: float = 0.99
    #: STT word error target: a step's mean WER must be at or under it (0..1)
    wer: float = 0.15
    #: caller scripts by weight: builtin ``mix_<name>`` or ``<name>`` scripts, or YAML paths
    mix: Mapping[str, float] = field(default_factory=lambda: dict(DEFAULT_MIX))
    seed: int = 0
    #: start the agent in the naive baseline mode (config ``naive: true``)
    naive: bool = False
    #: also run the naive baseline (after the normal run) and report the ratios
    compare_naive: bool = False
    #: where write_report puts its files; "" = ./capacity
    out_dir: str = ""
    #: extra agent config (YAML text) merged under the keys the run must set
    base_config: str = ""
    #: the file base_config came from: a relative ``agent:`` file path is resolved against it
    base_config_path: str = ""
    #: None = start an agent; else "host:port" of a running agent's FastAGI / ESL listener
    target: str | None = None
    #: a running agent's Prometheus endpoint (with ``target``)
    metrics_url: str = DEFAULT_METRICS_URL
    #: a running agent's pid for CPU/RSS; None = the process listening on the target port
    agent_pid: int | None = None
    #: Erlang B sizing of the measured capacity against this load (calls per busy hour)
    calls_per_hour: float | None = None
    #: average handling time for the sizing (s); None = the mean call length measured
    aht_s: float | None = None
    #: blocking probability the sizing aims for
    target_blocking: float = 0.01
    #: stop stepping after this many failing steps in a row
    stop_after_failures: int = 2
    #: noise variants rendered per caller turn (each call picks one)
    variants: int = 3
    #: unmeasured calls placed before the first step (one-off costs of fresh models)
    warmup_calls: int = 1
    #: caller loops start spread over this many seconds
    stagger_s: float = 2.0
    #: a call that takes longer than this counts as failed (s)
    call_timeout_s: float = 240.0
    #: seconds between progress lines within a step
    progress_every_s: float = 5.0
    #: how long a started agent may take to load its models (s)
    ready_timeout_s: float = 300.0

    def __post_init__(self) -> None:
        if self.pbx not in PBX_KINDS:
            raise ValueError(f"pbx must be one of {', '.join(PBX_KINDS)}, got {self.pbx!r}")
        steps = tuple(sorted(set(self.steps)))
        if not steps or any(isinstance(n, bool) or not isinstance(n, int) or n < 1
                            for n in steps):
            raise ValueError(f"steps must be integers >= 1, got {self.steps!r}")
        object.__setattr__(self, "steps", steps)
        object.__setattr__(self, "mix", dict(self.mix))
        if not self.step_s > 0:
            raise ValueError(f"step_s must be > 0, got {self.step_s!r}")
        if isinstance(self.min_calls, bool) or not isinstance(self.min_calls, int) \
                or self.min_calls < 0:
            raise ValueError(f"min_calls must be an integer >= 0, got {self.min_calls!r}")
        if not self.p95_ms > 0:
            raise ValueError(f"p95_ms must be > 0, got {self.p95_ms!r}")
        if not 0.0 <= self.completion <= 1.0:
            raise ValueError(f"completion must be within 0..1, got {self.completion!r}")
        if not self.wer >= 0.0:
            raise ValueError(f"wer must be >= 0, got {self.wer!r}")
        if self.stop_after_failures < 1:
            raise ValueError(f"stop_after_failures must be >= 1, got {self.stop_after_failures}")
        if self.variants < 1:
            raise ValueError(f"variants must be >= 1, got {self.variants}")
        if self.warmup_calls < 0:
            raise ValueError(f"warmup_calls must be >= 0, got {self.warmup_calls}")
        if self.naive and self.compare_naive:
            raise ValueError("naive and compare_naive exclude each other: compare_naive already "
                             "runs the naive baseline after the normal run")
        if self.target is not None:
            split_target(self.target)
            if self.naive or self.compare_naive:
                raise ValueError("the naive baseline needs an agent started by the run: "
                                 "drop target, or drop naive/compare_naive")
        check_mix(self.mix)

    def summary(self) -> dict[str, Any]:
        """The options as JSON-able values (the base config only as whether one was given)."""
        return {
            "pbx": self.pbx, "steps": list(self.steps), "step_s": self.step_s,
            "min_calls": self.min_calls,
            "targets": {"p95_ms": self.p95_ms, "completion": self.completion, "wer": self.wer},
            "mix": dict(self.mix), "seed": self.seed, "naive": self.naive,
            "compare_naive": self.compare_naive, "target": self.target, "out_dir": self.out_dir,
            "metrics_url": self.metrics_url if self.target else None,
            "base_config": bool(self.base_config.strip()),
            "calls_per_hour": self.calls_per_hour, "aht_s": self.aht_s,
            "target_blocking": self.target_blocking,
            "stop_after_failures": self.stop_after_failures, "variants": self.variants,
            "warmup_calls": self.warmup_calls,
        }


def split_target(target: str) -> tuple[str, int]:
    """``host:port`` -> (host, port); ValueError with the reason when malformed."""
    host, sep, port = target.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"target must be host:port, got {target!r}")
    return host.strip("[]"), int(port)


# -- the call mix ------------------------------------------------------------------------------

def check_mix(mix: Mapping[str, float]) -> None:
    """ValueError unless ``mix`` has names with non-negative weights summing above 0."""
    if not mix:
        raise ValueError("the call mix is empty")
    for name, weight in mix.items():
        if isinstance(weight, bool) or not isinstance(weight, int | float) or \
                not math.isfinite(weight) or weight < 0:
            raise ValueError(f"mix weight of {name!r} must be a number >= 0, got {weight!r}")
    if not sum(mix.values()) > 0:
        raise ValueError("the call mix weights sum to 0")


def parse_mix(text: str) -> dict[str, float]:
    """``faq=35,llm=25,...`` (the CLI's ``--mix``) -> a name -> weight mapping."""
    mix: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, weight = part.partition("=")
        if not sep or not name.strip():
            raise ValueError(f"mix entry {part!r} is not name=weight")
        try:
            mix[name.strip()] = float(weight)
        except ValueError:
            raise ValueError(f"mix weight of {name.strip()!r} is not a number: {weight!r}") \
                from None
    check_mix(mix)
    return mix


def resolve_script(name: str) -> CallerScript:
    """A mix entry's script: a YAML file path, a builtin ``mix_<name>``, or a builtin ``<name>``."""
    if name.endswith((".yaml", ".yml")) or os.sep in name:
        return load_script(name)
    for candidate in (f"mix_{name}", name):
        try:
            return builtin_script(candidate)
        except (FileNotFoundError, OSError):
            continue
    raise ValueError(f"no caller script {name!r} (agent/sim/scripts/mix_{name}.yaml or a path)")


@dataclass(frozen=True)
class CallMix:
    """Caller scripts and their weights; :meth:`draw` picks one per call."""

    names: tuple[str, ...]
    weights: tuple[float, ...]
    scripts: tuple[CallerScript, ...]

    @classmethod
    def load(cls, mix: Mapping[str, float]) -> CallMix:
        """Resolve every name with a positive weight to its script."""
        check_mix(mix)
        names = tuple(n for n, w in mix.items() if w > 0)
        return cls(names, tuple(float(mix[n]) for n in names),
                   tuple(resolve_script(n) for n in names))

    def draw(self, rng: random.Random) -> int:
        """The index of the next call's script, drawn by weight."""
        return rng.choices(range(len(self.names)), weights=self.weights)[0]


class _TextCache:
    """A synthesizer that synthesizes each distinct text once (noise is added per seed later)."""

    def __init__(self, synth: Synth) -> None:
        self._synth = synth
        self._pcm: dict[str, bytes] = {}

    def synthesize(self, text: str) -> bytes:
        if text not in self._pcm:
            self._pcm[text] = self._synth.synthesize(text)
        return self._pcm[text]


class AudioBank:
    """Every turn of every mix script rendered once per noise variant, before any step."""

    def __init__(self, audio: dict[tuple[int, int], list[bytes]], variants: int,
                 warmup: list[bytes] | None = None) -> None:
        self._audio = audio
        self.variants = variants
        #: the audio of :data:`WARMUP_SCRIPT`
        self.warmup = warmup or []

    @classmethod
    def render(cls, mix: CallMix, synth: Synth, variants: int = 3, seed: int = 0,
               rate_hz: int = RATE_HZ) -> AudioBank:
        """Render all turns (piper: CPU-heavy, done once); key (script index, variant)."""
        cache = _TextCache(synth)
        audio: dict[tuple[int, int], list[bytes]] = {}
        for si, script in enumerate(mix.scripts):
            for v in range(variants):
                audio[(si, v)] = [render_turn_audio(script, turn, cache, rate_hz,
                                                    seed * 1000 + v * 100 + ti)
                                  for ti, turn in enumerate(script.turns)]
        warmup = [render_turn_audio(WARMUP_SCRIPT, t, cache, rate_hz, seed)
                  for t in WARMUP_SCRIPT.turns]
        return cls(audio, variants, warmup)

    def turn_audio(self, script_index: int, variant: int) -> list[bytes]:
        """The caller's audio per turn of one script in one noise variant."""
        return self._audio[(script_index, variant % self.variants)]


def default_caller_voice() -> Synth:
    """The simulated callers' voice: piper joe-medium at 8 kHz, a little slower than the agent."""
    from agent.engine.tts import PiperTts
    from agent.models import require

    return PiperTts(str(require("piper-en-us-joe-medium")), out_rate_hz=RATE_HZ,
                    length_scale=1.15, deterministic=True)


# -- one call ----------------------------------------------------------------------------------

@dataclass
class CallSample:
    """One call placed during a step, as the caller, the dialplan and the agent's log saw it."""

    script: str
    expect_result: str
    call_id: str
    callerid: str
    #: seconds from the step's start to the call's start
    started_s: float
    #: seconds from connecting to the agent until the dialplan got the call back
    duration_s: float
    #: AGENT_RESULT / agent_result (or the agent's log when the PBX could not take it)
    result: str = ""
    reason: str = ""
    #: response latency (ms) per script turn; None where the turn got no reply
    turn_latency_ms: list[float | None] = field(default_factory=list)
    #: the script's text per turn, and whether that turn counts for the word error
    turn_texts: list[str] = field(default_factory=list)
    wer_turns: list[bool] = field(default_factory=list)
    hung_up: bool = False
    hangup_script: bool = False
    #: what the agent heard per turn (from its log), when known, and the path it took
    heard: list[str] | None = None
    paths: list[str] = field(default_factory=list)
    #: word error rates of this call's counted turns
    wers: list[float] = field(default_factory=list)
    error: str = ""

    @property
    def latencies_ms(self) -> list[float]:
        """Response latencies (ms) of the turns that got a reply."""
        return [ms for ms in self.turn_latency_ms if ms is not None]

    def path_latencies(self) -> list[tuple[str, float]]:
        """(path, latency ms) per spoken turn, when the agent heard one utterance per turn."""
        spoken = [ms for text, ms in zip(self.turn_texts, self.turn_latency_ms, strict=False)
                  if text]
        if len(self.paths) != len(spoken):
            return []
        return [(path, ms) for path, ms in zip(self.paths, spoken, strict=True)
                if ms is not None]

    @property
    def refused(self) -> bool:
        """The agent answered BUSY."""
        return self.result == "BUSY"

    @property
    def completed(self) -> bool:
        """Ended as the script expects (never when refused, failed or not completed)."""
        if self.error or self.result in _FAILED_RESULTS:
            return False
        if self.expect_result:
            if self.result == self.expect_result:
                return True
            # after a caller hangup Asterisk takes no more channel variables: a hangup script
            # whose caller did hang up, with no result and no error, ended as it should
            return self.hangup_script and self.hung_up and self.result == ""
        return self.result in ("DONE", "TRANSFER") or (self.hangup_script and self.hung_up)

    def brief(self) -> dict[str, Any]:
        """The call in a few JSON-able fields."""
        return {"script": self.script, "call_id": self.call_id, "start_s": round(self.started_s, 2),
                "duration_s": round(self.duration_s, 2), "result": self.result,
                "reason": self.reason, "completed": self.completed,
                "latencies_ms": [None if ms is None else round(ms)
                                 for ms in self.turn_latency_ms],
                "wer": [round(w, 3) for w in self.wers], "heard": self.heard,
                "paths": self.paths,
                "error": self.error}

    def score_heard(self, heard: list[str], paths: Sequence[str] = ()) -> None:
        """Set ``heard`` (and ``paths``) and the word error of the counted turns.

        With one heard utterance per spoken turn, each counted turn is scored on its own. When
        the numbers differ (the agent split an utterance at a pause, or missed one), the whole
        call is scored once: all spoken text against all heard text.
        """
        self.heard = heard
        self.paths = list(paths)
        self.wers = []
        if self.refused or self.error:
            return
        spoken = [(text, counted) for text, counted in zip(self.turn_texts, self.wer_turns,
                                                           strict=True) if text]
        if not spoken:
            return
        if len(heard) == len(spoken):
            self.wers = [word_error_rate(text, h) for (text, counted), h in zip(spoken, heard,
                                                                                strict=True)
                         if counted]
        else:
            self.wers = [word_error_rate(" ".join(t for t, _ in spoken), " ".join(heard))]


async def place_call(pbx: str, host: str, port: int, script: CallerScript, audio: list[bytes],
                     *, callerid: str, call_id: str, timeout_s: float = 240.0,
                     rate_hz: int = RATE_HZ) -> tuple[Any, CallerReport, float, str]:
    """Place one scripted call with pre-rendered audio: (PBX-side result or None, caller's
    report, seconds until the dialplan got the call back, error text or "")."""
    caller = ScriptedCaller(script, audio, rate_hz)

    async def media(peer: Any) -> None:
        await caller.run(peer)

    loop = asyncio.get_running_loop()
    started = loop.time()
    result: Any = None
    error = ""
    try:
        if pbx == "freeswitch":
            from agent.sim.freeswitch import FakeFreeSwitch

            fs = FakeFreeSwitch(host, port, media=media, rate_hz=rate_hz)
            result = await asyncio.wait_for(fs.place_call(
                caller_id_number=callerid, caller_id_name=script.calleridname,
                destination_number=script.dnid, uuid=call_id), timeout_s)
        else:
            from agent.sim.asterisk import FakeAsterisk

            fake = FakeAsterisk(host, port, media=media, rate_hz=rate_hz)
            result = await asyncio.wait_for(fake.place_call(
                callerid=callerid, calleridname=script.calleridname, dnid=script.dnid,
                uniqueid=call_id), timeout_s)
        error = str(getattr(result, "error", None) or "")
    except TimeoutError:
        error = f"no end after {timeout_s:.0f} s"
    except Exception as exc:  # one broken call is a failed call, never a failed run
        error = f"{type(exc).__name__}: {exc}"
    return result, caller.report, loop.time() - started, error


def _pbx_result(result: Any) -> tuple[str, str]:
    if result is None:
        return "", ""
    variables: Mapping[str, str] = getattr(result, "variables", {})
    return (str(variables.get("AGENT_RESULT") or variables.get("agent_result") or ""),
            str(variables.get("AGENT_REASON") or variables.get("agent_reason") or ""))


def sample_from_call(script: CallerScript, call_id: str, callerid: str, started_s: float,
                     result: Any, report: CallerReport, duration_s: float,
                     error: str) -> CallSample:
    """A :class:`CallSample` from what :func:`place_call` returned."""
    res, reason = _pbx_result(result)
    counted = [bool(t.text) and t.barge_in_after_ms is None and t.hangup_after_ms is None
               for t in script.turns]
    return CallSample(
        script=script.name, expect_result=script.expect_result, call_id=call_id,
        callerid=callerid, started_s=started_s, duration_s=duration_s, result=res,
        reason=reason,
        turn_latency_ms=[m.latency_ms for m in report.turns]
        + [None] * (len(script.turns) - len(report.turns)),
        turn_texts=[t.text for t in script.turns], wer_turns=counted, hung_up=report.hung_up,
        hangup_script=any(t.hangup_after_ms is not None for t in script.turns), error=error)


# -- the agent's side: log, metrics, process ---------------------------------------------------

_CALL_LINE = re.compile(r"\bcall (?P<call>\S+): ")
_END_LINE = re.compile(
    r"\bcall (?P<call>\S+): (?P<result>DONE|TRANSFER|BUSY|ERROR) (?P<reason>\S*)")
_REFUSED_LINE = re.compile(r"\bcall (?P<call>\S+): refused \((?P<reason>[^)]*)\)")


@dataclass
class AgentLog:
    """What an agent's log says per call: what it heard per turn and how the call ended."""

    heard: dict[str, list[str]] = field(default_factory=dict)
    paths: dict[str, list[str]] = field(default_factory=dict)
    ended: dict[str, tuple[str, str]] = field(default_factory=dict)

    @classmethod
    def parse(cls, text: str) -> AgentLog:
        """Parse the ``call <id>: ...`` lines of a `pbx-agent serve` log."""
        by_call: dict[str, list[str]] = {}
        out = cls()
        for line in text.splitlines():
            m = _CALL_LINE.search(line)
            if m is None:
                continue
            by_call.setdefault(m.group("call"), []).append(line)
            if (end := _END_LINE.search(line)) is not None:
                out.ended[end.group("call")] = (end.group("result"), end.group("reason"))
            elif (ref := _REFUSED_LINE.search(line)) is not None:
                out.ended[ref.group("call")] = ("BUSY", ref.group("reason"))
        for call_id, lines in by_call.items():
            turns = heard_turns("\n".join(lines), call_id)
            out.heard[call_id] = [h for h, _ in turns]
            out.paths[call_id] = [p for _, p in turns]
        return out


def parse_stage_cpu(text: str) -> dict[str, float]:
    """``pbx_agent_engine_cpu_seconds_total`` per stage from a Prometheus text exposition."""
    from prometheus_client.parser import text_string_to_metric_families

    names = {CPU_METRIC, CPU_METRIC.removesuffix("_total")}
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in names and "stage" in sample.labels:
                out[sample.labels["stage"]] = float(sample.value)
    return out


def scrape_stage_cpu(url: str, timeout_s: float = 3.0) -> dict[str, float] | None:
    """CPU seconds per stage from the agent's metrics endpoint; None when unreachable."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:  # noqa: S310 (local URL)
            text = resp.read().decode("utf-8", errors="replace")
        return parse_stage_cpu(text)
    except (OSError, ValueError, urllib.error.URLError) as exc:
        _LOGGER.debug("metrics %s unreachable: %r", url, exc)
        return None


def stage_cpu_delta(before: Mapping[str, float] | None,
                    after: Mapping[str, float] | None) -> dict[str, float] | None:
    """CPU seconds per stage spent between two scrapes (None unless both worked)."""
    if before is None or after is None:
        return None
    return {stage: max(0.0, after.get(stage, 0.0) - before.get(stage, 0.0))
            for stage in sorted(set(before) | set(after))}


def per_call_minute(cpu_s: Mapping[str, float] | None,
                    call_seconds: float) -> dict[str, float] | None:
    """CPU seconds per minute of call: each stage's CPU seconds / (call seconds / 60)."""
    if cpu_s is None or call_seconds <= 0:
        return None
    minutes = call_seconds / 60.0
    return {stage: value / minutes for stage, value in cpu_s.items()}


class ProcessProbe:
    """CPU time and resident memory of one process and its children (psutil)."""

    def __init__(self, pid: int) -> None:
        import psutil

        self._psutil = psutil
        self.pid = pid
        self.proc = psutil.Process(pid)

    def _family(self) -> list[Any]:
        try:
            return [self.proc, *self.proc.children(recursive=True)]
        except self._psutil.Error:
            return [self.proc]

    def cpu_seconds(self) -> float | None:
        """User + system seconds of the process, its live children and its reaped children."""
        total = 0.0
        try:
            t = self.proc.cpu_times()
            total += t.children_user + t.children_system
        except self._psutil.Error:
            return None
        for p in self._family():
            with contextlib.suppress(self._psutil.Error):
                t = p.cpu_times()
                total += t.user + t.system
        return total

    def rss_bytes(self) -> int | None:
        """Resident memory of the process and its live children."""
        total = 0
        seen = False
        for p in self._family():
            with contextlib.suppress(self._psutil.Error):
                total += p.memory_info().rss
                seen = True
        return total if seen else None


class _RssSampler:
    """Samples a probe's RSS every ``every_s`` in a thread and keeps the peak."""

    def __init__(self, probe: ProcessProbe | None, every_s: float = 0.5) -> None:
        self.probe = probe
        self.every_s = every_s
        self.peak: int | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="capacity-rss", daemon=True)

    def __enter__(self) -> _RssSampler:
        if self.probe is not None:
            self._thread.start()
        return self

    def _run(self) -> None:
        assert self.probe is not None
        while True:
            rss = self.probe.rss_bytes()
            if rss is not None:
                self.peak = max(self.peak or 0, rss)
            if self._stop.wait(self.every_s):
                return

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5.0)


def listening_pid(port: int) -> int | None:
    """The pid of the process listening on TCP ``port`` (None when unknown or not allowed)."""
    import psutil

    try:
        for conn in psutil.net_connections(kind="tcp"):
            if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port:
                return conn.pid
    except (psutil.Error, OSError) as exc:
        _LOGGER.debug("cannot list listening sockets: %r", exc)
    return None


# -- steps -------------------------------------------------------------------------------------

def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-quantile (0..1) by linear interpolation (the report's); None for no values."""
    return report_percentile(values, q * 100.0) if values else None


@dataclass
class StepResult:
    """One step: N concurrent callers for ``step_s`` seconds, and what was measured."""

    concurrent: int
    #: seconds from the first call's start until the last call ended
    wall_s: float
    calls: int
    completed: int
    refused: int
    errors: int
    #: completed / calls (0 when no call was placed)
    completion: float
    latency_n: int
    p50_ms: float | None
    p95_ms: float | None
    p99_ms: float | None
    #: mean STT word error rate over the counted turns (None when not measurable)
    wer: float | None
    wer_n: int
    #: the agent's CPU over the step: % of one core, % of the whole box
    cpu_core_percent: float | None
    cpu_box_percent: float | None
    #: the simulator's own CPU (it shares the box), % of one core
    sim_cpu_core_percent: float | None
    rss_peak_mib: float | None
    #: sum of the calls' durations (minutes)
    call_minutes: float
    #: CPU seconds per stage over the step (from the metrics endpoint)
    stage_cpu_s: dict[str, float] | None
    #: CPU seconds per call-minute: per stage, and ``total`` (the whole agent process)
    cpu_s_per_call_min: dict[str, float] | None
    #: result counts (DONE, TRANSFER, BUSY, ERROR, "" = none) and calls / completed per script
    results: dict[str, int] = field(default_factory=dict)
    by_script: dict[str, dict[str, int]] = field(default_factory=dict)
    #: response latency per dialog path (faq, llm, transfer...): n, p50_ms, p95_ms
    by_path: dict[str, dict[str, float | None]] = field(default_factory=dict)
    passed: bool = False
    #: why the step failed (empty when it passed)
    failures: list[str] = field(default_factory=list)
    #: every call of the step, compact (script, result, seconds, latencies, word errors...)
    call_log: list[dict[str, Any]] = field(default_factory=list)


def summarize_step(concurrent: int, samples: Sequence[CallSample], wall_s: float, *,
                   cpu_s: float | None = None, sim_cpu_s: float | None = None,
                   rss_peak: int | None = None, stage_cpu_s: Mapping[str, float] | None = None,
                   cpu_count: int | None = None) -> StepResult:
    """Aggregate a step's calls and measurements (not yet judged: see :func:`judge_step`)."""
    latencies = [ms for s in samples for ms in s.latencies_ms]
    wers = [w for s in samples for w in s.wers]
    completed = sum(s.completed for s in samples)
    call_s = sum(s.duration_s for s in samples)
    cores = cpu_count or os.cpu_count() or 1
    core_pct = None if cpu_s is None or wall_s <= 0 else cpu_s / wall_s * 100.0
    per_min = per_call_minute(stage_cpu_s, call_s)
    if cpu_s is not None and call_s > 0:
        per_min = dict(per_min or {})
        per_min["total"] = cpu_s / (call_s / 60.0)
    results: dict[str, int] = {}
    by_script: dict[str, dict[str, int]] = {}
    for s in samples:
        key = s.result or ("error" if s.error else "none")
        results[key] = results.get(key, 0) + 1
        row = by_script.setdefault(s.script, {"calls": 0, "completed": 0})
        row["calls"] += 1
        row["completed"] += int(s.completed)
    path_ms: dict[str, list[float]] = {}
    for s in samples:
        for path, ms in s.path_latencies():
            path_ms.setdefault(path, []).append(ms)
    by_path: dict[str, dict[str, float | None]] = {
        path: {"n": len(v), "p50_ms": percentile(v, 0.5), "p95_ms": percentile(v, 0.95)}
        for path, v in sorted(path_ms.items())}
    return StepResult(
        concurrent=concurrent, wall_s=wall_s, calls=len(samples), completed=completed,
        refused=sum(s.refused for s in samples), errors=sum(bool(s.error) for s in samples),
        completion=completed / len(samples) if samples else 0.0, latency_n=len(latencies),
        p50_ms=percentile(latencies, 0.50), p95_ms=percentile(latencies, 0.95),
        p99_ms=percentile(latencies, 0.99),
        wer=statistics.fmean(wers) if wers else None, wer_n=len(wers),
        cpu_core_percent=core_pct,
        cpu_box_percent=None if core_pct is None else core_pct / cores,
        sim_cpu_core_percent=None if sim_cpu_s is None or wall_s <= 0
        else sim_cpu_s / wall_s * 100.0,
        rss_peak_mib=None if rss_peak is None else rss_peak / (1 << 20),
        call_minutes=call_s / 60.0,
        stage_cpu_s=None if stage_cpu_s is None else dict(stage_cpu_s),
        cpu_s_per_call_min=per_min, results=results, by_script=by_script, by_path=by_path,
        call_log=[s.brief() for s in samples])


def judge_step(step: StepResult, options: CapacityOptions) -> StepResult:
    """Set ``passed`` and ``failures`` against the targets; returns the same step.

    An unmeasured WER (no agent log, no counted turn) does not fail a step; an unmeasured p95
    (no turn got a reply) does.
    """
    failures = []
    if step.calls == 0:
        failures.append("no call placed")
    if step.p95_ms is None:
        failures.append("no response latency measured")
    elif step.p95_ms > options.p95_ms:
        failures.append(f"p95 {step.p95_ms:.0f} ms > {options.p95_ms:.0f} ms")
    if step.completion < options.completion:
        failures.append(f"completion {step.completion * 100:.1f} % < "
                        f"{options.completion * 100:g} %")
    if step.wer is not None and step.wer > options.wer:
        failures.append(f"WER {step.wer * 100:.1f} % > {options.wer * 100:g} %")
    step.failures = failures
    step.passed = not failures
    return step


def safe_capacity(steps: Sequence[StepResult]) -> int:
    """The largest passing step with every smaller step passing too (0 if the first fails)."""
    safe = 0
    for step in sorted(steps, key=lambda s: s.concurrent):
        if not step.passed:
            break
        safe = step.concurrent
    return safe


def should_stop(steps: Sequence[StepResult], stop_after_failures: int) -> bool:
    """True once the last ``stop_after_failures`` steps all failed."""
    tail = list(steps)[-stop_after_failures:]
    return len(tail) >= stop_after_failures and not any(s.passed for s in tail)


# -- a run against one agent -------------------------------------------------------------------

def _deep_merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _deep_merge(dict(out[key]), value)
        else:
            out[key] = value
    return out


_DEFAULT_TRANSFERS: Mapping[str, Mapping[str, str]] = MappingProxyType({
    "asterisk": {"front-desk": "PJSIP/100", "billing": "PJSIP/101", "emergency": "PJSIP/199"},
    "freeswitch": {"front-desk": "1000", "billing": "1001", "emergency": "1999"},
})


def agent_config_text(options: CapacityOptions, *, naive: bool, state_dir: str,
                      listen_ports: Sequence[int], metrics_port: int, shedding_path: str) -> str:
    """The started agent's config: the user's base config under the keys the run must set.

    ``listen_ports``: (esl,) for FreeSWITCH, (fastagi, audiosocket) for Asterisk.
    """
    base: Any = yaml.safe_load(options.base_config) if options.base_config.strip() else {}
    if base is None:
        base = {}
    if not isinstance(base, dict):
        raise ValueError("the base config must be a YAML mapping")
    largest = max(options.steps) + 2
    if options.pbx == "freeswitch":
        listen: dict[str, Any] = {"esl": f"127.0.0.1:{listen_ports[0]}"}
    else:
        listen = {"fastagi": f"127.0.0.1:{listen_ports[0]}",
                  "audiosocket": f"127.0.0.1:{listen_ports[1]}"}
    capacity = dict(base.get("capacity") or {})
    capacity.pop("live", None)  # live PBX limits would refuse calls the run must measure
    capacity.update({"engine_calls": largest, "pbx_conf": "none", "shedding": shedding_path})
    kpi = dict(base.get("kpi") or {})
    kpi.update({"metrics": f"127.0.0.1:{metrics_port}", "records": ""})
    over: dict[str, Any] = {
        "pbx": options.pbx, "state_dir": state_dir, "max_calls": largest, "log_level": "INFO",
        "naive": naive, "listen": listen,
    }
    config = _deep_merge(base, over)
    config["capacity"] = capacity
    config["kpi"] = kpi
    agent_file = config.get("agent")
    if isinstance(agent_file, str) and options.base_config_path and \
            not Path(agent_file).is_absolute():
        config["agent"] = str(Path(options.base_config_path).resolve().parent / agent_file)
    if "transfers" not in config:  # the default agent's intents name these three
        config["transfers"] = dict(_DEFAULT_TRANSFERS[options.pbx])
    return yaml.safe_dump(config, sort_keys=False, default_flow_style=False)


@dataclass
class ModeResult:
    """The steps of one run mode (normal or naive) against one agent."""

    naive: bool
    steps: list[StepResult] = field(default_factory=list)
    safe_capacity: int = 0
    stopped_early: bool = False
    #: why the run stopped before its last step ("" when it did not)
    error: str = ""
    #: seconds the started agent took to load its models and listen
    ready_s: float | None = None
    rss_ready_mib: float | None = None


class _StepRunner:
    """Runs steps against one agent (started or targeted) with one audio bank."""

    def __init__(self, options: CapacityOptions, mix: CallMix, bank: AudioBank,
                 host: str, port: int, progress: Progress, *, metrics_url: str | None,
                 probe: ProcessProbe | None, proc: AgentProcess | None) -> None:
        self.options = options
        self.mix = mix
        self.bank = bank
        self.host = host
        self.port = port
        self.progress = progress
        self.metrics_url = metrics_url
        self.probe = probe
        self.proc = proc
        self._log_offset = 0
        self._call_no = 0
        self._cores = os.cpu_count() or 1

    def _next_call_id(self) -> str:
        self._call_no += 1
        if self.options.pbx == "freeswitch":
            return str(uuid.uuid4())
        return f"{int(time.time())}.{self._call_no}"  # Asterisk-style uniqueid

    async def _calls(self, n: int, samples: list[CallSample]) -> float:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        deadline = t0 + self.options.step_s
        in_flight: dict[int, float] = {}
        placed = [0]

        async def caller_loop(i: int) -> None:
            rng = random.Random(f"{self.options.seed}:{n}:{i}")
            await asyncio.sleep(self.options.stagger_s * i / n)
            while loop.time() < deadline or placed[0] < self.options.min_calls:
                placed[0] += 1
                si = self.mix.draw(rng)
                variant = rng.randrange(self.bank.variants)
                callerid = f"+1555{rng.randrange(10 ** 7):07d}"
                script = self.mix.scripts[si]
                call_id = self._next_call_id()
                started = loop.time()
                in_flight[i] = started
                result, report, duration, error = await place_call(
                    self.options.pbx, self.host, self.port, script,
                    self.bank.turn_audio(si, variant), callerid=callerid, call_id=call_id,
                    timeout_s=self.options.call_timeout_s)
                in_flight.pop(i, None)
                samples.append(sample_from_call(script, call_id, callerid, started - t0, result,
                                                report, duration, error))
                if error:  # an agent that is gone or stuck: don't spin placing calls
                    await asyncio.sleep(1.0)

        async def ticker() -> None:
            while True:
                await asyncio.sleep(self.options.progress_every_s)
                elapsed = loop.time() - t0
                lat = [ms for s in samples for ms in s.latencies_ms]
                p95 = percentile(lat, 0.95)
                finishing = " (finishing)" if elapsed > self.options.step_s else ""
                self.progress(
                    f"  {n} concurrent: {min(elapsed, self.options.step_s):3.0f}/"
                    f"{self.options.step_s:.0f} s{finishing}"
                    f", {len(samples)} calls done ({sum(s.completed for s in samples)} ok, "
                    f"{sum(s.refused for s in samples)} busy), {len(in_flight)} in flight, "
                    f"p95 {'-' if p95 is None else f'{p95:.0f} ms'}")

        tick = asyncio.create_task(ticker())
        try:
            await asyncio.gather(*(caller_loop(i) for i in range(n)))
        finally:
            tick.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await tick
        return loop.time() - t0

    def _new_log(self) -> str:
        if self.proc is None:
            return ""
        with self.proc.log_path.open("rb") as fh:
            fh.seek(self._log_offset)
            data = fh.read()
        self._log_offset += len(data)
        return data.decode("utf-8", errors="replace")

    def warm_up(self) -> None:
        """Place the unmeasured warm-up calls, one after another."""
        for i in range(self.options.warmup_calls):
            _, report, duration, error = asyncio.run(place_call(
                self.options.pbx, self.host, self.port, WARMUP_SCRIPT, self.bank.warmup,
                callerid=WARMUP_SCRIPT.callerid, call_id=self._next_call_id(),
                timeout_s=self.options.call_timeout_s))
            latency = [m.latency_ms for m in report.turns if m.latency_ms is not None]
            self.progress(f"  warm-up call {i + 1}/{self.options.warmup_calls} (not measured): "
                          f"{error or 'ended'} after {duration:.1f} s, latency "
                          f"{_fmt(latency[0] if latency else None)} ms")

    def run_step(self, n: int) -> StepResult:
        """Run one step of ``n`` concurrent callers and judge it."""
        import psutil

        self._new_log()  # skip what the agent logged before the step
        stages_before = scrape_stage_cpu(self.metrics_url) if self.metrics_url else None
        cpu_before = self.probe.cpu_seconds() if self.probe else None
        me = psutil.Process()
        sim_before = sum(me.cpu_times()[:2])
        samples: list[CallSample] = []
        with _RssSampler(self.probe) as rss:
            wall_s = asyncio.run(self._calls(n, samples))
        cpu_after = self.probe.cpu_seconds() if self.probe else None
        sim_after = sum(me.cpu_times()[:2])
        time.sleep(0.5)  # the agent logs a call's end just after the dialplan got it back
        stages_after = scrape_stage_cpu(self.metrics_url) if self.metrics_url else None
        if self.proc is not None:
            log = AgentLog.parse(self._new_log())
            for s in samples:
                if not s.result and s.call_id in log.ended:
                    s.result, s.reason = log.ended[s.call_id]
                s.score_heard(log.heard.get(s.call_id, []), log.paths.get(s.call_id, []))
        cpu_s = None if cpu_before is None or cpu_after is None else cpu_after - cpu_before
        step = summarize_step(n, samples, wall_s, cpu_s=cpu_s, sim_cpu_s=sim_after - sim_before,
                              rss_peak=rss.peak,
                              stage_cpu_s=stage_cpu_delta(stages_before, stages_after),
                              cpu_count=self._cores)
        return judge_step(step, self.options)


def _fmt(value: float | None, spec: str = ".0f", suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def step_line(step: StepResult) -> str:
    """One line for a finished step."""
    verdict = "PASS" if step.passed else "FAIL (" + "; ".join(step.failures) + ")"
    return (f"{step.concurrent} concurrent: {verdict}: {step.calls} calls, "
            f"p50/p95/p99 {_fmt(step.p50_ms)}/{_fmt(step.p95_ms)}/{_fmt(step.p99_ms)} ms, "
            f"completion {step.completion * 100:.0f} %, "
            f"WER {_fmt(None if step.wer is None else step.wer * 100, '.1f', ' %')}, "
            f"CPU {_fmt(step.cpu_core_percent, '.0f', ' %')} of a core, "
            f"RSS {_fmt(step.rss_peak_mib, '.0f', ' MiB')}, {step.refused} refused")


def step_through(options: CapacityOptions, run_step: Callable[[int], StepResult],
                 progress: Progress, *, label: str = "agent",
                 alive: Callable[[], bool] = lambda: True, settle_s: float = 1.0) -> ModeResult:
    """Run ``options.steps`` in order with ``run_step`` (which returns a judged step), stopping
    after ``stop_after_failures`` failing steps in a row or when ``alive()`` turns False."""
    mode = ModeResult(naive=False)
    for index, n in enumerate(options.steps, start=1):
        if not alive():
            mode.error = "the agent process exited"
            progress(f"{label}: {mode.error}; stopping")
            break
        progress(f"{label}: step {index}/{len(options.steps)}: {n} concurrent calls "
                 f"for {options.step_s:.0f} s")
        step = run_step(n)
        mode.steps.append(step)
        progress(f"{label}: {step_line(step)}")
        if index == len(options.steps):
            break
        if should_stop(mode.steps, options.stop_after_failures):
            mode.stopped_early = True
            progress(f"{label}: {options.stop_after_failures} failing step(s) in a row; "
                     "stopping")
            break
        time.sleep(settle_s)  # let the agent settle between steps
    mode.safe_capacity = safe_capacity(mode.steps)
    return mode


def _run_started(options: CapacityOptions, mix: CallMix, bank: Callable[[], AudioBank],
                 naive: bool, progress: Progress) -> ModeResult:
    """Start `pbx-agent serve` for one run mode, step through, stop it."""
    label = "naive" if naive else "agent"
    with tempfile.TemporaryDirectory(prefix="pbx-agent-capacity-") as tmp:
        shedding = Path(tmp) / "shedding.yaml"
        shedding.write_text("rules: []\n", encoding="utf-8")
        ports = (free_port(),) if options.pbx == "freeswitch" else (free_port(), free_port())
        metrics_port = free_port()
        text = agent_config_text(options, naive=naive, state_dir=str(Path(tmp) / "state"),
                                 listen_ports=ports, metrics_port=metrics_port,
                                 shedding_path=str(shedding))
        progress(f"{label}: starting pbx-agent serve ({options.pbx}"
                 f"{', naive baseline' if naive else ''}) and loading its models")
        t0 = time.monotonic()
        with AgentProcess(text, ready_timeout_s=options.ready_timeout_s) as proc:
            ready_s = time.monotonic() - t0
            assert proc.proc is not None
            child = proc.proc
            probe = ProcessProbe(child.pid)
            rss = probe.rss_bytes()
            rss_ready_mib = None if rss is None else rss / (1 << 20)
            progress(f"{label}: ready in {ready_s:.1f} s, RSS "
                     f"{_fmt(rss_ready_mib, '.0f', ' MiB')}")
            runner = _StepRunner(options, mix, bank(), "127.0.0.1", ports[0], progress,
                                 metrics_url=f"http://127.0.0.1:{metrics_port}/metrics",
                                 probe=probe, proc=proc)
            runner.warm_up()
            mode = step_through(options, runner.run_step, progress, label=label,
                                alive=lambda: child.poll() is None)
    mode.naive, mode.ready_s, mode.rss_ready_mib = naive, ready_s, rss_ready_mib
    return mode


def _run_target(options: CapacityOptions, mix: CallMix, bank: AudioBank,
                progress: Progress) -> ModeResult:
    assert options.target is not None
    host, port = split_target(options.target)
    pid = options.agent_pid or listening_pid(port)
    probe = None
    if pid is not None:
        try:
            probe = ProcessProbe(pid)
        except Exception as exc:  # psutil.Error: gone or not ours
            _LOGGER.warning("cannot watch agent pid %s: %r", pid, exc)
    if probe is None:
        progress(f"running agent at {options.target}: no process to watch (CPU/RSS not measured;"
                 " pass its pid)")
    runner = _StepRunner(options, mix, bank, host, port, progress,
                         metrics_url=options.metrics_url or None, probe=probe, proc=None)
    runner.warm_up()
    return step_through(options, runner.run_step, progress)


# -- the whole run -----------------------------------------------------------------------------

def machine_info() -> dict[str, Any]:
    """CPU count and model, RAM, platform and Python of this box."""
    import psutil

    model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.lower().startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {"cpu_count": os.cpu_count(), "cpu_model": model,
            "ram_gib": round(psutil.virtual_memory().total / (1 << 30), 1),
            "platform": platform.platform(), "python": platform.python_version()}


def utc_now() -> str:
    """Now, ISO 8601 UTC to the second with a ``Z``."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class CapacityResult:
    """A whole capacity run: per-step figures, the safe capacity, naive comparison, sizing."""

    options: dict[str, Any]
    machine: dict[str, Any]
    started_at: str
    finished_at: str
    steps: list[StepResult]
    #: concurrent calls the box serves within every target (the governor's ``engine`` term)
    safe_capacity: int
    stopped_early: bool = False
    error: str = ""
    #: the started agent: seconds to ready and RSS when ready (None for a running agent)
    agent_ready_s: float | None = None
    agent_rss_ready_mib: float | None = None
    naive_steps: list[StepResult] | None = None
    naive_safe_capacity: int | None = None
    naive_error: str = ""
    #: safe capacity ratio (normal / naive) and p95 at equal steps (compare_naive)
    ratios: dict[str, Any] | None = None
    #: Erlang B sizing lines (calls_per_hour given)
    sizing: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict; ``safe_capacity`` (int) and ``finished_at`` at the top level."""
        return asdict(self)


def naive_ratios(steps: Sequence[StepResult], naive_steps: Sequence[StepResult],
                 safe: int, naive_safe: int) -> dict[str, Any]:
    """Safe capacity normal / naive (None when naive is 0) and p95 side by side per step."""
    naive_by_n = {s.concurrent: s for s in naive_steps}
    rows = []
    for s in steps:
        other = naive_by_n.get(s.concurrent)
        if other is None:
            continue
        ratio = (other.p95_ms / s.p95_ms if other.p95_ms is not None and s.p95_ms
                 else None)
        rows.append({"concurrent": s.concurrent, "p95_ms": s.p95_ms,
                     "naive_p95_ms": other.p95_ms, "naive_over_normal": ratio,
                     "cpu_s_per_call_min": (s.cpu_s_per_call_min or {}).get("total"),
                     "naive_cpu_s_per_call_min":
                         (other.cpu_s_per_call_min or {}).get("total")})
    return {"safe_capacity": safe, "naive_safe_capacity": naive_safe,
            "safe_capacity_ratio": safe / naive_safe if naive_safe else None,
            "p95_at_equal_steps": rows}


def sizing_lines(options: CapacityOptions, safe: int,
                 steps: Sequence[StepResult]) -> list[str]:
    """Erlang B sizing of ``safe`` against the options' load; [] without calls_per_hour."""
    if options.calls_per_hour is None:
        return []
    from agent.kpi.erlang import size

    aht = options.aht_s
    note = ""
    if aht is None:
        seconds = sum(s.call_minutes for s in steps) * 60.0
        calls = sum(s.calls - s.refused for s in steps)
        if not calls or seconds <= 0:
            return ["Erlang B sizing: no average handling time (pass aht_s)"]
        aht = round(seconds / calls, 1)
        note = " (AHT: mean call length measured in this run)"
    lines = size(options.calls_per_hour, aht, safe, options.target_blocking).lines()
    return [lines[0] + note, *lines[1:]]


def run_capacity(options: CapacityOptions, progress: Progress | None = None,
                 synth: Synth | None = None) -> CapacityResult:
    """Measure the safe capacity as ``options`` say (blocking; runs asyncio inside).

    ``progress`` gets human-readable lines (step starts, every ~5 s within a step, step
    results); ``synth`` is the callers' voice (default: :func:`default_caller_voice`).
    """
    say: Progress = progress or (lambda line: _LOGGER.info("%s", line))
    started_at = utc_now()
    mix = CallMix.load(options.mix)
    say(f"capacity: {options.pbx}, steps {', '.join(map(str, options.steps))}, "
        f"{options.step_s:.0f} s each; mix "
        + ", ".join(f"{n} {w:g}" for n, w in zip(mix.names, mix.weights, strict=True)))

    def render() -> AudioBank:
        voice = synth or default_caller_voice()
        t0 = time.monotonic()
        rendered = AudioBank.render(mix, voice, options.variants, options.seed)
        say(f"caller audio rendered in {time.monotonic() - t0:.1f} s "
            f"({len(mix.names)} scripts x {options.variants} variants)")
        return rendered

    with ThreadPoolExecutor(1, thread_name_prefix="capacity-render") as pool:
        # rendering overlaps the agent's start-up; every step waits for it
        future = pool.submit(render)
        if options.target is not None:
            main = _run_target(options, mix, future.result(), say)
        else:
            main = _run_started(options, mix, future.result, options.naive, say)
        naive: ModeResult | None = None
        if options.compare_naive:
            try:
                naive = _run_started(options, mix, future.result, True, say)
            except RuntimeError as exc:  # the baseline failing to start must not lose the run
                naive = ModeResult(naive=True, error=str(exc).splitlines()[0])
    result = CapacityResult(
        options=options.summary(), machine=machine_info(), started_at=started_at,
        finished_at=utc_now(), steps=main.steps, safe_capacity=main.safe_capacity,
        stopped_early=main.stopped_early, error=main.error, agent_ready_s=main.ready_s,
        agent_rss_ready_mib=main.rss_ready_mib,
        sizing=sizing_lines(options, main.safe_capacity, main.steps))
    if naive is not None:
        result.naive_steps = naive.steps
        result.naive_safe_capacity = naive.safe_capacity
        result.naive_error = naive.error
        result.ratios = naive_ratios(main.steps, naive.steps, main.safe_capacity,
                                     naive.safe_capacity)
    say(f"safe capacity: {result.safe_capacity} concurrent call(s)")
    return result


# -- reports -----------------------------------------------------------------------------------

def _stamp(iso: str) -> str:
    return iso.replace("-", "").replace(":", "")


def _step_table(steps: Sequence[StepResult], safe: int | None = None) -> list[str]:
    stages = [s for s in STAGES if any(st.cpu_s_per_call_min and s in st.cpu_s_per_call_min
                                       for st in steps)]
    head = ["concurrent", "calls placed", "p50 ms", "p95 ms", "p99 ms", "completion", "WER",
            "CPU % core", "CPU % box", "RSS MiB", "refusals"] + \
        [f"CPU-s/call-min {s}" for s in stages] + ["CPU-s/call-min total", "result"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for st in steps:
        per = st.cpu_s_per_call_min or {}
        cells = [
            f"**{st.concurrent}**" if st.concurrent == safe else str(st.concurrent),
            str(st.calls), _fmt(st.p50_ms), _fmt(st.p95_ms),
            _fmt(st.p99_ms), f"{st.completion * 100:.1f} %",
            _fmt(None if st.wer is None else st.wer * 100, ".1f", " %"),
            _fmt(st.cpu_core_percent), _fmt(st.cpu_box_percent), _fmt(st.rss_peak_mib),
            str(st.refused),
        ] + [_fmt(per.get(s), ".2f") for s in stages] + [
            _fmt(per.get("total"), ".2f"),
            "pass" if st.passed else "FAIL: " + "; ".join(st.failures)]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _path_table(steps: Sequence[StepResult]) -> list[str]:
    paths = sorted({p for st in steps for p in st.by_path})
    if not paths:
        return []
    out = ["", "Response latency by dialog path, p50 / p95 ms (turns):", "",
           "| concurrent | " + " | ".join(paths) + " |", "|---|" + "---|" * len(paths)]
    for st in steps:
        cells = []
        for p in paths:
            row = st.by_path.get(p)
            cells.append("-" if row is None else
                         f"{_fmt(row['p50_ms'])} / {_fmt(row['p95_ms'])} ({row['n']:.0f})")
        out.append(f"| {st.concurrent} | " + " | ".join(cells) + " |")
    return out


def format_markdown(result: CapacityResult) -> str:
    """The Markdown report."""
    o, m = result.options, result.machine
    t = o["targets"]
    out = [
        f"# pbx-agent capacity: {o['pbx']}", "",
        f"**Safe capacity: {result.safe_capacity} concurrent call"
        f"{'' if result.safe_capacity == 1 else 's'}**"
        + (" (naive baseline)" if o["naive"] else ""), "",
        f"Measured {result.started_at} to {result.finished_at} on {m['cpu_model']} "
        f"({m['cpu_count']} CPUs, {m['ram_gib']} GiB RAM), {m['platform']}, "
        f"Python {m['python']}.", "",
        "## Targets and options", "",
        f"- a step passes with response latency p95 ≤ {t['p95_ms']:.0f} ms, completion ≥ "
        f"{t['completion'] * 100:g} % and STT word error ≤ {t['wer'] * 100:g} %",
        f"- steps: {', '.join(map(str, o['steps']))} concurrent calls, {o['step_s']:g} s each"
        f" and at least {o.get('min_calls', 0)} calls each;"
        f" stop after {o['stop_after_failures']} failing step(s) in a row"
        + (" (stopped early)" if result.stopped_early else ""),
        "- call mix: " + ", ".join(f"{k} {v:g}" for k, v in o["mix"].items())
        + f"; seed {o['seed']}",
        "- agent: " + (f"running at {o['target']}" if o["target"] else
                       "started by the run (`pbx-agent serve`, load shedding off, limits above "
                       "the largest step)")
        + ("; base config merged" if o["base_config"] else ""),
    ]
    if result.agent_ready_s is not None:
        out.append(f"- agent start to ready: {result.agent_ready_s:.1f} s, RSS when ready "
                   f"{_fmt(result.agent_rss_ready_mib, '.0f')} MiB")
    if result.error:
        out.append(f"- run stopped: {result.error}")
    out += ["", "## Steps" + (" (naive baseline)" if o["naive"] else ""), ""]
    out += _step_table(result.steps, result.safe_capacity)
    out += _path_table(result.steps)
    if result.naive_steps is not None:
        out += ["", "## Naive baseline", ""]
        if result.naive_error:
            out.append(f"Naive run stopped: {result.naive_error}")
            out.append("")
        out += _step_table(result.naive_steps, result.naive_safe_capacity)
        if result.ratios is not None:
            ratio = result.ratios["safe_capacity_ratio"]
            out += ["", f"Safe capacity: **{result.safe_capacity}** vs naive "
                    f"**{result.naive_safe_capacity}**"
                    + (f" (× {ratio:.2f})" if ratio is not None else
                       " (naive: 0, no ratio)"), "",
                    "| concurrent | p95 ms | naive p95 ms | naive / normal | CPU-s/call-min "
                    "| naive CPU-s/call-min |", "|---|---|---|---|---|---|"]
            for row in result.ratios["p95_at_equal_steps"]:
                out.append(f"| {row['concurrent']} | {_fmt(row['p95_ms'])} | "
                           f"{_fmt(row['naive_p95_ms'])} | "
                           f"{_fmt(row['naive_over_normal'], '.2f')} | "
                           f"{_fmt(row.get('cpu_s_per_call_min'), '.2f')} | "
                           f"{_fmt(row.get('naive_cpu_s_per_call_min'), '.2f')} |")
    if result.sizing:
        out += ["", "## Erlang B sizing", ""] + [f"- {line}" for line in result.sizing]
    out += [
        "", "## How it was measured", "",
        "- latency: per caller turn, end of the caller's speech to the first non-silent agent "
        "frame, as the simulated caller hears it over the PBX protocol (ms)",
        "- completion: calls that ended as their script expects (DONE or TRANSFER), over calls "
        "placed; refusals (BUSY), errors and wrong results count against it",
        "- WER: what the agent heard (its log) against the script's text; barge-in, hangup and "
        "silent turns are not counted",
        "- CPU: the agent process and its children over the step's wall time (% of one core; "
        "% of the box = that / CPU count); RSS: peak, sampled every 0.5 s",
        "- CPU-s/call-min: CPU seconds per engine stage (`pbx_agent_engine_cpu_seconds_total`)"
        " per minute of calls placed in the step; total = the whole agent process",
        "- safe capacity: the largest step that passed with every smaller step passing too",
    ]
    return "\n".join(out) + "\n"


def plot_latency(result: CapacityResult, path: Path) -> None:
    """PNG: p50/p95 response latency against concurrent calls, the p95 target, naive too."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5), dpi=110)
    series = [("", result.steps, "-")]
    if result.naive_steps:
        series.append(("naive ", result.naive_steps, "--"))
    for label, steps, style in series:
        xs = [s.concurrent for s in steps]
        for q, color in (("p50", "tab:blue"), ("p95", "tab:red")):
            ys = [getattr(s, f"{q}_ms") for s in steps]
            ax.plot(xs, [math.nan if y is None else y for y in ys], style, marker="o",
                    color=color, alpha=1.0 if not label else 0.6, label=f"{label}{q}")
    ax.axhline(result.options["targets"]["p95_ms"], color="grey", linestyle=":",
               label="p95 target")
    if result.safe_capacity:
        ax.axvline(result.safe_capacity, color="green", linestyle=":", alpha=0.6,
                   label=f"safe capacity {result.safe_capacity}")
    ax.set_xticks(sorted({s.concurrent for _, steps, _ in series for s in steps}))
    ax.set_xlabel("concurrent calls")
    ax.set_ylabel("response latency (ms)")
    ax.set_title(f"pbx-agent capacity ({result.options['pbx']}, "
                 f"{result.machine['cpu_count']} CPUs)")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_report(result: CapacityResult, out_dir: str | Path | None = None) -> dict[str, Path]:
    """Write ``capacity-<ts>.json`` (+ ``latest.json``), ``.md`` and ``.png`` into ``out_dir``
    (default: the options' out_dir, else ./capacity); returns them by kind."""
    folder = Path(out_dir or result.options.get("out_dir") or "capacity")
    folder.mkdir(parents=True, exist_ok=True)
    base = folder / f"capacity-{_stamp(result.finished_at)}"
    paths = {"json": base.with_suffix(".json"), "md": base.with_suffix(".md"),
             "png": base.with_suffix(".png"), "latest": folder / "latest.json"}
    paths["json"].write_text(json.dumps(result.to_dict(), indent=2) + "\n", encoding="utf-8")
    # write the copy under a temporary name and rename: the governor never reads half a file
    tmp = folder / ".latest.json.tmp"
    shutil.copyfile(paths["json"], tmp)
    os.replace(tmp, paths["latest"])
    paths["md"].write_text(format_markdown(result), encoding="utf-8")
    plot_latency(result, paths["png"])
    return paths


def format_summary(result: CapacityResult) -> str:
    """A few lines for the terminal."""
    lines = [f"safe capacity: {result.safe_capacity} concurrent call(s) "
             f"({result.options['pbx']}, p95 ≤ {result.options['targets']['p95_ms']:.0f} ms)"]
    lines += [f"  {step_line(s)}" for s in result.steps]
    if result.error:
        lines.append(f"  stopped: {result.error}")
    if result.naive_steps is not None:
        lines.append(f"naive baseline: {result.naive_safe_capacity} concurrent call(s)")
        lines += [f"  {step_line(s)}" for s in result.naive_steps]
        if result.ratios and result.ratios["safe_capacity_ratio"] is not None:
            lines.append(f"safe capacity ratio: × {result.ratios['safe_capacity_ratio']:.2f}")
    lines += result.sizing
    return "\n".join(lines)
