"""Speech-to-text engines: one shared model per process, one stream object per call."""

from __future__ import annotations

import functools
import json
import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from agent.errors import EngineError, ModelMissing

_LOGGER = logging.getLogger(__name__)

_LOAD_LOCK = threading.Lock()
_WHISPER_RATE_HZ = 16000


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
    """faster-whisper decoding whole VAD-segmented utterances; not streaming: partial() is ""."""

    name = "whisper"

    def __init__(
        self,
        model_path: str,
        cpu_threads: int = 2,
        beam_size: int = 1,
        num_workers: int = 1,
        initial_prompt: str | None = None,
        max_new_tokens: int = 96,
    ) -> None:
        _require_path("whisper", model_path)
        with _LOAD_LOCK:
            self._model = _load_whisper_model(model_path, cpu_threads, num_workers)
        self._beam_size = beam_size
        self._initial_prompt = initial_prompt
        self._max_new_tokens = max_new_tokens

    def open_stream(self, rate_hz: int) -> WhisperStream:
        """Open a buffering stream for audio at ``rate_hz``."""
        return WhisperStream(self, rate_hz)

    def transcribe(self, pcm16: bytes, rate_hz: int) -> SttResult:
        """Decode one utterance of PCM16 mono at ``rate_hz`` (also used for speculative decodes)."""
        import soxr

        audio_ms = _audio_ms(len(pcm16), rate_hz)
        started = time.perf_counter()
        if not pcm16:
            return SttResult("", 0, 0.0)
        audio = np.frombuffer(pcm16[: len(pcm16) // 2 * 2], dtype="<i2").astype(np.float32)
        audio /= 32768.0
        if rate_hz != _WHISPER_RATE_HZ:
            audio = soxr.resample(audio, rate_hz, _WHISPER_RATE_HZ).astype(np.float32)
        try:
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
            text = " ".join(segment.text.strip() for segment in segments).strip()
        except (RuntimeError, ValueError) as exc:
            raise EngineError(f"whisper decode failed: {exc}") from exc
        return SttResult(text, audio_ms, (time.perf_counter() - started) * 1000.0)

    def warmup(self) -> None:
        """Run one throwaway decode so the first call's utterance is not slow."""
        self.transcribe(bytes(_WHISPER_RATE_HZ), _WHISPER_RATE_HZ)


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
