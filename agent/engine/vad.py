"""Frame-level voice activity detection with webrtcvad."""

from __future__ import annotations

import logging

_LOGGER = logging.getLogger(__name__)

_RATES_HZ = (8000, 16000, 32000, 48000)
_NATIVE_FRAME_MS = (10, 20, 30)


class FrameVad:
    """Speech/non-speech decision for PCM16 mono frames; one instance per call (stateful)."""

    def __init__(self, rate_hz: int, aggressiveness: int = 2) -> None:
        import webrtcvad

        if rate_hz not in _RATES_HZ:
            raise ValueError(f"VAD rate must be one of {_RATES_HZ}, got {rate_hz}")
        if not 0 <= aggressiveness <= 3:
            raise ValueError(f"VAD aggressiveness must be 0..3, got {aggressiveness}")
        self.rate_hz = rate_hz
        self._bytes_per_10ms = rate_hz // 100 * 2
        self._vad = webrtcvad.Vad(aggressiveness)

    def is_speech(self, frame: bytes) -> bool:
        """True if the frame holds speech: 10/20/30 ms, or a multiple of 10 ms by majority vote."""
        size = len(frame)
        step = self._bytes_per_10ms
        if size == 0 or size % step:
            raise ValueError(
                f"VAD frame must be a multiple of 10 ms ({step} bytes at {self.rate_hz} Hz), "
                f"got {size} bytes"
            )
        if size // step * 10 in _NATIVE_FRAME_MS:
            return bool(self._vad.is_speech(frame, self.rate_hz))
        votes = sum(
            bool(self._vad.is_speech(frame[pos : pos + step], self.rate_hz))
            for pos in range(0, size, step)
        )
        return votes * 2 >= size // step
