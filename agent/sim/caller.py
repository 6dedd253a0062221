"""Scripted callers: real synthesized speech streamed in real time, with latency measurement.

A caller script (YAML) lists turns: an utterance (text synthesized at 8 kHz by piper at a
slower speaking rate than the agent's voice, with line noise and an optional G.711 round trip,
or a WAV file), optionally a barge-in or a hangup. The caller behaves like a SIP phone behind
Asterisk: it sends a 20 ms frame every 20 ms (silence between utterances), waits for the agent
to finish speaking before its next turn, and measures per turn the response latency: end of
caller speech → first non-silent agent frame.
"""

from __future__ import annotations

import asyncio
import logging
import time
import wave
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Protocol

import yaml

from agent.audio import (
    FRAME_MS,
    add_noise,
    frame_bytes,
    is_silent,
    mulaw_roundtrip,
    resample,
    split_frames,
    trim_silence,
)

_LOGGER = logging.getLogger(__name__)

AGENT_QUIET_MS = 900
REPLY_WAIT_S = 20.0


@dataclass(frozen=True)
class CallerTurn:
    """One scripted caller turn."""

    text: str = ""
    wav: str = ""
    barge_in_after_ms: int | None = None
    hangup_after_ms: int | None = None
    dtmf: str = ""


@dataclass(frozen=True)
class CallerScript:
    """A whole scripted call."""

    name: str
    turns: tuple[CallerTurn, ...]
    callerid: str = "+14155550123"
    calleridname: str = "Alice Example"
    dnid: str = "510"
    length_scale: float = 1.15
    noise_snr_db: float | None = 35.0
    mulaw: bool = True
    expect_result: str = ""


def parse_script(data: dict[str, Any], base_dir: Path | None = None) -> CallerScript:
    """Build a script from its YAML mapping."""
    turns = []
    for t in data.get("turns", []):
        wav = t.get("wav", "")
        if wav and base_dir is not None and not Path(wav).is_absolute():
            wav = str(base_dir / wav)
        turns.append(CallerTurn(text=t.get("say", ""), wav=wav,
                                barge_in_after_ms=t.get("barge_in_after_ms"),
                                hangup_after_ms=t.get("hangup_after_ms"),
                                dtmf=str(t.get("dtmf", ""))))
    voice = data.get("voice", {})
    caller = data.get("caller", {})
    return CallerScript(
        name=data.get("name", "script"), turns=tuple(turns),
        callerid=str(caller.get("callerid", "+14155550123")),
        calleridname=str(caller.get("name", "Alice Example")),
        dnid=str(caller.get("dnid", "510")),
        length_scale=float(voice.get("length_scale", 1.15)),
        noise_snr_db=voice.get("noise_snr_db", 35.0),
        mulaw=bool(voice.get("mulaw", True)),
        expect_result=str(data.get("expect_result", "")),
    )


def load_script(path: str) -> CallerScript:
    """Read a caller script file."""
    p = Path(path)
    return parse_script(yaml.safe_load(p.read_text(encoding="utf-8")), p.parent)


def builtin_script(name: str) -> CallerScript:
    """A script shipped in agent/sim/scripts/ (e.g. ``demo``)."""
    text = resources.files("agent.sim").joinpath("scripts", f"{name}.yaml").read_text("utf-8")
    return parse_script(yaml.safe_load(text))


class Synth(Protocol):
    """Anything that turns text into PCM16 at 8 kHz (the caller's voice)."""

    def synthesize(self, text: str) -> bytes:
        """PCM16 mono at the caller's rate."""


def read_wav(path: str, rate_hz: int) -> bytes:
    """Read a mono 16-bit WAV and resample it to ``rate_hz``."""
    with wave.open(path, "rb") as wf:
        if wf.getsampwidth() != 2 or wf.getnchannels() != 1:
            raise ValueError(f"{path}: need 16-bit mono WAV")
        pcm = wf.readframes(wf.getnframes())
        return resample(pcm, wf.getframerate(), rate_hz)


