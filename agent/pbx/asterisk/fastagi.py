"""FastAGI for Asterisk: header/reply codec first, then the per-call channel and the server.

Wire facts come from ``shared/fixtures/asterisk/fastagi/`` (Asterisk 22.10.1). panoramisk's
own FastAGI server is not used: its header loop spins forever on a peer that closes mid-header.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from urllib.parse import parse_qsl

from panoramisk.utils import parse_agi_result

from agent.errors import AgentError, ProtocolError
from agent.pbx.tcp import TcpServerBase

_LOGGER = logging.getLogger(__name__)

_HEADER_NAME = re.compile(r"agi_[A-Za-z0-9_]+")
_ARG_NAME = re.compile(r"agi_arg_(\d+)")
_REPLY_LINE = re.compile(r"(\d{3})(?:([ -])(.*))?")
_RESULT = re.compile(r"result=(\S*)(?:\s+\((.*)\)|\s+(.*))?")
_SAFE_VALUE = re.compile(r"[A-Za-z0-9_.+:/@#*=-]+")
_NAME = re.compile(r"[^\s\"\\]+")

HANGUP_NOTICE = "HANGUP"


@dataclass(frozen=True)
class AgiEnvironment:
    """The ``agi_*`` header block Asterisk sends first, with plain field names."""

    network_script: str
    request: str
    channel: str
    language: str
    channel_type: str
    uniqueid: str
    version: str
    callerid: str
    calleridname: str
    dnid: str
    rdnis: str
    context: str
    extension: str
    priority: str
    accountcode: str
    threadid: str
    args: tuple[str, ...]
    script: str
    query: dict[str, str] = field(hash=False)
    raw: Mapping[str, str] = field(hash=False)


def parse_agi_env(block: bytes) -> AgiEnvironment:
    """Parse an ``agi_*`` header block (LF lines, optional final blank line)."""
    text = block.decode("utf-8", errors="replace")
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if lines and lines[-1] in ("", "\r"):
        lines.pop()
    raw: dict[str, str] = {}
    for number, line in enumerate(lines, start=1):
        line = line.removesuffix("\r")
        name, sep, value = line.partition(":")
        if not sep or not _HEADER_NAME.fullmatch(name):
            raise ProtocolError(f"malformed AGI header line {number}: {line[:80]!r}")
        raw[name] = value.removeprefix(" ")
    if not raw:
        raise ProtocolError("empty AGI header block")
    numbered = sorted(
        (int(m.group(1)), value)
        for name, value in raw.items()
        if (m := _ARG_NAME.fullmatch(name)) is not None
    )
    network_script = raw.get("agi_network_script", "")
    script, _, query_text = network_script.partition("?")
    return AgiEnvironment(
        network_script=network_script,
        request=raw.get("agi_request", ""),
        channel=raw.get("agi_channel", ""),
        language=raw.get("agi_language", ""),
        channel_type=raw.get("agi_type", ""),
        uniqueid=raw.get("agi_uniqueid", ""),
        version=raw.get("agi_version", ""),
        callerid=raw.get("agi_callerid", ""),
        calleridname=raw.get("agi_calleridname", ""),
        dnid=raw.get("agi_dnid", ""),
        rdnis=raw.get("agi_rdnis", ""),
        context=raw.get("agi_context", ""),
        extension=raw.get("agi_extension", ""),
        priority=raw.get("agi_priority", ""),
        accountcode=raw.get("agi_accountcode", ""),
        threadid=raw.get("agi_threadid", ""),
        args=tuple(value for _, value in numbered),
        script=script,
        query=dict(parse_qsl(query_text, keep_blank_values=True)),
        raw=MappingProxyType(raw),
    )


async def read_agi_env(
    reader: asyncio.StreamReader, max_bytes: int = 8192, timeout_s: float = 5.0
) -> AgiEnvironment:
    """Read the header block up to its blank line, bounded by ``max_bytes`` and ``timeout_s``."""
    block = bytearray()
    async with asyncio.timeout(timeout_s):
        while True:
            try:
                line = await reader.readline()
            except ValueError as exc:
                raise ProtocolError(f"AGI header line too long: {exc}") from None
            block += line
            if len(block) > max_bytes:
                raise ProtocolError(f"AGI header block exceeds {max_bytes} bytes")
            if not line.endswith(b"\n"):
                raise ProtocolError(
                    f"FastAGI peer closed during the header block after {len(block)} bytes"
                )
            if line in (b"\n", b"\r\n"):
                break
    return parse_agi_env(bytes(block))


@dataclass(frozen=True)
class AgiReply:
    """One AGI reply: code, ``result=`` value and data (parenthesised text or what follows)."""

    code: int
    result: str
    data: str
    raw: str

    @property
    def ok(self) -> bool:
        """True for a 200 reply."""
        return self.code == 200


class AgiCommandError(AgentError):
    """Asterisk refused an AGI command; ``reply`` holds what it said."""

    def __init__(self, reply: AgiReply, command: str = "") -> None:
        self.reply = reply
        self.command = command
        super().__init__(f"{command!r} -> {reply.raw.splitlines()[0] if reply.raw else ''}")


class AgiInvalidCommand(AgiCommandError):
    """510: invalid or unknown command."""


class AgiDeadChannelError(AgiCommandError):
    """511: command not permitted on a dead channel."""


class AgiUsageError(AgiCommandError):
    """520: usage error; ``reply.data`` holds the usage text."""


class AgiUnknownError(AgiCommandError):
    """Any other non-200 code."""


class AgiConnectionClosed(AgentError, ConnectionError):
    """The FastAGI socket closed (or was closed) while a reply was expected."""


# panoramisk names its outcomes; 511 is not one of them (it falls into AGIUnknownError).
_ERROR_BY_PANORAMISK_NAME: dict[str, type[AgiCommandError]] = {
    "AGIInvalidCommand": AgiInvalidCommand,
    "AGIUsageError": AgiUsageError,
    "AGIUnknownError": AgiUnknownError,
}


def error_for_reply(reply: AgiReply) -> type[AgiCommandError] | None:
    """Return the exception class for a non-200 reply, None for 100/200."""
    if reply.code in (100, 200):
        return None
    if reply.code == 511:
        return AgiDeadChannelError
    # panoramisk classifies the first line; it is only given lines that already passed our
    # shape check, because on a line without a leading code it raises from int('').
    name = parse_agi_result(reply.raw.split("\n", 1)[0]).get("error", "AGIUnknownError")
    return _ERROR_BY_PANORAMISK_NAME.get(name, AgiUnknownError)


def parse_agi_reply(lines: list[str]) -> AgiReply:
    """Build an AgiReply from its lines (one line, or a whole ``520-`` block)."""
    if not lines:
        raise ProtocolError("empty AGI reply")
    first = lines[0]
    match = _REPLY_LINE.fullmatch(first)
    if match is None:
        raise ProtocolError(f"malformed AGI reply line: {first[:80]!r}")
    code = int(match.group(1))
    rest = match.group(3) or ""
    raw = "\n".join(lines)
    if code == 520 and match.group(2) == "-":
        return AgiReply(code, "", "\n".join(lines[1:-1]), raw)
    # Parsed here, not with panoramisk: its parser turns ``result=-1`` into an error dict and
    # drops the value and data, but EXEC AudioSocket answers -1 for ordinary outcomes.
    result_match = _RESULT.match(rest)
    if code in (100, 200) and result_match is not None:
        data = result_match.group(2) or result_match.group(3) or ""
        return AgiReply(code, result_match.group(1), data, raw)
    return AgiReply(code, "", rest, raw)


def quote_agi_arg(value: str) -> str:
    """Quote an AGI argument when needed, escaping ``"`` and ``\\`` as res_agi parses them."""
    if "\n" in value or "\r" in value:
        raise ValueError("AGI arguments cannot contain line breaks")
    if _SAFE_VALUE.fullmatch(value):
        return value
    escaped = value.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


