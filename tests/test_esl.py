"""ESL codec, checked against byte-exact FreeSWITCH 1.10.12 recordings."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

import pytest
from fixtures_path import FIXTURES

from agent.errors import ProtocolError
from agent.pbx.freeswitch.esl import (
    CT_API_RESPONSE,
    CT_AUTH_REQUEST,
    CT_COMMAND_REPLY,
    CT_DISCONNECT_NOTICE,
    CT_EVENT_PLAIN,
    DISCONNECT_BODY,
    ChannelData,
    EslDecoder,
    EslEvent,
    EslMessage,
    api,
    command,
    execute,
    hangup,
    parse_event,
    parse_header_block,
    parse_message,
    sendmsg,
    serialize_api_response,
    serialize_auth_request,
    serialize_connect_reply,
    serialize_disconnect_notice,
    serialize_event,
    serialize_linger_notice,
    serialize_message,
    serialize_reply,
    unicast,
    url_decode,
    url_encode,
)

FS = FIXTURES / "freeswitch"
OUTBOUND = FS / "esl-outbound"
INBOUND = FS / "esl-inbound"

# Direction suffix -> True when FreeSWITCH wrote the bytes.
_DIRECTIONS = {
    "fs_to_server": True,
    "server_to_fs": False,
    "fs_to_client": True,
    "client_to_fs": False,
}


def _streams() -> list[Path]:
    paths = sorted(OUTBOUND.glob("*.bin")) + sorted((OUTBOUND / "greenswitch").glob("*.bin"))
    paths += sorted(INBOUND.glob("*.bin"))
    return [p for p in paths if p.name.split(".")[-2] in _DIRECTIONS]


STREAMS = _streams()
FS_STREAMS = [p for p in STREAMS if _DIRECTIONS[p.name.split(".")[-2]]]
CLIENT_STREAMS = [p for p in STREAMS if not _DIRECTIONS[p.name.split(".")[-2]]]


def _id(path: Path) -> str:
    return str(path.relative_to(FS))


def _stem(path: Path) -> str:
    return path.name.split(".")[0]


def _direction(path: Path) -> str:
    return path.name.split(".")[-2]


def _chunks(path: Path) -> list[bytes]:
    """The stream cut exactly as recv()/send() saw it (chunks.jsonl)."""
    data = path.read_bytes()
    rows = [json.loads(line) for line in (path.parent / f"{_stem(path)}.chunks.jsonl").open()]
    mine = [r for r in rows if r.get("dir") == _direction(path)]
    pieces = []
    expected_off = 0
    for row in mine:
        assert row["off"] == expected_off, f"{path.name}: chunk gap at {row['off']}"
        pieces.append(data[row["off"] : row["off"] + row["len"]])
        expected_off += row["len"]
    assert expected_off == len(data)
    return pieces


def _decode_all(pieces: list[bytes]) -> list[EslMessage]:
    decoder = EslDecoder()
    messages: list[EslMessage] = []
    for piece in pieces:
        messages.extend(decoder.feed(piece))
    decoder.close()
    return messages


def _raw_messages(data: bytes) -> list[tuple[EslMessage, bytes]]:
    """Each message with the exact bytes it was parsed from."""
    out = []
    offset = 0
    while offset < len(data):
        msg, used = parse_message(data[offset:])
        assert msg is not None, f"incomplete message at {offset}"
        out.append((msg, data[offset : offset + used]))
        offset += used
    return out


def _summary(path: Path) -> dict[str, Any] | None:
    summary = path.parent / f"{_stem(path)}.summary.json"
    if not summary.exists():
        return None
    result: dict[str, Any] = json.loads(summary.read_text())
    return result


def _connect_reply(name: str) -> EslMessage:
    msg, _ = parse_message((OUTBOUND / f"{name}.fs_to_server.bin").read_bytes())
    assert msg is not None
    return msg


def _events(path: Path) -> list[EslEvent]:
    return [
        parse_event(m)
        for m in EslDecoder().feed(path.read_bytes())
        if m.content_type == CT_EVENT_PLAIN
    ]


# --- every recording parses the same in any chunking ------------------------------------------


def test_fixture_set_is_complete() -> None:
    assert len(FS_STREAMS) == len(CLIENT_STREAMS) == 16
    assert {_direction(p) for p in STREAMS} == set(_DIRECTIONS)


@pytest.mark.parametrize("path", STREAMS, ids=_id)
def test_stream_parses_identically_in_any_chunking(path: Path) -> None:
    data = path.read_bytes()
    at_once = _decode_all([data])
    recorded = _decode_all(_chunks(path))
    byte_by_byte = _decode_all([data[i : i + 1] for i in range(len(data))])
    assert at_once
    assert recorded == at_once
    assert byte_by_byte == at_once
    assert b"".join(serialize_message(m) for m in at_once) == data


@pytest.mark.parametrize("path", STREAMS, ids=_id)
def test_parse_message_walks_the_whole_stream(path: Path) -> None:
    data = path.read_bytes()
    pairs = _raw_messages(data)
    assert [m for m, _ in pairs] == EslDecoder().feed(data)
    assert sum(len(raw) for _, raw in pairs) == len(data)
    for msg, raw in pairs:
        assert parse_message(raw[:-1]) == (None, 0)
        assert parse_message(raw + b"Content-Type: x") == (msg, len(raw))


def _summary_entry(msg: EslMessage) -> list[Any]:
    """Render a message the way the capture scripts wrote *.summary.json sequences."""
    ct = msg.content_type
    if ct == CT_EVENT_PLAIN:
        ev = parse_event(msg)
        return ["event", ev.name, ev.application, ev.application_data, ev.application_response]
    if ct == CT_COMMAND_REPLY:
        return ["command/reply", url_decode(msg.reply_text)]
    if ct == CT_API_RESPONSE:
        return ["api/response", msg.body.decode()]
    if ct == CT_DISCONNECT_NOTICE:
        return ["disconnect-notice", msg.get("Content-Disposition")]
    return [ct]


@pytest.mark.parametrize("path", [p for p in FS_STREAMS if _summary(p)], ids=_id)
def test_stream_matches_summary(path: Path) -> None:
    summary = _summary(path)
    assert summary is not None
    expected = [entry[1:] for entry in summary["sequence"] if entry[1] != "_SOCKET_CLOSED"]
    got = [_summary_entry(m) for m in EslDecoder().feed(path.read_bytes())]
    assert len(got) == len(expected)
    for mine, theirs in zip(got, expected, strict=True):
        if mine[0] == "event":
            # The summary keeps name, Application, Application-Data, Application-Response.
            assert mine[: len(theirs)] == theirs
        elif mine[0] == "api/response":
            assert mine[1].startswith(theirs[1])
        else:
            assert mine == theirs
    if "connect_header_count" in summary:
        connect = EslDecoder().feed(path.read_bytes())[0]
        assert len(connect.headers) == summary["connect_header_count"]
        assert ChannelData.from_connect_reply(connect).uuid == summary["uuid"]
        assert connect.get("variable_socket_resume") == summary["socket_resume"]


@pytest.mark.parametrize("name", ["gs_normal", "gs_hangup"])
def test_greenswitch_sessions_match_report(name: str) -> None:
    report = json.loads((OUTBOUND / "greenswitch" / f"{name}.report.json").read_text())
    messages = EslDecoder().feed(
        (OUTBOUND / "greenswitch" / f"{name}.fs_to_server.bin").read_bytes()
    )
    data = ChannelData.from_connect_reply(messages[0])
    assert len(data.raw) == report["connect.session_data_keys"]
    assert data.uuid == report["connect.Unique-ID"]
    assert data.caller_id_number == report["connect.caller_id_number"]
    assert str(data.read_rate_hz) == report["connect.Channel-Read-Codec-Rate"]
    assert data.variables["socket_resume"] == report["connect.variable_socket_resume"]
    # greenswitch re-joins multi-line values with "\n"; the wire (and this codec) has "\r\n".
    assert (
        data.variables["switch_r_sdp"]
        .replace("\r\n", "\n")
        .startswith(report["connect.variable_switch_r_sdp_first_80"])
    )


# --- re-serialization gives the recorded bytes ------------------------------------------------


@pytest.mark.parametrize("path", FS_STREAMS, ids=_id)
def test_freeswitch_messages_reserialize_byte_exact(path: Path) -> None:
    seen = set()
    for msg, raw in _raw_messages(path.read_bytes()):
        ct = msg.content_type
        seen.add(ct)
        if ct == CT_EVENT_PLAIN:
            ev = parse_event(msg)
            assert serialize_event(ev.headers, ev.body) == raw
        elif ct == CT_COMMAND_REPLY and msg.get("Event-Name") == "CHANNEL_DATA":
            decoded = [(name, url_decode(value)) for name, value in msg.headers]
            assert serialize_connect_reply(decoded) == raw
            channel_only = [h for h in decoded if h[0] not in {"Content-Type", "Reply-Text"}]
            assert serialize_connect_reply(channel_only) == raw
        elif ct == CT_COMMAND_REPLY:
            assert serialize_reply(msg.reply_text) == raw
        elif ct == CT_API_RESPONSE:
            assert serialize_api_response(msg.body) == raw
        elif ct == CT_AUTH_REQUEST:
            assert serialize_auth_request() == raw
        elif ct == CT_DISCONNECT_NOTICE and msg.get("Content-Disposition") == "linger":
            linger = int(msg.get("Linger-Time") or "0")
            uuid, channel = msg.get("Controlled-Session-UUID"), msg.get("Channel-Name")
            assert uuid and channel
            assert serialize_linger_notice(uuid, channel, linger) == raw
        elif ct == CT_DISCONNECT_NOTICE:
            assert msg.body == DISCONNECT_BODY
            assert serialize_disconnect_notice(msg.get("Controlled-Session-UUID")) == raw
        else:
            pytest.fail(f"unexpected message from FreeSWITCH: {msg}")
    assert CT_COMMAND_REPLY in seen


def _rebuild_command(msg: EslMessage) -> bytes:
    """Re-create a client message with the public serializers."""
    verb, _, rest = msg.command.partition(" ")
    if verb != "sendmsg":
        assert not msg.headers
        if verb == "api":
            return api(rest)
        return command(msg.command)
    uuid = rest or None
    call_command = msg.get("call-command")
    others = [(n, v) for n, v in msg.headers if n != "call-command"]
    if call_command == "execute":
        app = msg.get("execute-app-name")
        assert app is not None
        return execute(app, msg.get("execute-app-arg") or "", uuid, msg.get("event-lock") == "true")
    if call_command == "unicast" and msg.get("flags") is None:
        values = dict(others)
        return unicast(
            values["local-ip"],
            int(values["local-port"]),
            values["remote-ip"],
            int(values["remote-port"]),
            values["transport"],
            uuid,
        )
    assert call_command is not None
    return sendmsg(call_command, others, uuid)


@pytest.mark.parametrize("path", CLIENT_STREAMS, ids=_id)
def test_client_commands_reserialize_byte_exact(path: Path) -> None:
    for msg, raw in _raw_messages(path.read_bytes()):
        assert msg.command
        assert msg.content_type == ""
        assert _rebuild_command(msg) == raw


def test_full_session_commands_are_what_the_helpers_write() -> None:
    expected = (OUTBOUND / "01_full_session.server_to_fs.bin").read_bytes()
    built = b"".join(
        [
            command("connect"),
            command("myevents"),
            command("linger"),
            execute("answer"),
            unicast("127.0.0.1", 28000, "127.0.0.1", 28500),
            execute("set", "agent_result=TRANSFER"),
            command("exit"),
        ]
    )
    assert built == expected


# --- what the recordings say, through the codec -----------------------------------------------


def test_repeated_header_names_are_kept() -> None:
    events = _events(OUTBOUND / "08_caller_hangup_linger.fs_to_server.bin")
    complete = [e for e in events if e.name == "CHANNEL_HANGUP_COMPLETE"]
    assert len(complete) == 1
    causes = complete[0].get_all("Hangup-Cause")
    assert len(causes) == 2
    assert causes[0] == "NORMAL_CLEARING"
    assert complete[0].hangup_cause == causes[0]
    assert complete[0].variable("sip_hangup_disposition") == "recv_bye"
    msg = next(
        m
        for m in EslDecoder().feed(
            (OUTBOUND / "08_caller_hangup_linger.fs_to_server.bin").read_bytes()
        )
        if m.content_type == CT_EVENT_PLAIN and b"CHANNEL_HANGUP_COMPLETE" in m.body[:40]
    )
    assert len(parse_header_block(msg.body)) == len(complete[0].headers)


def test_event_values_are_url_decoded() -> None:
    events = _events(OUTBOUND / "01_full_session.fs_to_server.bin")
    names = [e.name for e in events]
    assert names == [
        "CHANNEL_EXECUTE",
        "CHANNEL_ANSWER",
        "CHANNEL_EXECUTE_COMPLETE",
        "CHANNEL_EXECUTE",
        "CHANNEL_EXECUTE_COMPLETE",
    ]
    done = events[-1]
    assert done.application == "set"
    assert done.application_data == "agent_result=TRANSFER"
    assert done.application_response == "_none_"
    assert done.uuid == "3e0df5a8-edbb-429e-a5bb-aea813dec9c3"
    assert done.get("Channel-Name") == "sofia/lab/sipp@127.0.0.1:5281"
    assert done.get("FreeSWITCH-IPv6") == "fd00::2"
    assert done.get("channel-name") == done.get("Channel-Name")
    assert done.variable("agent_result") == "TRANSFER"
    transfer = _events(OUTBOUND / "11_uuid_break_uuid_transfer.fs_to_server.bin")
    plays = [e for e in transfer if e.application == "playback"]
    assert plays[0].application_data == "tone_stream://%(1000,0,660)"
    assert plays[-1].application_response == "FILE PLAYED"


def test_message_level_values_stay_as_on_the_wire() -> None:
    msg = _connect_reply("01_full_session")
    assert msg.content_type == CT_COMMAND_REPLY
    assert msg.reply_text == "%2BOK%0A"
    assert msg.get("Channel-Name") == "sofia/lab/sipp%40127.0.0.1%3A5281"
    assert msg.headers[0] == ("Event-Name", "CHANNEL_DATA")
    assert [n for n, _ in msg.headers[-4:]] == [
        "Content-Type",
        "Reply-Text",
        "Socket-Mode",
        "Control",
    ]
    assert msg.body == b""
    assert msg.get("No-Such-Header") is None
    assert msg.get("No-Such-Header", "x") == "x"


def test_connect_reply_8k() -> None:
    data = ChannelData.from_connect_reply(_connect_reply("01_full_session"))
    assert data.uuid == "3e0df5a8-edbb-429e-a5bb-aea813dec9c3"
    assert data.read_rate_hz == 8000
    assert data.read_codec == "PCMU"
    assert data.answer_state == "ringing"
    assert data.caller_id_number == "sipp"
    assert data.caller_id_name == "sipp"
    assert data.destination_number == "110"
    assert data.channel_name == "sofia/lab/sipp@127.0.0.1:5281"
    assert data.context == "public"
    assert data.variables["socket_resume"] == "true"
    assert data.variables["read_rate"] == "8000"
    assert data.raw["Reply-Text"] == "+OK\n"
    assert data.raw["Socket-Mode"] == "async"
    assert data.raw["Control"] == "full"
    assert "variable_socket_resume" not in data.variables


def test_connect_reply_without_socket_resume() -> None:
    data = ChannelData.from_connect_reply(_connect_reply("04_end_noresume_close"))
    assert "socket_resume" not in data.variables
    assert data.destination_number == "120"


def test_connect_reply_g722_is_16k() -> None:
    raw = (FS / "unicast" / "07_g722_16k.connect_reply.bin").read_bytes()
    msg, used = parse_message(raw)
    assert msg is not None and used == len(raw)
    data = ChannelData.from_connect_reply(msg)
    assert data.read_codec == "G722"
    assert data.read_rate_hz == 16000
    assert data.variables["rtp_use_codec_rate"] == "8000"
    assert serialize_connect_reply([(n, url_decode(v)) for n, v in msg.headers]) == raw


def _connect_with(replace: dict[str, str | None]) -> EslMessage:
    msg = _connect_reply("01_full_session")
    headers = []
    for name, value in msg.headers:
        if name in replace:
            new = replace[name]
            if new is not None:
                headers.append((name, new))
        else:
            headers.append((name, value))
    return EslMessage(tuple(headers), b"")


def test_connect_reply_errors() -> None:
    with pytest.raises(ProtocolError) as err:
        ChannelData.from_connect_reply(_connect_with({"Reply-Text": "-ERR%20nope"}))
    assert str(err.value) == "ESL connect failed: Reply-Text '-ERR nope'"
    with pytest.raises(ProtocolError) as err:
        ChannelData.from_connect_reply(_connect_with({"Content-Type": "api/response"}))
    assert str(err.value) == (
        "ESL connect reply has Content-Type 'api/response', expected 'command/reply'"
    )
    with pytest.raises(ProtocolError) as err:
        ChannelData.from_connect_reply(
            _connect_with({"Unique-ID": None, "Channel-Call-UUID": None})
        )
    assert str(err.value) == "ESL connect reply carries no Unique-ID"
    with pytest.raises(ProtocolError) as err:
        ChannelData.from_connect_reply(_connect_with({"Channel-Read-Codec-Rate": "fast"}))
    assert str(err.value) == "invalid ESL Channel-Read-Codec-Rate 'fast'"
    defaulted = _connect_with({"Channel-Read-Codec-Rate": None, "variable_read_rate": None})
    assert ChannelData.from_connect_reply(defaulted).read_rate_hz == 8000
    plain_ok = EslMessage((("Content-Type", "command/reply"), ("Reply-Text", "+OK")), b"")
    with pytest.raises(ProtocolError, match="no Unique-ID"):
        ChannelData.from_connect_reply(plain_ok)


def test_disconnect_notices() -> None:
    linger, disconnect = (
        m
        for m in EslDecoder().feed(
            (OUTBOUND / "08_caller_hangup_linger.fs_to_server.bin").read_bytes()
        )
        if m.content_type == CT_DISCONNECT_NOTICE
    )
    assert linger.get("Content-Disposition") == "linger"
    assert linger.get("Linger-Time") == "-1"
    assert linger.body == b""
    assert disconnect.get("Content-Disposition") == "disconnect"
    assert disconnect.body == DISCONNECT_BODY
    assert len(DISCONNECT_BODY) == 67
    inbound = (INBOUND / "01_bad_password.fs_to_client.bin").read_bytes()
    assert inbound.endswith(serialize_disconnect_notice())


# --- URL coding ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("plain", "encoded"),
    [
        ("+OK\n", "%2BOK%0A"),
        ("sofia/lab/sipp@127.0.0.1:5281", "sofia/lab/sipp%40127.0.0.1%3A5281"),
        ("Thu, 26 Nov 2026 13:03:27 GMT", "Thu,%2026%20Nov%202026%2013%3A03%3A27%20GMT"),
        ("tone_stream://%(1000,0,660)", "tone_stream%3A//%25(1000,0,660)"),
        ("ARRAY::110|:110", "ARRAY%3A%3A110%7C%3A110"),
        ('a"b\\c\r\t~', "a%22b%5Cc%0D%09~"),
        ("caf\u00e9", "caf%C3%A9"),
        ("\x7f", "%7F"),
        ("a=b,c/d_e.f-g*h'i!j$k(l)", "a%3Db,c/d_e.f-g*h'i!j$k(l)"),
    ],
)
def test_url_coding(plain: str, encoded: str) -> None:
    assert url_encode(plain) == encoded
    assert url_decode(encoded) == plain


def test_url_coding_quirks() -> None:
    assert url_decode("a+b") == "a+b"
    assert url_decode("100%") == "100%"
    assert url_decode("%zz") == "%zz"
    # switch_url_encode does not double-encode an existing upper-case %XX ...
    assert url_encode("%41%2B") == "%41%2B"
    # ... but does escape a lower-case one or a lone percent.
    assert url_encode("%4a") == "%254a"
    assert url_encode("50%") == "50%25"
    assert url_encode("") == ""


# --- malformed input --------------------------------------------------------------------------


def _error(buf: bytes, **kwargs: Any) -> str:
    with pytest.raises(ProtocolError) as err:
        parse_message(buf, **kwargs)
    assert isinstance(err.value, ValueError)
    return str(err.value)


def test_malformed_header_lines() -> None:
    assert (
        _error(b"Content-Type: command/reply\nReply-Text: +OK\ngarbage\n\n")
        == "malformed ESL header line 3: 'garbage'"
    )
    assert _error(b"Content-Type: x\nName:value\n\n") == "malformed ESL header line 2: 'Name:value'"
    assert _error(b"Content-Type: x\n: value\n\n") == "malformed ESL header line 2: ': value'"
    assert _error(b"garbage\n\n", allow_command=False) == "malformed ESL header line 1: 'garbage'"
    assert _error(b"\nContent-Type: x\n\n") == "ESL message starts with a blank line"
    assert _error(b"\n") == "ESL message starts with a blank line"


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("abc", "invalid ESL Content-Length 'abc'"),
        ("", "invalid ESL Content-Length ''"),
        ("+5", "invalid ESL Content-Length '+5'"),
        (" 5", "invalid ESL Content-Length ' 5'"),
        ("1.5", "invalid ESL Content-Length '1.5'"),
        ("-5", "negative ESL Content-Length -5"),
    ],
)
def test_bad_content_length(value: str, message: str) -> None:
    assert (
        _error(f"Content-Type: api/response\nContent-Length: {value}\n\n+OK\n".encode()) == message
    )


def test_limits() -> None:
    big_header = b"X-Long: " + b"a" * 100 + b"\n\n"
    assert _error(big_header, max_header_bytes=64) == "ESL header block exceeds limit 64 bytes"
    # Still waiting for the blank line, but already past the cap.
    assert _error(b"X-Long: " + b"a" * 100, max_header_bytes=64) == (
        "ESL header block exceeds limit 64 bytes"
    )
    assert parse_message(b"X-Long: " + b"a" * 40, max_header_bytes=64) == (None, 0)
    exact = b"X: " + b"a" * 61 + b"\n\n"
    assert parse_message(exact, max_header_bytes=64)[1] == len(exact)
    assert (
        _error(b"Content-Length: 11\n\n", max_body_bytes=10)
        == "ESL body of 11 bytes exceeds limit 10"
    )
    assert parse_message(b"Content-Length: 10\n\n0123456789", max_body_bytes=10)[1] == 30
    decoder = EslDecoder(max_header_bytes=64)
    with pytest.raises(ProtocolError, match="exceeds limit 64"):
        for _ in range(20):
            decoder.feed(b"X-Long: aaaaaaaa")


def test_wrong_content_length_breaks_the_next_message() -> None:
    # One byte short: the left-over "\n" starts the next message.
    stream = b"Content-Type: api/response\nContent-Length: 3\n\n+OK\n" + serialize_reply("+OK")
    decoder = EslDecoder()
    with pytest.raises(ProtocolError) as err:
        decoder.feed(stream)
    assert str(err.value) == "ESL message starts with a blank line"
    # Two bytes short: the left-over "K\n" is no header line (FreeSWITCH never sends commands).
    stream = b"Content-Type: api/response\nContent-Length: 2\n\n+OK\n" + serialize_reply("+OK")
    with pytest.raises(ProtocolError) as err:
        EslDecoder(allow_command=False).feed(stream)
    assert str(err.value) == "malformed ESL header line 1: 'K'"


@pytest.mark.parametrize("path", STREAMS[:4] + FS_STREAMS[-3:], ids=_id)
def test_stream_cut_mid_message(path: Path) -> None:
    data = path.read_bytes()
    pairs = _raw_messages(data)
    last_raw = pairs[-1][1]
    for keep in (1, len(last_raw) // 2, len(last_raw) - 1):
        cut = len(data) - len(last_raw) + keep
        decoder = EslDecoder()
        messages = decoder.feed(data[:cut])
        assert len(messages) == len(pairs) - 1
        assert decoder.pending_bytes == keep
        with pytest.raises(ProtocolError) as err:
            decoder.close()
        assert str(err.value) == f"truncated ESL message: {keep} bytes left"


def test_decoder_close_on_clean_end() -> None:
    decoder = EslDecoder()
    assert decoder.feed(serialize_reply("+OK") + serialize_api_response(b"+OK\n")) == [
        EslMessage((("Content-Type", "command/reply"), ("Reply-Text", "+OK")), b""),
        EslMessage((("Content-Type", "api/response"), ("Content-Length", "4")), b"+OK\n"),
    ]
    assert decoder.pending_bytes == 0
    decoder.close()


# --- events with a nested body ----------------------------------------------------------------


def test_event_with_nested_body_round_trips() -> None:
    headers = [
        ("Event-Name", "BACKGROUND_JOB"),
        ("Job-UUID", "7f4db78a-17d7-11dd-b7a0-db4edd065621"),
        ("Job-Command", "originate"),
        ("Job-Command-Arg", "sofia/default/1005 '&park'"),
        ("Empty", ""),
    ]
    body = b"+OK 7f4dd2ca-17d7-11dd-b7a0-db4edd065621\n"
    wire = serialize_event(headers, body)
    block = (
        b"Event-Name: BACKGROUND_JOB\n"
        b"Job-UUID: 7f4db78a-17d7-11dd-b7a0-db4edd065621\n"
        b"Job-Command: originate\n"
        b"Job-Command-Arg: sofia/default/1005%20'%26park'\n"
        b"Empty: _undef_\n"
        b"Content-Length: 41\n\n" + body
    )
    assert wire == b"Content-Length: %d\nContent-Type: text/event-plain\n\n" % len(block) + block
    msg, used = parse_message(wire)
    assert msg is not None and used == len(wire)
    event = parse_event(msg)
    assert event.name == "BACKGROUND_JOB"
    assert event.body == body
    assert event.uuid is None
    assert event.get("Job-Command-Arg") == "sofia/default/1005 '&park'"
    assert event.get("Content-Length") is None
    assert event.get("Empty") == "_undef_"


def _event_msg(body: bytes) -> EslMessage:
    return EslMessage((("Content-Length", str(len(body))), ("Content-Type", CT_EVENT_PLAIN)), body)


def test_event_errors() -> None:
    with pytest.raises(ProtocolError) as err:
        parse_event(EslMessage((("Content-Type", "command/reply"),), b""))
    assert str(err.value) == "not an ESL event: Content-Type 'command/reply'"
    with pytest.raises(ProtocolError) as err:
        parse_event(_event_msg(b"Event-Name: X\nContent-Length: 5\n\nabc"))
    assert str(err.value) == "ESL event body Content-Length 5 but 3 bytes follow"
    with pytest.raises(ProtocolError) as err:
        parse_event(_event_msg(b"Event-Name: X\n\nabc"))
    assert str(err.value) == "unexpected 3 bytes after ESL event headers"
    with pytest.raises(ProtocolError) as err:
        parse_event(_event_msg(b"Core-UUID: x\n\n"))
    assert str(err.value) == "ESL event has no Event-Name"
    with pytest.raises(ProtocolError) as err:
        parse_event(_event_msg(b"Event-Name: X\nbroken\n\n"))
    assert str(err.value) == "malformed ESL header line 2: 'broken'"
    assert parse_header_block(b"A: 1\nB: x%20y\n\n") == (("A", "1"), ("B", "x%20y"))
    with pytest.raises(ProtocolError) as err:
        parse_header_block(b"A: 1\n\nB: 2\n")
    assert str(err.value) == "blank ESL header line 2 inside a header block"


# --- serializers --------------------------------------------------------------------------------


def test_command_serializers() -> None:
    assert command("connect") == b"connect\n\n"
    assert api("uuid_break abc all") == b"api uuid_break abc all\n\n"
    assert execute("playback", "/tmp/a.wav", uuid="u-1", event_lock=True) == (
        b"sendmsg u-1\ncall-command: execute\nexecute-app-name: playback\n"
        b"execute-app-arg: /tmp/a.wav\nevent-lock: true\n\n"
    )
    assert hangup("USER_BUSY") == b"sendmsg\ncall-command: hangup\nhangup-cause: USER_BUSY\n\n"
    assert unicast("127.0.0.1", 28000, "127.0.0.1", 28500, uuid="u-1").startswith(
        b"sendmsg u-1\ncall-command: unicast\nlocal-ip: 127.0.0.1\n"
    )
    assert b"flags" not in unicast("127.0.0.1", 1, "127.0.0.1", 2)
    parsed, _ = parse_message(execute("set", "agent_transfer_to=1000 XML default"))
    assert parsed is not None
    assert parsed.command == "sendmsg"
    assert parsed.get("execute-app-arg") == "agent_transfer_to=1000 XML default"


@pytest.mark.parametrize(
    "build",
    [
        lambda: command("exit\n"),
        lambda: command(""),
        lambda: execute("set", "a=b\nexit"),
        lambda: sendmsg("execute", [("bad\nname", "x")]),
        lambda: sendmsg("execute", [("", "x")]),
        lambda: sendmsg("execute\r", []),
        lambda: serialize_reply("+OK\n"),
    ],
)
def test_serializers_reject_line_breaks(build: Any) -> None:
    with pytest.raises(ValueError):
        build()


def test_reply_serializers() -> None:
    assert serialize_reply("+OK bye") == b"Content-Type: command/reply\nReply-Text: +OK bye\n\n"
    assert serialize_api_response(b"\n0 total.\n") == (
        b"Content-Type: api/response\nContent-Length: 10\n\n\n0 total.\n"
    )
    assert serialize_auth_request() == b"Content-Type: auth/request\n\n"
    assert serialize_linger_notice("u-1", "sofia/lab/x@y", 3) == (
        b"Content-Type: text/disconnect-notice\nControlled-Session-UUID: u-1\n"
        b"Content-Disposition: linger\nChannel-Name: sofia/lab/x@y\nLinger-Time: 3\n"
        b"Content-Length: 0\n\n"
    )
    reply = serialize_connect_reply(
        [("Event-Name", "CHANNEL_DATA"), ("Unique-ID", "u-1"), ("Channel-Read-Codec-Rate", "16000")]
    )
    msg, _ = parse_message(reply)
    assert msg is not None
    assert msg.reply_text == "%2BOK%0A"
    data = ChannelData.from_connect_reply(msg)
    assert (data.uuid, data.read_rate_hz) == ("u-1", 16000)


# --- the dialplan the ESL app is reached from -------------------------------------------------


def test_dialplan_runs_socket_then_branches_in_agent_post() -> None:
    path = Path(__file__).resolve().parents[1] / "dialplan" / "freeswitch" / "pbx_agent.xml"
    root = ElementTree.parse(path).getroot()
    context = root.find("context")
    assert context is not None and context.get("name") == "pbx-agent"
    extensions = {e.get("name"): e for e in context.iter("extension")}
    assert list(extensions)[-1] == "pbx_agent"
    entry = [(a.get("application"), a.get("data")) for a in extensions["pbx_agent"].iter("action")]
    apps = [app for app, _ in entry]
    assert ("socket", "127.0.0.1:8084 async full") in entry
    assert ("set", "socket_resume=true") in entry
    assert "answer" not in apps
    assert apps.index("set") < apps.index("socket") < apps.index("transfer")
    assert entry[-1] == ("transfer", "agent_post XML pbx-agent")
    fields = {
        c.get("field")
        for name, ext in extensions.items()
        if name and name.startswith("agent_post")
        for c in ext.iter("condition")
    }
    assert {"destination_number", "${agent_result}", "${agent_transfer_to}"} <= fields
