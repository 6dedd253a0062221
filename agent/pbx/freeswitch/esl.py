"""FreeSWITCH Event Socket (ESL): a pure wire codec, no sockets here.

Every ESL message is a block of ``Name: value\\n`` lines ended by a blank line, followed by exactly
``Content-Length`` bytes of body when that header is present. A client-to-FreeSWITCH message starts
with a command line instead (``connect``, ``api status``, ``sendmsg <uuid>``). Events arrive
as ``text/event-plain``: the body is itself a header block with URL-encoded values, optionally
followed by ``Content-Length`` and a nested body. The outbound ``connect`` reply is the odd one
out: ONE header block holding a URL-encoded CHANNEL_DATA event with ``Content-Type:
command/reply`` last (``shared/fixtures/freeswitch/README.md`` has the recorded facts).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from urllib.parse import unquote

from agent.errors import ProtocolError

DEFAULT_MAX_HEADER_BYTES = 65536
DEFAULT_MAX_BODY_BYTES = 1 << 22

CT_AUTH_REQUEST = "auth/request"
CT_COMMAND_REPLY = "command/reply"
CT_API_RESPONSE = "api/response"
CT_EVENT_PLAIN = "text/event-plain"
CT_DISCONNECT_NOTICE = "text/disconnect-notice"

DISPOSITION_DISCONNECT = "disconnect"
DISPOSITION_LINGER = "linger"

DISCONNECT_BODY = b"Disconnected, goodbye.\nSee you at ClueCon! http://www.cluecon.com/\n"
"""The body FreeSWITCH 1.10.12 sends with the final disconnect notice (67 bytes)."""

# The connect reply ends with these, in this order (mod_event_socket.c parse_command "connect").
_CONNECT_TRAILER = ("Content-Type", "Reply-Text", "Socket-Mode", "Control")
_CONNECT_TRAILER_LOWER = frozenset(name.lower() for name in _CONNECT_TRAILER)

# switch_utils.h SWITCH_URL_UNSAFE; bytes below ' ' and above '~' are escaped as well.
_URL_UNSAFE = frozenset(b'\r\n #%&+:;<=>?@[\\]^`{|}"')
_HEX_UPPER = b"0123456789ABCDEF"
_DIGITS = re.compile(r"[0-9]+")
_NEGATIVE = re.compile(r"-[0-9]+")

Headers = tuple[tuple[str, str], ...]


def _first(headers: Headers, name: str) -> str | None:
    """First value of ``name`` (case-insensitive, as FreeSWITCH looks headers up)."""
    wanted = name.lower()
    for key, value in headers:
        if key.lower() == wanted:
            return value
    return None


def _all(headers: Headers, name: str) -> list[str]:
    """Every value of ``name`` in order (case-insensitive)."""
    wanted = name.lower()
    return [value for key, value in headers if key.lower() == wanted]


# --- URL coding --------------------------------------------------------------------------


def url_decode(value: str) -> str:
    """Percent-decode like switch_url_decode: ``%XX`` becomes a byte, ``+`` stays ``+``."""
    if "%" not in value:
        return value
    return unquote(value, encoding="utf-8", errors="replace")


def url_encode(value: str) -> str:
    """Percent-encode like switch_url_encode, as FreeSWITCH does when it serializes an event.

    Controls, bytes above ``~`` and ``SWITCH_URL_UNSAFE`` become ``%XX`` (upper-case hex); a ``%``
    already followed by two upper-case hex digits is left alone (FreeSWITCH does not double-encode).
    """
    raw = value.encode("utf-8")
    out = bytearray()
    end = len(raw)
    for i, byte in enumerate(raw):
        if byte == 0x25 and i + 2 < end and raw[i + 1] in _HEX_UPPER and raw[i + 2] in _HEX_UPPER:
            out.append(byte)
        elif byte < 0x20 or byte > 0x7E or byte in _URL_UNSAFE:
            out += b"%%%02X" % byte
        else:
            out.append(byte)
    return out.decode("ascii")


# --- messages ----------------------------------------------------------------------------


@dataclass(frozen=True)
class EslMessage:
    """One framed ESL message: headers in wire order (values as on the wire) and its body."""

    headers: Headers
    body: bytes
    command: str = ""
    """Command line of a client-to-FreeSWITCH message (``sendmsg``, ``api status``); else ''."""

    def get(self, name: str, default: str | None = None) -> str | None:
        """First value of header ``name`` (case-insensitive), or ``default``."""
        value = _first(self.headers, name)
        return default if value is None else value

    def get_all(self, name: str) -> list[str]:
        """Every value of header ``name`` in wire order (case-insensitive)."""
        return _all(self.headers, name)

    @property
    def content_type(self) -> str:
        """The Content-Type header, '' if there is none."""
        return self.get("Content-Type") or ""

    @property
    def reply_text(self) -> str:
        """The Reply-Text header as on the wire ('' if none; URL-encoded in the connect reply)."""
        return self.get("Reply-Text") or ""


@dataclass(frozen=True)
class _Head:
    """A parsed header block: where the body starts and how long it is."""

    command: str
    headers: Headers
    body_start: int
    body_len: int


def _parse_content_length(value: str, max_body_bytes: int) -> int:
    """Validate a Content-Length value against the body cap."""
    if not _DIGITS.fullmatch(value):
        if _NEGATIVE.fullmatch(value):
            raise ProtocolError(f"negative ESL Content-Length {value}")
        raise ProtocolError(f"invalid ESL Content-Length {value!r}")
    length = int(value)
    if length > max_body_bytes:
        raise ProtocolError(f"ESL body of {length} bytes exceeds limit {max_body_bytes}")
    return length


def _split_line(line: str, number: int) -> tuple[str, str]:
    """Split ``Name: value``; ProtocolError naming the 1-based line otherwise."""
    name, sep, value = line.partition(": ")
    if not sep or not name:
        raise ProtocolError(f"malformed ESL header line {number}: {line!r}")
    return name, value


def _is_command_line(line: str) -> bool:
    """True for a client command line: no ``Name: `` shape (header names hold no spaces)."""
    name, sep, _ = line.partition(": ")
    return not sep or not name or " " in name


def _parse_head(
    buf: bytes | bytearray,
    start: int,
    max_header_bytes: int,
    max_body_bytes: int,
    allow_command: bool,
    scan_from: int = 0,
) -> _Head | int:
    """Parse the header block at ``buf[start:]``.

    Returns the block (positions relative to ``start``) or, while the blank line has not arrived,
    the relative position to resume the search from.
    """
    if len(buf) > start and buf[start] == 0x0A:
        raise ProtocolError("ESL message starts with a blank line")
    limit = start + max_header_bytes + 2
    end = buf.find(b"\n\n", start + scan_from, limit)
    if end < 0:
        if len(buf) >= limit:
            raise ProtocolError(f"ESL header block exceeds limit {max_header_bytes} bytes")
        return max(len(buf) - start - 1, 0)
    lines = bytes(buf[start:end]).decode("utf-8", errors="replace").split("\n")
    command = ""
    first = 0
    if allow_command and _is_command_line(lines[0]):
        command = lines[0]
        first = 1
    headers = tuple(_split_line(lines[i], i + 1) for i in range(first, len(lines)))
    body_len = 0
    length_value = _first(headers, "Content-Length")
    if length_value is not None:
        body_len = _parse_content_length(length_value, max_body_bytes)
    return _Head(command, headers, end + 2 - start, body_len)


def parse_message(
    buf: bytes | bytearray,
    max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    *,
    allow_command: bool = True,
) -> tuple[EslMessage | None, int]:
    """Decode one message from the start of ``buf``; ``(None, 0)`` when more bytes are needed.

    With ``allow_command`` the first line may be a client command line (``sendmsg``); without it
    every line must be ``Name: value``, as in everything FreeSWITCH sends.
    """
    head = _parse_head(buf, 0, max_header_bytes, max_body_bytes, allow_command)
    if not isinstance(head, _Head):
        return None, 0
    end = head.body_start + head.body_len
    if len(buf) < end:
        return None, 0
    return EslMessage(head.headers, bytes(buf[head.body_start : end]), head.command), end


class EslDecoder:
    """Incremental decoder: feed it TCP chunks of any size, get whole messages back."""

    def __init__(
        self,
        max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
        *,
        allow_command: bool = True,
    ) -> None:
        self.max_header_bytes = max_header_bytes
        self.max_body_bytes = max_body_bytes
        self.allow_command = allow_command
        self._buf = bytearray()
        self._head: _Head | None = None
        self._scan_from = 0

    @property
    def pending_bytes(self) -> int:
        """Bytes held that do not yet make a whole message."""
        return len(self._buf)

    def feed(self, data: bytes) -> list[EslMessage]:
        """Add bytes and return every message completed by them."""
        self._buf += data
        messages: list[EslMessage] = []
        offset = 0
        while True:
            if self._head is None:
                # Resume the blank-line search where the last feed stopped, so a long header
                # block arriving in small pieces is scanned once.
                head = _parse_head(
                    self._buf,
                    offset,
                    self.max_header_bytes,
                    self.max_body_bytes,
                    self.allow_command,
                    self._scan_from,
                )
                if not isinstance(head, _Head):
                    self._scan_from = head
                    break
                self._head = head
                self._scan_from = 0
            start = offset + self._head.body_start
            end = start + self._head.body_len
            if len(self._buf) < end:
                break
            messages.append(
                EslMessage(self._head.headers, bytes(self._buf[start:end]), self._head.command)
            )
            self._head = None
            offset = end
        del self._buf[:offset]
        return messages

    def close(self) -> None:
        """Signal end of stream; raise ProtocolError if a partial message is left."""
        if self._buf:
            raise ProtocolError(f"truncated ESL message: {len(self._buf)} bytes left")


# --- events ------------------------------------------------------------------------------


def parse_header_block(data: bytes) -> Headers:
    """Parse ``Name: value`` lines (values as on the wire); blank lines only at the end."""
    text = data.decode("utf-8", errors="replace")
    lines = text.split("\n")
    while lines and lines[-1] == "":
        lines.pop()
    for number, line in enumerate(lines, 1):
        if line == "":
            raise ProtocolError(f"blank ESL header line {number} inside a header block")
    return tuple(_split_line(line, number) for number, line in enumerate(lines, 1))


@dataclass(frozen=True)
class EslEvent:
    """A FreeSWITCH event: its name, URL-decoded headers in wire order and nested body."""

    name: str
    headers: Headers
    body: bytes = b""

    def get(self, name: str, default: str | None = None) -> str | None:
        """First value of header ``name`` (case-insensitive), or ``default``."""
        value = _first(self.headers, name)
        return default if value is None else value

    def get_all(self, name: str) -> list[str]:
        """Every value of header ``name`` in order (case-insensitive)."""
        return _all(self.headers, name)

    def variable(self, name: str) -> str | None:
        """A channel variable carried as ``variable_<name>``."""
        return self.get(f"variable_{name}")

    @property
    def uuid(self) -> str | None:
        """The channel's Unique-ID, None for events without a channel."""
        return self.get("Unique-ID")

    @property
    def application(self) -> str | None:
        """Application of CHANNEL_EXECUTE / CHANNEL_EXECUTE_COMPLETE."""
        return self.get("Application")

    @property
    def application_data(self) -> str | None:
        """Application-Data of CHANNEL_EXECUTE / CHANNEL_EXECUTE_COMPLETE."""
        return self.get("Application-Data")

    @property
    def application_response(self) -> str | None:
        """Application-Response of CHANNEL_EXECUTE_COMPLETE (``_none_`` when the app set none)."""
        return self.get("Application-Response")

    @property
    def hangup_cause(self) -> str | None:
        """Hangup-Cause of CHANNEL_HANGUP / CHANNEL_HANGUP_COMPLETE."""
        return self.get("Hangup-Cause")


