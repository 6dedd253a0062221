"""The simulator's FakeFreeSwitch against a tiny asyncio outbound-ESL agent built on the codec."""

from __future__ import annotations

import asyncio
import math
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

import pytest
from fixtures_path import FIXTURES

from agent.pbx.freeswitch import esl
from agent.pbx.freeswitch.esl import ChannelData, EslDecoder, EslEvent, EslMessage, parse_event
from agent.pbx.freeswitch.unicast import is_filler
from agent.sim.freeswitch import (
    FakeFreeSwitch,
    SimFsCallResult,
    SimUnicastPeer,
    place_call,
)

T = TypeVar("T")
FS_DIR = FIXTURES / "freeswitch"


def run(coro: Awaitable[T], timeout_s: float = 20.0) -> T:
    """Run a coroutine on a fresh loop with an overall timeout."""

    async def bounded() -> T:
        return await asyncio.wait_for(coro, timeout_s)

    return asyncio.run(bounded())


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def tone_frame(rate_hz: int, value: int = 1000) -> bytes:
    return value.to_bytes(2, "little", signed=True) * (rate_hz // 50)


class _Udp(asyncio.DatagramProtocol):
    def __init__(self, sink: list[tuple[float, bytes]]) -> None:
        self.sink = sink

    def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        self.sink.append((asyncio.get_running_loop().time(), data))


@dataclass
class ScriptedAgent:
    """A tiny outbound-ESL server: connect, myevents, linger, answer, unicast, talk, set, exit."""

    send_frames: int = 25
    burst: bool = False
    linger: bool = True
    myevents: bool = True
    playback_after_s: float | None = None
    stay_s: float = 0.6
    extra_commands: tuple[str, ...] = ()
    wait_for_hangup: bool = False
    connect_delay_s: float = 0.0
    # what the agent saw
    bytes_before_connect: int = -1
    connect_reply: EslMessage | None = None
    channel: ChannelData | None = None
    replies: list[str] = field(default_factory=list)
    api_replies: list[str] = field(default_factory=list)
    events: list[EslEvent] = field(default_factory=list)
    notices: list[str] = field(default_factory=list)
    order: list[str] = field(default_factory=list)
    datagrams: list[tuple[float, bytes]] = field(default_factory=list)
    unicast_ok_at: float = 0.0
    eof: bool = False
    requested_local_port: int = 0
    errors: list[str] = field(default_factory=list)

    async def start(self) -> tuple[asyncio.AbstractServer, int]:
        server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return server, int(server.sockets[0].getsockname()[1])

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await self._session(reader, writer)
        except Exception as exc:  # surfaced by the test through .errors
            self.errors.append(repr(exc))
        finally:
            writer.close()

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        if self.connect_delay_s:
            try:
                early = await asyncio.wait_for(reader.read(1), self.connect_delay_s)
                self.bytes_before_connect = len(early)
            except TimeoutError:
                self.bytes_before_connect = 0
        replies: asyncio.Queue[EslMessage | None] = asyncio.Queue()
        hangup_seen = asyncio.Event()
        decoder = EslDecoder(allow_command=False)

        async def read_loop() -> None:
            while True:
                data = await reader.read(65536)
                if not data:
                    self.eof = True
                    self.order.append("EOF")
                    replies.put_nowait(None)
                    return
                for msg in decoder.feed(data):
                    kind = msg.content_type
                    if kind in ("command/reply", "api/response"):
                        replies.put_nowait(msg)
                    elif kind == "text/event-plain":
                        event = parse_event(msg)
                        self.events.append(event)
                        self.order.append(event.name)
                        if event.name == "CHANNEL_HANGUP":
                            hangup_seen.set()
                    elif kind == "text/disconnect-notice":
                        disposition = msg.get("Content-Disposition") or ""
                        self.notices.append(disposition)
                        self.order.append(f"notice:{disposition}")
                        if disposition == "linger":
                            hangup_seen.set()

        reader_task = asyncio.create_task(read_loop())

        async def request(data: bytes) -> EslMessage:
            writer.write(data)
            await writer.drain()
            msg = await asyncio.wait_for(replies.get(), 3.0)
            assert msg is not None, "FreeSWITCH closed the socket"
            if msg.content_type == "api/response":
                self.api_replies.append(msg.body.decode())
            else:
                self.replies.append(msg.reply_text)
            return msg

        async def wait_event(name: str, app: str | None = None) -> EslEvent:
            for _ in range(300):
                for event in self.events:
                    if event.name == name and (app is None or event.application == app):
                        return event
                await asyncio.sleep(0.01)
            raise AssertionError(f"no {name} {app or ''}")

        self.connect_reply = await request(esl.command("connect"))
        self.channel = ChannelData.from_connect_reply(self.connect_reply)
        frame_bytes = self.channel.read_rate_hz // 50 * 2
        if self.myevents:
            await request(esl.command("myevents"))
        if self.linger:
            await request(esl.command("linger"))
        await request(esl.execute("answer"))
        if self.myevents:
            await wait_event("CHANNEL_EXECUTE_COMPLETE", "answer")
        for line in self.extra_commands:
            await request(esl.command(line.replace("{uuid}", self.channel.uuid)))

        transport, _ = await loop.create_datagram_endpoint(
            lambda: _Udp(self.datagrams), local_addr=("127.0.0.1", 0)
        )
        my_port = int(transport.get_extra_info("sockname")[1])
        self.requested_local_port = free_udp_port()
        fs_addr = ("127.0.0.1", self.requested_local_port)
        await request(esl.unicast("127.0.0.1", self.requested_local_port, "127.0.0.1", my_port))
        self.unicast_ok_at = loop.time()
        start = loop.time()
        frame = tone_frame(self.channel.read_rate_hz, 2000)[:frame_bytes]
        for i in range(self.send_frames):
            if not self.burst:
                await asyncio.sleep(max(0.0, start + i * 0.02 - loop.time()))
            transport.sendto(frame, fs_addr)
        if self.playback_after_s is not None:
            await asyncio.sleep(self.playback_after_s)
            await request(esl.execute("playback", "silence_stream://20"))
        if self.wait_for_hangup:
            await asyncio.wait_for(hangup_seen.wait(), 5.0)
            await asyncio.sleep(0.1)
        else:
            await asyncio.sleep(self.stay_s)
        transport.close()
        if not self.eof:
            await request(esl.execute("set", "agent_result=DONE"))
            await request(esl.execute("set", "agent_transfer_to=sales"))
            if self.myevents and not hangup_seen.is_set():
                await wait_event("CHANNEL_EXECUTE_COMPLETE", "set")
            await request(esl.command("exit"))
        await asyncio.wait_for(reader_task, 3.0)


async def _call(
    agent: ScriptedAgent,
    media: Callable[[SimUnicastPeer], Awaitable[None]] | None = None,
    rate_hz: int = 8000,
    linger_wait_s: float = 10.0,
) -> SimFsCallResult:
    server, port = await agent.start()
    try:
        fake = FakeFreeSwitch("127.0.0.1", port, rate_hz=rate_hz, linger_wait_s=linger_wait_s)
        result = await fake.place_call(
            caller_id_number="+14155550199", caller_id_name="Bob Caller", media=media
        )
    finally:
        server.close()
        await server.wait_closed()
    assert agent.errors == []
    return result


def talking_caller(seconds: float, rate_hz: int) -> Callable[[SimUnicastPeer], Awaitable[None]]:
    async def media(peer: SimUnicastPeer) -> None:
        assert peer.rate_hz == rate_hz
        loop = asyncio.get_running_loop()
        start = loop.time()
        for i in range(int(seconds / 0.02)):
            await peer.send_audio(tone_frame(rate_hz, 1000))
            await asyncio.sleep(max(0.0, start + (i + 1) * 0.02 - loop.time()))

    return media


def recorded_connect_reply(name: str) -> EslMessage:
    data = (FS_DIR / name).read_bytes()
    msg, _ = esl.parse_message(data)
    assert msg is not None
    return msg


def recorded_events(name: str) -> list[EslEvent]:
    messages = EslDecoder(allow_command=False).feed((FS_DIR / name).read_bytes())
    return [parse_event(m) for m in messages if m.content_type == "text/event-plain"]


# --- tests -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rate_hz", "recorded", "codec", "fillers"),
    [
        (8000, "esl-outbound/01_full_session.fs_to_server.bin", "PCMU", [0, 1, 3, 4]),
        (16000, "unicast/07_g722_16k.connect_reply.bin", "G722", [0, 2, 3]),
    ],
)
def test_full_session_like_recording(
    rate_hz: int, recorded: str, codec: str, fillers: list[int]
) -> None:
    agent = ScriptedAgent(connect_delay_s=0.1)
    result = run(_call(agent, talking_caller(1.0, rate_hz), rate_hz=rate_hz))

    # FreeSWITCH sends nothing until `connect`; the reply is one block shaped like the recording.
    assert agent.bytes_before_connect == 0
    assert agent.connect_reply is not None and agent.channel is not None
    wanted = recorded_connect_reply(recorded)
    assert [n for n, _ in agent.connect_reply.headers] == [n for n, _ in wanted.headers]
    assert agent.connect_reply.headers[-4:] == (
        ("Content-Type", "command/reply"),
        ("Reply-Text", "%2BOK%0A"),
        ("Socket-Mode", "async"),
        ("Control", "full"),
    )
    assert agent.connect_reply.body == b""
    channel = agent.channel
    assert channel.uuid == result.uuid
    assert (channel.caller_id_number, channel.caller_id_name) == ("+14155550199", "Bob Caller")
    assert channel.destination_number == "110"
    assert (channel.read_codec, channel.read_rate_hz) == (codec, rate_hz)
    assert channel.answer_state == "ringing"
    assert channel.variables["read_rate"] == str(rate_hz)
    assert channel.variables["rtp_use_codec_rate"] == "8000"

    # Replies and events as recorded (01_full_session).
    assert agent.replies == [
        "%2BOK%0A",
        "+OK Events Enabled",
        "+OK will linger",
        "+OK",
        "+OK",
        "+OK",
        "+OK",
        "+OK bye",
    ]
    names = [e.name for e in agent.events]
    assert names == [
        "CHANNEL_EXECUTE",
        "CHANNEL_ANSWER",
        "CHANNEL_EXECUTE_COMPLETE",
        "CHANNEL_EXECUTE",
        "CHANNEL_EXECUTE_COMPLETE",
        "CHANNEL_EXECUTE",
        "CHANNEL_EXECUTE_COMPLETE",
    ]
    assert names == result.events_sent
    execute, answer, complete = agent.events[:3]
    assert execute.application == "answer" and execute.uuid == result.uuid
    assert answer.get("Answer-State") == "answered"
    assert complete.application_response == "_none_"
    assert agent.events[3].application_data == "agent_result=DONE"
    assert agent.order[-2:] == ["notice:disconnect", "EOF"]

    # The recorded CHANNEL_EXECUTE carries the same headers, bar two loop counters.
    rec = recorded_events("esl-outbound/01_full_session.fs_to_server.bin")[0]
    loop_counters = ("variable_current_loop", "variable_total_loops")
    rec_names = [n for n, _ in rec.headers if n not in loop_counters]
    assert [n for n, _ in execute.headers] == rec_names

    # What the fake recorded about the session.
    assert [c.name for c in result.commands] == [
        "connect",
        "myevents",
        "linger",
        "sendmsg",
        "sendmsg",
        "sendmsg",
        "sendmsg",
        "exit",
    ]
    assert result.commands[4].get("call-command") == "unicast"
    assert result.variables == {"agent_result": "DONE", "agent_transfer_to": "sales"}
    assert result.exited and result.answered and result.unicast_started
    assert not result.closed_by_agent and not result.caller_hung_up
    assert result.unicast_local == ("127.0.0.1", agent.requested_local_port)
    assert result.error is None, result.errors

    # Unicast: raw L16 frames of the decoded size, fillers where the recording has them,
    # one datagram per 20 ms in real time.
    frame_bytes = rate_hz // 50 * 2
    sizes = {len(p) for _, p in agent.datagrams}
    assert sizes == {frame_bytes}
    flags = [is_filler(p) for _, p in agent.datagrams[:6]]
    assert [i for i, f in enumerate(flags) if f] == fillers
    assert not any(is_filler(p) for _, p in agent.datagrams[6:40])
    assert agent.datagrams[0][0] - agent.unicast_ok_at < 0.1
    span = agent.datagrams[-1][0] - agent.datagrams[0][0]
    assert len(agent.datagrams) == pytest.approx(span / 0.02 + 1, abs=3)
    # The agent closed its UDP socket before `exit`: the last tick or two went nowhere.
    assert 0 <= result.frames_sent - len(agent.datagrams) <= 3

    # The agent's paced frames were all received and played one per 20 ms.
    assert len(result.received) == agent.send_frames
    assert result.max_inflight_frames <= 2
    assert result.wrong_size_frames == 0 and result.dropped_frames == 0


