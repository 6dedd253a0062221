"""The simulator's Asterisk side: a fake that dials the agent's FastAGI port like Asterisk.

Behaviour follows the Asterisk 22.10.1 recordings in ``shared/fixtures/asterisk/``: the header
block layout, the replies, ``EXEC AudioSocket`` outcomes (0 on the app's 0x00, -1 plus a late
``HANGUP`` line on caller hangup, -1 alone on the 2.0 s idle timeout) and the final ``HANGUP``
written when the script closes its socket. Pacing of caller audio is the caller script's job.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
import uuid as uuid_mod
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

from agent.errors import ProtocolError
from agent.pbx.asterisk.audiosocket import (
    AudioSocketFrame,
    FrameDecoder,
    Kind,
    audio_frame,
    dtmf_frame,
    uuid_frame,
)
from agent.sim.common import next_until_end

_LOGGER = logging.getLogger(__name__)

AGI_HEADER_NAMES: tuple[str, ...] = (
    "agi_network",
    "agi_network_script",
    "agi_request",
    "agi_channel",
    "agi_language",
    "agi_type",
    "agi_uniqueid",
    "agi_version",
    "agi_callerid",
    "agi_calleridname",
    "agi_callingpres",
    "agi_callingani2",
    "agi_callington",
    "agi_callingtns",
    "agi_dnid",
    "agi_rdnis",
    "agi_context",
    "agi_extension",
    "agi_priority",
    "agi_enhanced",
    "agi_accountcode",
    "agi_threadid",
)

IDLE_TIMEOUT_S = 2.0
HANGUP_NOTICE_DELAY_S = 0.045
DEAD_CHANNEL_REPLY = "511 Command Not Permitted on a dead channel or intercept routine"
INVALID_COMMAND_REPLY = "510 Invalid or unknown command"
# The usage block Asterisk 22.10.1 sent for a bare STREAM FILE (a_full_session).
STREAM_FILE_USAGE = (
    "520-Invalid command syntax.  Proper usage follows:",
    (
        "Send the given file, allowing playback to be interrupted by the given digits, if any. "
        "Returns <literal>0</literal> if playback completes without a digit being pressed, or the "
        "ASCII numerical value of the digit if one was pressed, or <literal>-1</literal> on error "
        "or if the channel was disconnected. If musiconhold is playing before calling stream file "
        "it will be automatically stopped and will not be restarted after completion."
    ),
    "It sets the following channel variables upon completion:",
    "<variable>PLAYBACKSTATUS</variable>: The status of the playback attempt as a text string.",
    "    <value>SUCCESS</value>",
    "    <value>FAILED</value>",
    "520 End of proper usage.",
)

_CALL_COUNTER = itertools.count()

Clock = Callable[[], float]


def build_agi_env_block(
    *,
    agi_host: str = "127.0.0.1",
    agi_port: int = 4573,
    network_script: str = "pbx-agent",
    channel: str = "PJSIP/sipp-00000000",
    uniqueid: str = "1795698340.0",
    callerid: str = "+14155550123",
    calleridname: str = "Alice Example",
    dnid: str = "510",
    extension: str | None = None,
    context: str = "from-sipp",
    priority: str = "2",
    threadid: str = "139984710231744",
    language: str = "en",
    channel_type: str = "PJSIP",
    version: str = "22.10.1",
    accountcode: str = "",
    args: Sequence[str] = (),
) -> bytes:
    """Build an ``agi_*`` block laid out exactly like Asterisk 22.10.1's (LF, blank line)."""
    values = {
        "agi_network": "yes",
        "agi_network_script": network_script,
        "agi_request": f"agi://{agi_host}:{agi_port}/{network_script}",
        "agi_channel": channel,
        "agi_language": language,
        "agi_type": channel_type,
        "agi_uniqueid": uniqueid,
        "agi_version": version,
        "agi_callerid": callerid,
        "agi_calleridname": calleridname,
        "agi_callingpres": "0",
        "agi_callingani2": "0",
        "agi_callington": "0",
        "agi_callingtns": "0",
        "agi_dnid": dnid,
        "agi_rdnis": "unknown",
        "agi_context": context,
        "agi_extension": dnid if extension is None else extension,
        "agi_priority": priority,
        "agi_enhanced": "0.0",
        "agi_accountcode": accountcode,
        "agi_threadid": threadid,
    }
    lines = [f"{name}: {values[name]}" for name in AGI_HEADER_NAMES]
    lines += [f"agi_arg_{i}: {arg}" for i, arg in enumerate(args, start=1)]
    return ("\n".join(lines) + "\n\n").encode("utf-8")