def parse_event(msg: EslMessage) -> EslEvent:
    """Decode a ``text/event-plain`` message into an event with URL-decoded headers."""
    if msg.content_type != CT_EVENT_PLAIN:
        raise ProtocolError(f"not an ESL event: Content-Type {msg.content_type!r}")
    split = msg.body.find(b"\n\n")
    if split < 0:
        block, rest = msg.body, b""
    else:
        block, rest = msg.body[: split + 1], msg.body[split + 2 :]
    raw = list(parse_header_block(block))
    # switch_event_serialize writes the nested body's Content-Length as the last line.
    if raw and raw[-1][0].lower() == "content-length":
        value = raw.pop()[1]
        length = _parse_content_length(value, len(msg.body))
        if length != len(rest):
            raise ProtocolError(
                f"ESL event body Content-Length {length} but {len(rest)} bytes follow"
            )
    elif rest:
        raise ProtocolError(f"unexpected {len(rest)} bytes after ESL event headers")
    headers = tuple((name, url_decode(value)) for name, value in raw)
    name = _first(headers, "Event-Name")
    if name is None:
        raise ProtocolError("ESL event has no Event-Name")
    return EslEvent(name, headers, rest)


# --- the outbound connect reply ----------------------------------------------------------


@dataclass(frozen=True)
class ChannelData:
    """The channel an outbound ESL session controls, from the ``connect`` reply."""

    uuid: str
    caller_id_number: str
    caller_id_name: str
    destination_number: str
    read_codec: str
    read_rate_hz: int
    answer_state: str
    variables: Mapping[str, str]
    """Channel variables (``variable_*`` headers without the prefix), URL-decoded."""
    raw: Mapping[str, str]
    """Every header, URL-decoded (first occurrence of a repeated name)."""
    channel_name: str = ""
    context: str = ""

    @classmethod
    def from_connect_reply(cls, msg: EslMessage) -> ChannelData:
        """Read the connect reply: ONE URL-encoded CHANNEL_DATA block ending in command/reply."""
        if msg.content_type != CT_COMMAND_REPLY:
            raise ProtocolError(
                f"ESL connect reply has Content-Type {msg.content_type!r}, "
                f"expected {CT_COMMAND_REPLY!r}"
            )
        reply = url_decode(msg.reply_text)
        if reply.rstrip("\n") != "+OK":
            raise ProtocolError(f"ESL connect failed: Reply-Text {reply!r}")
        decoded = tuple((name, url_decode(value)) for name, value in msg.headers)
        raw: dict[str, str] = {}
        for name, value in decoded:
            raw.setdefault(name, value)
        uuid = _first(decoded, "Unique-ID") or _first(decoded, "Channel-Call-UUID")
        if not uuid:
            raise ProtocolError("ESL connect reply carries no Unique-ID")
        variables: dict[str, str] = {}
        for name, value in decoded:
            if name.startswith("variable_"):
                variables.setdefault(name[len("variable_") :], value)
        rate_text = _first(decoded, "Channel-Read-Codec-Rate") or variables.get("read_rate")
        if rate_text is None:
            rate_hz = 8000
        elif _DIGITS.fullmatch(rate_text) and int(rate_text) > 0:
            rate_hz = int(rate_text)
        else:
            raise ProtocolError(f"invalid ESL Channel-Read-Codec-Rate {rate_text!r}")

        def pick(*names: str) -> str:
            for name in names:
                value = _first(decoded, name)
                if value is not None:
                    return value
            return ""

        return cls(
            uuid=uuid,
            caller_id_number=pick("Caller-Caller-ID-Number", "Channel-Caller-ID-Number"),
            caller_id_name=pick("Caller-Caller-ID-Name", "Channel-Caller-ID-Name"),
            destination_number=pick("Caller-Destination-Number", "Channel-Destination-Number"),
            read_codec=pick("Channel-Read-Codec-Name"),
            read_rate_hz=rate_hz,
            answer_state=pick("Answer-State"),
            variables=MappingProxyType(variables),
            raw=MappingProxyType(raw),
            channel_name=pick("Channel-Name"),
            context=pick("Caller-Context"),
        )


