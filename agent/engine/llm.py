"""Local LLM with llama.cpp, and the one FIFO scheduler every call's requests go through."""

from __future__ import annotations

import collections
import functools
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from agent.errors import EngineError, ModelMissing
from agent.kpi.cpu import name_thread, stage_thread_name

_LOGGER = logging.getLogger(__name__)

_LOAD_LOCK = threading.Lock()
_JOIN_TIMEOUT_S = 10.0

TokenCallback = Callable[[str | None], None]


@dataclass
class LlmRequest:
    """One chat completion: what to generate, plus timing and outcome filled in by the scheduler."""

    messages: list[dict[str, str]]
    max_tokens: int = 128
    temperature: float = 0.7
    stop: list[str] = field(default_factory=list)
    cancelled: threading.Event = field(default_factory=threading.Event)
    queued_at: float | None = None
    """time.monotonic() when submitted."""
    started_at: float | None = None
    """time.monotonic() when the worker began evaluating it."""
    first_token_at: float | None = None
    """time.monotonic() of the first streamed token."""
    finished_at: float | None = None
    """time.monotonic() when on_token(None) was delivered."""
    tokens: int = 0
    """Number of streamed text pieces."""
    error: BaseException | None = None


@functools.cache
def _load_llama(model_path: str, n_ctx: int, n_threads: int, seed: int) -> Any:
    """Load a GGUF model once per process (per settings)."""
    from llama_cpp import Llama

    started = time.perf_counter()
    llama = Llama(
        model_path=model_path,
        n_ctx=n_ctx,
        n_threads=n_threads,
        n_threads_batch=n_threads,
        seed=seed,
        verbose=False,
    )
    _LOGGER.info("loaded LLM %s in %.1f s", model_path, time.perf_counter() - started)
    return llama


class LlamaLlm:
    """A llama.cpp chat model; not thread-safe, so use it through one LlmScheduler."""

    def __init__(
        self, model_path: str, n_ctx: int = 2048, n_threads: int = 2, seed: int = 0
    ) -> None:
        if not os.path.isfile(model_path):
            raise ModelMissing(
                f"LLM model not found at {model_path}; "
                "install it with `pbx-agent models install` or fix the model path in the config"
            )
        with _LOAD_LOCK:
            self._llama = _load_llama(model_path, n_ctx, n_threads, seed)

    def stream(
        self,
        messages: list[dict[str, str]],
        max_tokens: int,
        temperature: float,
        stop: list[str],
        should_stop: Callable[[], bool],
    ) -> Iterator[str]:
        """Yield the reply's text pieces; ends early once ``should_stop()`` is true.

        llama.cpp reuses the longest token prefix shared with the previous request, so keep
        the fixed system prompt first and identical across requests.
        """
        try:
            chunks = self._llama.create_chat_completion(
                messages=messages,
                max_tokens=max_tokens,
                temperature=temperature,
                stop=stop or None,
                stream=True,
            )
            try:
                for chunk in chunks:
                    if should_stop():
                        return
                    piece = chunk["choices"][0]["delta"].get("content")
                    if piece:
                        yield piece
            finally:
                chunks.close()
        except (RuntimeError, ValueError) as exc:
            raise EngineError(f"LLM generation failed: {exc}") from exc


