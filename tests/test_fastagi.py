"""FastAGI codec, channel and server, checked against Asterisk 22.10.1 recordings."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import pytest
from fixtures_path import FIXTURES

from agent.errors import ProtocolError
from agent.pbx.asterisk.fastagi import (
    AgiChannel,
    AgiConnectionClosed,
    AgiDeadChannelError,
    AgiInvalidCommand,
    AgiReply,
    AgiUsageError,
    FastAgiServer,
    parse_agi_env,
    parse_agi_reply,
    quote_agi_arg,
    read_agi_env,
)

AGI = FIXTURES / "asterisk" / "fastagi"
ENV_A = (AGI / "a_full_session" / "agi_env_block.raw").read_bytes()
T = TypeVar("T")


def run(coro: Awaitable[T], timeout_s: float = 15.0) -> T:
    """Run a coroutine on a fresh loop with an overall timeout."""

    async def bounded() -> T:
        return await asyncio.wait_for(coro, timeout_s)

    return asyncio.run(bounded())


# --- header block ----------------------------------------------------------------------


@pytest.mark.parametrize("case", sorted(p.parent.name for p in AGI.glob("*/agi_env_block.raw")))
def test_every_recorded_env_block_parses(case: str) -> None:
    block = (AGI / case / "agi_env_block.raw").read_bytes()
    env = parse_agi_env(block)
    assert list(env.raw)[:3] == ["agi_network", "agi_network_script", "agi_request"]
    assert len([k for k in env.raw if not k.startswith("agi_arg_")]) == 22
    assert env.callerid == "+14155550123"
    assert env.calleridname == "Alice Example"
    assert env.channel_type == "PJSIP"
    assert env.version == "22.10.1"
    assert env.context == "from-sipp"
    assert env.priority == "2"
    assert env.rdnis == "unknown"
    assert env.accountcode == ""
    assert "agi_accountcode" in env.raw
    assert env.script == "pbx-agent"
    assert env.request == f"agi://127.0.0.1:4573/{env.network_script}"
    assert env.channel.startswith("PJSIP/sipp-")
    assert env.dnid == env.extension
    assert env.uniqueid.count(".") == 1
    assert env.threadid.isdigit()


@pytest.mark.parametrize(
    ("case", "args", "query", "network_script"),
    [
        ("a_full_session", (), {}, "pbx-agent"),
        ("c_args", ("sales", "en"), {}, "pbx-agent"),
        ("c_query", (), {"tenant": "acme", "lang": "en"}, "pbx-agent?tenant=acme&lang=en"),
        ("c_query_and_args", ("sales", "en"), {"tenant": "acme"}, "pbx-agent?tenant=acme"),
    ],
)
def test_args_and_query(
    case: str, args: tuple[str, ...], query: dict[str, str], network_script: str
) -> None:
    env = parse_agi_env((AGI / case / "agi_env_block.raw").read_bytes())
    assert env.args == args
    assert env.query == query
    assert env.network_script == network_script
    assert env.script == "pbx-agent"


def test_args_are_ordered_by_number() -> None:
    block = b"agi_network: yes\nagi_arg_2: b\nagi_arg_10: j\nagi_arg_1: a\n\n"
    assert parse_agi_env(block).args == ("a", "b", "j")


@pytest.mark.parametrize(
    ("block", "line"),
    [
        (b"agi_network: yes\nthis is not a header\n\n", 2),
        (b"agi_network yes\n\n", 1),
        (b"agi_network: yes\nagi_request: x\nNAME: v\n\n", 3),
    ],
)
def test_malformed_header_line(block: bytes, line: int) -> None:
    with pytest.raises(ProtocolError, match=f"malformed AGI header line {line}:"):
        parse_agi_env(block)
    with pytest.raises(ProtocolError, match="empty AGI header block"):
        parse_agi_env(b"\n")


def test_read_agi_env_over_two_reads() -> None:
    async def body() -> str:
        reader = asyncio.StreamReader()
        reader.feed_data(ENV_A[:394])
        task = asyncio.create_task(read_agi_env(reader))
        await asyncio.sleep(0.01)
        assert not task.done()
        reader.feed_data(ENV_A[394:] + b"ANSWER-reply-not-read")
        env = await task
        assert await reader.read(6) == b"ANSWER"
        return env.uniqueid

    assert run(body()) == "1795698340.0"


def test_read_agi_env_failures() -> None:
    async def body() -> None:
        reader = asyncio.StreamReader()
        reader.feed_data(ENV_A[:100])
        reader.feed_eof()
        with pytest.raises(ProtocolError, match="closed during the header"):
            await read_agi_env(reader)
        reader = asyncio.StreamReader()
        reader.feed_data(ENV_A[:-1])
        with pytest.raises(TimeoutError):
            await read_agi_env(reader, timeout_s=0.05)
        reader = asyncio.StreamReader()
        reader.feed_data(b"agi_x: " + b"y" * 300 + b"\n")
        with pytest.raises(ProtocolError, match="exceeds 200 bytes"):
            await read_agi_env(reader, max_bytes=200)

    run(body())


# --- replies ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "code", "result", "data"),
    [
        ("200 result=0", 200, "0", ""),
        ("200 result=-1", 200, "-1", ""),
        ("200 result=1 (+14155550123)", 200, "1", "+14155550123"),
        ("200 result=1 (caller wants sales)", 200, "1", "caller wants sales"),
        ("200 result=0 endpos=3404", 200, "0", "endpos=3404"),
        ("200 result= (timeout)", 200, "", "timeout"),
        ("510 Invalid or unknown command", 510, "", "Invalid or unknown command"),
        (
            "511 Command Not Permitted on a dead channel or intercept routine",
            511,
            "",
            "Command Not Permitted on a dead channel or intercept routine",
        ),
    ],
)
def test_parse_reply(line: str, code: int, result: str, data: str) -> None:
    assert parse_agi_reply([line]) == AgiReply(code, result, data, line)


@pytest.mark.parametrize("line", ["HELLO", "20 result=0", "", "200x"])
def test_malformed_reply(line: str) -> None:
    with pytest.raises(ProtocolError):
        parse_agi_reply([line])


def test_quote_agi_arg() -> None:
    assert quote_agi_arg("TRANSFER") == "TRANSFER"
    assert quote_agi_arg("caller asked for a person") == '"caller asked for a person"'
    assert quote_agi_arg('say "hi" \\ bye') == '"say \\"hi\\" \\\\ bye"'
    assert quote_agi_arg("") == '""'
    with pytest.raises(ValueError):
        quote_agi_arg("two\nlines")


# --- replay of recorded sessions -------------------------------------------------------


def timeline(case: str) -> list[dict[str, object]]:
    path = AGI / case / "agi.timeline.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


async def replay_asterisk(port: int, case: str) -> bytes:
    """Act as the recorded Asterisk: send its chunks in order, in lock step with the agent."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 2.0)
    received = bytearray()
    try:
        for event in timeline(case):
            direction = event["dir"]
            if direction == "from_asterisk":
                writer.write(str(event["data"]).encode("latin-1"))
                await writer.drain()
                await asyncio.sleep(0.002)
            elif direction == "to_asterisk":
                expected = str(event["data"]).encode("latin-1")
                got = await asyncio.wait_for(reader.readexactly(len(expected)), 3.0)
                received += got
                assert got == expected
            elif "shutdown" in str(event.get("note", "")):
                # The recording server half-closed here; ours closes once the handler returns.
                received += await asyncio.wait_for(reader.read(), 3.0)
    finally:
        writer.close()
    return bytes(received)