def parse_agi_command_args(line: str) -> list[str]:
    """Split an AGI command line the way res_agi's parse_args does (quotes, backslashes)."""
    args: list[str] = []
    current: list[str] = []
    in_arg = False
    quoted = False
    escaped = False
    for char in line:
        if char == '"' and not escaped:
            quoted = not quoted
            if quoted and not in_arg:
                in_arg = True
            continue
        if char in " \t" and not quoted and not escaped:
            if in_arg:
                args.append("".join(current))
                current = []
                in_arg = False
            continue
        if char == "\\" and not escaped:
            escaped = True
            continue
        escaped = False
        in_arg = True
        current.append(char)
    if in_arg:
        args.append("".join(current))
    return args


@dataclass(frozen=True)
class ReceivedFrame:
    """A frame the agent sent on the AudioSocket, with its arrival time."""

    t: float
    frame: AudioSocketFrame


class SimAudioSocketPeer:
    """Asterisk's end of one AudioSocket connection, driven by a caller-media coroutine."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        call_uuid: uuid_mod.UUID,
        *,
        rate_hz: int = 8000,
        clock: Clock = time.monotonic,
    ) -> None:
        self.uuid = call_uuid
        self.rate_hz = rate_hz
        self.received: list[ReceivedFrame] = []
        self.agent_hung_up = False
        self.caller_hung_up = False
        self.fatal_error: str | None = None
        self.end_reason: str | None = None
        self._reader = reader
        self._writer = writer
        self._clock = clock
        self._queue: asyncio.Queue[AudioSocketFrame | None] = asyncio.Queue()
        self._ended = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        self.last_activity = self._loop.time()
        self._reader_task: asyncio.Task[None] | None = None

    @property
    def ended(self) -> bool:
        """True once the AudioSocket connection is over."""
        return self._ended.is_set()

    @property
    def audio_received(self) -> bytes:
        """All agent audio payloads joined, in arrival order."""
        return b"".join(r.frame.payload for r in self.received if r.frame.is_audio)

    async def _start(self) -> None:
        """Send the UUID frame, as Asterisk does once connected, and start reading."""
        await self._send(uuid_frame(self.uuid))
        self._reader_task = asyncio.create_task(self._read_loop(), name=f"sim-as-{self.uuid}")

    def _end(self, reason: str) -> None:
        """Mark the connection over (first reason wins) and close the socket."""
        if self._ended.is_set():
            return
        self.end_reason = reason
        self._ended.set()
        self._queue.put_nowait(None)
        with contextlib.suppress(Exception):
            self._writer.close()

    async def _send(self, data: bytes) -> None:
        if self.ended:
            raise ConnectionError(f"AudioSocket ended ({self.end_reason})")
        self._writer.write(data)
        self.last_activity = self._loop.time()
        await asyncio.wait_for(self._writer.drain(), 2.0)

    async def _read_loop(self) -> None:
        decoder = FrameDecoder()
        try:
            while not self.ended:
                data = await self._reader.read(65536)
                if not data:
                    self._end("agent_closed")
                    return
                try:
                    frames = decoder.feed(data)
                except ProtocolError as exc:
                    self._fatal(str(exc))
                    return
                for frame in frames:
                    self.last_activity = self._loop.time()
                    self.received.append(ReceivedFrame(self._clock(), frame))
                    if frame.kind == Kind.HANGUP:
                        self.agent_hung_up = True
                        self._end("agent_hangup")
                        return
                    if not frame.is_audio:
                        self._fatal(f"agent sent kind 0x{frame.kind:02x}")
                        return
                    self._queue.put_nowait(frame)
        except (ConnectionError, OSError):
            self._end("agent_closed")

    def _fatal(self, reason: str) -> None:
        _LOGGER.error("sim AudioSocket %s: fatal frame from agent: %s", self.uuid, reason)
        self.fatal_error = reason
        self._end("fatal_frame")

    async def send_audio(self, pcm: bytes) -> None:
        """Send caller audio as one frame (kind 0x10, or the kind of ``rate_hz``)."""
        await self._send(audio_frame(pcm, self.rate_hz))

    async def send_dtmf(self, digit: str) -> None:
        """Send a caller DTMF digit as Asterisk does when the digit ends."""
        await self._send(dtmf_frame(digit))

    async def read_frame(self, timeout_s: float | None) -> AudioSocketFrame | None:
        """Next agent audio frame; None once the connection ended; TimeoutError on timeout."""
        return await next_until_end(self._queue, self.ended, timeout_s)

    def hangup(self) -> None:
        """Caller hangup: close the socket without a 0x00 frame."""
        if self.ended:
            return
        self.caller_hung_up = True
        self._end("caller_hangup")

    async def _run(self, idle_timeout_s: float) -> str:
        """Wait until the connection ends or goes idle; return the end reason."""
        while not self.ended:
            remaining = self.last_activity + idle_timeout_s - self._loop.time()
            if remaining <= 0:
                _LOGGER.error(
                    "sim AudioSocket %s: reached timeout after %d ms of no activity",
                    self.uuid,
                    int(idle_timeout_s * 1000),
                )
                self._end("idle_timeout")
                break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._ended.wait(), remaining)
        return self.end_reason or "agent_closed"

    async def _stop(self) -> None:
        self._end(self.end_reason or "agent_closed")
        if self._reader_task is not None:
            self._reader_task.cancel()
            with contextlib.suppress(BaseException):
                await self._reader_task
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._writer.wait_closed(), 1.0)


CallerMedia = Callable[[SimAudioSocketPeer], Awaitable[None]]


async def silent_caller(peer: SimAudioSocketPeer) -> None:
    """Default media: a caller who says nothing and stays on the line."""


@dataclass(frozen=True)
class SimExecResult:
    """One EXEC the agent ran and how it ended."""

    app: str
    args: str
    result: int
    end_reason: str | None = None


@dataclass
class SimCallResult:
    """What one simulated call saw on the Asterisk side."""

    uniqueid: str
    variables: dict[str, str] = field(default_factory=dict)
    exec_results: list[SimExecResult] = field(default_factory=list)
    transcript: list[tuple[str, str]] = field(default_factory=list)
    idle_timeout_fired: bool = False
    caller_hung_up: bool = False
    agent_hangup_command: bool = False
    answered: bool = False
    agi_closed_by_agent: bool = False
    peers: list[SimAudioSocketPeer] = field(default_factory=list)
    fatal_errors: list[str] = field(default_factory=list)
    error: str | None = None


class FakeAsterisk:
    """Places calls into an agent's FastAGI server and answers its commands like Asterisk."""

    def __init__(
        self,
        agi_host: str = "127.0.0.1",
        agi_port: int = 4573,
        *,
        media: CallerMedia = silent_caller,
        rate_hz: int = 8000,
        idle_timeout_s: float = IDLE_TIMEOUT_S,
        hangup_notice_delay_s: float = HANGUP_NOTICE_DELAY_S,
        command_timeout_s: float = 30.0,
        connect_timeout_s: float = 2.0,
        max_commands: int = 1000,
        clock: Clock = time.monotonic,
    ) -> None:
        self.agi_host = agi_host
        self.agi_port = agi_port
        self.media = media
        self.rate_hz = rate_hz
        self.idle_timeout_s = idle_timeout_s
        self.hangup_notice_delay_s = hangup_notice_delay_s
        self.command_timeout_s = command_timeout_s
        self.connect_timeout_s = connect_timeout_s
        self.max_commands = max_commands
        self.clock = clock

    async def place_call(
        self,
        *,
        callerid: str = "+14155550123",
        calleridname: str = "Alice Example",
        dnid: str = "510",
        extension: str | None = None,
        uniqueid: str | None = None,
        args: Sequence[str] = (),
        network_script: str = "pbx-agent",
        answered: bool = False,
        media: CallerMedia | None = None,
    ) -> SimCallResult:
        """Run one call: header block, command loop, EXEC AudioSocket, final HANGUP."""
        number = next(_CALL_COUNTER)
        uniqueid = uniqueid or f"{int(time.time())}.{number}"
        call = _SimCall(
            self,
            SimCallResult(uniqueid=uniqueid, answered=answered),
            media or self.media,
            {"CALLERID(num)": callerid, "CALLERID(name)": calleridname, "UNIQUEID": uniqueid},
        )
        block = build_agi_env_block(
            agi_host=self.agi_host,
            agi_port=self.agi_port,
            network_script=network_script,
            channel=f"PJSIP/sim-{number:08x}",
            uniqueid=uniqueid,
            callerid=callerid,
            calleridname=calleridname,
            dnid=dnid,
            extension=extension,
            threadid=str(139984710231744 + number),
            args=args,
        )
        await call.run(block)
        return call.result


