"""The simulator's FakeAsterisk against a tiny agent built on FastAgiServer + AudioSocketServer."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

import pytest
from fixtures_path import FIXTURES

from agent.pbx.asterisk.audiosocket import AudioSocketConnection, AudioSocketServer, Kind
from agent.pbx.asterisk.fastagi import AgiChannel, FastAgiServer, parse_agi_env
from agent.sim.asterisk import (
    AGI_HEADER_NAMES,
    FakeAsterisk,
    SimAudioSocketPeer,
    SimCallResult,
    build_agi_env_block,
    parse_agi_command_args,
    place_call,
)

T = TypeVar("T")
FRAME = b"\x01\x02" * 160
MediaHandler = Callable[[AudioSocketConnection], Awaitable[None]]


def run(coro: Awaitable[T], timeout_s: float = 20.0) -> T:
    """Run a coroutine on a fresh loop with an overall timeout."""

    async def bounded() -> T:
        return await asyncio.wait_for(coro, timeout_s)

    return asyncio.run(bounded())


def test_env_block_matches_recording() -> None:
    recorded = (FIXTURES / "asterisk/fastagi/a_full_session/agi_env_block.raw").read_bytes()
    assert build_agi_env_block() == recorded
    names = [line.split(":")[0] for line in recorded.decode().splitlines() if line]
    assert tuple(names) == AGI_HEADER_NAMES
    recorded_args = (FIXTURES / "asterisk/fastagi/c_args/agi_env_block.raw").read_bytes()
    built = build_agi_env_block(
        channel="PJSIP/sipp-00000002",
        uniqueid=parse_agi_env(recorded_args).uniqueid,
        dnid="512",
        threadid=parse_agi_env(recorded_args).threadid,
        args=("sales", "en"),
    )
    assert built == recorded_args


@pytest.mark.parametrize(
    ("line", "argv"),
    [
        ("SET VARIABLE AGENT_RESULT TRANSFER", ["SET", "VARIABLE", "AGENT_RESULT", "TRANSFER"]),
        ('SET VARIABLE N "caller wants sales"', ["SET", "VARIABLE", "N", "caller wants sales"]),
        ('STREAM FILE beep ""', ["STREAM", "FILE", "beep", ""]),
        ('VERBOSE "say \\"hi\\" \\\\ ok" 1', ["VERBOSE", 'say "hi" \\ ok', "1"]),
        ("  ANSWER  ", ["ANSWER"]),
    ],
)
def test_parse_agi_command_args(line: str, argv: list[str]) -> None:
    assert parse_agi_command_args(line) == argv


@dataclass
class TinyAgent:
    """A minimal agent: ANSWER, SET VARIABLE, EXEC AudioSocket, report the outcome."""

    media: MediaHandler
    answer: bool = True
    outcome: dict[str, object] = field(default_factory=dict)
    fastagi: FastAgiServer | None = None
    audiosocket: AudioSocketServer | None = None

    async def handle(self, agi: AgiChannel) -> None:
        assert self.audiosocket is not None
        if self.answer:
            await agi.answer()
        await agi.set_variable("AGENT_REASON", 'caller asked for a "person" \\ now')
        call_id = uuid.uuid4()
        self.audiosocket.register(call_id, self.media)
        reply = await agi.exec("AudioSocket", f"{call_id},127.0.0.1:{self.audiosocket.port}")
        self.audiosocket.unregister(call_id)
        self.outcome["exec_result"] = reply.result
        if reply.result == "-1" and await agi.wait_hangup_notice(0.5):
            self.outcome["caller_gone"] = True
            await agi.set_variable("AGENT_RESULT", "CALLER_GONE")
        else:
            await agi.set_variable("AGENT_RESULT", "DONE")
        self.outcome["hung_up"] = agi.hung_up

    async def __aenter__(self) -> TinyAgent:
        self.audiosocket = AudioSocketServer(port=0)
        await self.audiosocket.start()
        self.fastagi = FastAgiServer(self.handle, port=0)
        await self.fastagi.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.fastagi is not None and self.audiosocket is not None
        await self.fastagi.close()
        await self.audiosocket.close()


def from_asterisk(result: SimCallResult) -> list[str]:
    return [line for direction, line in result.transcript if direction == "from_asterisk"]


def test_agent_hangup_frame_gives_result_0_and_variables_come_back() -> None:
    async def media(conn: AudioSocketConnection) -> None:
        frame = await conn.read_frame(2.0)
        assert frame is not None and frame.kind == Kind.AUDIO_8K
        for _ in range(5):
            await conn.send_audio(FRAME)
        await conn.send_hangup()

    async def caller(peer: SimAudioSocketPeer) -> None:
        await peer.send_audio(FRAME)
        while await peer.read_frame(3.0) is not None:
            pass

    async def body() -> tuple[SimCallResult, dict[str, object]]:
        async with TinyAgent(media) as agent:
            assert agent.fastagi is not None
            result = await place_call(agent.fastagi.port, media=caller, uniqueid="42.1")
            await asyncio.sleep(0.05)
            assert agent.audiosocket is not None
            assert agent.audiosocket.stats.connected == 1
            return result, agent.outcome

    result, outcome = run(body())
    assert result.uniqueid == "42.1"
    assert result.error is None
    assert result.answered
    assert result.variables == {
        "AGENT_REASON": 'caller asked for a "person" \\ now',
        "AGENT_RESULT": "DONE",
    }
    assert [r.result for r in result.exec_results] == [0]
    assert result.exec_results[0].end_reason == "agent_hangup"
    assert not result.idle_timeout_fired and not result.caller_hung_up
    assert result.agi_closed_by_agent
    assert result.transcript[0] == ("to_asterisk", "ANSWER")
    assert result.transcript[-1] == ("from_asterisk", "HANGUP")
    (peer,) = result.peers
    assert peer.agent_hung_up
    kinds = [r.frame.kind for r in peer.received]
    assert kinds == [Kind.AUDIO_8K] * 5 + [Kind.HANGUP]
    assert peer.audio_received == FRAME * 5
    times = [r.t for r in peer.received]
    assert times == sorted(times)
    assert outcome == {"exec_result": "0", "hung_up": False}


def test_caller_hangup_gives_minus_1_then_hangup_line() -> None:
    received: list[object] = []

    async def media(conn: AudioSocketConnection) -> None:
        while True:
            frame = await conn.read_frame(3.0)
            received.append(frame if frame is None else (frame.kind, len(frame.payload)))
            if frame is None:
                return

    async def caller(peer: SimAudioSocketPeer) -> None:
        for _ in range(3):
            await peer.send_audio(FRAME)
        await peer.send_dtmf("7")
        await asyncio.sleep(0.05)
        peer.hangup()

    async def body() -> tuple[SimCallResult, dict[str, object]]:
        async with TinyAgent(media) as agent:
            assert agent.fastagi is not None
            return await place_call(agent.fastagi.port, media=caller), agent.outcome

    result, outcome = run(body())
    assert received == [(Kind.AUDIO_8K, 320)] * 3 + [(Kind.DTMF, 1), None]
    assert [r.result for r in result.exec_results] == [-1]
    assert result.caller_hung_up and not result.idle_timeout_fired
    lines = from_asterisk(result)
    exec_index = lines.index("200 result=-1")
    assert lines[exec_index + 1] == "HANGUP"
    assert result.variables["AGENT_RESULT"] == "CALLER_GONE"
    assert outcome == {"exec_result": "-1", "caller_gone": True, "hung_up": True}


def test_idle_timeout_fires_when_agent_sends_nothing() -> None:
    async def media(conn: AudioSocketConnection) -> None:
        assert await conn.read_frame(5.0) is None

    async def body() -> tuple[SimCallResult, dict[str, object], float]:
        async with TinyAgent(media) as agent:
            assert agent.fastagi is not None
            loop = asyncio.get_running_loop()
            start = loop.time()
            result = await place_call(agent.fastagi.port)
            return result, agent.outcome, loop.time() - start

    result, outcome, elapsed = run(body())
    assert result.idle_timeout_fired
    assert result.exec_results[0].end_reason == "idle_timeout"
    assert elapsed >= 2.0
    lines = from_asterisk(result)
    assert lines[lines.index("200 result=-1") + 1] == "200 result=1"
    assert result.variables["AGENT_RESULT"] == "DONE"
    assert outcome == {"exec_result": "-1", "hung_up": False}


def test_unanswered_channel_gets_empty_connection() -> None:
    async def media(conn: AudioSocketConnection) -> None:
        raise AssertionError("no AudioSocket session without ANSWER")

    async def body() -> tuple[SimCallResult, int]:
        async with TinyAgent(media, answer=False) as agent:
            assert agent.fastagi is not None and agent.audiosocket is not None
            result = await place_call(agent.fastagi.port)
            await asyncio.sleep(0.05)
            return result, agent.audiosocket.stats.closed_before_uuid

    result, empty = run(body())
    assert result.exec_results[0].result == -1
    assert result.exec_results[0].end_reason == "not_answered"
    assert empty == 1
    assert not result.peers


def test_fake_replies_like_asterisk() -> None:
    async def handler(agi: AgiChannel) -> None:
        await agi.command("FOOBAR baz", check=False)
        await agi.command("STREAM FILE", check=False)
        await agi.command("CHANNEL STATUS")
        await agi.answer()
        await agi.command("CHANNEL STATUS")
        assert await agi.get_variable("NOPE") is None
        assert await agi.get_variable("CALLERID(name)") == "Bob"
        await agi.hangup()
        assert await agi.wait_hangup_notice(1.0)
        await agi.hangup()

    async def body() -> SimCallResult:
        server = FastAgiServer(handler, port=0)
        await server.start()
        try:
            fake = FakeAsterisk(agi_port=server.port)
            return await fake.place_call(calleridname="Bob", args=("sales",))
        finally:
            await server.close()

    result = run(body())
    assert result.agent_hangup_command
    lines = from_asterisk(result)
    assert lines[0] == "510 Invalid or unknown command"
    assert lines[1].startswith("520-") and lines[7] == "520 End of proper usage."
    assert lines[8:] == [
        "200 result=4",
        "200 result=0",
        "200 result=6",
        "200 result=0",
        "200 result=1 (Bob)",
        "200 result=1",
        "HANGUP",
        "511 Command Not Permitted on a dead channel or intercept routine",
        "HANGUP",
    ]


def test_unreachable_agent_is_reported() -> None:
    async def body() -> SimCallResult:
        server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        server.close()
        await server.wait_closed()
        return await place_call(port)

    assert run(body()).error is not None


def test_fake_treats_forbidden_kinds_as_fatal() -> None:
    async def raw_audiosocket(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readexactly(19)
        writer.write(b"\x03\x00\x01\x31")
        await writer.drain()
        await asyncio.wait_for(reader.read(), 3.0)
        writer.close()

    async def body() -> SimCallResult:
        media_server = await asyncio.start_server(raw_audiosocket, "127.0.0.1", 0)
        media_port = media_server.sockets[0].getsockname()[1]

        async def handler(agi: AgiChannel) -> None:
            await agi.answer()
            reply = await agi.exec("AudioSocket", f"{uuid.uuid4()},127.0.0.1:{media_port}")
            assert reply.result == "-1"
            assert not await agi.wait_hangup_notice(0.2)

        server = FastAgiServer(handler, port=0)
        await server.start()
        try:
            return await place_call(server.port)
        finally:
            await server.close()
            media_server.close()

    result = run(body())
    assert result.exec_results[0].end_reason == "fatal_frame"
    assert result.fatal_errors == ["agent sent kind 0x03"]
    assert not result.idle_timeout_fired