async def handler_a(agi: AgiChannel) -> None:
    assert agi.env.uniqueid == "1795698340.0"
    assert (await agi.answer()).result == "0"
    assert await agi.get_variable("CALLERID(num)") == "+14155550123"
    assert (await agi.set_variable("AGENT_RESULT", "TRANSFER")).result == "1"
    reply = await agi.exec("AudioSocket", "6b0a7c55-3f1d-4a8e-9c2b-1d5e7f9a0b21,127.0.0.1:9092")
    assert (reply.code, reply.result) == (200, "0")
    with pytest.raises(AgiInvalidCommand) as invalid:
        await agi.command("FOOBAR baz")
    assert invalid.value.reply.data == "Invalid or unknown command"
    with pytest.raises(AgiUsageError) as usage:
        await agi.command("STREAM FILE")
    usage_reply = usage.value.reply
    assert usage_reply.code == 520
    assert usage_reply.raw.startswith("520-Invalid command syntax.  Proper usage follows:\n")
    assert usage_reply.raw.endswith("\n520 End of proper usage.")
    assert "<variable>PLAYBACKSTATUS</variable>" in usage_reply.data
    assert not agi.hung_up
    assert (await agi.hangup()).result == "1"
    assert await agi.wait_hangup_notice(2.0)


async def handler_b(agi: AgiChannel) -> None:
    await agi.answer()
    reply = await agi.exec("AudioSocket", "6b0a7c55-3f1d-4a8e-9c2b-1d5e7f9a0b21,127.0.0.1:9092")
    assert reply.result == "-1"
    assert await agi.wait_hangup_notice(2.0)
    with pytest.raises(AgiDeadChannelError):
        await agi.command("CHANNEL STATUS")
    assert await agi.get_variable("CALLERID(num)") == "+14155550123"
    with pytest.raises(AgiDeadChannelError):
        await agi.command('STREAM FILE beep ""')
    with pytest.raises(AgiDeadChannelError) as dead:
        await agi.answer()
    assert dead.value.reply.code == 511
    await agi.set_variable("AGENT_RESULT", "CALLER_GONE")
    await agi.verbose("agent: caller hung up during AudioSocket")
    assert (await agi.exec("Playback", "beep")).result == "0"
    assert (await agi.hangup()).code == 511