def render_turn_audio(script: CallerScript, turn: CallerTurn, synth: Synth | None,
                      rate_hz: int, seed: int = 0) -> bytes:
    """The caller's speech for one turn, as it would reach the PBX."""
    if turn.wav:
        pcm = read_wav(turn.wav, rate_hz)
    elif turn.text:
        if synth is None:
            raise ValueError("a text turn needs a synthesizer")
        pcm = synth.synthesize(turn.text)
    else:
        return b""
    pcm = trim_silence(pcm, rate_hz)
    if script.noise_snr_db is not None:
        pcm = add_noise(pcm, float(script.noise_snr_db), seed)
    if script.mulaw:
        pcm = mulaw_roundtrip(pcm)
    return pcm


class CallerPeer(Protocol):
    """The PBX-side media connection the caller speaks into (AudioSocket or unicast)."""

    async def send_audio(self, pcm: bytes) -> None:
        """Send one caller frame."""

    async def send_dtmf(self, digit: str) -> None:
        """Send a DTMF digit."""

    async def read_frame(self, timeout_s: float) -> Any:
        """Next frame from the agent (object with ``kind`` and ``payload``) or None at EOF."""

    def hangup(self) -> None:
        """Caller hangs up."""


@dataclass
class TurnMeasure:
    """What the caller measured in one turn."""

    said: str
    speech_ms: float = 0.0
    latency_ms: float | None = None
    barge_cut_ms: float | None = None
    agent_audio: bytearray = field(default_factory=bytearray)
    agent_text: str = ""


@dataclass
class CallerReport:
    """Everything the caller measured in one call."""

    turns: list[TurnMeasure] = field(default_factory=list)
    greeting_audio: bytearray = field(default_factory=bytearray)
    greeting_text: str = ""
    max_agent_gap_ms: float = 0.0
    agent_frames: int = 0
    hung_up: bool = False
    agent_ended: bool = False


