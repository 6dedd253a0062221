"""Unicast frame rules, checked against FreeSWITCH 1.10.12 UDP recordings."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fixtures_path import FIXTURES

from agent.errors import ProtocolError
from agent.pbx.freeswitch.unicast import (
    frame_bytes_for_rate,
    is_filler,
    normalize_inbound,
    silence,
)

UNICAST = FIXTURES / "freeswitch" / "unicast"

# (capture, direction, payload file suffix)
RECORDED = [
    ("01_l16_8k_paced", "fs_to_server", "l16"),
    ("01_l16_8k_paced", "server_to_fs", "l16"),
    ("07_g722_16k", "fs_to_server", "l16"),
    ("08_native_pcmu", "fs_to_server", "pcmu"),
    ("08_native_pcmu", "server_to_fs", "pcmu"),
]


def _datagrams(name: str, direction: str, suffix: str) -> list[tuple[dict[str, object], bytes]]:
    """Index rows whose payload was kept, with that payload."""
    payloads = (UNICAST / f"{name}.{direction}.{suffix}").read_bytes()
    rows = [json.loads(line) for line in (UNICAST / f"{name}.{direction}.index.jsonl").open()]
    out = []
    for row in rows:
        off, length = row.get("off"), row["len"]
        if isinstance(off, int) and isinstance(length, int) and off + length <= len(payloads):
            out.append((row, payloads[off : off + length]))
    return out


def test_frame_bytes_for_rate() -> None:
    assert frame_bytes_for_rate(8000) == 320
    assert frame_bytes_for_rate(16000) == 640
    for rate in (0, 11025, 48000):
        with pytest.raises(ValueError) as err:
            frame_bytes_for_rate(rate)
        assert str(err.value) == f"no unicast L16 frame size for rate {rate} Hz"


@pytest.mark.parametrize(("name", "direction", "suffix"), RECORDED)
def test_is_filler_agrees_with_recorded_flags(name: str, direction: str, suffix: str) -> None:
    datagrams = _datagrams(name, direction, suffix)
    assert len(datagrams) >= 100
    fillers = 0
    for row, payload in datagrams:
        assert len(payload) == row["len"]
        assert is_filler(payload) == bool(row.get("all_0xFF")), row
        fillers += is_filler(payload)
    if direction == "fs_to_server":
        # Every capture starts with a few filler frames before caller RTP arrives.
        assert 2 <= fillers <= 4
    else:
        assert fillers == 0


@pytest.mark.parametrize(("name", "rate_hz"), [("01_l16_8k_paced", 8000), ("07_g722_16k", 16000)])
def test_normalize_recorded_l16(name: str, rate_hz: int) -> None:
    frame_bytes = frame_bytes_for_rate(rate_hz)
    for row, payload in _datagrams(name, "fs_to_server", "l16"):
        frame = normalize_inbound(payload, frame_bytes)
        assert len(frame) == frame_bytes
        if row.get("all_0xFF"):
            assert frame == bytes(frame_bytes)
        else:
            assert frame == payload


def test_is_filler_edges() -> None:
    assert not is_filler(b"")
    assert is_filler(b"\xff")
    assert not is_filler(b"\xff" * 319 + b"\xfe")
    assert not is_filler(bytes(320))


def test_normalize_inbound() -> None:
    voice = bytes(range(256)) + bytes(64)
    assert normalize_inbound(voice, 320) is voice
    assert normalize_inbound(b"\xff" * 320, 320) == silence(320) == bytes(320)
    # Native-mode fillers stay 320 bytes while frames are 160: still silence of the frame size.
    assert normalize_inbound(b"\xff" * 320, 160) == bytes(160)
    with pytest.raises(ProtocolError) as err:
        normalize_inbound(bytes(160), 320)
    assert str(err.value) == "unicast datagram of 160 bytes, expected 320-byte L16 frames"
    with pytest.raises(ProtocolError) as err:
        normalize_inbound(b"", 640)
    assert str(err.value) == "unicast datagram of 0 bytes, expected 640-byte L16 frames"


def test_recorded_paths_exist() -> None:
    for name, direction, suffix in RECORDED:
        assert Path(UNICAST / f"{name}.{direction}.{suffix}").exists()
