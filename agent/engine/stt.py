"""Speech-to-text engines: one shared model per process, one stream object per call."""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import threading
import time
import zlib
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from agent.errors import EngineError, ModelMissing

_LOGGER = logging.getLogger(__name__)

_LOAD_LOCK = threading.Lock()
_WHISPER_RATE_HZ = 16000

# Short-window ("audio_ctx") decoding: the encoder sees the utterance plus a margin instead of
# whisper's fixed 30 s window, which cuts the encoder cost ~10x for 1-5 s utterances.
_FULL_WINDOW_FRAMES = 3000  # 30 s of 10 ms mel frames
_FAST_MARGIN_FRAMES = 100  # silence after the utterance, so the last word is not clipped
# Below ~8 s of window tiny.en's accuracy on 1-2 s utterances drops (measured on noisy
# telephone speech: min 300 frames WER +0.055 over the full window, min 800 +0.027).
_FAST_MIN_FRAMES = 800
_FAST_STEP_FRAMES = 100  # few distinct encoder shapes
_FAST_TOKENS_PER_S = 6.0  # generation budget: fast speech is ~4 words/s, ~5 tokens/s
_FAST_TOKENS_EXTRA = 10
# The short window makes tiny.en prone to repeating the utterance; these damp it and the
# degenerate-output check below catches what gets through.
_FAST_REPETITION_PENALTY = 1.1
_FAST_NO_REPEAT_NGRAM = 3
_MAX_COMPRESSION_RATIO = 2.4
_MAX_WORDS_PER_S = 5.0
_MIN_AVG_LOGPROB = -1.0
_EMPTY_TEXT_MIN_S = 1.0
_WORD_RE = re.compile(r"[a-z0-9']+")


@dataclass(frozen=True)
class SttResult:
    """Final text of one utterance with its audio length and decode time."""

    text: str
    audio_ms: int
    decode_ms: float


class SttStream(Protocol):
    """Per-call recognizer session; not shared between threads."""

    def accept(self, pcm16: bytes) -> None:
        """Feed PCM16 mono audio at the stream's rate (any length)."""

    def partial(self) -> str:
        """Best guess of the current utterance so far ("" when the backend can't tell)."""

    def finish(self) -> SttResult:
        """Final text of everything accepted since the last finish; the stream is then reset."""

    def reset(self) -> None:
        """Discard the audio accepted since the last finish."""

    def close(self) -> None:
        """Release the stream's resources."""


class SttEngine(Protocol):
    """A loaded STT model that hands out per-call streams."""

    name: str

    def open_stream(self, rate_hz: int) -> SttStream:
        """Open a recognizer session for PCM16 mono audio at ``rate_hz``."""


def _audio_ms(n_bytes: int, rate_hz: int) -> int:
    """Duration in ms of ``n_bytes`` of PCM16 mono at ``rate_hz``."""
    return n_bytes * 1000 // (2 * rate_hz)


def _require_path(backend: str, model_path: str) -> None:
    """Raise ModelMissing naming the path when a model directory is absent."""
    if not os.path.exists(model_path):
        raise ModelMissing(
            f"{backend} model not found at {model_path}; "
            "install it with `pbx-agent models install` or fix the model path in the config"
        )


@functools.cache
def _load_vosk_model(model_path: str) -> Any:
    """Load a vosk model once per process."""
    import vosk

    vosk.SetLogLevel(-1)
    started = time.perf_counter()
    model = vosk.Model(model_path)
    _LOGGER.info("loaded vosk model %s in %.1f s", model_path, time.perf_counter() - started)
    return model


class VoskStt:
    """Streaming vosk (Kaldi) recognizer; vosk releases the GIL while decoding."""

    name = "vosk"

    def __init__(self, model_path: str) -> None:
        _require_path("vosk", model_path)
        with _LOAD_LOCK:
            self._model = _load_vosk_model(model_path)

    def open_stream(self, rate_hz: int) -> VoskStream:
        """Open a KaldiRecognizer at the call's rate (vosk resamples internally)."""
        return VoskStream(self._model, rate_hz)


