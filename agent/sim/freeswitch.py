"""The simulator's FreeSWITCH side: a fake that runs ``socket 127.0.0.1:8084 async full``.

Behaviour follows the FreeSWITCH 1.10.12 recordings in ``shared/fixtures/freeswitch/``: the
fake dials the agent's outbound-ESL port, waits for ``connect``, answers with one URL-encoded
CHANNEL_DATA header block laid out like esl-outbound/01 (``Content-Type: command/reply`` ...
``Control: full`` last), replies to commands with the recorded texts, emits the recorded events
(when ``myevents``/``event`` enabled them) and the ``text/disconnect-notice`` messages, and
plays the unicast media leg:

* FreeSWITCH -> agent: one raw L16 datagram per 20 ms tick (320 B at 8 kHz, 640 B at 16 kHz)
  from FreeSWITCH's local-port to the agent's remote-port, in real time. Ticks with no caller
  audio carry an all-0xFF filler frame; the first ticks follow the recorded start pattern
  (unicast/01: fillers at frames 0,1,3,4; unicast/07: 0,2,3).
* agent -> FreeSWITCH: FreeSWITCH does not pace; it plays what is queued in its UDP receive
  buffer one frame per 20 ms. The fake models that buffer as a leaky bucket: each datagram is
  "played" (handed to the caller's ``read_frame``) at ``max(arrival, end of the previous
  frame)``, the queue depth at arrival is recorded (``max_inflight_frames``), and datagrams
  beyond ``udp_buffer_frames`` are dropped as the kernel does (unicast/02: 82 of 250 lost).

The fake never imports gevent: it runs on asyncio in the test/demo process while the agent
under test is its own (gevent) process.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import time
import uuid as uuid_mod
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from email.utils import formatdate
from typing import Any

from agent.errors import ProtocolError
from agent.pbx.freeswitch.esl import (
    EslDecoder,
    serialize_api_response,
    serialize_connect_reply,
    serialize_disconnect_notice,
    serialize_event,
    serialize_linger_notice,
    serialize_reply,
)
from agent.pbx.freeswitch.unicast import frame_bytes_for_rate
from agent.sim.common import next_until_end

_LOGGER = logging.getLogger(__name__)

Clock = Callable[[], float]

FRAME_S = 0.020
AUDIO_KIND = 0x10
FILLER_BYTE = 0xFF
# Seconds between the "+OK" to sendmsg unicast and the first datagram (01: 22 ms, 07: 34 ms).
FIRST_DATAGRAM_DELAY_S = 0.022
# Which of the first ticks carried an all-0xFF filler although the caller was talking.
START_FILLER_PATTERN: dict[int, tuple[bool, ...]] = {
    8000: (True, True, False, True, True),  # unicast/01_l16_8k_paced: frames 0,1,3,4
    16000: (True, False, True, True),  # unicast/07_g722_16k: frames 0,2,3
}
# Caller frames FreeSWITCH holds before it drops the oldest (it reads one per tick).
CALLER_BACKLOG_FRAMES = 5
# Frames of agent audio the UDP receive buffer holds (unicast/02: the caller got 168 of 250).
UDP_BUFFER_FRAMES = 168
# A frame that arrives this fraction of a frame early is not counted as one more in flight.
INFLIGHT_TOLERANCE_FRAMES = 0.1
# CHANNEL_EXECUTE -> CHANNEL_ANSWER for the answer app (01: ~20 ms).
ANSWER_DELAY_S = 0.02
# How long the fake waits, after a caller hangup with `linger` (no timeout), for the agent to
# `exit` or close. FreeSWITCH waits forever; the fake gives up and records an error.
LINGER_WAIT_S = 10.0
COMMAND_NOT_FOUND = "-ERR command not found"
NO_SUCH_CHANNEL = "-ERR No such channel!\n"

CORE_UUID = "d72a9469-1fcb-483a-b3f3-d2aa5bb49ee7"
HOSTNAME = "vm"
IPV4 = "192.0.2.2"
IPV6 = "fd00::2"

_SEQUENCE = itertools.count(478)
_CALL_COUNTER = itertools.count(1)


@dataclass(frozen=True)
class _Codec:
    """What the channel negotiated with the SIP caller, as the connect reply shows it."""

    name: str
    rate_hz: int
    rtp_rate_hz: int
    payload_type: int
    ep_codec_string: str


_CODECS: dict[int, _Codec] = {
    8000: _Codec("PCMU", 8000, 8000, 0, "CORE_PCM_MODULE.PCMU@8000h@20i@64000b"),
    16000: _Codec("G722", 16000, 8000, 9, "mod_spandsp.G722@8000h@20i@64000b"),
}


@dataclass(frozen=True)
class SimEslCommand:
    """One command the agent sent on the ESL socket, decoded."""

    t: float
    line: str
    headers: tuple[tuple[str, str], ...] = ()
    body: str = ""

    @property
    def name(self) -> str:
        """The command word (``connect``, ``sendmsg``, ``api`` ...), lower case."""
        return self.line.split(" ", 1)[0].lower()

    @property
    def args(self) -> str:
        """Everything after the command word."""
        parts = self.line.split(" ", 1)
        return parts[1].strip() if len(parts) > 1 else ""

    def get(self, name: str, default: str | None = None) -> str | None:
        """First header value by case-insensitive name."""
        lname = name.lower()
        for key, value in self.headers:
            if key.lower() == lname:
                return value
        return default


@dataclass(frozen=True)
class SimUnicastFrame:
    """A frame of agent audio as the caller gets it (same surface as an AudioSocket frame)."""

    payload: bytes
    kind: int = AUDIO_KIND

    @property
    def is_audio(self) -> bool:
        """Always True: unicast carries nothing but audio."""
        return True


@dataclass(frozen=True)
class SimDatagram:
    """One datagram the agent sent to FreeSWITCH's unicast port.

    ``t`` is its arrival (injected clock); ``play_t`` when FreeSWITCH plays it to the caller
    (same clock; None when the UDP buffer was full and it was dropped); ``inflight_frames``
    the buffer depth in frames right after it arrived.
    """

    t: float
    payload: bytes
    play_t: float | None
    inflight_frames: int


@dataclass
class SimFsCallResult:
    """What one simulated call saw on the FreeSWITCH side."""

    uuid: str
    rate_hz: int = 8000
    variables: dict[str, str] = field(default_factory=dict)
    commands: list[SimEslCommand] = field(default_factory=list)
    replies: list[str] = field(default_factory=list)
    events_sent: list[str] = field(default_factory=list)
    notices_sent: list[str] = field(default_factory=list)
    apps_executed: list[tuple[str, str]] = field(default_factory=list)
    connected: bool = False
    answered: bool = False
    events_enabled: bool = False
    linger_s: int | None = None
    exited: bool = False
    closed_by_agent: bool = False
    caller_hung_up: bool = False
    agent_hung_up: bool = False
    hangup_cause: str | None = None
    unicast_started: bool = False
    unicast_local: tuple[str, int] | None = None
    unicast_remote: tuple[str, int] | None = None
    frames_sent: int = 0
    fillers_sent: int = 0
    caller_frames_dropped: int = 0
    received: list[SimDatagram] = field(default_factory=list)
    max_inflight_frames: int = 0
    dropped_frames: int = 0
    wrong_size_frames: int = 0
    zero_length_datagram: bool = False
    playback_during_unicast: bool = False
    peer: SimUnicastPeer | None = None
    errors: list[str] = field(default_factory=list)
    error: str | None = None

    @property
    def audio_received(self) -> bytes:
        """All agent audio payloads joined, in arrival order."""
        return b"".join(d.payload for d in self.received)

    def _fail(self, message: str) -> None:
        _LOGGER.warning("sim FreeSWITCH %s: %s", self.uuid, message)
        self.errors.append(message)
        if self.error is None:
            self.error = message


class _UnicastProtocol(asyncio.DatagramProtocol):
    """Hands each datagram from the agent to the unicast session."""

    def __init__(self, on_datagram: Callable[[bytes], None]) -> None:
        self._on_datagram = on_datagram

    def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        self._on_datagram(data)

    def error_received(self, exc: Exception) -> None:
        # ICMP port unreachable once the agent's socket is gone; FreeSWITCH ignores it too.
        _LOGGER.debug("sim unicast: %s", exc)


class SimUnicastPeer:
    """FreeSWITCH's end of one unicast media leg, driven by a caller-media coroutine."""

    def __init__(self, call: _SimFsCall, *, rate_hz: int, clock: Clock) -> None:
        self.uuid = call.result.uuid
        self.rate_hz = rate_hz
        self.frame_bytes = frame_bytes_for_rate(rate_hz)
        self.received: list[SimDatagram] = call.result.received
        self.caller_hung_up = False
        self.end_reason: str | None = None
        self._call = call
        self._clock = clock
        self._loop = asyncio.get_running_loop()
        self._caller_frames: deque[bytes] = deque()
        self._played: asyncio.Queue[SimUnicastFrame | None] = asyncio.Queue()
        self._ended = asyncio.Event()
        self._transport: asyncio.DatagramTransport | None = None
        self._remote: tuple[str, int] = ("127.0.0.1", 0)
        self._send_task: asyncio.Task[None] | None = None
        self._play_end = 0.0
        self._to_caller_dead = False

    @property
    def ended(self) -> bool:
        """True once the unicast leg is torn down."""
        return self._ended.is_set()

    @property
    def audio_received(self) -> bytes:
        """All agent audio payloads joined, in arrival order."""
        return b"".join(d.payload for d in self.received)

    async def _start(self, local: tuple[str, int], remote: tuple[str, int]) -> tuple[str, int]:
        """Bind FreeSWITCH's side and start the 20 ms tick; return the bound address."""
        self._remote = remote
        transport: asyncio.DatagramTransport | None = None
        last_exc: OSError | None = None
        # FreeSWITCH binds local-ip:local-port; if that port is taken (or 0) the fake takes an
        # ephemeral one so parallel simulated calls never collide. Read the result's
        # unicast_local for the port actually bound (datagrams come from it).
        for port in dict.fromkeys((local[1], 0)):
            try:
                transport, _ = await self._loop.create_datagram_endpoint(
                    lambda: _UnicastProtocol(self._on_datagram), local_addr=(local[0], port)
                )
                break
            except OSError as exc:
                last_exc = exc
        if transport is None:
            raise OSError(f"cannot bind unicast local {local[0]}:{local[1]}: {last_exc}")
        self._transport = transport
        bound = transport.get_extra_info("sockname")
        self._send_task = asyncio.create_task(self._send_loop(), name=f"sim-fs-tx-{self.uuid}")
        return str(bound[0]), int(bound[1])

    def _next_frame(self, tick: int) -> bytes:
        pattern = START_FILLER_PATTERN.get(self.rate_hz, ())
        result = self._call.result
        if tick < len(pattern) and pattern[tick]:
            # No caller RTP had made it through yet: a filler, and the late frame is lost.
            if self._caller_frames:
                self._caller_frames.popleft()
                result.caller_frames_dropped += 1
            return bytes([FILLER_BYTE]) * self.frame_bytes
        if self._caller_frames:
            return self._caller_frames.popleft()
        return bytes([FILLER_BYTE]) * self.frame_bytes

    async def _send_loop(self) -> None:
        result = self._call.result
        start = self._loop.time() + FIRST_DATAGRAM_DELAY_S
        tick = 0
        try:
            while not self.ended:
                due = start + tick * FRAME_S
                now = self._loop.time()
                if now - due > 2 * FRAME_S:
                    # The loop stalled: FreeSWITCH's timer skips ticks rather than bursting.
                    start = now - tick * FRAME_S
                    due = now
                await asyncio.sleep(max(0.0, due - now))
                if self.ended or self._transport is None:
                    return
                frame = self._next_frame(tick)
                self._transport.sendto(frame, self._remote)
                result.frames_sent += 1
                if frame[0] == FILLER_BYTE and frame == bytes([FILLER_BYTE]) * len(frame):
                    result.fillers_sent += 1
                tick += 1
        except (OSError, RuntimeError) as exc:
            if not self.ended:
                result._fail(f"unicast send failed: {exc}")

    def _on_datagram(self, data: bytes) -> None:
        result = self._call.result
        now = self._loop.time()
        t = self._clock()
        if self.ended:
            return
        if not data:
            # unicast/06: a zero-length datagram kills the agent->caller direction for good.
            result.zero_length_datagram = True
            self._to_caller_dead = True
            result.received.append(SimDatagram(t, data, None, 0))
            return
        if len(data) != self.frame_bytes:
            result.wrong_size_frames += 1
        duration_s = len(data) / 2 / self.rate_hz
        play_at = max(now, self._play_end)
        queued = math.ceil((play_at - now) / FRAME_S - INFLIGHT_TOLERANCE_FRAMES)
        if queued >= self._call.fake.udp_buffer_frames or self._to_caller_dead:
            if not self._to_caller_dead:
                result.dropped_frames += 1
            result.received.append(SimDatagram(t, data, None, max(queued, 0)))
            return
        self._play_end = play_at + duration_s
        inflight = max(1, math.ceil((self._play_end - now) / FRAME_S - INFLIGHT_TOLERANCE_FRAMES))
        result.max_inflight_frames = max(result.max_inflight_frames, inflight)
        result.received.append(SimDatagram(t, data, t + (play_at - now), inflight))
        self._loop.call_at(play_at, self._play, data)

    def _play(self, payload: bytes) -> None:
        if not self.ended:
            self._played.put_nowait(SimUnicastFrame(payload))

    def _stop(self, reason: str) -> None:
        """Tear the leg down (first reason wins): FreeSWITCH closes its socket."""
        if self.ended:
            return
        self.end_reason = reason
        self._ended.set()
        self._played.put_nowait(None)
        if self._transport is not None:
            self._transport.close()
        if self._send_task is not None and self._send_task is not asyncio.current_task():
            self._send_task.cancel()

    async def send_audio(self, pcm: bytes) -> None:
        """Queue caller audio; FreeSWITCH forwards one frame per 20 ms tick."""
        if self.ended:
            raise ConnectionError(f"unicast ended ({self.end_reason})")
        for i in range(0, len(pcm), self.frame_bytes):
            frame = pcm[i : i + self.frame_bytes]
            if len(frame) < self.frame_bytes:
                frame += bytes(self.frame_bytes - len(frame))
            if len(self._caller_frames) >= CALLER_BACKLOG_FRAMES:
                self._caller_frames.popleft()
                self._call.result.caller_frames_dropped += 1
            self._caller_frames.append(frame)
        await asyncio.sleep(0)

    async def send_dtmf(self, digit: str) -> None:
        """Caller presses a key: FreeSWITCH emits a DTMF event (when events are enabled)."""
        if self.ended:
            raise ConnectionError(f"unicast ended ({self.end_reason})")
        await self._call.send_dtmf(digit)

    async def read_frame(self, timeout_s: float | None) -> SimUnicastFrame | None:
        """Next agent frame as the caller hears it; None once the leg ended; TimeoutError."""
        return await next_until_end(self._played, self.ended, timeout_s)

    def hangup(self) -> None:
        """Caller hangup: the channel goes down, FreeSWITCH tells the agent."""
        if self.caller_hung_up:
            return
        self.caller_hung_up = True
        self._call.start_caller_hangup()


