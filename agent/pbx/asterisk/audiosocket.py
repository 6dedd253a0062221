"""AudioSocket for Asterisk: a pure frame codec first, then an asyncio TCP server.

Wire format: ``kind:u8, length:u16 big-endian, payload``. The app side may only send audio
kinds and 0x00; Asterisk hangs the call up on 0xFF, 0x03, unknown kinds and zero-length audio
(see ``shared/fixtures/asterisk/audiosocket/README.md``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
import uuid as uuid_mod
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from enum import IntEnum

from agent.errors import ProtocolError
from agent.pbx.tcp import TcpServerBase

_LOGGER = logging.getLogger(__name__)

HEADER_BYTES = 3
DEFAULT_MAX_PAYLOAD = 16384
MAX_WIRE_PAYLOAD = 0xFFFF
_HEADER = struct.Struct("!BH")
_READ_CHUNK = 65536


class Kind(IntEnum):
    """AudioSocket frame kinds (``enum ast_audiosocket_msg_kind`` in res_audiosocket)."""

    HANGUP = 0x00
    UUID = 0x01
    DTMF = 0x03
    AUDIO_8K = 0x10
    AUDIO_12K = 0x11
    AUDIO_16K = 0x12
    AUDIO_24K = 0x13
    AUDIO_32K = 0x14
    AUDIO_44K = 0x15
    AUDIO_48K = 0x16
    AUDIO_96K = 0x17
    AUDIO_192K = 0x18
    ERROR = 0xFF


_RATE_BY_KIND: dict[Kind, int] = {
    Kind.AUDIO_8K: 8000,
    Kind.AUDIO_12K: 12000,
    Kind.AUDIO_16K: 16000,
    Kind.AUDIO_24K: 24000,
    Kind.AUDIO_32K: 32000,
    Kind.AUDIO_44K: 44100,
    Kind.AUDIO_48K: 48000,
    Kind.AUDIO_96K: 96000,
    Kind.AUDIO_192K: 192000,
}
_KIND_BY_RATE: dict[int, Kind] = {rate: kind for kind, rate in _RATE_BY_KIND.items()}
_KNOWN_KINDS = frozenset(int(k) for k in Kind)


def rate_for_kind(kind: int) -> int | None:
    """Return the sample rate in Hz of an audio kind, or None for a non-audio kind."""
    try:
        return _RATE_BY_KIND.get(Kind(kind))
    except ValueError:
        return None


def audio_kind_for_rate(rate_hz: int) -> Kind:
    """Return the audio kind that carries slin at ``rate_hz``; ValueError if there is none."""
    try:
        return _KIND_BY_RATE[rate_hz]
    except KeyError:
        raise ValueError(f"no AudioSocket audio kind for rate {rate_hz} Hz") from None


def is_audio_kind(kind: int) -> bool:
    """Return True for the slin audio kinds 0x10..0x18."""
    return rate_for_kind(kind) is not None


@dataclass(frozen=True)
class AudioSocketFrame:
    """One AudioSocket frame: its kind and raw payload."""

    kind: Kind
    payload: bytes

    @property
    def is_audio(self) -> bool:
        """True for slin audio frames (0x10..0x18)."""
        return is_audio_kind(self.kind)

    @property
    def rate_hz(self) -> int | None:
        """Sample rate of an audio frame, None for other kinds."""
        return rate_for_kind(self.kind)

    @property
    def uuid(self) -> uuid_mod.UUID:
        """The UUID carried by a UUID frame."""
        if self.kind != Kind.UUID:
            raise ValueError(f"AudioSocket frame kind 0x{self.kind:02x} carries no UUID")
        return uuid_mod.UUID(bytes=self.payload)

    @property
    def digit(self) -> str:
        """The ASCII DTMF digit carried by a DTMF frame."""
        if self.kind != Kind.DTMF:
            raise ValueError(f"AudioSocket frame kind 0x{self.kind:02x} carries no digit")
        return self.payload.decode("ascii", errors="replace")


def _check_header(kind_byte: int, length: int, max_payload: int) -> Kind:
    """Validate a frame header and return its kind."""
    if kind_byte not in _KNOWN_KINDS:
        raise ProtocolError(f"unknown AudioSocket frame kind 0x{kind_byte:02x}")
    if length > max_payload:
        raise ProtocolError(f"AudioSocket payload length {length} exceeds limit {max_payload}")
    kind = Kind(kind_byte)
    if kind == Kind.UUID and length != 16:
        raise ProtocolError(f"AudioSocket UUID frame must carry 16 bytes, got {length}")
    if kind == Kind.DTMF and length != 1:
        raise ProtocolError(f"AudioSocket DTMF frame must carry 1 byte, got {length}")
    if length == 0 and is_audio_kind(kind):
        raise ProtocolError("AudioSocket audio frame has length 0")
    return kind


def serialize_frame(frame: AudioSocketFrame) -> bytes:
    """Encode a frame as ``kind, length (u16 BE), payload``."""
    length = len(frame.payload)
    if length > MAX_WIRE_PAYLOAD:
        raise ValueError(f"AudioSocket payload length {length} exceeds limit {MAX_WIRE_PAYLOAD}")
    if length == 0 and is_audio_kind(frame.kind):
        raise ValueError("AudioSocket audio frame has length 0")
    return _HEADER.pack(int(frame.kind), length) + frame.payload


def audio_frame(pcm: bytes, rate: int = 8000) -> bytes:
    """Encode one slin audio frame of the kind that matches ``rate``."""
    return serialize_frame(AudioSocketFrame(audio_kind_for_rate(rate), bytes(pcm)))


def hangup_frame() -> bytes:
    """Encode the 0x00 hangup frame (``00 00 00``)."""
    return serialize_frame(AudioSocketFrame(Kind.HANGUP, b""))


def uuid_frame(value: uuid_mod.UUID) -> bytes:
    """Encode the UUID frame Asterisk sends first (``01 00 10`` + 16 raw bytes)."""
    return serialize_frame(AudioSocketFrame(Kind.UUID, value.bytes))


def dtmf_frame(digit: str) -> bytes:
    """Encode a DTMF frame as Asterisk sends it (``03 00 01 <ascii digit>``)."""
    if len(digit) != 1:
        raise ValueError(f"DTMF digit must be one character, got {digit!r}")
    return serialize_frame(AudioSocketFrame(Kind.DTMF, digit.encode("ascii")))


def parse_frame(
    buf: bytes | bytearray | memoryview, max_payload: int = DEFAULT_MAX_PAYLOAD
) -> tuple[AudioSocketFrame | None, int]:
    """Decode one frame from the start of ``buf``; ``(None, 0)`` when more bytes are needed."""
    if len(buf) < HEADER_BYTES:
        return None, 0
    kind_byte, length = _HEADER.unpack_from(buf, 0)
    kind = _check_header(kind_byte, length, max_payload)
    end = HEADER_BYTES + length
    if len(buf) < end:
        return None, 0
    return AudioSocketFrame(kind, bytes(buf[HEADER_BYTES:end])), end


class FrameDecoder:
    """Incremental decoder: feed it TCP chunks, get whole frames back."""

    def __init__(self, max_payload: int = DEFAULT_MAX_PAYLOAD) -> None:
        self.max_payload = max_payload
        self._buf = bytearray()

    @property
    def pending_bytes(self) -> int:
        """Bytes held that do not yet make a whole frame."""
        return len(self._buf)

    def feed(self, data: bytes) -> list[AudioSocketFrame]:
        """Add bytes and return every frame completed by them."""
        self._buf += data
        frames: list[AudioSocketFrame] = []
        offset = 0
        view = memoryview(self._buf)
        try:
            while True:
                frame, used = parse_frame(view[offset:], self.max_payload)
                if frame is None:
                    break
                frames.append(frame)
                offset += used
        finally:
            view.release()
        del self._buf[:offset]
        return frames

    def close(self) -> None:
        """Signal end of stream; raise ProtocolError if a partial frame is left."""
        held = len(self._buf)
        if held == 0:
            return
        if held < HEADER_BYTES:
            raise ProtocolError(f"truncated AudioSocket header: {held} of {HEADER_BYTES} bytes")
        _, length = _HEADER.unpack_from(self._buf, 0)
        raise ProtocolError(f"truncated AudioSocket frame: {held} of {HEADER_BYTES + length} bytes")


@dataclass
class AudioSocketStats:
    """Counters kept by an AudioSocketServer."""

    accepted: int = 0
    connected: int = 0
    rejected_unknown_uuid: int = 0
    malformed: int = 0
    uuid_timeouts: int = 0
    closed_before_uuid: int = 0
    handler_errors: int = 0


class AudioSocketConnection:
    """One accepted AudioSocket connection, owned by the handler it was given to."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        max_payload: int = DEFAULT_MAX_PAYLOAD,
        send_timeout_s: float = 2.0,
    ) -> None:
        self._reader = reader
        self._writer = writer
        self._decoder = FrameDecoder(max_payload)
        self._pending: deque[AudioSocketFrame] = deque()
        self._eof = False
        self._closed = False
        self._send_timeout_s = send_timeout_s
        self._rate_known = False
        self.uuid: uuid_mod.UUID | None = None
        self.rate_hz = 8000

    @property
    def closed(self) -> bool:
        """True once the connection was closed by either side."""
        return self._closed

    @property
    def peer_eof(self) -> bool:
        """True once Asterisk closed its side (caller hangup or Asterisk-side timeout)."""
        return self._eof

    async def read_frame(self, timeout_s: float | None) -> AudioSocketFrame | None:
        """Return the next frame from Asterisk, or None at EOF; TimeoutError after timeout_s."""
        async with asyncio.timeout(timeout_s):
            while not self._pending:
                if self._eof or self._closed:
                    return None
                # read() is cancel-safe: bytes are consumed only when it returns.
                data = await self._reader.read(_READ_CHUNK)
                if not data:
                    self._eof = True
                    self._decoder.close()
                    return None
                self._pending.extend(self._decoder.feed(data))
        frame = self._pending.popleft()
        if frame.is_audio and not self._rate_known:
            self.rate_hz = rate_for_kind(frame.kind) or self.rate_hz
            self._rate_known = True
        return frame

    async def _write(self, data: bytes) -> None:
        """Write bytes and drain, with the send timeout."""
        if self._closed:
            raise ConnectionError("AudioSocket connection is closed")
        self._writer.write(data)
        await asyncio.wait_for(self._writer.drain(), self._send_timeout_s)

    async def send_audio(self, pcm: bytes) -> None:
        """Send one slin frame of the connection's rate kind and drain (no pacing here)."""
        if not pcm:
            raise ValueError("AudioSocket audio frame has length 0")
        await self._write(audio_frame(pcm, self.rate_hz))

    async def send_hangup(self) -> None:
        """Send the 0x00 hangup frame, then close; Asterisk's AudioSocket() returns 0."""
        try:
            await self._write(hangup_frame())
        except (ConnectionError, TimeoutError) as exc:
            _LOGGER.debug("AudioSocket %s: hangup frame not delivered: %s", self.uuid, exc)
        finally:
            self.close()

    def close(self) -> None:
        """Close the socket (without a 0x00 frame); safe to call twice."""
        if self._closed:
            return
        self._closed = True
        self._writer.close()

    async def wait_closed(self, timeout_s: float = 1.0) -> None:
        """Wait, bounded, until the transport is really closed."""
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._writer.wait_closed(), timeout_s)