# --- serialization: what the app sends -----------------------------------------------------


def _check_line(text: str, what: str) -> None:
    """Reject text that would break ESL's line framing."""
    if "\n" in text or "\r" in text:
        raise ValueError(f"ESL {what} must not contain a newline: {text!r}")


def command(line: str) -> bytes:
    """Frame a one-line command (``connect``, ``myevents``, ``linger``, ``exit``, ``api ...``)."""
    _check_line(line, "command")
    if not line:
        raise ValueError("ESL command is empty")
    return (line + "\n\n").encode("utf-8")


def api(command_line: str) -> bytes:
    """Frame ``api <command_line>``; FreeSWITCH answers with an api/response."""
    return command(f"api {command_line}")


def sendmsg(
    call_command: str, headers: Sequence[tuple[str, str]], uuid: str | None = None
) -> bytes:
    """Frame ``sendmsg [uuid]`` with ``call-command`` first, then ``headers`` in order."""
    first = "sendmsg" if uuid is None else f"sendmsg {uuid}"
    _check_line(first, "sendmsg uuid")
    lines = [first, f"call-command: {call_command}"]
    _check_line(call_command, "call-command")
    for name, value in headers:
        _check_line(name, "header name")
        _check_line(value, "header value")
        if not name or ": " in name:
            raise ValueError(f"invalid ESL header name {name!r}")
        lines.append(f"{name}: {value}")
    return ("\n".join(lines) + "\n\n").encode("utf-8")