CallerMedia = Callable[[SimUnicastPeer], Awaitable[None]]


async def silent_caller(peer: SimUnicastPeer) -> None:
    """Default media: a caller who says nothing and stays on the line."""


class FakeFreeSwitch:
    """Places calls into an agent's outbound-ESL server and plays FreeSWITCH's side."""

    def __init__(
        self,
        esl_host: str = "127.0.0.1",
        esl_port: int = 8084,
        *,
        media: CallerMedia = silent_caller,
        rate_hz: int = 8000,
        clock: Clock = time.monotonic,
        connect_timeout_s: float = 2.0,
        linger_wait_s: float = LINGER_WAIT_S,
        max_call_s: float = 600.0,
        max_commands: int = 1000,
        udp_buffer_frames: int = UDP_BUFFER_FRAMES,
        socket_resume: bool = True,
    ) -> None:
        if rate_hz not in _CODECS:
            raise ValueError(f"rate_hz must be one of {sorted(_CODECS)}, got {rate_hz}")
        self.esl_host = esl_host
        self.esl_port = esl_port
        self.media = media
        self.rate_hz = rate_hz
        self.clock = clock
        self.connect_timeout_s = connect_timeout_s
        self.linger_wait_s = linger_wait_s
        self.max_call_s = max_call_s
        self.max_commands = max_commands
        self.udp_buffer_frames = udp_buffer_frames
        self.socket_resume = socket_resume

    async def place_call(
        self,
        *,
        caller_id_number: str = "+14155550123",
        caller_id_name: str = "Alice Example",
        destination_number: str = "110",
        uuid: str | None = None,
        media: CallerMedia | None = None,
    ) -> SimFsCallResult:
        """Run one call: dial the agent, wait for ``connect``, serve the session, return."""
        call = _SimFsCall(
            self,
            SimFsCallResult(uuid=uuid or str(uuid_mod.uuid4()), rate_hz=self.rate_hz),
            media or self.media,
            caller_id_number=caller_id_number,
            caller_id_name=caller_id_name,
            destination_number=destination_number,
        )
        await call.run()
        return call.result


