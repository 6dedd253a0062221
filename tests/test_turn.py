"""Endpointing and barge-in decisions, clocked by frames (runs far faster than real time)."""

from __future__ import annotations

from agent.call.playback import Playback
from agent.call.turn import TurnDetector, TurnEvent


def detector() -> TurnDetector:
    return TurnDetector(endpoint_silence_ms=360, min_speech_ms=120, barge_in_ms=160,
                        max_utterance_ms=2000)


def feed(det: TurnDetector, pattern: list[tuple[bool, int]], speaking: bool = False
         ) -> list[tuple[int, TurnEvent]]:
    events = []
    for voiced, frames in pattern:
        for _ in range(frames):
            ev = det.feed(voiced, speaking)
            if ev is not TurnEvent.NONE:
                events.append((det.now_ms, ev))
    return events


def test_speech_start_and_endpoint_in_audio_time() -> None:
    det = detector()
    events = feed(det, [(False, 10), (True, 50), (False, 30)])
    # speech starts once 120 ms (6 frames) are voiced; the onset is the first voiced frame
    assert events[0] == (200 + 120, TurnEvent.SPEECH_START)
    # the endpoint fires after 360 ms (18 frames) of silence following 1 s of speech
    assert events[1] == (200 + 1000 + 360, TurnEvent.SPEECH_END)
    assert len(events) == 2


def test_short_pause_inside_utterance_does_not_end_it() -> None:
    det = detector()
    events = feed(det, [(True, 20), (False, 10), (True, 20), (False, 20)])
    assert [e for _, e in events] == [TurnEvent.SPEECH_START, TurnEvent.SPEECH_END]


def test_blip_is_not_speech() -> None:
    det = detector()
    assert feed(det, [(True, 3), (False, 30), (True, 2), (False, 30)]) == []


def test_barge_in_needs_160ms_of_speech_over_agent_audio() -> None:
    det = detector()
    events = feed(det, [(False, 5), (True, 7)], speaking=True)
    assert events == []  # 140 ms is not enough
    events = feed(det, [(True, 1)], speaking=True)
    assert events == [(260, TurnEvent.BARGE_IN)]
    assert det.onset_ms == 100
    # after a barge-in the utterance continues and is endpointed normally
    events = feed(det, [(True, 20), (False, 18)], speaking=False)
    assert events == [(260 + 400 + 360, TurnEvent.SPEECH_END)]


def test_max_utterance_length() -> None:
    det = detector()
    events = feed(det, [(True, 150)])
    # cut at 2 s of speech; the caller still talking starts the next utterance
    assert [e for _, e in events] == [TurnEvent.SPEECH_START, TurnEvent.UTTERANCE_TOO_LONG,
                                      TurnEvent.SPEECH_START]
    assert events[1][0] == 2000


def test_playback_paces_frames_and_clears_on_barge_in() -> None:
    pb = Playback(8000)
    silence = bytes(320)
    assert pb.next_frame() == (silence, None)
    pb.enqueue(b"\x01\x00" * 800, reply_id=7)  # 100 ms -> 5 frames
    assert pb.speaking and pb.queued_ms == 100
    frame, started = pb.next_frame()
    assert started == 7 and len(frame) == 320
    assert pb.next_frame()[1] is None
    assert pb.clear() == 3
    assert not pb.speaking
    assert pb.next_frame() == (silence, None)
