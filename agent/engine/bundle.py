"""Load every engine once per process from the config: STT, TTS (+ phrase cache), LLM."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from agent.config import Config
from agent.engine.llm import LlamaLlm, LlmRequest, LlmScheduler
from agent.engine.stt import SttEngine, load_stt
from agent.engine.tts import PhraseCache, PiperTts
from agent.kpi.cpu import pool_initializer, run_named
from agent.models import installed_vosk_english, require

_LOGGER = logging.getLogger(__name__)


@dataclass
class EngineBundle:
    """The shared engines of one process (thread-safe; never used on an event loop)."""

    stt: SttEngine
    tts: PiperTts
    phrases: PhraseCache
    llm: LlmScheduler
    stt_backend: str
    load_times_s: dict[str, float] = field(default_factory=dict)

    @classmethod
    def load(cls, config: Config, extra_phrases: Iterable[str] = (),
             cache_phrases: bool = True) -> EngineBundle:
        """Load models named by ``config`` (embedded defaults when paths are empty); with
        ``cache_phrases`` every fixed phrase is synthesized once now."""
        times: dict[str, float] = {}
        m = config.models
        t0 = time.perf_counter()
        backend = m.stt_backend
        vosk_path = m.vosk_model
        if backend == "auto":
            if not vosk_path:
                found = installed_vosk_english()
                vosk_path = str(found) if found else ""
            backend = "vosk" if vosk_path else "whisper"
        # each model is loaded in a thread named for its stage: the native worker pools the
        # libraries create inherit the name, so CPU per stage can be measured (agent.kpi.cpu)
        if backend == "vosk":
            path = require("vosk-small-en-us", vosk_path)
            stt = run_named("stt", lambda: load_stt("vosk", str(path)))
        else:
            path = require("whisper-tiny-en", m.whisper_model)
            stt = run_named("stt", lambda: load_stt("whisper", str(path),
                                                    cpu_threads=m.stt_threads))
        warmup = getattr(stt, "warmup", None)
        if callable(warmup):
            run_named("stt", warmup)  # the first decode allocates; the first caller won't pay
        times["stt"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        voice = str(require("piper-en-us-joe-medium", m.tts_voice))
        tts = run_named("tts", lambda: PiperTts(voice, out_rate_hz=config.rate_hz))
        times["tts"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        llm_path = str(require("smollm2-135m-instruct-q4_1", m.llm_model))
        llm = run_named("llm", lambda: LlamaLlm(llm_path, n_ctx=m.llm_context_tokens,
                                                n_threads=m.llm_threads))
        scheduler = LlmScheduler(llm)
        times["llm"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        phrases = PhraseCache(tts)
        texts = list(dict.fromkeys([*config.agent.fixed_phrases(), *extra_phrases]))
        if not cache_phrases:
            texts = []
        # piper releases the GIL in onnxruntime: two workers halve the start-up synthesis time
        with ThreadPoolExecutor(max_workers=2, thread_name_prefix="warm",
                                initializer=pool_initializer("tts")) as pool:
            for text, audio in zip(texts, pool.map(tts.synthesize, texts), strict=True):
                phrases.put(text, audio)
        times["phrase_cache"] = time.perf_counter() - t0
        _LOGGER.info("engines loaded: stt=%s %s", backend,
                     ", ".join(f"{k}={v:.2f}s" for k, v in times.items()))
        return cls(stt=stt, tts=tts, phrases=phrases, llm=scheduler, stt_backend=backend,
                   load_times_s=times)

    def warm_llm(self, messages: list[dict[str, str]], timeout_s: float = 60.0) -> float:
        """Evaluate a prompt once so its prefix (persona + knowledge) is cached; returns seconds.

        llama.cpp reuses the longest common prefix of the previous evaluation, so after this the
        first caller's open question costs only its own tokens.
        """
        done = threading.Event()
        t0 = time.perf_counter()
        request = LlmRequest(messages=messages, max_tokens=1, temperature=0.0)
        self.llm.submit(request, lambda token: done.set() if token is None else None)
        if not done.wait(timeout_s):
            self.llm.cancel(request)
        return time.perf_counter() - t0

    def close(self) -> None:
        """Stop the LLM worker thread."""
        self.llm.close()
