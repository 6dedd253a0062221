"""The agent's outgoing audio: a frame queue the pacer drains one 20 ms frame per tick."""

from __future__ import annotations

import threading
from collections import deque

from agent.audio import frame_bytes, split_frames


class Playback:
    """Queued agent audio; silence when empty; cleared at once on barge-in.

    Thread-safe, so a TTS worker can enqueue while the pacer dequeues.
    """

    def __init__(self, rate_hz: int) -> None:
        self.rate_hz = rate_hz
        self._silence = bytes(frame_bytes(rate_hz))
        self._frames: deque[tuple[bytes, int]] = deque()
        self._lock = threading.Lock()
        self._started: set[int] = set()
        self.frames_sent = 0
        self.frames_dropped = 0

    def enqueue(self, pcm: bytes, reply_id: int) -> None:
        """Append ``pcm`` (cut into frames) as part of reply ``reply_id``."""
        frames = split_frames(pcm, self.rate_hz)
        with self._lock:
            self._frames.extend((f, reply_id) for f in frames)

    def next_frame(self) -> tuple[bytes, int | None]:
        """The next frame to send and, if it is a reply's first frame, that reply's id."""
        with self._lock:
            if not self._frames:
                return self._silence, None
            frame, reply_id = self._frames.popleft()
            self.frames_sent += 1
            if reply_id not in self._started:
                self._started.add(reply_id)
                return frame, reply_id
            return frame, None

    def clear(self) -> int:
        """Drop everything queued (barge-in); returns the frames dropped."""
        with self._lock:
            dropped = len(self._frames)
            self._frames.clear()
            self.frames_dropped += dropped
            return dropped

    @property
    def speaking(self) -> bool:
        """True while agent audio is queued."""
        return bool(self._frames)

    @property
    def queued_ms(self) -> int:
        """Milliseconds of audio waiting to be sent."""
        return len(self._frames) * 20