AudioSocketHandler = Callable[[AudioSocketConnection], Awaitable[None]]


class AudioSocketServer(TcpServerBase):
    """Asyncio AudioSocket server that hands each registered UUID's connection to its handler."""

    kind = "AudioSocket"

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 9092,
        uuid_timeout_s: float = 2.0,
        *,
        max_payload: int = DEFAULT_MAX_PAYLOAD,
        send_timeout_s: float = 2.0,
    ) -> None:
        super().__init__(host, port)
        self.uuid_timeout_s = uuid_timeout_s
        self.max_payload = max_payload
        self.send_timeout_s = send_timeout_s
        self.stats = AudioSocketStats()
        self._handlers: dict[uuid_mod.UUID, AudioSocketHandler] = {}

    def register(self, uuid: uuid_mod.UUID, handler: AudioSocketHandler) -> None:
        """Accept one connection for ``uuid`` and give it to ``handler``."""
        if uuid in self._handlers:
            raise ValueError(f"AudioSocket UUID {uuid} is already registered")
        self._handlers[uuid] = handler

    def unregister(self, uuid: uuid_mod.UUID) -> None:
        """Forget ``uuid`` if it has not connected yet."""
        self._handlers.pop(uuid, None)

    @property
    def pending_uuids(self) -> frozenset[uuid_mod.UUID]:
        """UUIDs registered and not yet connected."""
        return frozenset(self._handlers)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.stats.accepted += 1
        peer = writer.get_extra_info("peername")
        conn = AudioSocketConnection(
            reader, writer, max_payload=self.max_payload, send_timeout_s=self.send_timeout_s
        )
        try:
            try:
                first = await conn.read_frame(self.uuid_timeout_s)
            except TimeoutError:
                self.stats.uuid_timeouts += 1
                _LOGGER.warning(
                    "AudioSocket %s: no UUID frame within %.1f s, closing",
                    peer,
                    self.uuid_timeout_s,
                )
                return
            except ProtocolError as exc:
                self.stats.malformed += 1
                _LOGGER.warning("AudioSocket %s: malformed first frame (%s), closing", peer, exc)
                return
            if first is None:
                self.stats.closed_before_uuid += 1
                _LOGGER.info("AudioSocket %s: closed before sending a UUID", peer)
                return
            if first.kind != Kind.UUID:
                self.stats.malformed += 1
                _LOGGER.warning(
                    "AudioSocket %s: first frame is kind 0x%02x, not UUID, closing",
                    peer,
                    first.kind,
                )
                return
            handler = self._handlers.pop(first.uuid, None)
            if handler is None:
                self.stats.rejected_unknown_uuid += 1
                _LOGGER.warning(
                    "AudioSocket %s: UUID %s is not registered, closing", peer, first.uuid
                )
                return
            conn.uuid = first.uuid
            self.stats.connected += 1
            try:
                await handler(conn)
            except Exception:
                self.stats.handler_errors += 1
                _LOGGER.exception("AudioSocket %s: handler failed", conn.uuid)
        finally:
            conn.close()
            await conn.wait_closed()