def execute(app: str, arg: str = "", uuid: str | None = None, event_lock: bool = False) -> bytes:
    """Frame ``sendmsg`` ``call-command: execute`` for a dialplan application."""
    headers = [("execute-app-name", app)]
    if arg:
        headers.append(("execute-app-arg", arg))
    if event_lock:
        headers.append(("event-lock", "true"))
    return sendmsg("execute", headers, uuid)


def unicast(
    local_ip: str,
    local_port: int,
    remote_ip: str,
    remote_port: int,
    transport: str = "udp",
    uuid: str | None = None,
) -> bytes:
    """Frame ``sendmsg`` ``call-command: unicast`` (no ``flags``: raw L16 at the read rate).

    ``local`` is FreeSWITCH's side of the UDP stream, ``remote`` is ours.
    """
    headers = [
        ("local-ip", local_ip),
        ("local-port", str(local_port)),
        ("remote-ip", remote_ip),
        ("remote-port", str(remote_port)),
        ("transport", transport),
    ]
    return sendmsg("unicast", headers, uuid)


def hangup(cause: str = "NORMAL_CLEARING", uuid: str | None = None) -> bytes:
    """Frame ``sendmsg`` ``call-command: hangup`` with a hangup cause."""
    return sendmsg("hangup", [("hangup-cause", cause)], uuid)