def test_caller_hangup_with_linger_sends_hangup_then_notice() -> None:
    async def media(peer: SimUnicastPeer) -> None:
        for _ in range(10):
            await peer.send_audio(tone_frame(8000))
            await asyncio.sleep(0.02)
        peer.hangup()

    agent = ScriptedAgent(send_frames=5, wait_for_hangup=True)
    result = run(_call(agent, media))
    assert result.caller_hung_up and result.hangup_cause == "NORMAL_CLEARING"
    order = agent.order
    assert order.index("CHANNEL_HANGUP") < order.index("notice:linger")
    assert order.index("notice:linger") < order.index("CHANNEL_HANGUP_COMPLETE")
    assert order[-2:] == ["notice:disconnect", "EOF"]
    assert result.events_sent[-6:] == [
        "CHANNEL_HANGUP",
        "CHANNEL_UNPARK",
        "CHANNEL_EXECUTE_COMPLETE",
        "CHANNEL_STATE",
        "CHANNEL_STATE",
        "CHANNEL_HANGUP_COMPLETE",
    ]
    complete = next(e for e in agent.events if e.name == "CHANNEL_HANGUP_COMPLETE")
    assert complete.hangup_cause == "NORMAL_CLEARING"
    assert complete.get("Answer-State") == "hangup"
    # The agent exited after the hangup: the set never ran on the dead channel.
    assert result.exited and result.notices_sent == ["linger", "disconnect"]
    assert "agent_result" not in result.variables
    # FreeSWITCH stops sending once the channel is down.
    last = agent.datagrams[-1][0]
    assert all(t <= last for t, _ in agent.datagrams)
    assert result.peer is not None and result.peer.ended