async def handler_d(agi: AgiChannel) -> None:
    await agi.set_variable("AGENT_RESULT", "TRANSFER")
    await agi.set_variable("AGENT_NOTE", "caller wants sales")
    assert await agi.get_variable("AGENT_RESULT") == "TRANSFER"
    reply = await agi.command("GET FULL VARIABLE ${AGENT_NOTE}")
    assert reply.data == "caller wants sales"


async def handler_e(agi: AgiChannel) -> None:
    await agi.answer()
    reply = await agi.exec("AudioSocket", "6b0a7c55-3f1d-4a8e-9c2b-1d5e7f9a0b21,127.0.0.1:9092")
    assert reply.result == "-1"
    # Idle timeout: no HANGUP notice follows, the channel is still up.
    assert not await agi.wait_hangup_notice(0.2)
    assert (await agi.command("CHANNEL STATUS")).result == "6"
    await agi.get_variable("CALLERID(num)")
    assert (await agi.command('STREAM FILE beep ""')).data == "endpos=3404"
    assert (await agi.hangup()).result == "1"
    assert await agi.wait_hangup_notice(2.0)


HANDLERS: dict[str, Callable[[AgiChannel], Awaitable[None]]] = {
    "a_full_session": handler_a,
    "b_caller_hangup_during_exec": handler_b,
    "d_setvar_visible_after_agi": handler_d,
    "e_exec_audiosocket_idle_timeout": handler_e,
}


@pytest.mark.parametrize("case", sorted(HANDLERS))
def test_replay_recorded_session(case: str) -> None:
    async def body() -> bytes:
        server = FastAgiServer(HANDLERS[case], port=0)
        await server.start()
        try:
            sent = await replay_asterisk(server.port, case)
            await asyncio.sleep(0.05)
            assert server.stats.accepted == 1
            assert server.stats.handler_errors == 0
            assert server.stats.completed == 1
            return sent
        finally:
            await server.close()

    sent = run(body())
    assert sent == (AGI / case / "agi.to_asterisk.raw").read_bytes()


# --- channel edge cases against a scripted peer ----------------------------------------

Peer = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def scripted(handler: Callable[[AgiChannel], Awaitable[None]], peer: Peer) -> FastAgiServer:
    done = asyncio.Event()
    errors: list[BaseException] = []

    async def wrapped(agi: AgiChannel) -> None:
        try:
            await handler(agi)
        except BaseException as exc:
            errors.append(exc)
            raise
        finally:
            done.set()

    server = FastAgiServer(wrapped, port=0)
    await server.start()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(ENV_A)
        await peer(reader, writer)
        await asyncio.wait_for(done.wait(), 5.0)
        writer.close()
    finally:
        await server.close()
    if errors:
        raise errors[0]
    return server


def test_hangup_notice_before_and_inside_replies() -> None:
    async def peer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        assert await reader.readline() == b"ANSWER\n"
        writer.write(b"HANGUP\n")
        await writer.drain()
        await asyncio.sleep(0.02)
        writer.write(b"200 result=0\n")
        assert await reader.readline() == b"STREAM FILE\n"
        writer.write(b"520-Invalid command syntax.  Proper usage follows:\nusage\nHANGUP\n")
        writer.write(b"more usage\n520 End of proper usage.\n")
        assert await reader.readline() == b'VERBOSE "done" 1\n'
        writer.write(b"100 result=0 Trying...\n200 result=1\n")
        await writer.drain()

    async def handler(agi: AgiChannel) -> None:
        reply = await agi.answer()
        assert (reply.code, reply.result) == (200, "0")
        assert agi.hung_up
        usage = await agi.command("STREAM FILE", check=False)
        assert usage.code == 520
        assert usage.data == "usage\nmore usage"
        assert (await agi.verbose("done")).result == "1"

    run(scripted(handler, peer))


