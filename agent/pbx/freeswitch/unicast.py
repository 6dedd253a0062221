"""FreeSWITCH unicast audio: the framing of the raw UDP datagrams, no sockets here.

Without ``flags: native`` each datagram is one 20 ms frame of raw L16 (signed 16-bit little-endian,
mono, no header) at the channel's read rate: 320 bytes at 8 kHz, 640 bytes at 16 kHz (G.722).
Whenever no caller RTP is available for a tick FreeSWITCH sends a frame of all 0xFF bytes instead
(``shared/fixtures/freeswitch/unicast/``); it means "no caller audio" and is treated as silence.
Audio sent back must be the same format and size, one frame every 20 ms.
"""

from __future__ import annotations

from agent.errors import ProtocolError

FRAME_MS = 20
SAMPLE_BYTES = 2
_FRAME_BYTES_BY_RATE = {8000: 320, 16000: 640}


def frame_bytes_for_rate(rate_hz: int) -> int:
    """Bytes in one 20 ms L16 mono frame at ``rate_hz`` (8000 → 320, 16000 → 640)."""
    try:
        return _FRAME_BYTES_BY_RATE[rate_hz]
    except KeyError:
        raise ValueError(f"no unicast L16 frame size for rate {rate_hz} Hz") from None


def is_filler(payload: bytes) -> bool:
    """True for FreeSWITCH's no-caller-audio frame: non-empty and every byte 0xFF."""
    return bool(payload) and payload.count(0xFF) == len(payload)


def silence(frame_bytes: int) -> bytes:
    """One frame of L16 silence (zeros)."""
    return bytes(frame_bytes)


def normalize_inbound(payload: bytes, frame_bytes: int) -> bytes:
    """Return a caller frame as L16: filler becomes zeros; any other size is a ProtocolError."""
    if is_filler(payload):
        return silence(frame_bytes)
    if len(payload) != frame_bytes:
        raise ProtocolError(
            f"unicast datagram of {len(payload)} bytes, expected {frame_bytes}-byte L16 frames"
        )
    return payload
