"""One object per call: the turn loop (listen → understand → answer), barge-in, pacing.

:class:`CallSession` owns a call's state and is runtime-neutral: it uses plain threads and
thread-safe queues, never asyncio or gevent, so the Asterisk (asyncio) and FreeSWITCH (gevent)
processes drive the same code. The runtime does only the media I/O:

- for every caller frame it calls :meth:`CallSession.on_audio` (cheap: VAD, endpointing,
  barge-in, queueing STT chunks), :meth:`on_dtmf` or :meth:`on_hangup`;
- every 20 ms it sends :meth:`CallSession.next_frame` (silence when the agent has nothing to
  say), on absolute deadlines;
- it waits for the session to end (:meth:`add_done_callback`), ends the media leg and hands the
  :class:`CallOutcome` to the dialplan.

Two threads per call do the blocking work: one feeds the STT stream, one runs the dialog
(greeting, decisions, LLM streaming, TTS). Engine calls go through shared, bounded pools.
"""

from __future__ import annotations

import enum
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol
from zoneinfo import ZoneInfo

from agent.audio import FRAME_MS, frame_bytes
from agent.call.playback import Playback
from agent.call.turn import TurnDetector, TurnEvent
from agent.config import Config
from agent.dialog.flows import (
    CallAnswer,
    FlowAborted,
    FlowResult,
    FlowRunner,
    Heard,
)
from agent.dialog.guard import split_sentences
from agent.dialog.policy import AskLlm, DialogPolicy, Hangup, SayFixed, StartFlow, Transfer
from agent.engine.bundle import EngineBundle
from agent.engine.llm import LlmRequest
from agent.engine.stt import SttResult
from agent.engine.text import SentenceChunker
from agent.engine.vad import FrameVad
from agent.flowconf import AskStep, FlowConfig
from agent.kpi.cpu import pool_initializer

_LOGGER = logging.getLogger(__name__)

STT_CHUNK_MS = 100
PREROLL_MS = 200
JOIN_TIMEOUT_S = 5.0
_STOP = object()
_LLM_END = object()
SATISFACTION_PROMPT = "Before you go, please rate this call from 1 to 5 on your keypad."
SATISFACTION_THANKS = "Thank you for your rating. Goodbye."
#: keypad entry ends this long after the last key (audio time) when no # is pressed
DTMF_INTERDIGIT_MS = 3000
# the naive baseline (config `naive`): every call's LLM request runs behind this one lock
_NAIVE_LLM_LOCK = threading.Lock()
_NAIVE_POOL: ThreadPoolExecutor | None = None
_NAIVE_POOL_LOCK = threading.Lock()


def _naive_pool() -> ThreadPoolExecutor:
    """Long-lived threads named for the LLM stage (so their CPU counts as `llm`), created on
    first use: waiting on the lock takes a thread per waiting call, as in a naive server."""
    global _NAIVE_POOL
    with _NAIVE_POOL_LOCK:
        if _NAIVE_POOL is None:
            _NAIVE_POOL = ThreadPoolExecutor(max_workers=64, thread_name_prefix="naive-llm",
                                             initializer=pool_initializer("llm"))
        return _NAIVE_POOL


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
    shed_level: str = "normal"


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
    #: post-call DTMF rating 1-5 (kpi.satisfaction), None when not asked or not given
    satisfaction: int | None = None
    #: the flows run during the call
    flows: list[FlowRecord] = field(default_factory=list)
    #: every integration call made on the call path (webhook outcomes, as returned)
    integrations: list[Any] = field(default_factory=list)


@dataclass
class FlowRecord:
    """One flow run in a call: its KPI outcome, and the slots it collected."""

    name: str
    outcome: str
    steps: int
    started_at: float
    ended_at: float
    slots: dict[str, str] = field(default_factory=dict)


class FlowServices(Protocol):
    """The integrations a flow may use (built once per process by the runtime)."""

    def call(self, name: str, payload: dict[str, Any]) -> Any:
        """Call a webhook; the answer has ok, data, error (never raises)."""

    def background(self, name: str, payload: dict[str, Any]) -> None:
        """Queue side work (never blocks)."""


@dataclass
class _Utterance:
    text: str
    stt_ms: float
    endpoint_at: float
    dtmf: str = ""