def test_command_timeout_closes_channel() -> None:
    async def peer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        assert await reader.readline() == b"ANSWER\n"
        assert await asyncio.wait_for(reader.read(), 3.0) == b""

    async def handler(agi: AgiChannel) -> None:
        with pytest.raises(TimeoutError):
            await agi.command("ANSWER", timeout_s=0.1)
        assert agi.closed
        with pytest.raises(AgiConnectionClosed):
            await agi.answer()

    run(scripted(handler, peer))


def test_agi_vanishing_during_exec_is_noticed() -> None:
    async def peer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        assert (await reader.readline()).startswith(b"EXEC AudioSocket")
        await asyncio.sleep(0.05)
        writer.close()

    async def handler(agi: AgiChannel) -> None:
        exec_task = asyncio.create_task(agi.exec("AudioSocket", "x,127.0.0.1:9"))
        await asyncio.wait_for(agi.wait_closed(), 2.0)
        assert agi.closed
        with pytest.raises(AgiConnectionClosed):
            await exec_task

    run(scripted(handler, peer))


def test_malformed_reply_closes_channel() -> None:
    async def peer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readline()
        writer.write(b"garbage\n")
        await writer.drain()

    async def handler(agi: AgiChannel) -> None:
        with pytest.raises(ProtocolError, match="malformed AGI reply line"):
            await agi.answer()
        assert agi.closed

    run(scripted(handler, peer))


def test_bad_command_lines_are_refused() -> None:
    async def peer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        return None

    async def handler(agi: AgiChannel) -> None:
        with pytest.raises(ValueError):
            await agi.command("ANSWER\nHANGUP")
        with pytest.raises(ValueError):
            await agi.set_variable("bad name", "x")

    run(scripted(handler, peer))


# --- server robustness -----------------------------------------------------------------


async def full_call(port: int) -> bytes:
    """A minimal well-behaved Asterisk: header, answer the one command, read to EOF."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(ENV_A)
    line = await reader.readline()
    writer.write(b"200 result=1\n")
    await writer.drain()
    rest = await reader.read()
    writer.close()
    return line + rest


async def verbose_handler(agi: AgiChannel) -> None:
    await agi.verbose("hello")


def test_half_header_then_close_does_not_stall() -> None:
    async def body() -> None:
        server = FastAgiServer(verbose_handler, port=0)
        await server.start()
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write(ENV_A[:200])
            await writer.drain()
            writer.close()
            got = await asyncio.wait_for(full_call(server.port), 2.0)
            assert got == b'VERBOSE "hello" 1\n'
            assert server.stats.malformed_header == 1
            assert server.stats.completed == 1
        finally:
            await server.close()

    run(body())


def test_oversized_and_timed_out_headers_are_counted() -> None:
    async def body() -> None:
        server = FastAgiServer(verbose_handler, port=0, header_timeout_s=0.3, max_header_bytes=600)
        await server.start()
        try:
            slow_reader, slow_writer = await asyncio.open_connection("127.0.0.1", server.port)
            slow_writer.write(ENV_A[:100])
            big_reader, big_writer = await asyncio.open_connection("127.0.0.1", server.port)
            big_writer.write(b"agi_network: yes\n" + b"agi_x: y\n" * 100)
            # A good call is served while the slow one is still pending.
            assert await asyncio.wait_for(full_call(server.port), 2.0)
            assert await asyncio.wait_for(big_reader.read(), 2.0) == b""
            assert await asyncio.wait_for(slow_reader.read(), 2.0) == b""
            slow_writer.close()
            big_writer.close()
            assert server.stats.malformed_header == 2
            assert server.stats.header_timeouts == 1
            assert server.stats.accepted == 3
        finally:
            await server.close()

    run(body())


def test_handler_exception_is_counted_and_socket_closed() -> None:
    async def failing(agi: AgiChannel) -> None:
        raise RuntimeError("boom")

    async def body() -> None:
        server = FastAgiServer(failing, port=0)
        await server.start()
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write(ENV_A)
            assert await asyncio.wait_for(reader.read(), 2.0) == b""
            writer.close()
            assert server.stats.handler_errors == 1
            # The server keeps serving: the next call reaches the handler too.
            assert await asyncio.wait_for(full_call(server.port), 2.0) == b""
            assert server.stats.handler_errors == 2
        finally:
            await server.close()

    run(body())


def test_server_port_zero() -> None:
    async def body() -> int:
        server = FastAgiServer(verbose_handler, port=0)
        await server.start()
        port = server.port
        await server.close()
        return port

    assert run(body()) > 0


def test_fixture_root_exists() -> None:
    assert isinstance(FIXTURES, Path)
    assert (FIXTURES / "asterisk" / "README.md").is_file()