class _SimCall:
    """One simulated channel's AGI session (state lives here, not in the FakeAsterisk)."""

    def __init__(
        self,
        fake: FakeAsterisk,
        result: SimCallResult,
        media: CallerMedia,
        builtins: dict[str, str],
    ) -> None:
        self.fake = fake
        self.result = result
        self.media = media
        self.builtins = builtins
        self.dead = False
        self._writer: asyncio.StreamWriter | None = None
        self._notices: set[asyncio.Task[None]] = set()

    def _write_line(self, line: str) -> None:
        assert self._writer is not None
        self.result.transcript.append(("from_asterisk", line))
        self._writer.write(line.encode("utf-8") + b"\n")

    async def _reply(self, *lines: str) -> None:
        for line in lines:
            self._write_line(line)
        assert self._writer is not None
        await asyncio.wait_for(self._writer.drain(), 2.0)

    def _schedule_hangup_notice(self) -> None:
        self.dead = True
        task = asyncio.create_task(self._hangup_notice())
        self._notices.add(task)
        task.add_done_callback(self._notices.discard)

    async def _hangup_notice(self) -> None:
        await asyncio.sleep(self.fake.hangup_notice_delay_s)
        with contextlib.suppress(Exception):
            await self._reply("HANGUP")

    async def run(self, block: bytes) -> None:
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(self.fake.agi_host, self.fake.agi_port),
                self.fake.connect_timeout_s,
            )
        except (OSError, TimeoutError) as exc:
            self.result.error = f"cannot reach FastAGI: {exc}"
            return
        self._writer = writer
        try:
            # Asterisk's block arrived in two TCP reads; send it in two writes too.
            split = block.find(b"agi_extension:")
            for part in (block[:split], block[split:]) if split > 0 else (block,):
                writer.write(part)
                await asyncio.wait_for(writer.drain(), 2.0)
            await self._command_loop(reader)
        except (ConnectionError, OSError) as exc:
            self.result.error = f"FastAGI socket failed: {exc}"
        finally:
            for task in list(self._notices):
                with contextlib.suppress(BaseException):
                    await task
            with contextlib.suppress(Exception):
                writer.close()
                await asyncio.wait_for(writer.wait_closed(), 1.0)

    async def _command_loop(self, reader: asyncio.StreamReader) -> None:
        for _ in range(self.fake.max_commands):
            try:
                data = await asyncio.wait_for(reader.readline(), self.fake.command_timeout_s)
            except TimeoutError:
                self.result.error = "agent sent no command in time"
                return
            if not data.endswith(b"\n"):
                # The script closed or half-closed: Asterisk always writes a last HANGUP.
                self.result.agi_closed_by_agent = True
                with contextlib.suppress(Exception):
                    await self._reply("HANGUP")
                return
            line = data.decode("utf-8", errors="replace").rstrip("\r\n")
            self.result.transcript.append(("to_asterisk", line))
            await self._dispatch(line)
        self.result.error = "too many commands"

    async def _dispatch(self, line: str) -> None:
        argv = parse_agi_command_args(line)
        words = [a.upper() for a in argv]
        if not words:
            await self._reply(INVALID_COMMAND_REPLY)
        elif words[0] == "ANSWER":
            if self.dead:
                await self._reply(DEAD_CHANNEL_REPLY)
            else:
                self.result.answered = True
                await self._reply("200 result=0")
        elif words[:2] == ["SET", "VARIABLE"] and len(argv) >= 4:
            self.result.variables[argv[2]] = argv[3]
            await self._reply("200 result=1")
        elif words[:2] == ["GET", "VARIABLE"] and len(argv) >= 3:
            await self._reply(self._get(argv[2]))
        elif words[:3] == ["GET", "FULL", "VARIABLE"] and len(argv) >= 4:
            expr = argv[3]
            name = expr[2:-1] if expr.startswith("${") and expr.endswith("}") else expr
            await self._reply(self._get(name))
        elif words[0] == "VERBOSE":
            await self._reply("200 result=1")
        elif words[:2] == ["CHANNEL", "STATUS"]:
            if self.dead:
                await self._reply(DEAD_CHANNEL_REPLY)
            else:
                await self._reply("200 result=6" if self.result.answered else "200 result=4")
        elif words[:2] == ["STREAM", "FILE"]:
            if len(argv) < 4:
                await self._reply(*STREAM_FILE_USAGE)
            elif self.dead:
                await self._reply(DEAD_CHANNEL_REPLY)
            else:
                await self._reply("200 result=0 endpos=0")
        elif words[0] == "HANGUP":
            if self.dead:
                await self._reply(DEAD_CHANNEL_REPLY)
            else:
                self.result.agent_hangup_command = True
                await self._reply("200 result=1")
                self._schedule_hangup_notice()
        elif words[0] == "EXEC" and len(argv) >= 2:
            await self._exec(argv[1], " ".join(argv[2:]))
        else:
            await self._reply(INVALID_COMMAND_REPLY)

    def _get(self, name: str) -> str:
        value = self.result.variables.get(name, self.builtins.get(name))
        return "200 result=0" if value is None else f"200 result=1 ({value})"

    async def _exec(self, app: str, args: str) -> None:
        if app.lower() != "audiosocket":
            self.result.exec_results.append(SimExecResult(app, args, 0))
            await self._reply("200 result=0")
            return
        result, reason = await self._audiosocket(args)
        self.result.exec_results.append(SimExecResult(app, args, result, reason))
        await self._reply(f"200 result={result}")
        if reason == "caller_hangup":
            self._schedule_hangup_notice()

    async def _audiosocket(self, args: str) -> tuple[int, str]:
        """Run AudioSocket(uuid,host:port) and return (result, end reason)."""
        uuid_text, _, address = args.partition(",")
        host, _, port_text = address.strip().rpartition(":")
        try:
            call_uuid = uuid_mod.UUID(uuid_text.strip())
            port = int(port_text)
        except ValueError:
            return -1, "bad_arguments"
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(host, port), self.fake.connect_timeout_s
            )
        except (OSError, TimeoutError):
            return -1, "connect_failed"
        if self.dead or not self.result.answered:
            # 22.10.1 checks for state Up: it opens and closes the socket with zero bytes.
            writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), 1.0)
            return -1, "not_answered"
        peer = SimAudioSocketPeer(
            reader, writer, call_uuid, rate_hz=self.fake.rate_hz, clock=self.fake.clock
        )
        self.result.peers.append(peer)
        media_task: asyncio.Task[None] | None = None
        try:
            await peer._start()
            media_task = asyncio.create_task(self._media(peer))
            reason = await peer._run(self.fake.idle_timeout_s)
        except (ConnectionError, OSError, TimeoutError):
            reason = peer.end_reason or "agent_closed"
        finally:
            await peer._stop()
            if media_task is not None and not media_task.done():
                media_task.cancel()
            if media_task is not None:
                with contextlib.suppress(BaseException):
                    await media_task
        if reason == "idle_timeout":
            self.result.idle_timeout_fired = True
        if reason == "fatal_frame" and peer.fatal_error:
            self.result.fatal_errors.append(peer.fatal_error)
        if reason == "caller_hangup":
            self.result.caller_hung_up = True
        return (0 if reason == "agent_hangup" else -1), reason

    async def _media(self, peer: SimAudioSocketPeer) -> None:
        try:
            await self.media(peer)
        except ConnectionError:
            pass
        except Exception:
            _LOGGER.exception("sim caller media failed for %s", peer.uuid)


async def place_call(
    agi_port: int,
    *,
    agi_host: str = "127.0.0.1",
    media: CallerMedia = silent_caller,
    rate_hz: int = 8000,
    idle_timeout_s: float = IDLE_TIMEOUT_S,
    callerid: str = "+14155550123",
    calleridname: str = "Alice Example",
    dnid: str = "510",
    extension: str | None = None,
    uniqueid: str | None = None,
    args: Sequence[str] = (),
    answered: bool = False,
) -> SimCallResult:
    """Place one simulated call into the agent listening on ``agi_host:agi_port``."""
    fake = FakeAsterisk(
        agi_host, agi_port, media=media, rate_hz=rate_hz, idle_timeout_s=idle_timeout_s
    )
    return await fake.place_call(
        callerid=callerid,
        calleridname=calleridname,
        dnid=dnid,
        extension=extension,
        uniqueid=uniqueid,
        args=args,
        answered=answered,
    )