class _DtmfEntry:
    """Keypad digits being collected for a flow question: ends on #, length or a pause."""

    def __init__(self, max_digits: int) -> None:
        self.max_digits = max_digits
        self.digits = ""
        self.frames_since_key = 0


class _Interrupted(Exception):
    """The reply being produced was cut off (barge-in, new utterance, end of call)."""


class CallSession:
    """The conversation of one call; the runtime feeds frames in and takes frames out."""

    def __init__(self, call_id: str, config: Config, engines: EngineBundle, policy: DialogPolicy,
                 rate_hz: int, stt_pool: Executor, tts_pool: Executor,
                 clock: Callable[[], float] = time.monotonic,
                 shed_level: Callable[[], str] = lambda: "normal",
                 on_latency: Callable[[float], None] | None = None,
                 services: FlowServices | None = None,
                 call_info: dict[str, str] | None = None,
                 wall_clock: Callable[[], datetime] = lambda: datetime.now(UTC)) -> None:
        self.call_id = call_id
        #: integrations for flows (None: every integration call fails → the flow's fallback)
        self.services = services
        #: caller_id, did, call_id: the built-in variables of flows
        self.call_info = dict(call_info or {})
        #: the wall clock for business hours (injected in tests)
        self.wall_clock = wall_clock
        self._dtmf_entry: _DtmfEntry | None = None
        #: the load-shedding level now (normal, brief, canned, reject-new), read at every turn
        self.shed_level = shed_level
        #: gets each turn's response latency (ms), e.g. the shedding rules' p95 window
        self.on_latency = on_latency
        self.config = config
        self.engines = engines
        self.policy = policy
        self.rate_hz = rate_hz
        self.stt_pool = stt_pool
        self.tts_pool = tts_pool
        self.clock = clock
        self.outcome = CallOutcome()
        self.playback = Playback(rate_hz)
        t = config.turn
        self.turns = TurnDetector(t.endpoint_silence_ms, t.min_speech_ms, t.barge_in_ms,
                                  t.max_utterance_ms)
        self.vad = FrameVad(rate_hz, t.vad_aggressiveness)
        self._frame_bytes = frame_bytes(rate_hz)
        self._stt_q: queue.Queue[object] = queue.Queue()
        self._utt_q: queue.Queue[_Utterance | None] = queue.Queue()
        self._rating: queue.Queue[str] | None = None  # set while asking for a rating
        self._preroll: deque[bytes] = deque(maxlen=PREROLL_MS // FRAME_MS)
        self._pending = bytearray()  # caller audio not yet cut into 20 ms frames
        self._chunk = bytearray()
        self._chunk_bytes = frame_bytes(rate_hz, STT_CHUNK_MS)
        # speculative decoding: a one-shot transcription started before the endpoint fires
        self._one_shot = None if config.naive else getattr(engines.stt, "transcribe", None)
        self._spec_frames = t.speculative_stt_ms // FRAME_MS
        self._utt_audio = bytearray()
        self._spec: Future[SttResult] | None = None
        self._lock = threading.Lock()
        self._reply_id = 0
        self._pending_latency: dict[int, tuple[TurnRecord, float]] = {}
        self._current_llm: LlmRequest | None = None
        self._replying = threading.Event()
        self._interrupt = threading.Event()
        self._done = threading.Event()
        self._callbacks: list[Callable[[], None]] = []
        self._frames_since_agent = 0
        self._last_sent: float | None = None
        self._history: list[tuple[str, str]] = []
        self._started_at = clock()
        self._threads = [
            threading.Thread(target=self._guard(self._stt_loop), name=f"stt-{call_id}",
                             daemon=True),
            threading.Thread(target=self._guard(self._dialog_loop), name=f"dialog-{call_id}",
                             daemon=True),
        ]

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self) -> None:
        """Start the STT and dialog threads (the greeting is queued at once)."""
        for thread in self._threads:
            thread.start()

    @property
    def done(self) -> bool:
        """True once the call has ended (goodbye, transfer, error, hangup, abort)."""
        return self._done.is_set()

    def wait(self, timeout_s: float | None = None) -> bool:
        """Block until the call ends (threads only; runtimes use add_done_callback)."""
        return self._done.wait(timeout_s)

    def add_done_callback(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` (from any thread) once the call has ended."""
        with self._lock:
            if not self._done.is_set():
                self._callbacks.append(callback)
                return
        callback()

    def abort(self, reason: str, result: CallResult = CallResult.ERROR) -> None:
        """End the call from outside (AGI side vanished, shutdown, max duration)."""
        self._end(result, reason, self.default_target() if result is CallResult.TRANSFER else "")

    def threads_alive(self) -> bool:
        """True while the call's STT or dialog thread still runs."""
        return any(t.is_alive() for t in self._threads)

    def close(self) -> None:
        """Stop the threads (bounded join); call after the call has ended."""
        if not self._done.is_set():
            self.abort("closed")
        for thread in self._threads:
            if thread.is_alive() and thread is not threading.current_thread():
                thread.join(JOIN_TIMEOUT_S)
                if thread.is_alive():
                    _LOGGER.warning("call %s: thread %s did not stop", self.call_id, thread.name)

    # -- media side (called by the runtime's I/O loop) -------------------------------------------

    def on_audio(self, audio: bytes) -> None:
        """Account for caller audio: VAD, endpointing, barge-in, STT chunks, no-input timer."""
        if self._done.is_set():
            return
        self._pending += audio
        size = self._frame_bytes
        while len(self._pending) >= size:
            frame = bytes(self._pending[:size])
            del self._pending[:size]
            self._on_frame(frame)

    def on_dtmf(self, digit: str) -> None:
        """A caller DTMF digit: `0` asks for a person."""
        _LOGGER.info("call %s: DTMF %s", self.call_id, digit)
        rating = self._rating
        if rating is not None:
            rating.put(digit)
            return
        entry = self._dtmf_entry
        if entry is not None:
            self._frames_since_agent = 0
            entry.frames_since_key = 0
            if not entry.digits:
                self.playback.clear()  # a key press cuts the prompt, as in any IVR
            if digit == "#":
                self._end_dtmf_entry()
            elif digit == "*":
                entry.digits = ""
            else:
                entry.digits += digit
                if len(entry.digits) >= entry.max_digits:
                    self._end_dtmf_entry()
            return
        if digit == "0":
            self._end(CallResult.TRANSFER, "dtmf-0", self.default_target())

    def _end_dtmf_entry(self) -> None:
        entry = self._dtmf_entry
        if entry is not None and entry.digits:
            self._dtmf_entry = None
            self._utt_q.put(_Utterance("", 0.0, self.clock(), dtmf=entry.digits))

    def on_hangup(self) -> None:
        """The caller hung up (media leg closed)."""
        if not self._done.is_set():
            _LOGGER.info("call %s: caller hung up", self.call_id)
            self.outcome.caller_hung_up = True
            self._end(CallResult.DONE, "caller-hangup")

    def next_frame(self) -> bytes:
        """The frame to send now; notes when each reply's first audio leaves."""
        frame, started = self.playback.next_frame()
        now = self.clock()
        if self._last_sent is not None:
            gap = (now - self._last_sent) * 1000.0
            if gap > self.outcome.max_send_gap_ms:
                self.outcome.max_send_gap_ms = gap
        self._last_sent = now
        if started is not None:
            pending = self._pending_latency.pop(started, None)
            if pending is not None:
                record, endpoint_at = pending
                record.endpoint_to_audio_ms = (now - endpoint_at) * 1000.0 + \
                    self.config.turn.endpoint_silence_ms
                if self.on_latency is not None:
                    self.on_latency(record.endpoint_to_audio_ms)
        return frame

    def _on_frame(self, frame: bytes) -> None:
        voiced = self.vad.is_speech(frame)
        speaking = self.playback.speaking or self._replying.is_set()
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
            self._stt_q.put(self._spec if event is TurnEvent.SPEECH_END else None)
            self._spec = None
            self._utt_audio.clear()
        elif in_speech:
            self._push_stt(frame)
            self._maybe_speculate(voiced)
        elif self.config.naive:
            self._push_stt(frame)  # the baseline: STT gets every frame, no VAD gating
        else:
            self._preroll.append(frame)
        self._tick_no_input(speaking or in_speech)
        entry = self._dtmf_entry
        if entry is not None and entry.digits:
            entry.frames_since_key += 1
            if entry.frames_since_key * FRAME_MS >= DTMF_INTERDIGIT_MS:
                self._end_dtmf_entry()

    def _tick_no_input(self, busy: bool) -> None:
        if busy or not self._utt_q.empty():
            self._frames_since_agent = 0
            return
        self._frames_since_agent += 1
        if self._frames_since_agent * FRAME_MS >= self.config.turn.no_input_timeout_ms:
            self._frames_since_agent = 0
            self._utt_q.put(_Utterance("", 0.0, self.clock()))

    def _maybe_speculate(self, voiced: bool) -> None:
        """Start decoding a pause that may be the endpoint; forget it if speech resumes."""
        if voiced:
            self._spec = None
            return
        if (self._one_shot is not None and self._spec_frames > 0 and self._spec is None
                and self.turns.state.silent_run == self._spec_frames):
            self._spec = self.stt_pool.submit(self._one_shot, bytes(self._utt_audio),
                                              self.rate_hz)

    def _push_stt(self, frame: bytes) -> None:
        if self._one_shot is not None:
            self._utt_audio += frame
        self._chunk += frame
        if len(self._chunk) >= self._chunk_bytes:
            self._flush_stt_chunk()

    def _flush_stt_chunk(self) -> None:
        if self._chunk:
            self._stt_q.put(bytes(self._chunk))
            self._chunk.clear()

    def _barge_in(self) -> None:
        dropped = self.playback.clear()
        self._interrupt.set()
        self._cancel_llm()
        self.outcome.barge_ins += 1
        if self.outcome.turns:
            self.outcome.turns[-1].barged_in = True
        _LOGGER.info("call %s: barge-in, dropped %d ms of agent audio", self.call_id,
                     dropped * FRAME_MS)

    # -- worker threads -----------------------------------------------------------------------

    def _guard(self, body: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            try:
                body()
            except Exception:  # a worker crash hands the call to a human, never a dead line
                _LOGGER.exception("call %s: worker failed", self.call_id)
                self._end(CallResult.TRANSFER, "engine-error", self.default_target())
        return run

    def _stt_loop(self) -> None:
        """Feed ~100 ms chunks to this call's STT stream; finish per turn."""
        stream = self.engines.stt.open_stream(self.rate_hz)
        try:
            while not self._done.is_set():
                try:
                    item = self._stt_q.get(timeout=0.5)
                except queue.Empty:
                    continue
                if item is _STOP:
                    return
                if isinstance(item, bytes):
                    self.stt_pool.submit(stream.accept, item).result()
                    continue
                endpoint_at = self.clock()
                t0 = time.perf_counter()
                result: SttResult | None = None
                if isinstance(item, Future):  # a speculative decode of this utterance
                    try:
                        result = item.result()
                        self.stt_pool.submit(stream.reset).result()
                    except Exception as exc:  # fall back to the stream's own final decode
                        _LOGGER.warning("call %s: speculative STT failed: %r", self.call_id, exc)
                        result = None
                if result is None:
                    result = self.stt_pool.submit(stream.finish).result()
                stt_ms = (time.perf_counter() - t0) * 1000.0
                text = result.text.strip()
                _LOGGER.info("call %s: heard %r (%.0f ms)", self.call_id, text, stt_ms)
                if text:
                    if self._replying.is_set():
                        self._interrupt.set()  # the caller spoke again: drop the old reply
                    self._utt_q.put(_Utterance(text, stt_ms, endpoint_at))
        finally:
            stream.close()

    def _dialog_loop(self) -> None:
        """Greet, then answer each utterance; ends the call on goodbye, transfer or silence."""
        agent = self.config.agent
        after_hours = next((f for f in agent.flows if f.start == "after-hours"), None)
        if after_hours is not None and not self.config.hours.is_open(self.wall_clock()):
            record = TurnRecord(caller_text="", reply_text="", path="flow")
            self.outcome.turns.append(record)
            if not self._run_flow(after_hours, self._next_reply_id(), record, None):
                return
        else:
            self.policy.note_reply(agent.greeting)
            self._say_fixed(agent.greeting, self._next_reply_id())
        no_input = 0
        max_call_s = self.config.turn.max_call_s
        while not self._done.is_set():
            if self.clock() - self._started_at > max_call_s:
                self.abort("max-call-duration", CallResult.TRANSFER)
                return
            try:
                utt = self._utt_q.get(timeout=0.5)
            except queue.Empty:
                continue
            if utt is None:
                return
            self._interrupt.clear()
            if utt.dtmf:
                continue  # keypad entry outside a flow question (0 is handled in on_dtmf)
            if not utt.text:
                no_input += 1
                if no_input > self.config.turn.max_no_input_prompts:
                    self._finish_with(agent.goodbye, CallResult.DONE, "no-input")
                    return
                self._say_fixed(agent.no_input_reply, self._next_reply_id())
                continue
            no_input = 0
            self._replying.set()
            try:
                self._answer(utt)
            except _Interrupted:
                _LOGGER.info("call %s: reply interrupted", self.call_id)
            finally:
                self._replying.clear()

    def _answer(self, utt: _Utterance) -> None:
        decision = self.policy.decide(utt.text)
        record = TurnRecord(caller_text=utt.text, reply_text="", path=_path_of(decision),
                            stt_ms=utt.stt_ms)
        self.outcome.turns.append(record)
        _LOGGER.info("call %s: turn %d path=%s heard=%r", self.call_id, len(self.outcome.turns),
                     record.path, utt.text)
        reply_id = self._next_reply_id()
        self._pending_latency[reply_id] = (record, utt.endpoint_at)
        level = self.shed_level()
        record.shed_level = level
        if isinstance(decision, StartFlow):
            flow = self.config.agent.flow(decision.name)
            if flow is not None:
                self._run_flow(flow, reply_id, record, utt)
                self._history.append((utt.text, record.reply_text))
                return
        if isinstance(decision, AskLlm) and level in ("canned", "reject-new"):
            # shedding: no LLM; offer a person (a "yes" transfers, as for any fallback)
            record.path = "canned"
            record.reply_text = self.config.agent.fallback
            self.policy.note_reply(record.reply_text)
            self._say_fixed(record.reply_text, reply_id, record)
        elif isinstance(decision, AskLlm):
            self._answer_llm(decision, record, reply_id, brief=level == "brief")
        elif isinstance(decision, Transfer):
            record.reply_text = decision.text
            target = self.config.transfers.get(decision.target_name)
            if target is None:  # config validation makes this unreachable; stay safe anyway
                self._finish_with(decision.text, CallResult.ERROR, "transfer-target-not-allowed",
                                  reply_id=reply_id, record=record)
            else:
                self._finish_with(decision.text, CallResult.TRANSFER,
                                  f"intent:{decision.target_name}", target, reply_id, record)
        elif isinstance(decision, Hangup):
            record.reply_text = decision.text
            self._finish_with(decision.text, CallResult.DONE, "caller-goodbye",
                              reply_id=reply_id, record=record)
        elif isinstance(decision, SayFixed):
            record.reply_text = decision.text
            if decision.end_call:
                self._finish_with(decision.text, CallResult.DONE, "agent-ended",
                                  reply_id=reply_id, record=record)
            else:
                self._say_fixed(decision.text, reply_id, record)
        self._history.append((utt.text, record.reply_text))

    def _run_flow(self, flow: FlowConfig, reply_id: int, record: TurnRecord,
                  utt: _Utterance | None) -> bool:
        """Run a flow in this dialog thread; False when it ended the call."""
        record.path = "flow"
        io = _SessionFlowIO(self, reply_id, record)
        builtins: dict[str, Any] = {"agent": self.config.agent.name, "now": io.now().isoformat(
            timespec="minutes")}
        for key in ("caller_id", "did", "call_id"):
            builtins[key] = self.call_info.get(key, "")
        started = time.time()
        runner = FlowRunner(flow, io, tuple(self.config.transfers), builtins=builtins)
        result = runner.run()
        slots = {name: getattr(value, "value", "") for name, value in runner.vars.items()
                 if hasattr(value, "spoken") and not name.startswith("_")}
        self.outcome.flows.append(FlowRecord(flow.name, result.outcome, result.steps, started,
                                             time.time(), slots))
        record.reply_text = record.reply_text or io.last_text
        if result.action == "continue":
            self.policy.note_reply(io.last_text)
            return not self._done.is_set()
        if self._done.is_set():
            return False
        agent = self.config.agent
        reason = f"flow:{flow.name}" if result.outcome in ("completed", "fallback") \
            else f"flow-{result.outcome}:{flow.name}"
        last_id = io.reply_id_for_next()
        last_record = io.record_for_next()
        if result.action == "transfer":
            target = self.config.transfers.get(result.target) if result.target else None
            self._finish_with(result.text or agent.transfer_reply, CallResult.TRANSFER, reason,
                              target or self.default_target(), last_id, last_record)
        else:
            self._finish_with(result.text or agent.goodbye, CallResult.DONE, reason,
                              reply_id=last_id, record=last_record)
        return False

    def _answer_llm(self, decision: AskLlm, record: TurnRecord, reply_id: int,
                    brief: bool = False) -> None:
        tokens: queue.Queue[object] = queue.Queue()
        turns = 0 if brief else self.config.llm.history_turns
        history = self._history[-turns:] if turns else []
        max_tokens = self.config.llm.max_tokens
        max_sentences = 2
        if brief:  # shedding level `brief`: one short sentence, less LLM time per turn
            max_tokens = min(max_tokens, self.config.llm.brief_max_tokens)
            max_sentences = 1
            record.path = "llm-brief"
        request = LlmRequest(messages=self.policy.llm_messages(history, decision.user_text),
                             max_tokens=max_tokens,
                             temperature=self.config.llm.temperature)
        t0 = time.perf_counter()
        if self.config.naive:
            self._naive_llm(request, tokens)
        else:
            self._current_llm = self.engines.llm.submit(
                request, lambda tok: tokens.put(_LLM_END if tok is None else tok))
        chunker = SentenceChunker(first_clause_chars=24)
        spoken: list[str] = []
        fallback = self.config.agent.fallback
        deadline = time.monotonic() + self.config.llm.timeout_ms / 1000.0
        try:
            finished = False
            while not finished and len(spoken) < max_sentences:
                self._check_interrupt()
                try:
                    item = tokens.get(timeout=max(0.01, min(0.1, deadline - time.monotonic())))
                except queue.Empty:
                    if time.monotonic() >= deadline:
                        _LOGGER.warning("call %s: LLM timed out", self.call_id)
                        break
                    continue
                if item is _LLM_END:
                    finished = True
                    rest = chunker.flush()
                    sentences = [rest] if rest else []
                else:
                    if record.llm_first_token_ms is None:
                        record.llm_first_token_ms = (time.perf_counter() - t0) * 1000.0
                    sentences = chunker.push(str(item))
                for sentence in sentences:
                    reply = self.policy.finalize_llm_reply(sentence)
                    if not reply or reply == fallback:
                        finished = True  # never speak past an unsupported claim
                        break
                    spoken.append(reply)
                    self._say_tts(reply, reply_id, record, t0)
                    if len(spoken) >= max_sentences:
                        break
        finally:
            self._cancel_llm()
        if not spoken:
            spoken.append(fallback)
            self._say_fixed(fallback, reply_id, record)
        record.reply_text = " ".join(spoken)

    def _naive_llm(self, request: LlmRequest, tokens: queue.Queue[object]) -> None:
        """The baseline: generate behind one process-wide lock, to the end (a lock holder
        cannot be cancelled by barge-in), instead of through the scheduler."""
        llm = getattr(self.engines.llm, "_llm", None)

        def generate() -> None:
            try:
                with _NAIVE_LLM_LOCK:
                    if llm is None:
                        return
                    for piece in llm.stream(request.messages, request.max_tokens,
                                            request.temperature, request.stop, lambda: False):
                        tokens.put(piece)
            except Exception as exc:
                _LOGGER.warning("call %s: naive LLM failed: %r", self.call_id, exc)
            finally:
                tokens.put(_LLM_END)

        _naive_pool().submit(generate)

    # -- speaking -----------------------------------------------------------------------------

    def _check_interrupt(self) -> None:
        if self._interrupt.is_set() or self._done.is_set():
            raise _Interrupted()

    def _next_reply_id(self) -> int:
        self._reply_id += 1
        return self._reply_id

    def _synthesize(self, text: str) -> bytes:
        audio = self.engines.phrases.get(text)
        if audio is None:
            audio = self.tts_pool.submit(self.engines.tts.synthesize, text).result()
        return audio

    def _say_fixed(self, text: str, reply_id: int, record: TurnRecord | None = None) -> None:
        """Queue a fixed phrase: cached audio when present, else synthesized now."""
        cached = self.engines.phrases.get(text) is not None
        audio = self._synthesize(text)
        self._check_interrupt()
        if record is not None and cached and record.tts_first_audio_ms is None:
            record.tts_first_audio_ms = 0.0
        self.playback.enqueue(audio, reply_id)

    def _say_tts(self, text: str, reply_id: int, record: TurnRecord, t0: float) -> None:
        audio = self._synthesize(text)
        self._check_interrupt()
        if record.tts_first_audio_ms is None:
            record.tts_first_audio_ms = (time.perf_counter() - t0) * 1000.0
        self.playback.enqueue(audio, reply_id)

    def _finish_with(self, text: str, result: CallResult, reason: str, target: str = "",
                     reply_id: int | None = None, record: TurnRecord | None = None) -> None:
        """Say a last phrase, let it play out, then end the call."""
        try:
            self._say_fixed(text, reply_id if reply_id is not None else self._next_reply_id(),
                            record)
        except _Interrupted:
            pass
        # the last words are not interruptible: wait for them to leave (bounded by their length)
        limit = self.clock() + self.playback.queued_ms / 1000.0 + 2.0
        while self.playback.speaking and not self._done.is_set() and self.clock() < limit:
            self._done.wait(0.02)
        self._done.wait(0.1)
        if (result is CallResult.DONE and self.config.kpi.satisfaction
                and reason in ("caller-goodbye", "agent-ended") and not self._done.is_set()):
            self.outcome.satisfaction = self._ask_rating()
        self._end(result, reason, target)

    def _ask_rating(self) -> int | None:
        """Post-call rating: ask for a key 1-5, wait kpi.satisfaction_timeout_ms for it."""
        digits: queue.Queue[str] = queue.Queue()
        self._rating = digits
        try:
            self._say_fixed(SATISFACTION_PROMPT, self._next_reply_id())
            wait_until = (self.clock() + self.playback.queued_ms / 1000.0
                          + self.config.kpi.satisfaction_timeout_ms / 1000.0)
            while not self._done.is_set() and self.clock() < wait_until:
                try:
                    digit = digits.get(timeout=0.05)
                except queue.Empty:
                    continue
                if digit in "12345" and len(digit) == 1:
                    _LOGGER.info("call %s: rated %s", self.call_id, digit)
                    self._say_fixed(SATISFACTION_THANKS, self._next_reply_id())
                    limit = self.clock() + self.playback.queued_ms / 1000.0 + 1.0
                    while self.playback.speaking and not self._done.is_set() \
                            and self.clock() < limit:
                        self._done.wait(0.02)
                    return int(digit)
            return None
        except _Interrupted:
            return None
        finally:
            self._rating = None

    def _cancel_llm(self) -> None:
        request = self._current_llm
        if request is not None:
            self.engines.llm.cancel(request)
            self._current_llm = None

    def default_target(self) -> str:
        """The human fallback: `fallback_transfer` from the allowlist (front-desk by default)."""
        return self.config.fallback_target()

    def _end(self, result: CallResult, reason: str, transfer_to: str = "") -> None:
        with self._lock:
            if self._done.is_set():
                return
            self.outcome.result = result
            self.outcome.reason = reason
            self.outcome.transfer_to = transfer_to
            self._done.set()
            callbacks, self._callbacks = self._callbacks, []
        self._interrupt.set()
        self._cancel_llm()
        self._stt_q.put(_STOP)
        self._utt_q.put(None)
        for callback in callbacks:
            try:
                callback()
            except Exception:
                _LOGGER.exception("call %s: done callback failed", self.call_id)


class _SessionFlowIO:
    """A flow's view of the call: speech out, speech or keypad in, integrations, the clock.

    Keeps the turn accounting: each answer the caller gives starts a new flow turn, whose
    response latency runs to the first audio of what the flow says next.
    """

    def __init__(self, session: CallSession, reply_id: int, record: TurnRecord) -> None:
        self.s = session
        self.reply_id = reply_id
        self.record = record
        self.t0 = time.perf_counter()
        self.last_text = ""
        self._tz = ZoneInfo(session.config.hours.timezone)

    def reply_id_for_next(self) -> int:
        """The reply id the next words belong to (the current turn's, if nothing said yet)."""
        if not self.record.reply_text:
            return self.reply_id
        return self.s._next_reply_id()

    def record_for_next(self) -> TurnRecord | None:
        """The turn the next words answer, if it has not been answered yet."""
        return None if self.record.reply_text else self.record

    def say(self, text: str) -> None:
        """Speak now (cached audio for fixed texts); a barge-in cuts it, the flow goes on."""
        if not text:
            return
        s = self.s
        if s._done.is_set():
            raise FlowAborted()
        record = self.record
        try:
            if s.engines.phrases.get(text) is not None:
                s._say_fixed(text, self.reply_id, record)
            else:  # sentence by sentence: the caller hears the first while the rest is made
                for sentence in split_sentences(text) or [text]:
                    s._say_tts(sentence, self.reply_id, record, self.t0)
        except _Interrupted:
            if s._done.is_set():
                raise FlowAborted() from None
            s._interrupt.clear()  # the caller spoke over the prompt: their words come next
        record.reply_text = f"{record.reply_text} {text}".strip()
        self.last_text = text
        s.policy.note_reply(text)

    def listen(self, ask: AskStep) -> Heard | None:
        """Wait for the caller's answer: words, keypad digits, or nothing (no-input timer)."""
        s = self.s
        if ask.dtmf:
            digits = ask.max_digits if ask.type in ("phone", "digits") else 1
            s._dtmf_entry = _DtmfEntry(digits)
        # waiting for an answer is not replying: caller speech now starts a turn (not a
        # barge-in) and the no-input timer runs once the prompt has played
        replying = s._replying.is_set()
        s._replying.clear()
        try:
            while not s._done.is_set():
                if s.clock() - s._started_at > s.config.turn.max_call_s:
                    s.abort("max-call-duration", CallResult.TRANSFER)
                    return None
                try:
                    utt = s._utt_q.get(timeout=0.5)
                except queue.Empty:
                    continue
                if utt is None:
                    return None
                s._interrupt.clear()
                self._new_turn(utt)
                return Heard(text=utt.text, dtmf=utt.dtmf)
            return None
        finally:
            s._dtmf_entry = None
            if replying:
                s._replying.set()

    def _new_turn(self, utt: _Utterance) -> None:
        s = self.s
        self.reply_id = s._next_reply_id()
        self.t0 = time.perf_counter()
        caller = utt.text or (f"[keypad {len(utt.dtmf)} digits]" if utt.dtmf else "")
        record = TurnRecord(caller_text=caller, reply_text="", path="flow", stt_ms=utt.stt_ms,
                            shed_level=s.shed_level())
        s.outcome.turns.append(record)
        self.record = record
        if utt.text:  # a spoken answer: its response latency is measured like any turn's
            s._pending_latency[self.reply_id] = (record, utt.endpoint_at)

    def call(self, integration: str, payload: dict[str, Any]) -> CallAnswer:
        """Call a webhook on the call path (bounded by its timeout and breaker)."""
        services = self.s.services
        if services is None:
            return CallAnswer(False, error="no-integrations")
        outcome = services.call(integration, payload)
        self.s.outcome.integrations.append(outcome)
        return CallAnswer(bool(outcome.ok), outcome.data, str(outcome.error))

    def background(self, integration: str, payload: dict[str, Any]) -> None:
        """Send work off the call path."""
        services = self.s.services
        if services is None:
            _LOGGER.warning("call %s: side work for %s dropped: no integrations",
                            self.s.call_id, integration)
            return
        services.background(integration, payload)

    def escape(self, text: str) -> FlowResult | None:
        """A person or a goodbye asked for mid-flow leaves the flow."""
        decision = self.s.policy.escape(text)
        if isinstance(decision, Transfer):
            return FlowResult("escalated", action="transfer", target=decision.target_name,
                              text=decision.text, detail=f"caller asked for {decision.target_name}")
        if isinstance(decision, Hangup):
            return FlowResult("escalated", action="end", text=decision.text,
                              detail="caller said goodbye")
        return None

    def now(self) -> datetime:
        """The wall clock in the business's timezone."""
        return self.s.wall_clock().astimezone(self._tz)


def _path_of(decision: object) -> str:
    """The KPI name of a decision's path: faq, llm, transfer or goodbye."""
    if isinstance(decision, AskLlm):
        return "llm"
    if isinstance(decision, Transfer):
        return "transfer"
    if isinstance(decision, Hangup):
        return "goodbye"
    if isinstance(decision, StartFlow):
        return "flow"
    return "faq"