class VoskStream:
    """One KaldiRecognizer; segments vosk finalises on its own are kept until finish()."""

    def __init__(self, model: Any, rate_hz: int) -> None:
        import vosk

        self.rate_hz = rate_hz
        self._rec: Any = vosk.KaldiRecognizer(model, float(rate_hz))
        self._rec.SetWords(False)
        self._done: list[str] = []
        self._partial = ""
        self._bytes = 0

    def accept(self, pcm16: bytes) -> None:
        """Feed audio; keep any segment vosk closes at its own endpoint."""
        if not pcm16:
            return
        self._bytes += len(pcm16)
        try:
            if self._rec.AcceptWaveform(pcm16):
                # The next AcceptWaveform would drop this segment, so take it now.
                self._keep(json.loads(self._rec.Result()).get("text", ""))
                self._partial = ""
            else:
                self._partial = json.loads(self._rec.PartialResult()).get("partial", "")
        except (RuntimeError, ValueError) as exc:
            raise EngineError(f"vosk decode failed: {exc}") from exc

    def partial(self) -> str:
        """Text of the utterance so far."""
        return " ".join([*self._done, self._partial]).strip()

    def finish(self) -> SttResult:
        """Flush the recognizer and return the utterance's text."""
        started = time.perf_counter()
        try:
            self._keep(json.loads(self._rec.FinalResult()).get("text", ""))
        except (RuntimeError, ValueError) as exc:
            raise EngineError(f"vosk decode failed: {exc}") from exc
        decode_ms = (time.perf_counter() - started) * 1000.0
        result = SttResult(" ".join(self._done), _audio_ms(self._bytes, self.rate_hz), decode_ms)
        self._clear()
        return result

    def reset(self) -> None:
        """Discard the current utterance."""
        self._rec.Reset()
        self._clear()

    def close(self) -> None:
        """Drop the recognizer."""
        self._clear()
        self._rec = None

    def _keep(self, text: str) -> None:
        """Remember a finalised segment's text."""
        text = text.strip()
        if text:
            self._done.append(text)

    def _clear(self) -> None:
        """Forget the utterance state."""
        self._done = []
        self._partial = ""
        self._bytes = 0


def _repeated_phrase(words: list[str]) -> str | None:
    """A phrase of 2+ words (not one word said over and over) that occurs twice, else None."""
    for n in (2, 3, 4):
        seen: set[tuple[str, ...]] = set()
        for i in range(len(words) - n + 1):
            gram = tuple(words[i : i + n])
            if len(set(gram)) == 1:
                continue  # "no no": real speech does this (runs of 3+ are caught below)
            if gram in seen:
                return " ".join(gram)
            seen.add(gram)
    return None


def detect_degenerate(text: str, audio_s: float) -> str | None:
    """Why ``text`` looks like a failed decode of ``audio_s`` s of audio; None if it looks fine.

    Flags repetition loops (a repeated phrase, a zlib compression ratio above 2.4), more words
    than the audio could hold, and no text at all for a second or more of audio.
    """
    words = _WORD_RE.findall(text.lower())
    if not words:
        return "empty text" if audio_s >= _EMPTY_TEXT_MIN_S else None
    if len(words) > _MAX_WORDS_PER_S * audio_s + 2:
        return f"{len(words)} words in {audio_s:.1f} s of audio"
    for i in range(len(words) - 2):
        if words[i] == words[i + 1] == words[i + 2]:
            return f"{words[i]!r} three times in a row"
    phrase = _repeated_phrase(words)
    if phrase is not None:
        return f"repeated phrase {phrase!r}"
    raw = text.encode("utf-8")
    ratio = len(raw) / len(zlib.compress(raw))
    if ratio > _MAX_COMPRESSION_RATIO:
        return f"compression ratio {ratio:.2f}"
    return None