# --- serialization: what FreeSWITCH sends (for the simulator) --------------------------------


def serialize_message(msg: EslMessage) -> bytes:
    """Frame a message exactly as parsed: command line, headers as given, blank line, body."""
    lines = [msg.command] if msg.command else []
    lines.extend(f"{name}: {value}" for name, value in msg.headers)
    return ("\n".join(lines) + "\n\n").encode("utf-8") + msg.body


def serialize_auth_request() -> bytes:
    """The greeting of an inbound ESL connection."""
    return f"Content-Type: {CT_AUTH_REQUEST}\n\n".encode()


def serialize_reply(reply_text: str) -> bytes:
    """A ``command/reply`` with a one-line, unencoded Reply-Text (``+OK``, ``+OK bye``)."""
    _check_line(reply_text, "Reply-Text")
    return f"Content-Type: {CT_COMMAND_REPLY}\nReply-Text: {reply_text}\n\n".encode()


def serialize_api_response(body: bytes) -> bytes:
    """An ``api/response``: Content-Type, Content-Length, blank line, body."""
    head = f"Content-Type: {CT_API_RESPONSE}\nContent-Length: {len(body)}\n\n"
    return head.encode() + body


def _event_block(headers: Sequence[tuple[str, str]], body: bytes) -> bytes:
    """switch_event_serialize with URL encoding: ``Name: value`` lines, then blank line or body."""
    parts = [f"{name}: {url_encode(value) or '_undef_'}\n" for name, value in headers]
    text = "".join(parts).encode("utf-8")
    if body:
        return text + f"Content-Length: {len(body)}\n\n".encode() + body
    return text + b"\n"


def serialize_event(headers: Sequence[tuple[str, str]], body: bytes = b"") -> bytes:
    """A ``text/event-plain`` message framed as mod_event_socket sends it (values URL-encoded)."""
    block = _event_block(headers, body)
    head = f"Content-Length: {len(block)}\nContent-Type: {CT_EVENT_PLAIN}\n\n"
    return head.encode() + block


def serialize_connect_reply(
    headers: Sequence[tuple[str, str]],
    *,
    socket_mode: str = "async",
    control: str = "full",
) -> bytes:
    """The outbound ``connect`` reply: channel headers URL-encoded, the reply headers last.

    Any Content-Type / Reply-Text / Socket-Mode / Control in ``headers`` is dropped and the four
    are appended in FreeSWITCH's order, with Reply-Text ``+OK\\n`` (sent as ``%2BOK%0A``).
    """
    channel = [(n, v) for n, v in headers if n.lower() not in _CONNECT_TRAILER_LOWER]
    trailer = [
        ("Content-Type", CT_COMMAND_REPLY),
        ("Reply-Text", "+OK\n"),
        ("Socket-Mode", socket_mode),
        ("Control", control),
    ]
    return _event_block(channel + trailer, b"")


def serialize_disconnect_notice(uuid: str | None = None, body: bytes = DISCONNECT_BODY) -> bytes:
    """The final ``text/disconnect-notice``; with ``uuid`` in its outbound form, else inbound."""
    lines = [f"Content-Type: {CT_DISCONNECT_NOTICE}"]
    if uuid is not None:
        lines.append(f"Controlled-Session-UUID: {uuid}")
        lines.append(f"Content-Disposition: {DISPOSITION_DISCONNECT}")
    lines.append(f"Content-Length: {len(body)}")
    return ("\n".join(lines) + "\n\n").encode("utf-8") + body


def serialize_linger_notice(uuid: str, channel_name: str, linger_time_s: int = -1) -> bytes:
    """The ``text/disconnect-notice`` sent at hangup under ``linger`` (-1: no timeout)."""
    return (
        f"Content-Type: {CT_DISCONNECT_NOTICE}\n"
        f"Controlled-Session-UUID: {uuid}\n"
        f"Content-Disposition: {DISPOSITION_LINGER}\n"
        f"Channel-Name: {channel_name}\n"
        f"Linger-Time: {linger_time_s}\n"
        "Content-Length: 0\n\n"
    ).encode()
