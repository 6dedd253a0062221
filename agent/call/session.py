"""One object per call: the turn loop (listen → understand → answer), barge-in, pacing.

:class:`CallSession` owns a call's state. It reads caller frames from a :class:`MediaPort`,
decides turns with the frame-clocked :class:`~agent.call.turn.TurnDetector`, sends exactly one
20 ms frame every 20 ms (silence when the agent has nothing to say), and runs the blocking
engines in thread pools so the event loop never stalls.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Protocol

from agent.audio import FRAME_MS, frame_bytes, is_silent
from agent.call.playback import Playback
from agent.call.turn import TurnDetector, TurnEvent
from agent.config import Config
from agent.dialog.policy import (
    AskLlm,
    DialogPolicy,
    Hangup,
    SayFixed,
    Transfer,
)
from agent.engine.bundle import EngineBundle
from agent.engine.llm import LlmRequest
from agent.engine.stt import SttResult
from agent.engine.text import SentenceChunker
from agent.engine.vad import FrameVad

_LOGGER = logging.getLogger(__name__)

STT_CHUNK_MS = 100
PREROLL_MS = 200
LLM_END = object()


class MediaKind(enum.Enum):
    """What a media event carries."""

    AUDIO = "audio"
    DTMF = "dtmf"
    HANGUP = "hangup"


@dataclass(frozen=True)
class MediaEvent:
    """One event from the caller side of the media stream."""

    kind: MediaKind
    audio: bytes = b""
    digit: str = ""


class MediaPort(Protocol):
    """The PBX media leg of a call, as the session sees it (AudioSocket, unicast UDP)."""

    rate_hz: int

    async def read(self, timeout_s: float) -> MediaEvent | None:
        """Next caller event; None on timeout."""

    async def send(self, frame: bytes) -> None:
        """Send one 20 ms frame of agent audio."""

    async def finish(self) -> None:
        """End the media leg from our side (the dialplan then continues)."""


class CallResult(enum.Enum):
    """`AGENT_RESULT` values handed back to the dialplan."""

    DONE = "DONE"
    TRANSFER = "TRANSFER"
    BUSY = "BUSY"
    ERROR = "ERROR"


@dataclass
class TurnRecord:
    """What happened in one caller turn, with stage timings in milliseconds."""

    caller_text: str
    reply_text: str
    path: str
    stt_ms: float = 0.0
    llm_first_token_ms: float | None = None
    tts_first_audio_ms: float | None = None
    endpoint_to_audio_ms: float | None = None
    barged_in: bool = False


@dataclass
class CallOutcome:
    """How the call ended."""

    result: CallResult = CallResult.DONE
    reason: str = ""
    transfer_to: str = ""
    caller_hung_up: bool = False
    turns: list[TurnRecord] = field(default_factory=list)
    barge_ins: int = 0
    max_send_gap_ms: float = 0.0


@dataclass
class _Utterance:
    text: str
    stt_ms: float
    endpoint_at: float


class CallSession:
    """The conversation of one call over one media port."""

    def __init__(self, call_id: str, config: Config, engines: EngineBundle, policy: DialogPolicy,
                 media: MediaPort, stt_pool: Executor, tts_pool: Executor,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.call_id = call_id
        self.config = config
        self.engines = engines
        self.policy = policy
        self.media = media
        self.stt_pool = stt_pool
        self.tts_pool = tts_pool
        self.clock = clock
        self.rate_hz = media.rate_hz
        self.outcome = CallOutcome()
        self.playback = Playback(self.rate_hz)
        t = config.turn
        self.turns = TurnDetector(t.endpoint_silence_ms, t.min_speech_ms, t.barge_in_ms,
                                  t.max_utterance_ms)
        self.vad = FrameVad(self.rate_hz, t.vad_aggressiveness)
        self._utterances: asyncio.Queue[_Utterance | None] = asyncio.Queue()
        self._stt_chunks: asyncio.Queue[bytes | asyncio.Future[SttResult] | None] = \
            asyncio.Queue()
        # speculative decoding: a one-shot transcription started before the endpoint fires
        self._one_shot = getattr(engines.stt, "transcribe", None)
        self._spec_frames = config.turn.speculative_stt_ms // FRAME_MS
        self._utt_audio = bytearray()
        self._spec: asyncio.Future[SttResult] | None = None
        self._preroll: deque[bytes] = deque(maxlen=PREROLL_MS // FRAME_MS)
        self._chunk = bytearray()
        self._chunk_bytes = frame_bytes(self.rate_hz, STT_CHUNK_MS)
        self._reply_id = 0
        self._reply_started: dict[int, float] = {}
        self._current_llm: LlmRequest | None = None
        self._reply_task: asyncio.Task[None] | None = None
        self._done = asyncio.Event()
        self._frames_since_agent = 0
        self._history: list[tuple[str, str]] = []

    # -- public -----------------------------------------------------------------------------

    async def run(self) -> CallOutcome:
        """Run the call until goodbye, transfer, error or caller hangup."""
        tasks = [
            asyncio.create_task(self._pace(), name=f"pace-{self.call_id}"),
            asyncio.create_task(self._listen(), name=f"listen-{self.call_id}"),
            asyncio.create_task(self._transcribe(), name=f"stt-{self.call_id}"),
            asyncio.create_task(self._converse(), name=f"dialog-{self.call_id}"),
        ]
        try:
            await asyncio.wait_for(self._done.wait(), timeout=self.config.turn.max_call_s)
        except TimeoutError:
            self._end(CallResult.TRANSFER, "max-call-duration", self._default_target())
        finally:
            for task in tasks:
                task.cancel()
            if self._reply_task is not None:
                self._reply_task.cancel()
            self._cancel_llm()
            results = await asyncio.gather(*tasks, return_exceptions=True)
            for res in results:
                if isinstance(res, Exception) and not isinstance(res, asyncio.CancelledError):
                    _LOGGER.error("call %s: task failed: %r", self.call_id, res)
            if not self.outcome.caller_hung_up:
                with contextlib.suppress(Exception):
                    await self.media.finish()
        return self.outcome

    def abort(self, reason: str) -> None:
        """End the call from outside (AGI side vanished, drain)."""
        self._end(CallResult.ERROR, reason)

    # -- tasks ------------------------------------------------------------------------------

    async def _pace(self) -> None:
        """Send exactly one frame per 20 ms on absolute deadlines (no drift, no bursts)."""
        loop = asyncio.get_running_loop()
        period = FRAME_MS / 1000.0
        next_at = loop.time()
        last_sent = self.clock()
        while not self._done.is_set():
            frame, started = self.playback.next_frame()
            if started is not None:
                self._reply_started[started] = self.clock()
            try:
                await self.media.send(frame)
            except (ConnectionError, OSError) as exc:
                self._caller_gone(f"send failed: {exc}")
                return
            now = self.clock()
            self.outcome.max_send_gap_ms = max(self.outcome.max_send_gap_ms,
                                               (now - last_sent) * 1000.0)
            last_sent = now
            next_at += period
            delay = next_at - loop.time()
            if delay < -0.2:
                next_at = loop.time()  # we fell far behind (paused process): don't burst
                delay = 0
            await asyncio.sleep(max(0.0, delay))

    async def _listen(self) -> None:
        """Read caller media: voice activity, endpointing, barge-in, STT chunks, DTMF."""
        while not self._done.is_set():
            event = await self.media.read(timeout_s=2.5)
            if event is None:
                continue
            if event.kind is MediaKind.HANGUP:
                self._caller_gone("caller hung up")
                return
            if event.kind is MediaKind.DTMF:
                self._on_dtmf(event.digit)
                continue
            self._on_audio(event.audio)

    def _on_audio(self, audio: bytes) -> None:
        size = frame_bytes(self.rate_hz)
        for i in range(0, len(audio) - size + 1, size):
            frame = audio[i:i + size]
            voiced = self.vad.is_speech(frame)
            speaking = self.playback.speaking or self._reply_busy()
            event = self.turns.feed(voiced, speaking)
            in_speech = self.turns.state.in_speech
            if event in (TurnEvent.SPEECH_START, TurnEvent.BARGE_IN):
                if event is TurnEvent.BARGE_IN:
                    self._barge_in()
                for pre in self._preroll:
                    self._push_stt(pre)
                self._preroll.clear()
                self._push_stt(frame)
            elif event in (TurnEvent.SPEECH_END, TurnEvent.UTTERANCE_TOO_LONG):
                self._push_stt(frame)
                self._flush_stt_chunk()
                self._stt_chunks.put_nowait(self._spec if event is TurnEvent.SPEECH_END
                                            else None)
                self._spec = None
                self._utt_audio.clear()
            elif in_speech:
                self._push_stt(frame)
                self._maybe_speculate(voiced)
            else:
                self._preroll.append(frame)
            self._tick_no_input(speaking, in_speech)

    def _tick_no_input(self, speaking: bool, in_speech: bool) -> None:
        if speaking or in_speech or self._reply_busy() or not self._utterances.empty():
            self._frames_since_agent = 0
            return
        self._frames_since_agent += 1
        if self._frames_since_agent * FRAME_MS >= self.config.turn.no_input_timeout_ms:
            self._frames_since_agent = 0
            self._utterances.put_nowait(_Utterance("", 0.0, self.clock()))

    def _maybe_speculate(self, voiced: bool) -> None:
        """Start decoding a pause that may be the endpoint; forget it if speech resumes."""
        if voiced:
            self._spec = None
            return
        if (self._one_shot is not None and self._spec_frames > 0 and self._spec is None
                and self.turns.state.silent_run == self._spec_frames):
            loop = asyncio.get_running_loop()
            self._spec = loop.run_in_executor(self.stt_pool, self._one_shot,
                                              bytes(self._utt_audio), self.rate_hz)

    def _push_stt(self, frame: bytes) -> None:
        if self._one_shot is not None:
            self._utt_audio += frame
        self._chunk += frame
        if len(self._chunk) >= self._chunk_bytes:
            self._flush_stt_chunk()

    def _flush_stt_chunk(self) -> None:
        if self._chunk:
            self._stt_chunks.put_nowait(bytes(self._chunk))
            self._chunk.clear()

    async def _transcribe(self) -> None:
        """Feed ~100 ms chunks to this call's STT stream in a worker thread; finish per turn."""
        loop = asyncio.get_running_loop()
        stream = self.engines.stt.open_stream(self.rate_hz)
        try:
            while True:
                chunk = await self._stt_chunks.get()
                if isinstance(chunk, bytes):
                    await loop.run_in_executor(self.stt_pool, stream.accept, chunk)
                    continue
                endpoint_at = self.clock()
                t0 = time.perf_counter()
                result = None
                if chunk is not None:  # a speculative decode of this utterance is under way
                    try:
                        result = await chunk
                        await loop.run_in_executor(self.stt_pool, stream.reset)
                    except Exception as exc:  # fall back to the stream's own final decode
                        _LOGGER.warning("call %s: speculative STT failed: %r", self.call_id, exc)
                if result is None:
                    result = await loop.run_in_executor(self.stt_pool, stream.finish)
                stt_ms = (time.perf_counter() - t0) * 1000.0
                _LOGGER.info("call %s: heard %r (%.0f ms)", self.call_id, result.text, stt_ms)
                if result.text.strip():
                    self._utterances.put_nowait(_Utterance(result.text.strip(), stt_ms,
                                                           endpoint_at))
        finally:
            stream.close()

    async def _converse(self) -> None:
        """Greet, then answer each utterance; ends the call on goodbye or transfer."""
        agent = self.config.agent
        self.policy.note_reply(agent.greeting)
        await self._say_fixed(agent.greeting)
        no_input = 0
        while not self._done.is_set():
            utt = await self._utterances.get()
            if utt is None:
                return
            if self._reply_task is not None:
                # a new utterance (barge-in) replaces whatever reply was still being produced
                self._reply_task.cancel()
                self._cancel_llm()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await self._reply_task
                self._reply_task = None
            if not utt.text:
                no_input += 1
                if no_input > self.config.turn.max_no_input_prompts:
                    await self._say_fixed(agent.goodbye)
                    await self._drain_playback()
                    self._end(CallResult.DONE, "no-input")
                    return
                await self._say_fixed(agent.no_input_reply)
                continue
            no_input = 0
            self._reply_task = asyncio.create_task(self._answer(utt))
            if not await self._wait_reply_or_utterance():
                return

    async def _wait_reply_or_utterance(self) -> bool:
        """Let the reply run; return False when the call ended."""
        task = self._reply_task
        assert task is not None
        waiter = asyncio.create_task(self._wait_utterance_available())
        done, _ = await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
        if task in done:
            self._reply_task = None
            exc = task.exception()
            if exc is not None:
                _LOGGER.error("call %s: reply failed: %r", self.call_id, exc)
                await self._say_fixed(self.config.agent.error_reply)
                await self._drain_playback()
                self._end(CallResult.TRANSFER, "engine-error", self._default_target())
                return False
        return not self._done.is_set()

    async def _wait_utterance_available(self) -> None:
        while self._utterances.empty():
            await asyncio.sleep(0.02)

    async def _answer(self, utt: _Utterance) -> None:
        decision = self.policy.decide(utt.text)
        record = TurnRecord(caller_text=utt.text, reply_text="", path="faq", stt_ms=utt.stt_ms)
        self.outcome.turns.append(record)
        reply_id = self._next_reply_id()
        if isinstance(decision, AskLlm):
            record.path = "llm"
            await self._answer_llm(decision, record, reply_id)
        elif isinstance(decision, Transfer):
            record.path = "transfer"
            record.reply_text = decision.text
            await self._say_fixed(decision.text, reply_id, record)
            await self._drain_playback()
            target = self.config.transfers.get(decision.target_name)
            if target is None:  # config validation makes this unreachable; stay safe anyway
                self._end(CallResult.ERROR, "transfer-target-not-allowed")
            else:
                self._end(CallResult.TRANSFER, f"intent:{decision.target_name}", target)
        elif isinstance(decision, Hangup):
            record.path = "goodbye"
            record.reply_text = decision.text
            await self._say_fixed(decision.text, reply_id, record)
            await self._drain_playback()
            self._end(CallResult.DONE, "caller-goodbye")
        elif isinstance(decision, SayFixed):
            record.reply_text = decision.text
            await self._say_fixed(decision.text, reply_id, record)
            if decision.end_call:
                await self._drain_playback()
                self._end(CallResult.DONE, "agent-ended")
        self._history.append((utt.text, record.reply_text))
        await self._note_latency(record, reply_id, utt)

    async def _note_latency(self, record: TurnRecord, reply_id: int, utt: _Utterance) -> None:
        for _ in range(500):
            started = self._reply_started.get(reply_id)
            if started is not None:
                record.endpoint_to_audio_ms = (started - utt.endpoint_at) * 1000.0 + \
                    self.config.turn.endpoint_silence_ms
                return
            if self._done.is_set():
                return
            await asyncio.sleep(0.02)

    async def _answer_llm(self, decision: AskLlm, record: TurnRecord, reply_id: int) -> None:
        loop = asyncio.get_running_loop()
        tokens: asyncio.Queue[object] = asyncio.Queue()

        def on_token(token: str | None) -> None:
            loop.call_soon_threadsafe(tokens.put_nowait, LLM_END if token is None else token)

        turns = self.config.llm.history_turns
        history = self._history[-turns:] if turns else []
        messages = self.policy.llm_messages(history, decision.user_text)
        request = LlmRequest(messages=messages, max_tokens=self.config.llm.max_tokens,
                             temperature=self.config.llm.temperature)
        t0 = time.perf_counter()
        self._current_llm = self.engines.llm.submit(request, on_token)
        chunker = SentenceChunker(first_clause_chars=24)
        spoken: list[str] = []
        deadline = loop.time() + self.config.llm.timeout_ms / 1000.0
        try:
            while True:
                try:
                    item = await asyncio.wait_for(tokens.get(), max(0.01, deadline - loop.time()))
                except TimeoutError:
                    _LOGGER.warning("call %s: LLM timed out", self.call_id)
                    break
                if item is LLM_END:
                    rest = chunker.flush()
                    sentences = [rest] if rest else []
                else:
                    if record.llm_first_token_ms is None:
                        record.llm_first_token_ms = (time.perf_counter() - t0) * 1000.0
                    sentences = chunker.push(str(item))
                for sentence in sentences:
                    if len(spoken) >= 2:
                        break
                    reply = self.policy.finalize_llm_reply(sentence)
                    fallback = self.config.agent.fallback
                    if reply == fallback or not reply:
                        if not spoken:
                            spoken.append(fallback)
                            await self._say_fixed(fallback, reply_id, record)
                        self._cancel_llm()
                        item = LLM_END
                        break
                    spoken.append(reply)
                    await self._say_tts(reply, reply_id, record, t0)
                if item is LLM_END or len(spoken) >= 2:
                    break
        finally:
            self._cancel_llm()
        if not spoken:
            spoken.append(self.config.agent.fallback)
            await self._say_fixed(self.config.agent.fallback, reply_id, record)
        record.reply_text = " ".join(spoken)

    # -- speaking -----------------------------------------------------------------------------

    def _next_reply_id(self) -> int:
        self._reply_id += 1
        return self._reply_id

    async def _say_fixed(self, text: str, reply_id: int | None = None,
                         record: TurnRecord | None = None) -> None:
        """Queue a fixed phrase: cached audio when present, else synthesized now."""
        rid = reply_id if reply_id is not None else self._next_reply_id()
        audio = self.engines.phrases.get(text)
        if audio is None:
            loop = asyncio.get_running_loop()
            audio = await loop.run_in_executor(self.tts_pool, self.engines.tts.synthesize, text)
        elif record is not None:
            record.tts_first_audio_ms = 0.0
        self.playback.enqueue(audio, rid)

    async def _say_tts(self, text: str, reply_id: int, record: TurnRecord, t0: float) -> None:
        loop = asyncio.get_running_loop()
        audio = self.engines.phrases.get(text)
        if audio is None:
            audio = await loop.run_in_executor(self.tts_pool, self.engines.tts.synthesize, text)
        if record.tts_first_audio_ms is None:
            record.tts_first_audio_ms = (time.perf_counter() - t0) * 1000.0
        self.playback.enqueue(audio, reply_id)

    async def _drain_playback(self) -> None:
        """Wait until the queued agent audio has been sent (bounded by its own length)."""
        limit = self.clock() + self.playback.queued_ms / 1000.0 + 2.0
        while self.playback.speaking and not self._done.is_set() and self.clock() < limit:
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.1)

    def _reply_busy(self) -> bool:
        return self._reply_task is not None and not self._reply_task.done()

    def _barge_in(self) -> None:
        dropped = self.playback.clear()
        self.outcome.barge_ins += 1
        if self.outcome.turns:
            self.outcome.turns[-1].barged_in = True
        _LOGGER.info("call %s: barge-in, dropped %d ms of agent audio", self.call_id,
                     dropped * FRAME_MS)

    def _cancel_llm(self) -> None:
        if self._current_llm is not None:
            self.engines.llm.cancel(self._current_llm)
            self._current_llm = None

    def _on_dtmf(self, digit: str) -> None:
        _LOGGER.info("call %s: DTMF %s", self.call_id, digit)
        if digit == "0":
            self._end(CallResult.TRANSFER, "dtmf-0", self._default_target())

    def _default_target(self) -> str:
        for intent in self.config.agent.intents:
            target = intent.target
            if intent.kind == "transfer" and target and target in self.config.transfers:
                return self.config.transfers[target]
        return next(iter(self.config.transfers.values()), "")

    def _caller_gone(self, why: str) -> None:
        if not self._done.is_set():
            _LOGGER.info("call %s: %s", self.call_id, why)
            self.outcome.caller_hung_up = True
            self._end(CallResult.DONE, "caller-hangup")

    def _end(self, result: CallResult, reason: str, transfer_to: str = "") -> None:
        if self._done.is_set():
            return
        self.outcome.result = result
        self.outcome.reason = reason
        self.outcome.transfer_to = transfer_to
        self._done.set()
        self._utterances.put_nowait(None)


def audio_is_speech(frame: bytes) -> bool:
    """True for a frame with audible content (used to find the first agent audio)."""
    return not is_silent(frame)


SessionFactory = Callable[[str, MediaPort], Awaitable[CallOutcome]]