class _SimFsCall:
    """One simulated channel's outbound-ESL session (state lives here)."""

    def __init__(
        self,
        fake: FakeFreeSwitch,
        result: SimFsCallResult,
        media: CallerMedia,
        *,
        caller_id_number: str,
        caller_id_name: str,
        destination_number: str,
    ) -> None:
        self.fake = fake
        self.result = result
        self.media = media
        self.codec = _CODECS[fake.rate_hz]
        self.number = next(_CALL_COUNTER)
        self.cid_number = caller_id_number
        self.cid_name = caller_id_name
        self.destination = destination_number
        self.sip_port = 5280 + self.number % 700
        self.channel_name = f"sofia/lab/{caller_id_number}@127.0.0.1:{self.sip_port}"
        self.created_us = int(time.time() * 1_000_000)
        self.answered_us = 0
        self.hangup_us = 0
        self.channel_state = "CS_EXECUTE"
        self.call_state = "RINGING"
        self.state_number = 4
        self.answer_state = "ringing"
        self.hangup_cause: str | None = None
        self.current_application = "socket"
        self.extra_variables: list[tuple[str, str]] = []
        self.peer: SimUnicastPeer | None = None
        self.unicast_tried = False
        self.hung_up = False
        self._writer: asyncio.StreamWriter | None = None
        self._done = asyncio.Event()
        self._apps: asyncio.Queue[tuple[str, str]] = asyncio.Queue()
        self._tasks: set[asyncio.Task[None]] = set()
        self._media_task: asyncio.Task[None] | None = None

    # --- channel data ------------------------------------------------------------------

    def _profile(self, prefix: str) -> list[tuple[str, str]]:
        """The caller-profile block, as ``Channel-*`` (connect reply) or ``Caller-*``."""
        p = prefix
        created = str(self.created_us)
        return [
            (f"{p}-Direction", "inbound"),
            (f"{p}-Logical-Direction", "inbound"),
            (f"{p}-Username", self.cid_number),
            (f"{p}-Dialplan", "XML"),
            (f"{p}-Caller-ID-Name", self.cid_name),
            (f"{p}-Caller-ID-Number", self.cid_number),
            (f"{p}-Orig-Caller-ID-Name", self.cid_name),
            (f"{p}-Orig-Caller-ID-Number", self.cid_number),
            (f"{p}-Network-Addr", "127.0.0.1"),
            (f"{p}-ANI", self.cid_number),
            (f"{p}-Destination-Number", self.destination),
            (f"{p}-Unique-ID", self.result.uuid),
            (f"{p}-Source", "mod_sofia"),
            (f"{p}-Context", "public"),
            (f"{p}-Channel-Name", self.channel_name),
            (f"{p}-Profile-Index", "1"),
            (f"{p}-Profile-Created-Time", created),
            (f"{p}-Channel-Created-Time", created),
            (f"{p}-Channel-Answered-Time", str(self.answered_us)),
            (f"{p}-Channel-Progress-Time", "0"),
            (f"{p}-Channel-Progress-Media-Time", "0"),
            (f"{p}-Channel-Hangup-Time", str(self.hangup_us)),
            (f"{p}-Channel-Transfer-Time", "0"),
            (f"{p}-Channel-Resurrect-Time", "0"),
            (f"{p}-Channel-Bridged-Time", "0"),
            (f"{p}-Channel-Last-Hold", "0"),
            (f"{p}-Channel-Hold-Accum", "0"),
            (f"{p}-Screen-Bit", "true"),
            (f"{p}-Privacy-Hide-Name", "false"),
            (f"{p}-Privacy-Hide-Number", "false"),
        ]

    def _core(self, event_name: str, calling: tuple[str, str, int]) -> list[tuple[str, str]]:
        now = time.time()
        local = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(now))
        return [
            ("Event-Name", event_name),
            ("Core-UUID", CORE_UUID),
            ("FreeSWITCH-Hostname", HOSTNAME),
            ("FreeSWITCH-Switchname", HOSTNAME),
            ("FreeSWITCH-IPv4", IPV4),
            ("FreeSWITCH-IPv6", IPV6),
            ("Event-Date-Local", local),
            ("Event-Date-GMT", formatdate(now, usegmt=True)),
            ("Event-Date-Timestamp", str(int(now * 1_000_000))),
            ("Event-Calling-File", calling[0]),
            ("Event-Calling-Function", calling[1]),
            ("Event-Calling-Line-Number", str(calling[2])),
            ("Event-Sequence", str(next(_SEQUENCE))),
        ]

    def _state(self) -> list[tuple[str, str]]:
        codec = self.codec
        headers = [
            ("Channel-State", self.channel_state),
            ("Channel-Call-State", self.call_state),
            ("Channel-State-Number", str(self.state_number)),
            ("Channel-Name", self.channel_name),
            ("Unique-ID", self.result.uuid),
            ("Call-Direction", "inbound"),
            ("Presence-Call-Direction", "inbound"),
            ("Channel-HIT-Dialplan", "true"),
            ("Channel-Call-UUID", self.result.uuid),
            ("Answer-State", self.answer_state),
        ]
        if self.hangup_cause is not None:
            headers.append(("Hangup-Cause", self.hangup_cause))
        headers += [
            ("Channel-Read-Codec-Name", codec.name),
            ("Channel-Read-Codec-Rate", str(codec.rate_hz)),
            ("Channel-Read-Codec-Bit-Rate", "64000"),
            ("Channel-Write-Codec-Name", codec.name),
            ("Channel-Write-Codec-Rate", str(codec.rate_hz)),
            ("Channel-Write-Codec-Bit-Rate", "64000"),
        ]
        return headers

    def _variables(self, *, connect: bool = False) -> list[tuple[str, str]]:
        codec = self.codec
        uid = self.result.uuid
        num = self.cid_number
        dest = self.destination
        port = str(self.sip_port)
        media_port = str(27200 + 2 * (self.number % 400))
        from_uri = f"{num}@127.0.0.1:{port}"
        to_uri = f"{dest}@127.0.0.1:5080"
        tag = f"{self.number}SIMTag001"
        pt = codec.payload_type
        sdp = (
            "v=0\r\no=sipp 53655765 2353687637 IN IP4 127.0.0.1\r\ns=-\r\n"
            "c=IN IP4 127.0.0.1\r\nt=0 0\r\n"
            f"m=audio {media_port} RTP/AVP {pt} 101\r\n"
            f"a=rtpmap:{pt} {codec.name}/{codec.rtp_rate_hz}\r\n"
            "a=rtpmap:101 telephone-event/8000\r\na=fmtp:101 0-15\r\na=ptime:20\r\n"
        )
        esl = f"{self.fake.esl_host}:{self.fake.esl_port}"
        variables = [
            ("variable_direction", "inbound"),
            ("variable_uuid", uid),
            ("variable_session_id", str(self.number)),
            ("variable_sip_from_user", num),
            ("variable_sip_from_port", port),
            ("variable_sip_from_uri", from_uri),
            ("variable_sip_from_host", "127.0.0.1"),
            ("variable_video_media_flow", "disabled"),
            ("variable_text_media_flow", "disabled"),
            ("variable_channel_name", self.channel_name),
            ("variable_sip_call_id", f"{self.number}-sim@127.0.0.1"),
            ("variable_sip_local_network_addr", "127.0.0.1"),
            ("variable_sip_network_ip", "127.0.0.1"),
            ("variable_sip_network_port", port),
            ("variable_sip_invite_stamp", str(self.created_us)),
            ("variable_sip_received_ip", "127.0.0.1"),
            ("variable_sip_received_port", port),
            ("variable_sip_via_protocol", "udp"),
            ("variable_sip_from_user_stripped", num),
            ("variable_sip_from_tag", tag),
            ("variable_sofia_profile_name", "lab"),
            ("variable_sofia_profile_url", "sip:mod_sofia@127.0.0.1:5080"),
            ("variable_recovery_profile_name", "lab"),
            ("variable_sip_full_via", f"SIP/2.0/UDP 127.0.0.1:{port};branch=z9hG4bK-sim-1-0"),
            ("variable_sip_from_display", self.cid_name),
            ("variable_sip_full_from", f'"{self.cid_name}" <sip:{from_uri}>;tag={tag}'),
            ("variable_sip_full_to", f"<sip:{to_uri}>"),
            ("variable_sip_req_user", dest),
            ("variable_sip_req_port", "5080"),
            ("variable_sip_req_uri", to_uri),
            ("variable_sip_req_host", "127.0.0.1"),
            ("variable_sip_to_user", dest),
            ("variable_sip_to_port", "5080"),
            ("variable_sip_to_uri", to_uri),
            ("variable_sip_to_host", "127.0.0.1"),
            ("variable_sip_contact_user", num),
            ("variable_sip_contact_port", port),
            ("variable_sip_contact_uri", from_uri),
            ("variable_sip_contact_host", "127.0.0.1"),
            ("variable_sip_subject", "pbx-agent simulator"),
            ("variable_sip_via_host", "127.0.0.1"),
            ("variable_sip_via_port", port),
            ("variable_max_forwards", "70"),
            ("variable_switch_r_sdp", sdp),
            ("variable_ep_codec_string", codec.ep_codec_string),
            ("variable_rtp_use_codec_string", "PCMU,PCMA,OPUS,G722,L16"),
            ("variable_remote_video_media_flow", "inactive"),
            ("variable_remote_text_media_flow", "inactive"),
            ("variable_remote_audio_media_flow", "sendrecv"),
            ("variable_audio_media_flow", "sendrecv"),
            ("variable_remote_media_ip", "127.0.0.1"),
            ("variable_remote_media_port", media_port),
            ("variable_rtp_audio_recv_pt", str(pt)),
            ("variable_rtp_use_codec_name", codec.name),
            ("variable_rtp_use_codec_rate", str(codec.rtp_rate_hz)),
            ("variable_rtp_use_codec_ptime", "20"),
            ("variable_rtp_use_codec_channels", "1"),
            ("variable_rtp_last_audio_codec_string", f"{codec.name}@{codec.rtp_rate_hz}h@20i@1c"),
            ("variable_read_codec", codec.name),
            ("variable_original_read_codec", codec.name),
            ("variable_read_rate", str(codec.rate_hz)),
            ("variable_original_read_rate", str(codec.rate_hz)),
            ("variable_write_codec", codec.name),
            ("variable_write_rate", str(codec.rate_hz)),
            ("variable_dtmf_type", "rfc2833"),
            ("variable_endpoint_disposition", "RECEIVED"),
            ("variable_DP_MATCH", f"ARRAY::{dest}|:{dest}"),
            ("variable_call_uuid", uid),
        ]
        if self.fake.socket_resume:
            variables.append(("variable_socket_resume", "true"))
        # The connect reply and the events order these differently (01_full_session).
        if connect:
            variables += [
                ("variable_current_application_data", f"{esl} async full"),
                ("variable_current_application", self.current_application),
                ("variable_socket_host", self.fake.esl_host),
            ]
        else:
            variables += [
                ("variable_socket_host", self.fake.esl_host),
                ("variable_current_application", self.current_application),
            ]
        variables += self.extra_variables
        return variables

    def connect_headers(self) -> list[tuple[str, str]]:
        """The CHANNEL_DATA headers of the connect reply, in the recorded order."""
        return [
            *self._core("CHANNEL_DATA", ("mod_event_socket.c", "parse_command", 2021)),
            *self._profile("Channel"),
            *self._state(),
            *self._profile("Caller"),
            *self._variables(connect=True),
        ]

    def event_headers(
        self,
        name: str,
        calling: tuple[str, str, int],
        extra: Sequence[tuple[str, str]] = (),
    ) -> list[tuple[str, str]]:
        """Headers of a channel event: core, state, caller profile, variables, then ``extra``."""
        return [
            *self._core(name, calling),
            *self._state(),
            *self._profile("Caller"),
            *self._variables(),
            *extra,
        ]

    # --- writing -----------------------------------------------------------------------

    async def _write(self, data: bytes) -> None:
        if self._writer is None or self._writer.is_closing():
            return
        self._writer.write(data)
        with contextlib.suppress(ConnectionError, OSError, TimeoutError):
            await asyncio.wait_for(self._writer.drain(), 2.0)

    async def _reply(self, text: str) -> None:
        self.result.replies.append(text)
        await self._write(serialize_reply(text))

    async def _api_response(self, body: str) -> None:
        self.result.replies.append(body)
        await self._write(serialize_api_response(body.encode("utf-8")))

    async def _event(
        self,
        name: str,
        calling: tuple[str, str, int],
        extra: Sequence[tuple[str, str]] = (),
    ) -> None:
        """Emit a channel event if the agent enabled events (``myevents`` / ``event``)."""
        if not self.result.events_enabled:
            return
        self.result.events_sent.append(name)
        await self._write(serialize_event(self.event_headers(name, calling, extra)))

    async def _notice(self, disposition: str) -> None:
        self.result.notices_sent.append(disposition)
        if disposition == "linger":
            linger = self.result.linger_s
            await self._write(
                serialize_linger_notice(
                    self.result.uuid, self.channel_name, -1 if linger is None else linger
                )
            )
        else:
            await self._write(serialize_disconnect_notice(self.result.uuid))

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # --- session -----------------------------------------------------------------------

    async def run(self) -> None:
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(self.fake.esl_host, self.fake.esl_port),
                self.fake.connect_timeout_s,
            )
        except (OSError, TimeoutError) as exc:
            # FreeSWITCH logs "Socket Error" and the dialplan continues with agent_result empty.
            self.result._fail(f"cannot reach outbound ESL server: {exc}")
            return
        self._writer = writer
        reader_task = asyncio.create_task(self._command_loop(reader), name="sim-fs-cmd")
        app_task = asyncio.create_task(self._app_loop(), name="sim-fs-apps")
        try:
            await asyncio.wait_for(self._done.wait(), self.fake.max_call_s)
        except TimeoutError:
            self.result._fail(f"call still up after {self.fake.max_call_s} s")
        finally:
            self._stop_unicast("session_end")
            tasks = [reader_task, app_task, *self._tasks]
            for task in tasks:
                task.cancel()
            # bounded: on 3.11 wait_for() can swallow a cancel that races its inner future
            await asyncio.wait(tasks, timeout=1.0)
            await self._finish_media()
            with contextlib.suppress(Exception):
                writer.close()
                await asyncio.wait_for(writer.wait_closed(), 1.0)

    async def _finish_media(self) -> None:
        task = self._media_task
        if task is None:
            return
        if not task.done():
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(asyncio.shield(task), 1.0)
        if not task.done():
            task.cancel()
            with contextlib.suppress(BaseException):
                await task

    def _end(self) -> None:
        self._done.set()

    async def _command_loop(self, reader: asyncio.StreamReader) -> None:
        decoder = EslDecoder()
        count = 0
        try:
            while not self._done.is_set():
                data = await reader.read(65536)
                if not data:
                    if not self._done.is_set():
                        self.result.closed_by_agent = True
                    break
                for msg in decoder.feed(data):
                    command = SimEslCommand(
                        self.fake.clock(),
                        msg.command.strip(),
                        msg.headers,
                        msg.body.decode("utf-8", errors="replace"),
                    )
                    self.result.commands.append(command)
                    count += 1
                    if count > self.fake.max_commands:
                        self.result._fail("too many commands")
                        break
                    await self._dispatch(command)
                    if self._done.is_set():
                        break
                if count > self.fake.max_commands:
                    break
        except ProtocolError as exc:
            # FreeSWITCH would misparse it; the fake records it and ends the session.
            self.result._fail(f"malformed command from agent: {exc}")
        except (ConnectionError, OSError) as exc:
            if not self._done.is_set():
                self.result.closed_by_agent = True
                self.result._fail(f"ESL socket failed: {exc}")
        self._stop_unicast("agent_closed")
        self._end()

    async def _dispatch(self, command: SimEslCommand) -> None:
        name = command.name
        if not self.result.connected and name != "connect":
            # FreeSWITCH parses it anyway; an agent that skips `connect` has no channel data.
            self.result._fail(f"command before connect: {command.line!r}")
        if name == "connect":
            self.result.connected = True
            self.result.replies.append("+OK\n")
            await self._write(serialize_connect_reply(self.connect_headers()))
        elif name == "myevents":
            self.result.events_enabled = True
            await self._reply("+OK Events Enabled")
        elif name == "event":
            self.result.events_enabled = True
            fmt = command.args.split(" ", 1)[0] or "plain"
            await self._reply(f"+OK event listener enabled {fmt}")
        elif name == "noevents":
            self.result.events_enabled = False
            await self._reply("+OK no longer listening for events")
        elif name == "linger":
            arg = command.args
            if arg.isdigit() and int(arg) > 0:
                self.result.linger_s = int(arg)
                await self._reply(f"+OK will linger {arg} seconds")
            else:
                self.result.linger_s = -1
                await self._reply("+OK will linger")
        elif name == "nolinger":
            self.result.linger_s = None
            await self._reply("+OK will not linger")
        elif name == "resume":
            await self._reply("+OK")
        elif name == "sendmsg":
            await self._sendmsg(command)
        elif name == "api":
            await self._api(command.args)
        elif name == "exit":
            self.result.exited = True
            await self._reply("+OK bye")
            self._stop_unicast("exit")
            await self._notice("disconnect")
            self._end()
        else:
            await self._reply(COMMAND_NOT_FOUND)

    async def _sendmsg(self, command: SimEslCommand) -> None:
        target = command.args or command.get("session-id") or ""
        if target and target != self.result.uuid:
            await self._reply(f"-ERR invalid session id [{target}]")
            return
        await self._reply("+OK")
        if self.hung_up:
            return  # queued on a dead session: nothing runs any more
        call_command = (command.get("call-command") or "").lower()
        if call_command == "execute":
            app = command.get("execute-app-name") or ""
            arg = command.get("execute-app-arg")
            if arg is None:
                arg = command.body
            self._apps.put_nowait((app, arg))
        elif call_command == "unicast":
            await self._unicast(command)
        elif call_command == "hangup":
            cause = command.get("hangup-cause") or "NORMAL_CLEARING"
            self.result.agent_hung_up = True
            self._spawn(self._hangup(cause), "sim-fs-hangup")
        # nomedia and the rest: +OK, nothing changes (unicast/06).

    async def _api(self, args: str) -> None:
        words = args.split()
        cmd = words[0] if words else ""
        if cmd in ("uuid_break", "uuid_kill", "uuid_exists"):
            known = len(words) > 1 and words[1] == self.result.uuid and not self.hung_up
            if cmd == "uuid_exists":
                await self._api_response("true" if known else "false")
            elif not known:
                await self._api_response(NO_SUCH_CHANNEL)
            else:
                await self._api_response("+OK\n")
                if cmd == "uuid_kill":
                    self.result.agent_hung_up = True
                    self._spawn(self._hangup("NORMAL_CLEARING"), "sim-fs-hangup")
        elif cmd == "uuid_setvar" and len(words) >= 3:
            if words[1] != self.result.uuid or self.hung_up:
                await self._api_response(NO_SUCH_CHANNEL)
            else:
                self.result.variables[words[2]] = " ".join(words[3:])
                await self._api_response("+OK\n")
        else:
            await self._api_response(f"-ERR {cmd} Command not found!\n")

    # --- applications (async mode: +OK first, the app runs on the session thread) --------

    async def _app_loop(self) -> None:
        while not self._done.is_set():
            app, arg = await self._apps.get()
            if self.hung_up:
                continue
            await self._execute(app, arg)

    async def _execute(self, app: str, arg: str) -> None:
        self.result.apps_executed.append((app, arg))
        app_uuid = str(uuid_mod.uuid4())
        self.current_application = app
        data = [("Application-Data", arg)] if arg else []
        await self._event(
            "CHANNEL_EXECUTE",
            ("switch_core_session.c", "switch_core_session_exec", 2944),
            [("Application", app), *data, ("Application-UUID", app_uuid)],
        )
        response = "_none_"
        lapp = app.lower()
        if lapp == "answer":
            await asyncio.sleep(ANSWER_DELAY_S)
            await self._answer()
        elif lapp == "set":
            var, sep, value = arg.partition("=")
            if sep and var:
                self.result.variables[var] = value
                self.extra_variables = [
                    (k, v) for k, v in self.extra_variables if k != f"variable_{var}"
                ] + [(f"variable_{var}", value)]
        elif lapp == "playback":
            if self.peer is not None and not self.peer.ended:
                self.result.playback_during_unicast = True
                self.result._fail("playback while unicast is active: FreeSWITCH tears unicast down")
                self._stop_unicast("playback")
            response = "FILE PLAYED"
        elif lapp == "hangup":
            self.result.agent_hung_up = True
            await self._event(
                "CHANNEL_EXECUTE_COMPLETE",
                ("switch_core_session.c", "switch_core_session_exec", 2967),
                [
                    ("Application", app),
                    *data,
                    ("Application-Response", response),
                    ("Application-UUID", app_uuid),
                ],
            )
            await self._hangup(arg or "NORMAL_CLEARING")
            return
        await self._event(
            "CHANNEL_EXECUTE_COMPLETE",
            ("switch_core_session.c", "switch_core_session_exec", 2967),
            [
                ("Application", app),
                *data,
                ("Application-Response", response),
                ("Application-UUID", app_uuid),
            ],
        )

    async def _answer(self) -> None:
        if self.result.answered:
            return
        self.result.answered = True
        self.answered_us = int(time.time() * 1_000_000)
        self.answer_state = "answered"
        self.call_state = "ACTIVE"
        self.state_number = 10
        await self._event(
            "CHANNEL_ANSWER", ("switch_channel.c", "switch_channel_perform_mark_answered", 3846)
        )

    # --- media -------------------------------------------------------------------------

    async def _unicast(self, command: SimEslCommand) -> None:
        if self.unicast_tried:
            # Lab README: re-sending unicast in the same session does not restart it.
            self.result._fail("unicast sent twice in one session (FreeSWITCH ignores it)")
            return
        self.unicast_tried = True
        if (command.get("flags") or "").strip():
            self.result._fail(f"unicast flags {command.get('flags')!r}: the fake sends L16 only")
        transport = (command.get("transport") or "udp").lower()
        try:
            local = (command.get("local-ip") or "127.0.0.1", int(command.get("local-port") or 0))
            remote = (command.get("remote-ip") or "", int(command.get("remote-port") or 0))
        except ValueError:
            self.result._fail("unicast with a non-numeric port")
            return
        if transport != "udp" or not remote[0] or not remote[1]:
            self.result._fail(f"unicast needs udp and a remote address, got {command.headers}")
            return
        peer = SimUnicastPeer(self, rate_hz=self.fake.rate_hz, clock=self.fake.clock)
        try:
            bound = await peer._start(local, remote)
        except OSError as exc:
            self.result._fail(str(exc))
            return
        self.peer = peer
        self.result.peer = peer
        self.result.unicast_started = True
        self.result.unicast_local = bound
        self.result.unicast_remote = remote
        self._media_task = asyncio.create_task(self._media(peer), name="sim-fs-media")

    async def _media(self, peer: SimUnicastPeer) -> None:
        try:
            await self.media(peer)
        except ConnectionError:
            pass
        except Exception:
            _LOGGER.exception("sim caller media failed for %s", peer.uuid)

    def _stop_unicast(self, reason: str) -> None:
        if self.peer is not None:
            self.peer._stop(reason)

    async def send_dtmf(self, digit: str) -> None:
        """Emit the DTMF event FreeSWITCH sends when an RFC 2833 digit ends.

        Not in the recordings: header names follow FreeSWITCH's DTMF event (DTMF-Digit,
        DTMF-Duration, DTMF-Source); the digit never appears in the unicast audio.
        """
        await self._event(
            "DTMF",
            ("switch_channel.c", "switch_channel_dequeue_dtmf", 1218),
            [("DTMF-Digit", digit), ("DTMF-Duration", "2000"), ("DTMF-Source", "RTP")],
        )

    # --- hangup ------------------------------------------------------------------------

    def start_caller_hangup(self) -> None:
        """The caller sent BYE: run the hangup sequence in the background."""
        if self.hung_up or self._done.is_set():
            return
        self.result.caller_hung_up = True
        self._spawn(self._hangup("NORMAL_CLEARING"), "sim-fs-hangup")

    async def _hangup(self, cause: str) -> None:
        """The channel goes down: events, linger notice, then wait for the agent or close."""
        if self.hung_up:
            return
        self.hung_up = True
        self.result.hangup_cause = cause
        self._stop_unicast("hangup")
        self.hangup_us = int(time.time() * 1_000_000)
        self.hangup_cause = cause
        self.answer_state = "hangup"
        await self._event(
            "CHANNEL_HANGUP", ("switch_channel.c", "switch_channel_perform_hangup", 3445)
        )
        linger = self.result.linger_s
        if linger is not None:
            await self._notice("linger")
        await self._event("CHANNEL_UNPARK", ("switch_ivr.c", "switch_ivr_park", 1213))
        await self._event(
            "CHANNEL_EXECUTE_COMPLETE",
            ("switch_core_session.c", "switch_core_session_exec", 2967),
            [
                ("Application", "socket"),
                ("Application-Data", f"{self.fake.esl_host}:{self.fake.esl_port} async full"),
                ("Application-Response", "_none_"),
                ("Application-UUID", str(uuid_mod.uuid4())),
            ],
        )
        for state, number in (("CS_HANGUP", 10), ("CS_REPORTING", 11)):
            self.channel_state = state
            self.state_number = number
            if state == "CS_REPORTING":
                self.call_state = "HANGUP"
            await self._event(
                "CHANNEL_STATE",
                ("switch_channel.c", "switch_channel_perform_set_running_state", 2408),
            )
        await self._event(
            "CHANNEL_HANGUP_COMPLETE",
            ("switch_core_state_machine.c", "switch_core_session_reporting_state", 943),
            [("variable_hangup_cause", cause)],
        )
        if linger is None:
            await self._notice("disconnect")
            self._end()
            return
        wait_s = self.fake.linger_wait_s if linger < 0 else float(linger)
        try:
            await asyncio.wait_for(self._done.wait(), wait_s)
        except TimeoutError:
            if linger < 0:
                self.result._fail(
                    f"agent neither sent exit nor closed {wait_s} s after the hangup (linger)"
                )
            await self._notice("disconnect")
            self._end()


async def place_call(
    esl_port: int,
    *,
    esl_host: str = "127.0.0.1",
    media: CallerMedia = silent_caller,
    rate_hz: int = 8000,
    caller_id_number: str = "+14155550123",
    caller_id_name: str = "Alice Example",
    destination_number: str = "110",
    uuid: str | None = None,
) -> SimFsCallResult:
    """Place one simulated call into the agent listening on ``esl_host:esl_port``."""
    fake = FakeFreeSwitch(esl_host, esl_port, media=media, rate_hz=rate_hz)
    return await fake.place_call(
        caller_id_number=caller_id_number,
        caller_id_name=caller_id_name,
        destination_number=destination_number,
        uuid=uuid,
    )
