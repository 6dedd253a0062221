"""Text-to-speech with piper, resampled to the PBX rate, plus a cache of fixed phrases."""

from __future__ import annotations

import functools
import json
import logging
import os
import threading
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

import numpy as np

from agent.engine.text import normalize
from agent.errors import EngineError, ModelMissing

if TYPE_CHECKING:
    from piper import PiperVoice

_LOGGER = logging.getLogger(__name__)

_LOAD_LOCK = threading.Lock()
# Below this absolute level (float, full scale 1.0) a sample counts as silence when trimming.
_SILENCE_LEVEL = 0.01
_KEEP_LEAD_MS = 20
_KEEP_TRAIL_MS = 150


@functools.cache
def _load_voice(model_path: str, threads: int | None) -> PiperVoice:
    """Load a piper voice once per process (per path and thread setting)."""
    import onnxruntime
    from piper import PiperVoice
    from piper.config import PiperConfig

    with open(f"{model_path}.json", encoding="utf-8") as config_file:
        config = PiperConfig.from_dict(json.load(config_file))
    options = onnxruntime.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    # Spinning worker threads steal cores from concurrent calls and the other engines.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = onnxruntime.InferenceSession(
        model_path, sess_options=options, providers=["CPUExecutionProvider"]
    )
    _LOGGER.info("loaded piper voice %s (%d Hz)", model_path, config.sample_rate)
    return PiperVoice(session=session, config=config)


class PiperTts:
    """Piper voice producing PCM16 mono at the PBX rate; thread-safe, the voice is shared."""

    def __init__(
        self,
        model_path: str,
        out_rate_hz: int = 8000,
        length_scale: float | None = None,
        threads: int | None = 1,
        deterministic: bool = False,
    ) -> None:
        """``deterministic`` turns piper's sampling noise off: the same text always gives the
        same audio (the simulator's caller voice, so end-to-end tests are reproducible)."""
        if not os.path.isfile(model_path) or not os.path.isfile(f"{model_path}.json"):
            raise ModelMissing(
                f"piper voice not found at {model_path} (needs the .onnx and .onnx.json); "
                "install it with `pbx-agent models install`"
            )
        from piper import SynthesisConfig

        with _LOAD_LOCK:
            self._voice = _load_voice(model_path, threads)
        self.out_rate_hz = out_rate_hz
        self.sample_rate_hz: int = self._voice.config.sample_rate
        if deterministic:
            self._syn_config = SynthesisConfig(length_scale=length_scale, noise_scale=0.0,
                                               noise_w_scale=0.0)
        else:
            self._syn_config = SynthesisConfig(length_scale=length_scale)

    def synthesize(self, text: str) -> bytes:
        """Synthesize all of ``text`` as one PCM16 buffer at ``out_rate_hz``."""
        return b"".join(self.iter_synthesize(text))

    def iter_synthesize(self, text: str) -> Iterator[bytes]:
        """Yield PCM16 at ``out_rate_hz``, one chunk per sentence as piper produces them."""
        if not text.strip():
            return
        try:
            # piper locks its phonemizer and onnxruntime sessions are safe to run concurrently.
            for chunk in self._voice.synthesize(text, syn_config=self._syn_config):
                yield self._to_pcm(chunk.audio_float_array, chunk.sample_rate)
        except (RuntimeError, ValueError, OSError) as exc:
            raise EngineError(f"piper synthesis failed: {exc}") from exc

    def _to_pcm(self, audio: Any, rate_hz: int) -> bytes:
        """Trim long edge silence, resample to the PBX rate and convert to PCM16 bytes."""
        import soxr

        audio = _trim_silence(np.asarray(audio, dtype=np.float32), rate_hz)
        if rate_hz != self.out_rate_hz and audio.size:
            audio = soxr.resample(audio, rate_hz, self.out_rate_hz)
        pcm = np.clip(audio * 32767.0, -32768.0, 32767.0).astype("<i2")
        return pcm.tobytes()


def _trim_silence(audio: Any, rate_hz: int) -> Any:
    """Drop leading/trailing silence beyond a short natural margin."""
    loud = np.flatnonzero(np.abs(audio) >= _SILENCE_LEVEL)
    if loud.size == 0:
        return audio[:0]
    start = max(0, int(loud[0]) - rate_hz * _KEEP_LEAD_MS // 1000)
    end = min(audio.size, int(loud[-1]) + 1 + rate_hz * _KEEP_TRAIL_MS // 1000)
    return audio[start:end]


class PhraseCache:
    """Pre-synthesized audio for fixed phrases (greetings, fillers), keyed by normalised text."""

    def __init__(self, tts: PiperTts) -> None:
        self._tts = tts
        self._lock = threading.Lock()
        self._audio: dict[str, bytes] = {}

    def warm(self, texts: Iterable[str]) -> None:
        """Synthesize every phrase not cached yet (call once at start-up)."""
        for text in texts:
            if self.get(text) is None:
                self.put(text, self._tts.synthesize(text))

    def get(self, text: str) -> bytes | None:
        """Cached PCM for ``text``, or None."""
        with self._lock:
            return self._audio.get(normalize(text))

    def put(self, text: str, pcm16: bytes) -> None:
        """Store PCM for ``text``."""
        with self._lock:
            self._audio[normalize(text)] = pcm16

    def __len__(self) -> int:
        """Number of cached phrases."""
        with self._lock:
            return len(self._audio)