def test_caller_hangup_without_linger_closes_at_once() -> None:
    async def media(peer: SimUnicastPeer) -> None:
        await asyncio.sleep(0.2)
        peer.hangup()

    agent = ScriptedAgent(send_frames=3, linger=False, wait_for_hangup=True)
    result = run(_call(agent, media))
    assert agent.order[-2:] == ["notice:disconnect", "EOF"]
    assert "CHANNEL_HANGUP_COMPLETE" in agent.order
    assert agent.notices == ["disconnect"]
    assert result.caller_hung_up and not result.exited


def test_linger_without_exit_is_bounded() -> None:
    async def media(peer: SimUnicastPeer) -> None:
        await asyncio.sleep(0.1)
        peer.hangup()

    # The agent ignores the hangup and stays connected for longer than the fake waits.
    agent = ScriptedAgent(send_frames=0, stay_s=1.5)
    result = run(_call(agent, media, linger_wait_s=0.4))
    assert result.caller_hung_up
    assert result.error is not None and "linger" in result.error
    assert agent.notices == ["linger", "disconnect"] and agent.eof


def test_burst_fills_the_buffer_and_is_played_in_real_time() -> None:
    heard: list[float] = []

    async def media(peer: SimUnicastPeer) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                frame = await peer.read_frame(timeout_s=2.0)
            except TimeoutError:
                return
            if frame is None:
                return
            assert frame.kind == 0x10 and len(frame.payload) == 320
            heard.append(loop.time())

    agent = ScriptedAgent(send_frames=40, burst=True, stay_s=1.0)
    result = run(_call(agent, media))
    assert result.max_inflight_frames >= 35
    assert len(heard) == 40
    # 40 frames queued at once still take 0.8 s to play: FreeSWITCH does not flush.
    assert heard[-1] - heard[0] == pytest.approx(0.78, abs=0.06)
    assert max(d.inflight_frames for d in result.received) == result.max_inflight_frames