class AgiChannel:
    """One FastAGI connection: the environment and the command/reply exchange on it."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        env: AgiEnvironment,
    ) -> None:
        self.env = env
        self.hung_up = False
        self._reader = reader
        self._writer = writer
        self._lock = asyncio.Lock()
        self._closed_event = asyncio.Event()

    @property
    def closed(self) -> bool:
        """True once the socket reached EOF or was closed here."""
        return self._closed_event.is_set()

    async def wait_closed(self) -> None:
        """Return once the AGI side vanished (EOF seen by a pending read) or close() ran."""
        await self._closed_event.wait()

    def close(self) -> None:
        """Close the socket now; Asterisk then sends the SIP BYE if the call was hung up."""
        if not self._closed_event.is_set():
            self._closed_event.set()
        with contextlib.suppress(Exception):
            self._writer.close()

    async def _readline(self) -> str:
        """Read one LF-terminated line; EOF closes the channel and raises."""
        try:
            data = await self._reader.readline()
        except ValueError as exc:
            self.close()
            raise ProtocolError(f"AGI reply line too long: {exc}") from None
        except ConnectionError as exc:
            self.close()
            raise AgiConnectionClosed(f"FastAGI socket failed: {exc}") from None
        if not data.endswith(b"\n"):
            self.close()
            raise AgiConnectionClosed("FastAGI socket closed by Asterisk")
        return data.decode("utf-8", errors="replace").rstrip("\r\n")

    async def _read_reply(self) -> AgiReply:
        """Read lines until one whole reply, taking bare HANGUP lines as notices."""
        while True:
            line = await self._readline()
            if line == HANGUP_NOTICE:
                self.hung_up = True
                continue
            if line.startswith("520-"):
                lines = [line]
                # Usage text is bounded by the StreamReader line limit and this count.
                for _ in range(1000):
                    more = await self._readline()
                    if more == HANGUP_NOTICE:
                        self.hung_up = True
                        continue
                    lines.append(more)
                    if more.startswith("520 "):
                        return parse_agi_reply(lines)
                self.close()
                raise ProtocolError("AGI 520 usage block did not end")
            reply = parse_agi_reply([line])
            if reply.code == 100:
                continue
            return reply

    async def command(
        self, line: str, timeout_s: float | None = 10.0, *, check: bool = True
    ) -> AgiReply:
        """Send one command and return its reply; raise AgiCommandError on non-200 if check."""
        if "\n" in line or "\r" in line:
            raise ValueError("an AGI command is one line")
        async with self._lock:
            if self.closed:
                raise AgiConnectionClosed("FastAGI channel is closed")
            try:
                self._writer.write(line.encode("utf-8") + b"\n")
                async with asyncio.timeout(timeout_s):
                    await self._writer.drain()
                    reply = await self._read_reply()
            except TimeoutError:
                # A late reply would be taken for the next command's: the stream is lost.
                _LOGGER.warning(
                    "AGI %s: no reply to %r within %s s, closing",
                    self.env.uniqueid,
                    line,
                    timeout_s,
                )
                self.close()
                raise
            except ConnectionError as exc:
                self.close()
                if isinstance(exc, AgiConnectionClosed):
                    raise
                raise AgiConnectionClosed(f"FastAGI socket failed: {exc}") from None
            except ProtocolError:
                self.close()
                raise
        if check:
            error = error_for_reply(reply)
            if error is not None:
                raise error(reply, line)
        return reply

    async def wait_hangup_notice(self, timeout_s: float = 0.2) -> bool:
        """Read pending notices for up to ``timeout_s``; return ``hung_up``.

        After ``EXEC AudioSocket`` answers ``200 result=-1`` the ``HANGUP`` line that tells a
        caller hangup from an AudioSocket timeout follows about 45 ms later.
        """
        if self.hung_up or self.closed:
            return self.hung_up
        async with self._lock:
            try:
                async with asyncio.timeout(timeout_s):
                    while not self.hung_up:
                        line = await self._readline()
                        if line == HANGUP_NOTICE:
                            self.hung_up = True
                        else:
                            _LOGGER.warning(
                                "AGI %s: unexpected line %r", self.env.uniqueid, line[:80]
                            )
            except (TimeoutError, AgiConnectionClosed, ProtocolError):
                pass
        return self.hung_up

    async def answer(self) -> AgiReply:
        """ANSWER the channel (required before EXEC AudioSocket)."""
        return await self.command("ANSWER")

    async def set_variable(self, name: str, value: str) -> AgiReply:
        """SET VARIABLE; the value is quoted when it holds spaces or quotes."""
        if not _NAME.fullmatch(name):
            raise ValueError(f"bad AGI variable name {name!r}")
        return await self.command(f"SET VARIABLE {name} {quote_agi_arg(value)}")

    async def get_variable(self, name: str) -> str | None:
        """GET VARIABLE; None when the variable is not set."""
        if not _NAME.fullmatch(name):
            raise ValueError(f"bad AGI variable name {name!r}")
        reply = await self.command(f"GET VARIABLE {name}")
        return reply.data if reply.result == "1" else None

    async def exec(self, app: str, args: str = "", timeout_s: float | None = None) -> AgiReply:
        """EXEC a dialplan application; ``result`` is its return value (AudioSocket: 0 or -1)."""
        if not _NAME.fullmatch(app):
            raise ValueError(f"bad application name {app!r}")
        line = f"EXEC {app} {args}" if args else f"EXEC {app}"
        return await self.command(line, timeout_s)

    async def hangup(self) -> AgiReply:
        """HANGUP the channel; a 511 on an already dead channel is returned, not raised."""
        return await self.command("HANGUP", check=False)

    async def verbose(self, msg: str, level: int = 1) -> AgiReply:
        """VERBOSE a message to the Asterisk console/log."""
        escaped = msg.replace("\\", "\\\\").replace('"', '\\"')
        return await self.command(f'VERBOSE "{escaped}" {level}')


AgiHandler = Callable[[AgiChannel], Awaitable[None]]


@dataclass
class FastAgiStats:
    """Counters kept by a FastAgiServer."""

    accepted: int = 0
    malformed_header: int = 0
    header_timeouts: int = 0
    handler_errors: int = 0
    completed: int = 0


class FastAgiServer(TcpServerBase):
    """Asyncio FastAGI server: one AgiChannel per connection, handed to ``handler``."""

    kind = "FastAGI"

    def __init__(
        self,
        handler: AgiHandler,
        host: str = "127.0.0.1",
        port: int = 4573,
        header_timeout_s: float = 5.0,
        max_header_bytes: int = 8192,
    ) -> None:
        super().__init__(host, port)
        self.handler = handler
        self.header_timeout_s = header_timeout_s
        self.max_header_bytes = max_header_bytes
        self.stats = FastAgiStats()

    async def _after_connection(self, writer: asyncio.StreamWriter) -> None:
        """Close the FastAGI socket promptly: Asterisk sends the BYE only when it closes."""
        with contextlib.suppress(Exception):
            writer.close()
            await asyncio.wait_for(writer.wait_closed(), 1.0)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.stats.accepted += 1
        peer = writer.get_extra_info("peername")
        try:
            env = await read_agi_env(reader, self.max_header_bytes, self.header_timeout_s)
        except TimeoutError:
            self.stats.malformed_header += 1
            self.stats.header_timeouts += 1
            _LOGGER.warning(
                "FastAGI %s: no complete header within %.1f s, closing",
                peer,
                self.header_timeout_s,
            )
            return
        except (ProtocolError, ConnectionError) as exc:
            self.stats.malformed_header += 1
            _LOGGER.warning("FastAGI %s: bad header (%s), closing", peer, exc)
            return
        channel = AgiChannel(reader, writer, env)
        try:
            await self.handler(channel)
            self.stats.completed += 1
        except Exception:
            self.stats.handler_errors += 1
            _LOGGER.exception("FastAGI call %s: handler failed", env.uniqueid)
        finally:
            channel.close()