class ScriptedCaller:
    """Plays one caller script over a media peer, in real time."""

    def __init__(self, script: CallerScript, turn_audio: list[bytes], rate_hz: int = 8000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.script = script
        self.turn_audio = turn_audio
        self.rate_hz = rate_hz
        self.clock = clock
        self.report = CallerReport()
        self._outgoing: asyncio.Queue[bytes] = asyncio.Queue()
        self._speech_end_at: float | None = None
        self._speech_onset_at: float | None = None
        self._last_agent_audio_at = 0.0
        self._first_audio_after: float | None = None
        self._agent_speaking = False
        self._capture: bytearray | None = None
        self._timeline: list[tuple[float, bool]] = []
        self._done = asyncio.Event()

    async def run(self, peer: CallerPeer) -> CallerReport:
        """Run the script; returns when the script ends or either side hangs up."""
        sender = asyncio.create_task(self._send_loop(peer))
        receiver = asyncio.create_task(self._receive_loop(peer))
        try:
            await self._drive(peer)
        finally:
            self._done.set()
            sender.cancel()
            receiver.cancel()
            await asyncio.gather(sender, receiver, return_exceptions=True)
        return self.report

    async def _send_loop(self, peer: CallerPeer) -> None:
        loop = asyncio.get_running_loop()
        silence = bytes(frame_bytes(self.rate_hz))
        next_at = loop.time()
        while not self._done.is_set():
            try:
                frame = self._outgoing.get_nowait()
                if self._speech_onset_at is None and not is_silent(frame):
                    self._speech_onset_at = self.clock()
                if self._outgoing.empty():
                    self._speech_end_at = self.clock()
            except asyncio.QueueEmpty:
                frame = silence
            try:
                await peer.send_audio(frame)
            except (ConnectionError, OSError):
                self.report.agent_ended = True
                self._done.set()
                return
            next_at += FRAME_MS / 1000.0
            await asyncio.sleep(max(0.0, next_at - loop.time()))

    async def _receive_loop(self, peer: CallerPeer) -> None:
        last = None
        while not self._done.is_set():
            try:
                frame = await peer.read_frame(timeout_s=3.0)
            except TimeoutError:
                continue
            now = self.clock()
            if frame is None:
                self.report.agent_ended = True
                self._done.set()
                return
            if getattr(frame, "kind", None) is not None and int(frame.kind) == 0x00:
                self.report.agent_ended = True
                self._done.set()
                return
            payload = frame.payload
            if last is not None:
                self.report.max_agent_gap_ms = max(self.report.max_agent_gap_ms,
                                                   (now - last) * 1000.0)
            last = now
            self.report.agent_frames += 1
            silent = is_silent(payload)
            if not silent:
                self._last_agent_audio_at = now
                self._agent_speaking = True
                if self._first_audio_after is None and self._speech_end_at is not None:
                    self._first_audio_after = now
            self._timeline.append((now, silent))
            if self._capture is not None and (not silent or self._capture):
                self._capture += payload

    async def _wait_agent_quiet(self, quiet_ms: int = AGENT_QUIET_MS,
                                timeout_s: float = REPLY_WAIT_S) -> None:
        """Wait until the agent has spoken and then been silent for ``quiet_ms``."""
        end = self.clock() + timeout_s
        while not self._done.is_set() and self.clock() < end:
            if self._agent_speaking and self.clock() - self._last_agent_audio_at >= quiet_ms / 1e3:
                self._agent_speaking = False
                return
            await asyncio.sleep(0.02)

    async def _wait_agent_audio(self, timeout_s: float = REPLY_WAIT_S) -> bool:
        end = self.clock() + timeout_s
        while not self._done.is_set() and self.clock() < end:
            if self._first_audio_after is not None:
                return True
            await asyncio.sleep(0.01)
        return False

    def _speak(self, pcm: bytes) -> None:
        self._speech_end_at = None
        self._speech_onset_at = None
        self._first_audio_after = None
        for frame in split_frames(pcm, self.rate_hz):
            self._outgoing.put_nowait(frame)

    async def _drive(self, peer: CallerPeer) -> None:
        self._capture = self.report.greeting_audio
        first = self.script.turns[0] if self.script.turns else None
        if first is None or first.barge_in_after_ms is None:
            await self._wait_agent_quiet()  # let the greeting finish, as a polite caller would
        for turn, pcm in zip(self.script.turns, self.turn_audio, strict=True):
            if self._done.is_set():
                return
            measure = TurnMeasure(said=turn.text or Path(turn.wav).name,
                                  speech_ms=len(pcm) / 2 / self.rate_hz * 1000.0)
            self.report.turns.append(measure)
            if turn.dtmf:
                for digit in turn.dtmf:
                    await peer.send_dtmf(digit)
            if turn.barge_in_after_ms is not None:
                # talk over the agent: wait for its audio, then start speaking
                if not await self._wait_agent_audio_any():
                    return
                await asyncio.sleep(turn.barge_in_after_ms / 1000.0)
                self._agent_speaking = True
            self._capture = measure.agent_audio
            if pcm:
                self._speak(pcm)
                while self._speech_end_at is None and not self._done.is_set():
                    await asyncio.sleep(0.01)
                if turn.barge_in_after_ms is not None and self._speech_onset_at is not None:
                    measure.barge_cut_ms = self._cut_after(self._speech_onset_at,
                                                           self._speech_end_at or self.clock())
                got = await self._wait_agent_audio()
                if got and self._first_audio_after is not None and self._speech_end_at:
                    measure.latency_ms = (self._first_audio_after - self._speech_end_at) * 1000.0
            if turn.hangup_after_ms is not None:
                await asyncio.sleep(turn.hangup_after_ms / 1000.0)
                self.report.hung_up = True
                peer.hangup()
                return
            await self._wait_agent_quiet()

    def _cut_after(self, onset: float, speech_end: float) -> float:
        """Ms from the caller's speech onset to the agent's last audible frame before the
        caller stopped talking.

        Conservative: a pause inside the agent's own speech cannot pass for a cut, because the
        agent's audio would resume while the caller still talks.
        """
        last_loud = onset
        for t, silent in self._timeline:
            if onset <= t <= speech_end and not silent:
                last_loud = t
        return (last_loud - onset) * 1000.0 + FRAME_MS

    async def _wait_agent_audio_any(self, timeout_s: float = REPLY_WAIT_S) -> bool:
        end = self.clock() + timeout_s
        while not self._done.is_set() and self.clock() < end:
            if self.clock() - self._last_agent_audio_at < 0.05:
                return True
            await asyncio.sleep(0.01)
        return False