def test_paced_agent_keeps_one_or_two_frames_in_flight() -> None:
    heard: list[float] = []

    async def media(peer: SimUnicastPeer) -> None:
        await peer.send_dtmf("5")
        while (frame := await peer.read_frame(timeout_s=2.0)) is not None:
            heard.append(asyncio.get_running_loop().time())
            assert frame.payload == tone_frame(8000, 2000)

    agent = ScriptedAgent(send_frames=40, stay_s=0.3)
    result = run(_call(agent, media))
    assert 1 <= result.max_inflight_frames <= 2
    assert len(heard) == 40
    gaps = [b - a for a, b in zip(heard, heard[1:], strict=False)]
    assert sum(gaps) / len(gaps) == pytest.approx(0.02, abs=0.003)
    dtmf = [e for e in agent.events if e.name == "DTMF"]
    assert len(dtmf) == 1 and dtmf[0].get("DTMF-Digit") == "5"
    assert all(d.play_t is not None and d.play_t >= d.t for d in result.received)


def test_playback_during_unicast_is_flagged_and_stops_media() -> None:
    agent = ScriptedAgent(send_frames=5, playback_after_s=0.3, stay_s=0.4)
    result = run(_call(agent))
    assert result.playback_during_unicast
    assert result.error is not None and "playback" in result.error
    assert ("playback", "silence_stream://20") in result.apps_executed
    assert result.peer is not None and result.peer.end_reason == "playback"
    # No unicast datagrams after the teardown (allow one already in flight).
    playback_at = next(c.t for c in result.commands if c.get("execute-app-name") == "playback")
    assert result.frames_sent <= math.ceil((playback_at - result.commands[0].t) / 0.02) + 2
    assert result.exited and result.variables["agent_result"] == "DONE"


