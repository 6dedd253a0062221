"""Keypad entry for flow questions in the call session, clocked by audio frames (no threads)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace
from typing import Any

import pytest

from agent.audio import FRAME_MS, frame_bytes
from agent.call.session import DTMF_INTERDIGIT_MS, CallResult, CallSession, _DtmfEntry
from agent.config import default_config
from agent.dialog.policy import DialogPolicy

RATE = 8000


@pytest.fixture
def session() -> CallSession:
    config = default_config()
    engines: Any = SimpleNamespace(stt=SimpleNamespace(), tts=None, llm=None, phrases={})
    pool = ThreadPoolExecutor(max_workers=1)
    return CallSession("t1", config, engines, DialogPolicy(config.agent), RATE, pool, pool)


def queued(session: CallSession) -> list[Any]:
    out = []
    while not session._utt_q.empty():
        out.append(session._utt_q.get_nowait())
    return out


def silence(session: CallSession, ms: int) -> None:
    session.on_audio(b"\x00" * frame_bytes(RATE, ms))


def test_pound_ends_the_entry(session: CallSession) -> None:
    session._dtmf_entry = _DtmfEntry(15)
    for digit in "555*5551234567#":
        session.on_dtmf(digit)
    [utt] = queued(session)
    assert utt.dtmf == "5551234567" and utt.text == ""  # * started the entry over
    assert session._dtmf_entry is None


def test_the_entry_ends_at_its_length(session: CallSession) -> None:
    session._dtmf_entry = _DtmfEntry(1)
    session.on_dtmf("2")
    assert [u.dtmf for u in queued(session)] == ["2"]


def test_a_pause_ends_the_entry_counted_in_audio_frames(session: CallSession) -> None:
    session._dtmf_entry = _DtmfEntry(15)
    for digit in "5551234":
        session.on_dtmf(digit)
    silence(session, DTMF_INTERDIGIT_MS - FRAME_MS)
    assert queued(session) == []
    silence(session, FRAME_MS)
    assert [u.dtmf for u in queued(session)] == ["5551234"]


def test_a_key_press_cuts_the_prompt(session: CallSession) -> None:
    session.playback.enqueue(b"\x10\x00" * RATE, 1)
    assert session.playback.speaking
    session._dtmf_entry = _DtmfEntry(15)
    session.on_dtmf("5")
    assert not session.playback.speaking


def test_zero_outside_an_entry_still_asks_for_a_person(session: CallSession) -> None:
    session.on_dtmf("0")
    assert session.done
    assert session.outcome.result is CallResult.TRANSFER
    assert session.outcome.reason == "dtmf-0"
    assert session.outcome.transfer_to == default_config().transfers["front-desk"]


def test_zero_inside_an_entry_is_a_digit(session: CallSession) -> None:
    session._dtmf_entry = _DtmfEntry(15)
    for digit in "5550100#":
        session.on_dtmf(digit)
    assert not session.done
    assert [u.dtmf for u in queued(session)] == ["5550100"]