def _fast_window_frames(n_frames: int) -> int:
    """Encoder window for ``n_frames`` of features: margin added, rounded up, at least the min."""
    frames = -(-(n_frames + _FAST_MARGIN_FRAMES) // _FAST_STEP_FRAMES) * _FAST_STEP_FRAMES
    return max(_FAST_MIN_FRAMES, frames)


@functools.cache
def _load_whisper_model(model_path: str, cpu_threads: int, num_workers: int) -> Any:
    """Load a CTranslate2 whisper model once per process (per settings)."""
    from faster_whisper import WhisperModel

    started = time.perf_counter()
    model = WhisperModel(
        model_path,
        device="cpu",
        compute_type="int8",
        cpu_threads=cpu_threads,
        num_workers=num_workers,
    )
    _LOGGER.info("loaded whisper model %s in %.1f s", model_path, time.perf_counter() - started)
    return model


class WhisperStt:
    """faster-whisper decoding whole VAD-segmented utterances; not streaming: partial() is "".

    With ``fast_window`` (the default) an utterance is first decoded with the encoder fed only
    the utterance plus a 1 s margin, at least 8 s (whisper.cpp's "audio_ctx"), ~3x faster
    than the full 30 s window for 1-5 s of audio. A short window can make tiny.en loop, so
    repetition is damped during generation and output that still looks degenerate
    (``detect_degenerate``) is decoded again with the full window.
    """

    name = "whisper"

    def __init__(
        self,
        model_path: str,
        cpu_threads: int = 2,
        beam_size: int = 1,
        num_workers: int = 1,
        initial_prompt: str | None = None,
        max_new_tokens: int = 96,
        fast_window: bool = True,
        fast_beam_size: int = 2,
    ) -> None:
        _require_path("whisper", model_path)
        with _LOAD_LOCK:
            self._model = _load_whisper_model(model_path, cpu_threads, num_workers)
        self._beam_size = beam_size
        self._initial_prompt = initial_prompt
        self._max_new_tokens = max_new_tokens
        self.fast_window = fast_window
        # Greedy search in the short window loses a word now and then (tiny.en: mean WER +0.02
        # on 18 noisy telephone utterances); a beam of 2 recovered it for ~60 ms.
        self._fast_beam_size = max(fast_beam_size, beam_size)
        self._stats_lock = threading.Lock()
        self.fast_decodes = 0
        self.fast_fallbacks = 0
        self._init_fast_tokens()

    def _init_fast_tokens(self) -> None:
        """Prompt and suppressed token ids for the direct CTranslate2 decode (as faster-whisper)."""
        from faster_whisper.tokenizer import Tokenizer
        from faster_whisper.transcribe import get_suppressed_tokens

        model = self._model
        multilingual = bool(model.model.is_multilingual)
        tokenizer = Tokenizer(
            model.hf_tokenizer,
            multilingual,
            task="transcribe",
            language="en" if multilingual else None,
        )
        self._tokenizer = tokenizer
        self._eot: int = tokenizer.eot
        prompt: list[int] = []
        if self._initial_prompt:
            prompt.append(tokenizer.sot_prev)
            prompt_tokens = tokenizer.encode(" " + self._initial_prompt.strip())
            prompt.extend(prompt_tokens[-(model.max_length // 2 - 1) :])
        prompt.extend(tokenizer.sot_sequence)
        prompt.append(tokenizer.no_timestamps)
        self._fast_prompt = prompt
        self._suppress_tokens = list(get_suppressed_tokens(tokenizer, [-1]) or [])
        self._max_length: int = model.max_length

    def open_stream(self, rate_hz: int) -> WhisperStream:
        """Open a buffering stream for audio at ``rate_hz``."""
        return WhisperStream(self, rate_hz)

    def transcribe(self, pcm16: bytes, rate_hz: int) -> SttResult:
        """Decode one utterance of PCM16 mono at ``rate_hz`` (also used for speculative decodes)."""
        audio_ms = _audio_ms(len(pcm16), rate_hz)
        started = time.perf_counter()
        if not pcm16:
            return SttResult("", 0, 0.0)
        audio = self._to_whisper_audio(pcm16, rate_hz)
        # Without timestamps tiny.en may end its output after the first of two phrases, and no
        # output check can see that; so only single-phrase utterances take the short window.
        fast = self.fast_window and speech_segments(pcm16, rate_hz) <= 1
        try:
            text = self._decode_fast(audio) if fast else None
            if text is None:
                text = self._decode_full(audio)
        except (RuntimeError, ValueError) as exc:
            raise EngineError(f"whisper decode failed: {exc}") from exc
        return SttResult(text, audio_ms, (time.perf_counter() - started) * 1000.0)

    @staticmethod
    def _to_whisper_audio(pcm16: bytes, rate_hz: int) -> np.ndarray:
        """PCM16 at ``rate_hz`` as float32 samples in [-1, 1) at 16 kHz."""
        import soxr

        audio = np.frombuffer(pcm16[: len(pcm16) // 2 * 2], dtype="<i2").astype(np.float32)
        audio /= 32768.0
        if rate_hz != _WHISPER_RATE_HZ:
            audio = soxr.resample(audio, rate_hz, _WHISPER_RATE_HZ).astype(np.float32)
        return audio

    def _decode_fast(self, audio: np.ndarray) -> str | None:
        """Short-window decode; None when the window doesn't fit or the output is degenerate."""
        import ctranslate2

        model = self._model
        features = model.feature_extractor(audio)[..., :-1]
        n_frames = int(features.shape[-1])
        window = _fast_window_frames(n_frames)
        if window >= _FULL_WINDOW_FRAMES:
            return None  # long audio: the full window is what the model expects anyway
        padded = np.zeros((1, features.shape[0], window), dtype=np.float32)
        padded[0, :, :n_frames] = features
        encoded = model.model.encode(ctranslate2.StorageView.from_array(padded))
        audio_s = len(audio) / _WHISPER_RATE_HZ
        budget = min(self._max_new_tokens, int(_FAST_TOKENS_PER_S * audio_s) + _FAST_TOKENS_EXTRA)
        max_length = min(len(self._fast_prompt) + budget, self._max_length)
        result = model.model.generate(
            encoded,
            [self._fast_prompt],
            beam_size=self._fast_beam_size,
            max_length=max_length,
            repetition_penalty=_FAST_REPETITION_PENALTY,
            no_repeat_ngram_size=_FAST_NO_REPEAT_NGRAM,
            suppress_blank=True,
            suppress_tokens=self._suppress_tokens,
            return_scores=True,
        )[0]
        tokens = [token for token in result.sequences_ids[0] if token < self._eot]
        text = self._tokenizer.decode(tokens).strip()
        avg_logprob = result.scores[0] / (len(result.sequences_ids[0]) + 1)
        reason = self._fast_reject_reason(text, audio_s, len(tokens), budget, avg_logprob)
        with self._stats_lock:
            self.fast_decodes += 1
            if reason is not None:
                self.fast_fallbacks += 1
        if reason is not None:
            _LOGGER.debug("short-window decode %r rejected (%s); full window", text, reason)
            return None
        return text

    @staticmethod
    def _fast_reject_reason(
        text: str, audio_s: float, n_tokens: int, budget: int, avg_logprob: float
    ) -> str | None:
        """Why a short-window decode should be redone with the full window, or None."""
        if n_tokens >= budget:
            return f"hit the {budget}-token budget"
        if avg_logprob < _MIN_AVG_LOGPROB:
            return f"average log-probability {avg_logprob:.2f}"
        return detect_degenerate(text, audio_s)

    def _decode_full(self, audio: np.ndarray) -> str:
        """faster-whisper's own decode over the full 30 s window."""
        segments, _info = self._model.transcribe(
            audio,
            language="en",
            beam_size=self._beam_size,
            best_of=1,
            temperature=0.0,
            # Timestamp mode costs ~10% more but, without it, tiny.en often stops after
            # the first sentence of a two-sentence utterance (measured: 2 of 6 dropped).
            without_timestamps=False,
            condition_on_previous_text=False,
            vad_filter=False,
            initial_prompt=self._initial_prompt,
            max_new_tokens=self._max_new_tokens,
            # No fallback re-decodes: one greedy pass keeps the latency bounded.
            compression_ratio_threshold=None,
            log_prob_threshold=None,
            no_speech_threshold=None,
        )
        return " ".join(segment.text.strip() for segment in segments).strip()

    def warmup(self) -> None:
        """Run throwaway decodes (both windows) so the first call's utterance is not slow."""
        audio = np.zeros(_WHISPER_RATE_HZ // 2, dtype=np.float32)
        try:
            if self.fast_window:
                self._decode_fast(audio)
            self._decode_full(audio)
        except (RuntimeError, ValueError) as exc:
            raise EngineError(f"whisper decode failed: {exc}") from exc
        with self._stats_lock:
            self.fast_decodes = self.fast_fallbacks = 0


class WhisperStream:
    """Buffers one utterance and decodes it on finish(); partial() is always ""."""

    def __init__(self, engine: WhisperStt, rate_hz: int) -> None:
        self.rate_hz = rate_hz
        self._engine = engine
        self._chunks: list[bytes] = []

    def accept(self, pcm16: bytes) -> None:
        """Buffer audio until finish()."""
        if pcm16:
            self._chunks.append(pcm16)

    def partial(self) -> str:
        """Whisper does not stream, so there is no partial text."""
        return ""

    def audio(self) -> bytes:
        """The audio buffered since the last finish (for a speculative transcribe())."""
        return b"".join(self._chunks)

    def finish(self) -> SttResult:
        """Decode the buffered utterance and clear the buffer."""
        pcm16 = self.audio()
        self._chunks = []
        return self._engine.transcribe(pcm16, self.rate_hz)

    def reset(self) -> None:
        """Discard the buffered audio."""
        self._chunks = []

    def close(self) -> None:
        """Discard the buffered audio."""
        self._chunks = []


def load_stt(backend: str, model_path: str, **opts: Any) -> SttEngine:
    """Load the STT engine named by ``backend`` ("vosk" or "whisper")."""
    if backend == "vosk":
        return VoskStt(model_path, **opts)
    if backend in ("whisper", "faster-whisper"):
        return WhisperStt(model_path, **opts)
    raise ValueError(f"unknown STT backend {backend!r}; expected 'vosk' or 'whisper'")


def speech_segments(pcm16: bytes, rate_hz: int, pause_ms: int = 300) -> int:
    """Voiced stretches in ``pcm16`` separated by at least ``pause_ms`` of non-speech."""
    from agent.engine.vad import FrameVad

    if rate_hz not in (8000, 16000):
        return 1
    vad = FrameVad(rate_hz, 2)
    size = rate_hz * 20 // 1000 * 2
    segments = 0
    silent_run = pause_ms  # leading silence doesn't count as a pause
    for pos in range(0, len(pcm16) - size + 1, size):
        if vad.is_speech(pcm16[pos:pos + size]):
            if silent_run >= pause_ms:
                segments += 1
            silent_run = 0
        else:
            silent_run += 20
    return segments
