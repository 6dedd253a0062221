"""Endpointing and barge-in, clocked by audio frames (never by wall time).

:class:`TurnDetector` is fed one voice-activity decision per 20 ms caller frame and says when
the caller started speaking, when they finished (endpoint), and when speech during agent audio
should cut the agent off (barge-in). Because its clock is the frame count, tests can feed it
faster than real time.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from agent.audio import FRAME_MS


class TurnEvent(enum.Enum):
    """What a frame changed."""

    NONE = "none"
    SPEECH_START = "speech_start"
    SPEECH_END = "speech_end"
    BARGE_IN = "barge_in"
    UTTERANCE_TOO_LONG = "too_long"


@dataclass
class TurnState:
    """Counters the detector keeps, in frames."""

    in_speech: bool = False
    voiced_run: int = 0
    silent_run: int = 0
    speech_frames: int = 0
    onset_frame: int = -1
    barged: bool = False


class TurnDetector:
    """Endpointing and barge-in decisions from per-frame voice activity."""

    def __init__(self, endpoint_silence_ms: int, min_speech_ms: int, barge_in_ms: int,
                 max_utterance_ms: int, frame_ms: int = FRAME_MS) -> None:
        self.frame_ms = frame_ms
        self.endpoint_frames = max(1, endpoint_silence_ms // frame_ms)
        self.min_speech_frames = max(1, min_speech_ms // frame_ms)
        self.barge_frames = max(1, barge_in_ms // frame_ms)
        self.max_frames = max(1, max_utterance_ms // frame_ms)
        self.frame_index = 0
        self.state = TurnState()

    @property
    def now_ms(self) -> int:
        """Audio time: milliseconds of caller audio seen so far."""
        return self.frame_index * self.frame_ms

    @property
    def onset_ms(self) -> int:
        """Audio time of the first voiced frame of the current utterance (-1 if none)."""
        s = self.state.onset_frame
        return -1 if s < 0 else s * self.frame_ms

    def feed(self, voiced: bool, agent_speaking: bool) -> TurnEvent:
        """Account for one caller frame; return what it changed."""
        st = self.state
        index = self.frame_index
        self.frame_index += 1
        if voiced:
            if st.voiced_run == 0 and not st.in_speech:
                st.onset_frame = index
            st.voiced_run += 1
            st.silent_run = 0
        else:
            st.silent_run += 1
            if not st.in_speech:
                st.voiced_run = 0
        if not st.in_speech:
            if agent_speaking and not st.barged and st.voiced_run >= self.barge_frames:
                st.barged = True
                st.in_speech = True
                st.speech_frames = st.voiced_run
                return TurnEvent.BARGE_IN
            if not agent_speaking and st.voiced_run >= self.min_speech_frames:
                st.in_speech = True
                st.speech_frames = st.voiced_run
                return TurnEvent.SPEECH_START
            return TurnEvent.NONE
        st.speech_frames += 1
        if st.silent_run >= self.endpoint_frames:
            self._reset()
            return TurnEvent.SPEECH_END
        if st.speech_frames >= self.max_frames:
            self._reset()
            return TurnEvent.UTTERANCE_TOO_LONG
        return TurnEvent.NONE

    def _reset(self) -> None:
        self.state = TurnState()