class LlmScheduler:
    """FIFO queue and one worker thread in front of the LLM; every call's requests go through it."""

    def __init__(self, llm: LlamaLlm, max_queue: int = 64) -> None:
        self._llm = llm
        self._max_queue = max_queue
        self._cond = threading.Condition()
        self._queue: collections.deque[tuple[LlmRequest, TokenCallback]] = collections.deque()
        self._running: LlmRequest | None = None
        self._closing = False
        #: gets each request's queue wait in ms as it starts (the shedding rules' sensor)
        self.wait_observer: Callable[[float], None] | None = None
        self._worker = threading.Thread(target=self._run, name="llm-scheduler", daemon=True)
        self._worker.start()

    @property
    def queue_depth(self) -> int:
        """Requests waiting to start (the running one not counted)."""
        with self._cond:
            return len(self._queue)

    @property
    def busy(self) -> bool:
        """True while a request is being generated."""
        with self._cond:
            return self._running is not None

    def submit(self, request: LlmRequest, on_token: TokenCallback) -> LlmRequest:
        """Queue a request; ``on_token`` gets each text piece, then None exactly once at the end.

        ``on_token`` runs on the worker thread (or, for a request cancelled or closed before it
        started, on the thread calling cancel()/close()); callers marshal it to their loop.
        """
        with self._cond:
            if self._closing:
                raise EngineError("LLM scheduler is closed")
            if len(self._queue) >= self._max_queue:
                raise EngineError(f"LLM queue full ({self._max_queue} requests waiting)")
            request.queued_at = time.monotonic()
            self._queue.append((request, on_token))
            self._cond.notify()
        return request

    def cancel(self, request: LlmRequest) -> None:
        """Drop a queued request, or stop a running one at its next token."""
        request.cancelled.set()
        dropped: TokenCallback | None = None
        with self._cond:
            for entry in self._queue:
                if entry[0] is request:
                    self._queue.remove(entry)
                    dropped = entry[1]
                    break
        if dropped is not None:
            self._finish(request, dropped)

    def close(self) -> None:
        """Stop the worker: a running request stops at its next token; queued ones end unserved."""
        with self._cond:
            self._closing = True
            pending = list(self._queue)
            self._queue.clear()
            self._cond.notify_all()
        for request, on_token in pending:
            request.cancelled.set()
            self._finish(request, on_token)
        if threading.current_thread() is not self._worker:
            self._worker.join(_JOIN_TIMEOUT_S)
            if self._worker.is_alive():
                _LOGGER.warning("LLM worker did not stop within %.0f s", _JOIN_TIMEOUT_S)

    def _run(self) -> None:
        """Worker loop: serve requests in order until closed."""
        name_thread(stage_thread_name("llm"))  # ggml's threads inherit it: CPU per stage
        try:
            while True:
                with self._cond:
                    while not self._queue and not self._closing:
                        self._cond.wait()
                    if self._closing:
                        return
                    request, on_token = self._queue.popleft()
                    self._running = request
                try:
                    self._serve(request, on_token)
                finally:
                    with self._cond:
                        self._running = None
        except BaseException:
            _LOGGER.exception("LLM worker crashed")
            raise
        finally:
            _LOGGER.debug("LLM worker exiting")

    def _serve(self, request: LlmRequest, on_token: TokenCallback) -> None:
        """Generate one request, streaming its pieces to ``on_token``."""
        request.started_at = time.monotonic()
        observer = self.wait_observer
        if observer is not None and request.queued_at is not None:
            try:
                observer((request.started_at - request.queued_at) * 1000.0)
            except Exception:
                _LOGGER.exception("LLM wait observer failed")

        def should_stop() -> bool:
            return request.cancelled.is_set() or self._closing

        try:
            if not should_stop():
                pieces = self._llm.stream(
                    request.messages,
                    request.max_tokens,
                    request.temperature,
                    request.stop,
                    should_stop,
                )
                for piece in pieces:
                    if request.first_token_at is None:
                        request.first_token_at = time.monotonic()
                    request.tokens += 1
                    on_token(piece)
        except Exception as exc:
            # One bad request (or a failing callback) must not stop the worker.
            request.error = exc
            _LOGGER.warning("LLM request failed: %s", exc)
        finally:
            self._finish(request, on_token)

    @staticmethod
    def _finish(request: LlmRequest, on_token: TokenCallback) -> None:
        """Mark the request finished and deliver the end-of-stream None."""
        request.finished_at = time.monotonic()
        try:
            on_token(None)
        except Exception:
            # The caller's callback must not take the worker down.
            _LOGGER.exception("LLM on_token(None) callback failed")
