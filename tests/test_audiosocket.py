"""AudioSocket codec and server, checked against Asterisk 22.10.1 recordings."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import pytest
from fixtures_path import FIXTURES

from agent.errors import ProtocolError
from agent.pbx.asterisk.audiosocket import (
    AudioSocketConnection,
    AudioSocketFrame,
    AudioSocketServer,
    FrameDecoder,
    Kind,
    audio_frame,
    audio_kind_for_rate,
    hangup_frame,
    parse_frame,
    rate_for_kind,
    serialize_frame,
)

AS = FIXTURES / "asterisk" / "audiosocket"
T = TypeVar("T")


def run(coro: Awaitable[T], timeout_s: float = 10.0) -> T:
    """Run a coroutine on a fresh loop with an overall timeout."""

    async def bounded() -> T:
        return await asyncio.wait_for(coro, timeout_s)

    return asyncio.run(bounded())


# --- codec -----------------------------------------------------------------------------


def test_kinds_and_rates() -> None:
    assert rate_for_kind(Kind.AUDIO_8K) == 8000
    assert rate_for_kind(0x12) == 16000
    assert rate_for_kind(0x15) == 44100
    assert rate_for_kind(0x18) == 192000
    assert rate_for_kind(Kind.DTMF) is None
    assert rate_for_kind(0x42) is None
    assert audio_kind_for_rate(8000) == Kind.AUDIO_8K
    assert audio_kind_for_rate(16000) == 0x12
    with pytest.raises(ValueError):
        audio_kind_for_rate(11025)


@pytest.mark.parametrize(
    "frame",
    [
        AudioSocketFrame(Kind.HANGUP, b""),
        AudioSocketFrame(Kind.UUID, uuid.UUID("6b0a7c55-3f1d-4a8e-9c2b-1d5e7f9a0b21").bytes),
        AudioSocketFrame(Kind.DTMF, b"#"),
        AudioSocketFrame(Kind.AUDIO_8K, bytes(range(256)) + b"\x01" * 64),
        AudioSocketFrame(Kind.AUDIO_16K, b"\x00\x80" * 320),
        AudioSocketFrame(Kind.ERROR, b"\x02"),
    ],
)
def test_round_trip(frame: AudioSocketFrame) -> None:
    wire = serialize_frame(frame)
    assert wire[0] == frame.kind
    assert int.from_bytes(wire[1:3], "big") == len(frame.payload)
    assert parse_frame(wire) == (frame, len(wire))
    assert parse_frame(wire + b"\x10\x00") == (frame, len(wire))


def test_helpers() -> None:
    assert hangup_frame() == b"\x00\x00\x00"
    assert audio_frame(b"\x01\x02") == b"\x10\x00\x02\x01\x02"
    assert audio_frame(b"\x01\x02", rate=16000) == b"\x12\x00\x02\x01\x02"
    u = uuid.uuid4()
    frame, _ = parse_frame(b"\x01\x00\x10" + u.bytes)
    assert frame is not None and frame.uuid == u
    frame, _ = parse_frame(b"\x03\x00\x01\x31")
    assert frame is not None and frame.digit == "1"
    with pytest.raises(ValueError):
        serialize_frame(AudioSocketFrame(Kind.AUDIO_8K, b""))


def test_needs_more_bytes() -> None:
    wire = audio_frame(b"\x00" * 320)
    for cut in range(len(wire)):
        assert parse_frame(wire[:cut]) == (None, 0)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"\x42\x00\x00", "unknown AudioSocket frame kind 0x42"),
        (b"\x05\x00\x01\x00", "unknown AudioSocket frame kind 0x05"),
        (b"\x10\x9c\x40", "AudioSocket payload length 40000 exceeds limit 16384"),
        (b"\x01\x00\x05abcde", "AudioSocket UUID frame must carry 16 bytes, got 5"),
        (b"\x10\x00\x00", "AudioSocket audio frame has length 0"),
        (b"\x03\x00\x02ab", "AudioSocket DTMF frame must carry 1 byte, got 2"),
    ],
)
def test_parse_errors(data: bytes, message: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_frame(data)
    assert str(info.value) == message
    assert isinstance(info.value, ProtocolError)
    with pytest.raises(ProtocolError, match=message):
        FrameDecoder().feed(data)


def test_over_long_length_fails_on_header_alone() -> None:
    with pytest.raises(ProtocolError, match="exceeds limit 1000"):
        FrameDecoder(max_payload=1000).feed(b"\x10\x03\xe9")


def test_decoder_truncation_messages() -> None:
    decoder = FrameDecoder()
    assert decoder.feed(b"\x10\x00") == []
    with pytest.raises(ValueError) as info:
        decoder.close()
    assert str(info.value) == "truncated AudioSocket header: 2 of 3 bytes"
    decoder = FrameDecoder()
    assert decoder.feed(b"\x10\x01\x40" + b"\x00" * 7) == []
    with pytest.raises(ProtocolError) as info2:
        decoder.close()
    assert str(info2.value) == "truncated AudioSocket frame: 10 of 323 bytes"
    FrameDecoder().close()


# --- recorded streams ------------------------------------------------------------------


def read_tsv(path: Path) -> list[dict[str, str]]:
    """Rows of an audiosocket.frames.tsv (comments and notes skipped)."""
    rows: list[dict[str, str]] = []
    header: list[str] | None = None
    for line in path.read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        cells = line.split("\t")
        if header is None:
            header = cells
            continue
        row = dict(zip(header, cells, strict=False))
        if row["dir"] in ("A>S", "S>A"):
            rows.append(row)
    return rows


def decode_chunked(data: bytes, chunk: int) -> list[AudioSocketFrame]:
    decoder = FrameDecoder()
    frames: list[AudioSocketFrame] = []
    for start in range(0, len(data), chunk):
        frames += decoder.feed(data[start : start + chunk])
    decoder.close()
    return frames


STREAMS = [
    ("caller_speech_dtmf_hangup", "from_asterisk", "A>S"),
    ("caller_speech_dtmf_hangup", "to_asterisk", "S>A"),
    ("channel_driver/slin16_caller_speech_dtmf_hangup", "from_asterisk", "A>S"),
    ("../fastagi/a_full_session", "from_asterisk", "A>S"),
    ("../fastagi/a_full_session", "to_asterisk", "S>A"),
]


@pytest.mark.parametrize(("case", "direction", "tsv_dir"), STREAMS)
def test_recorded_stream_parses_fully(case: str, direction: str, tsv_dir: str) -> None:
    folder = (AS / case).resolve()
    raw = (folder / f"audiosocket.{direction}.raw").read_bytes()
    rows = [r for r in read_tsv(folder / "audiosocket.frames.tsv") if r["dir"] == tsv_dir]
    summary = json.loads((folder / "audiosocket.summary.json").read_text())

    frames = decode_chunked(raw, len(raw) or 1)
    assert decode_chunked(raw, 7) == frames
    assert decode_chunked(raw, 1000) == frames

    assert len(frames) == len(rows)
    offset = 0
    for frame, row in zip(frames, rows, strict=True):
        assert int(row["offset"]) == offset
        assert int(row["kind"], 16) == frame.kind
        assert int(row["len"]) == len(frame.payload)
        offset += 3 + len(frame.payload)
    assert offset == len(raw)

    kinds = Counter(f"0x{f.kind:02x}" for f in frames)
    assert dict(kinds) == summary[f"{direction}_kinds"]
    sizes = Counter(f"0x{f.kind:02x}/{len(f.payload)}" for f in frames if f.is_audio)
    assert dict(sizes) == summary[f"{direction}_sizes"]

    if direction == "from_asterisk":
        assert frames[0].kind == Kind.UUID
        assert str(frames[0].uuid) == summary["uuid"]
        digits = "".join(f.digit for f in frames if f.kind == Kind.DTMF)
        assert digits == summary["dtmf"]
        assert summary["from_asterisk_frames"] == sum(1 for f in frames if f.is_audio)

    assert b"".join(serialize_frame(f) for f in frames) == raw


def test_channel_driver_is_slin16() -> None:
    raw = AS / "channel_driver/slin16_caller_speech_dtmf_hangup/audiosocket.from_asterisk.raw"
    frames = decode_chunked(raw.read_bytes(), 4096)
    audio = [f for f in frames if f.is_audio]
    assert {f.kind for f in audio} == {Kind.AUDIO_16K}
    assert {len(f.payload) for f in audio} == {640}
    assert {f.rate_hz for f in audio} == {16000}


# --- server ----------------------------------------------------------------------------


async def connect(server: AudioSocketServer) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.wait_for(asyncio.open_connection("127.0.0.1", server.port), 2.0)


async def read_until_eof(reader: asyncio.StreamReader) -> bytes:
    return await asyncio.wait_for(reader.read(), 3.0)


async def with_server(
    body: Callable[[AudioSocketServer], Awaitable[T]], uuid_timeout_s: float = 2.0
) -> T:
    server = AudioSocketServer(port=0, uuid_timeout_s=uuid_timeout_s)
    await server.start()
    try:
        return await body(server)
    finally:
        await server.close()


def test_port_zero_gets_a_real_port() -> None:
    async def body(server: AudioSocketServer) -> int:
        return server.port

    assert run(with_server(body)) > 0


def test_unknown_uuid_is_refused_and_counted() -> None:
    async def body(server: AudioSocketServer) -> bytes:
        server.register(uuid.uuid4(), _never_called)
        reader, writer = await connect(server)
        writer.write(b"\x01\x00\x10" + uuid.uuid4().bytes + audio_frame(b"\x00" * 320))
        data = await read_until_eof(reader)
        writer.close()
        assert server.stats.rejected_unknown_uuid == 1
        assert server.stats.connected == 0
        return data

    assert run(with_server(body)) == b""


async def _never_called(conn: AudioSocketConnection) -> None:
    raise AssertionError("handler must not run")


@pytest.mark.parametrize(
    "first",
    [
        b"GET / HTTP/1.1\r\n\r\n",
        b"\x42\x00\x00",
        b"\x01\x00\x05abcde",
        audio_frame(b"\x00" * 320),
    ],
)
def test_garbage_first_frame_is_malformed(first: bytes) -> None:
    async def body(server: AudioSocketServer) -> None:
        reader, writer = await connect(server)
        writer.write(first)
        assert await read_until_eof(reader) == b""
        writer.close()
        assert server.stats.malformed == 1
        assert server.stats.rejected_unknown_uuid == 0

    run(with_server(body))


def test_silent_peer_times_out() -> None:
    async def body(server: AudioSocketServer) -> None:
        reader, writer = await connect(server)
        assert await read_until_eof(reader) == b""
        writer.close()
        assert server.stats.uuid_timeouts == 1

    run(with_server(body, uuid_timeout_s=0.2))


def test_registered_uuid_reaches_handler_with_rate() -> None:
    call_id = uuid.uuid4()
    seen: dict[str, object] = {}

    async def handler(conn: AudioSocketConnection) -> None:
        seen["uuid"] = conn.uuid
        seen["rate_before"] = conn.rate_hz
        first = await conn.read_frame(2.0)
        assert first is not None
        seen["rate"] = conn.rate_hz
        dtmf = await conn.read_frame(2.0)
        assert dtmf is not None
        seen["digit"] = dtmf.digit
        await conn.send_audio(b"\x01\x00" * 320)
        await conn.send_hangup()
        seen["closed"] = conn.closed

    async def body(server: AudioSocketServer) -> bytes:
        server.register(call_id, handler)
        reader, writer = await connect(server)
        # Split the stream mid-header to exercise reassembly.
        stream = b"\x01\x00\x10" + call_id.bytes + audio_frame(b"\x00" * 640, 16000)
        stream += b"\x03\x00\x01\x35"
        writer.write(stream[:20])
        await writer.drain()
        await asyncio.sleep(0.01)
        writer.write(stream[20:])
        data = await read_until_eof(reader)
        writer.close()
        # A UUID is good for one connection only.
        reader2, writer2 = await connect(server)
        writer2.write(b"\x01\x00\x10" + call_id.bytes)
        assert await read_until_eof(reader2) == b""
        writer2.close()
        assert server.stats.connected == 1
        assert server.stats.rejected_unknown_uuid == 1
        return data

    data = run(with_server(body))
    assert seen == {
        "uuid": call_id,
        "rate_before": 8000,
        "rate": 16000,
        "digit": "5",
        "closed": True,
    }
    assert data == b"\x12\x02\x80" + b"\x01\x00" * 320 + b"\x00\x00\x00"


def test_caller_hangup_is_eof_and_timeouts_lose_nothing() -> None:
    call_id = uuid.uuid4()
    results: list[object] = []
    done = asyncio.Event()

    async def handler(conn: AudioSocketConnection) -> None:
        try:
            with pytest.raises(TimeoutError):
                await conn.read_frame(0.1)
            results.append(await conn.read_frame(2.0))
            results.append(await conn.read_frame(2.0))
            results.append(conn.peer_eof)
        finally:
            done.set()

    async def body(server: AudioSocketServer) -> None:
        server.register(call_id, handler)
        reader, writer = await connect(server)
        frame = audio_frame(b"\x07" * 320)
        writer.write(b"\x01\x00\x10" + call_id.bytes + frame[:10])
        await writer.drain()
        await asyncio.sleep(0.3)
        writer.write(frame[10:])
        await writer.drain()
        writer.close()
        await asyncio.wait_for(done.wait(), 3.0)

    run(with_server(body))
    assert results == [AudioSocketFrame(Kind.AUDIO_8K, b"\x07" * 320), None, True]


def test_unregister_and_handler_error_counted() -> None:
    gone, bad = uuid.uuid4(), uuid.uuid4()

    async def failing(conn: AudioSocketConnection) -> None:
        raise RuntimeError("boom")

    async def body(server: AudioSocketServer) -> None:
        server.register(gone, _never_called)
        server.unregister(gone)
        server.register(bad, failing)
        for call_id in (gone, bad):
            reader, writer = await connect(server)
            writer.write(b"\x01\x00\x10" + call_id.bytes)
            assert await read_until_eof(reader) == b""
            writer.close()
        assert server.stats.rejected_unknown_uuid == 1
        assert server.stats.handler_errors == 1

    run(with_server(body))