def test_api_and_unknown_commands() -> None:
    agent = ScriptedAgent(
        send_frames=0,
        stay_s=0.0,
        extra_commands=(
            "api uuid_break {uuid}",
            "api uuid_break {uuid} all",
            "api uuid_break 00000000-0000-0000-0000-000000000000",
            "api bogus_cmd",
            "frobnicate",
        ),
    )
    result = run(_call(agent))
    assert agent.api_replies == [
        "+OK\n",
        "+OK\n",
        "-ERR No such channel!\n",
        "-ERR bogus_cmd Command not found!\n",
    ]
    assert "-ERR command not found" in agent.replies
    assert result.exited


def test_without_myevents_no_events_are_sent() -> None:
    agent = ScriptedAgent(send_frames=2, myevents=False, stay_s=0.1)
    result = run(_call(agent))
    assert agent.events == [] and result.events_sent == []
    assert result.variables["agent_result"] == "DONE"


def test_agent_closing_the_socket_is_recorded() -> None:
    async def agent_handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(esl.command("connect"))
        await writer.drain()
        await reader.read(65536)
        writer.close()

    async def scenario() -> SimFsCallResult:
        server = await asyncio.start_server(agent_handler, "127.0.0.1", 0)
        port = int(server.sockets[0].getsockname()[1])
        try:
            return await place_call(port)
        finally:
            server.close()
            await server.wait_closed()

    result = run(scenario())
    assert result.connected and result.closed_by_agent and not result.exited


def test_no_listener_is_an_error_not_a_hang() -> None:
    port = free_udp_port()  # nothing listens on this TCP port either, in practice
    result = run(place_call(port))
    assert result.error is not None and "cannot reach" in result.error
    assert result.commands == []


def test_unsupported_rate_is_rejected() -> None:
    with pytest.raises(ValueError, match="rate_hz"):
        FakeFreeSwitch(rate_hz=48000)
