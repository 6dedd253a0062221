"""AMI live limits, checked against byte-exact Asterisk 22.10.1 recordings."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import pytest
from fixtures_path import FIXTURES

from agent.capacity.limits import LiveLimits
from agent.errors import AgentError, ProtocolError
from agent.pbx.asterisk.ami import (
    AmiAuthError,
    AmiError,
    AmiLimitsMonitor,
    limits_from_ami,
    parse_ami_message,
)

AMI = FIXTURES / "asterisk" / "ami"
T = TypeVar("T")
USER = "labtest"
SECRET = "labtest-secret"  # manager.conf of the recording lab
WRONG = "wrong-secret-4711"


def run(coro: Awaitable[T], timeout_s: float = 9.0) -> T:
    """Run a coroutine on a fresh loop with an overall timeout."""

    async def bounded() -> T:
        return await asyncio.wait_for(coro, timeout_s)

    return asyncio.run(bounded())


# --- the recordings ----------------------------------------------------------------------------


def timeline(name: str) -> list[dict[str, Any]]:
    text = (AMI / f"{name}.timeline.jsonl").read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines()]


def chunks(name: str, direction: str) -> list[bytes]:
    """What one direction sent, cut as recv()/send() saw it."""
    return [r["data"].encode("latin-1") for r in timeline(name) if r["dir"] == direction]


def replies(name: str) -> dict[str, bytes]:
    """Every reply Asterisk sent in a recording, by its ActionID, byte for byte."""
    data = b"".join(chunks(name, "from_asterisk"))
    banner, _, rest = data.partition(b"\r\n")
    assert banner == b"Asterisk Call Manager/11.0.0"
    out: dict[str, bytes] = {}
    for block in rest.split(b"\r\n\r\n")[:-1]:
        match = re.search(rb"^ActionID: (.*)$", block, re.M)
        if match:
            out[match.group(1).rstrip(b"\r").decode()] = block + b"\r\n\r\n"
    return out


BANNER = chunks("ami_session", "from_asterisk")[0]
SESSION = replies("ami_session")
FAILED = replies("ami_failed_login")


def segments_of(action_id: str) -> list[bytes]:
    """The TCP segments one reply of ami_session arrived in."""
    rows = timeline("ami_session")
    start = next(i for i, r in enumerate(rows)
                 if r["dir"] == "from_asterisk" and f"ActionID: {action_id}\r\n" in r["data"])
    out = []
    for row in rows[start:]:
        if row["dir"] != "from_asterisk":
            break
        out.append(row["data"].encode("latin-1"))
        if out[-1].endswith(b"\r\n\r\n") or out[-1] == b"\r\n":
            break
    assert b"".join(out) == SESSION[action_id]
    return out


def line_segments(message: bytes) -> list[bytes]:
    """Cut a reply as Asterisk cut its multi-segment reply: Response+ActionID, a line each, CRLF."""
    lines = [line + b"\r\n" for line in message[:-2].split(b"\r\n")[:-1]]
    return [lines[0] + lines[1], *lines[2:], b"\r\n"]


def with_action_id(message: bytes, action_id: str) -> bytes:
    """The recorded reply with the client's ActionID in place of the recorded one."""
    new, count = re.subn(rb"^ActionID: [^\r]*\r\n", f"ActionID: {action_id}\r\n".encode(),
                         message, count=1, flags=re.M)
    assert count == 1
    return new


def test_timeline_matches_raw_files() -> None:
    for name in ("ami_session", "ami_failed_login"):
        for direction in ("from_asterisk", "to_asterisk"):
            raw = (AMI / f"{name}.{direction}.raw").read_bytes()
            assert b"".join(chunks(name, direction)) == raw


def test_recorded_multi_segment_reply_is_one_line_per_segment() -> None:
    # the shape the fake server reproduces for CoreStatus (recorded: Command with 3 calls up)
    segs = segments_of("cmd-3calls")
    assert len(segs) == 6
    assert segs == line_segments(SESSION["cmd-3calls"])
    assert segs[-1] == b"\r\n"
    # CoreStatus itself came in one segment in this recording
    assert segments_of("corestatus-3calls") == [SESSION["corestatus-3calls"]]


# --- codec -------------------------------------------------------------------------------------


def test_parse_recorded_core_settings() -> None:
    settings = parse_ami_message(SESSION["coresettings-1"])
    assert settings["Response"] == "Success"
    assert settings["ActionID"] == "coresettings-1"
    assert settings["CoreMaxCalls"] == "50"
    assert settings["CoreMaxLoadAvg"] == "0.000000"
    assert settings["SystemName"] == ""
    assert settings["AsteriskVersion"] == "22.10.1"
    assert len(settings) == 14


def test_parse_repeated_header_keeps_every_value() -> None:
    reply = parse_ami_message(SESSION["cmd-3calls"])
    assert reply["Output"].split("\n") == [
        "3 active channels",
        "3 of 50 max active calls ( 6.00% of capacity)",
        "31 calls processed",
    ]


def test_parse_rejects_the_banner() -> None:
    with pytest.raises(ProtocolError, match=r"line 1: no 'Key: value' in 'Asterisk Call Manager"):
        parse_ami_message(BANNER)


def test_limits_from_recorded_replies() -> None:
    settings = parse_ami_message(SESSION["coresettings-1"])
    busy = limits_from_ami(settings, parse_ami_message(SESSION["corestatus-3calls"]),
                           "ami 127.0.0.1:5038", 12.5)
    assert busy == LiveLimits(pbx="asterisk", source="ami 127.0.0.1:5038", at=12.5,
                              max_calls=50, current_calls=3)
    idle = limits_from_ami(settings, parse_ami_message(SESSION["corestatus-idle"]), "s", 1.0)
    assert idle.current_calls == 0 and idle.max_calls == 50
    assert limits_from_ami(settings, None, "s", 1.0).current_calls is None


def test_limits_zero_means_unlimited_and_load_is_read() -> None:
    raw = SESSION["coresettings-2"]
    unlimited = raw.replace(b"CoreMaxCalls: 50\r\n", b"CoreMaxCalls: 0\r\n")
    assert unlimited != raw
    got = limits_from_ami(parse_ami_message(unlimited), None, "s", 0.0)
    assert got.max_calls is None and got.max_load is None
    loaded = raw.replace(b"CoreMaxLoadAvg: 0.000000", b"CoreMaxLoadAvg: 2.500000")
    assert limits_from_ami(parse_ami_message(loaded), None, "s", 0.0).max_load == 2.5


def test_limits_reject_a_malformed_number() -> None:
    bad = SESSION["coresettings-1"].replace(b"CoreMaxCalls: 50", b"CoreMaxCalls: lots")
    with pytest.raises(ProtocolError, match=r"^CoreMaxCalls: not a number: 'lots'$"):
        limits_from_ami(parse_ami_message(bad), None, "s", 0.0)


# --- a fake Asterisk that replays the recorded bytes -------------------------------------------


class FakeAmi:
    """AMI on 127.0.0.1 that answers with the recorded replies, the client's ActionID put in."""

    def __init__(self, *, secret: str = SECRET, failed_login_delay_s: float = 1.0,
                 status: str = "corestatus-3calls", silent: bool = False,
                 hang_up_at_once: bool = False, settings: bytes = SESSION["coresettings-1"],
                 ) -> None:
        self.secret = secret
        self.failed_login_delay_s = failed_login_delay_s  # recorded: 1.0 s
        self.status = status
        self.silent = silent
        self.hang_up_at_once = hang_up_at_once
        self.settings = settings
        self.port = 0
        self.connections = 0
        self.actions: list[dict[str, str]] = []
        self.unknown: list[str] = []
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    async def stop(self) -> None:
        """Stop listening and drop every connection (the port stays ours for a restart)."""
        assert self._server is not None
        self._server.close()
        for writer in list(self._writers):
            writer.close()
        await asyncio.wait_for(self._server.wait_closed(), 2.0)
        self._server = None

    async def _send(self, writer: asyncio.StreamWriter, segments: list[bytes]) -> None:
        for i, segment in enumerate(segments):
            if i:
                await asyncio.sleep(0.002)
            writer.write(segment)
            await writer.drain()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers.add(writer)
        writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            if self.hang_up_at_once:
                return
            if self.silent:  # accepts, then says nothing at all
                await asyncio.wait_for(reader.read(), 5.0)
                return
            await self._send(writer, [BANNER])
            logged_in = False
            while True:
                try:
                    block = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5.0)
                except (asyncio.IncompleteReadError, ConnectionError, TimeoutError):
                    return
                action = parse_ami_message(block)
                self.actions.append(action)
                name, aid = action.get("Action", "").lower(), action.get("ActionID", "")
                if name == "login":
                    if action.get("Username") == USER and action.get("Secret") == self.secret:
                        logged_in = True
                        await self._send(writer, [with_action_id(SESSION["login-1"], aid)])
                        continue
                    await asyncio.sleep(self.failed_login_delay_s)
                    await self._send(writer, [with_action_id(FAILED["login-bad-1"], aid)])
                    return  # Asterisk closes right after a failed login
                if not logged_in:  # not recorded: Asterisk's text for actions before a login
                    await self._send(writer, [f"Response: Error\r\nActionID: {aid}\r\n"
                                              f"Message: Permission denied\r\n\r\n".encode()])
                elif name == "coresettings":
                    await self._send(writer, [with_action_id(self.settings, aid)])
                elif name == "corestatus":
                    reply = with_action_id(SESSION[self.status], aid)
                    await self._send(writer, line_segments(reply))
                elif name == "ping":
                    await self._send(writer, [with_action_id(SESSION["ping-1"], aid)])
                elif name == "logoff":
                    await self._send(writer, [with_action_id(SESSION["logoff-1"], aid)])
                    return
                else:
                    self.unknown.append(name)
                    await self._send(writer, [f"Response: Error\r\nActionID: {aid}\r\n"
                                              f"Message: Invalid/unknown command\r\n\r\n".encode()])
        except ConnectionError:
            pass
        finally:
            self._writers.discard(writer)
            writer.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def wait_until(predicate: Callable[[], bool], timeout_s: float = 4.0) -> bool:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if predicate():
            return True
        await asyncio.sleep(0.01)
    return predicate()


def test_fake_server_sends_core_status_in_several_segments() -> None:
    async def body() -> int:
        fake = FakeAmi()
        port = await fake.start()
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        assert await reader.readuntil(b"\r\n") == BANNER
        writer.write(f"Action: Login\r\nActionID: a1\r\nUsername: {USER}\r\n"
                     f"Secret: {SECRET}\r\n\r\n".encode())
        assert await reader.readuntil(b"\r\n\r\n") == with_action_id(SESSION["login-1"], "a1")
        writer.write(b"Action: CoreStatus\r\nActionID: a2\r\n\r\n")
        data, reads = b"", 0
        while not data.endswith(b"\r\n\r\n"):
            data += await asyncio.wait_for(reader.read(4096), 2.0)
            reads += 1
        writer.close()
        await fake.stop()
        assert data == with_action_id(SESSION["corestatus-3calls"], "a2")
        return reads

    assert run(body()) > 1


# --- fetch_once ------------------------------------------------------------------------------


def test_fetch_once_reads_the_recorded_limits() -> None:
    async def body() -> tuple[LiveLimits, FakeAmi]:
        fake = FakeAmi()
        port = await fake.start()
        monitor = AmiLimitsMonitor("127.0.0.1", port, USER, SECRET, clock=lambda: 42.0)
        try:
            return await monitor.fetch_once(), fake
        finally:
            await fake.stop()

    limits, fake = run(body())
    assert limits == LiveLimits(pbx="asterisk", source=f"ami 127.0.0.1:{fake.port}", at=42.0,
                                max_calls=50, current_calls=3)
    assert [a["Action"] for a in fake.actions] == ["Login", "CoreSettings", "CoreStatus", "Logoff"]
    login = fake.actions[0]
    assert login["Username"] == USER and login["Events"] == "off"
    assert len({a["ActionID"] for a in fake.actions}) == 4
    assert fake.unknown == []


def test_fetch_once_idle_pbx_reports_zero_calls() -> None:
    async def body() -> LiveLimits:
        fake = FakeAmi(status="corestatus-idle")
        port = await fake.start()
        try:
            return await AmiLimitsMonitor("127.0.0.1", port, USER, SECRET).fetch_once()
        finally:
            await fake.stop()

    limits = run(body())
    assert limits.current_calls == 0 and limits.max_calls == 50


def test_fetch_once_wrong_secret(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)

    async def body() -> tuple[AmiError, int, float]:
        fake = FakeAmi()  # answers a bad login after the recorded 1.0 s, then closes
        port = await fake.start()
        started = time.monotonic()
        try:
            with pytest.raises(AmiAuthError) as info:
                await AmiLimitsMonitor("127.0.0.1", port, USER, WRONG).fetch_once()
        finally:
            await fake.stop()
        assert fake.actions[0]["Secret"] == WRONG  # it was sent, so it could have leaked
        return info.value, port, time.monotonic() - started

    error, port, took = run(body())
    text = str(error)
    assert text == (f"AMI 127.0.0.1:{port}: authentication failed for user 'labtest'"
                    " (Authentication failed)")
    assert WRONG not in text and WRONG not in repr(error.args)
    assert WRONG not in caplog.text
    assert 0.9 <= took < 3.0
    assert isinstance(error, AgentError)


def test_fetch_once_nothing_listening() -> None:
    port = free_port()

    async def body() -> AmiError:
        with pytest.raises(AmiError) as info:
            await AmiLimitsMonitor("127.0.0.1", port, USER, SECRET, timeout_s=2.0).fetch_once()
        return info.value

    error = run(body())
    assert str(error).startswith(f"AMI 127.0.0.1:{port}: cannot connect: ")
    assert not isinstance(error, AmiAuthError)


def test_fetch_once_silent_peer_is_bounded() -> None:
    async def body() -> tuple[AmiError, int, float]:
        fake = FakeAmi(silent=True)
        port = await fake.start()
        started = time.monotonic()
        try:
            with pytest.raises(AmiError) as info:
                await AmiLimitsMonitor("127.0.0.1", port, USER, SECRET,
                                       timeout_s=0.3).fetch_once()
        finally:
            await fake.stop()
        return info.value, port, time.monotonic() - started

    error, port, took = run(body())
    assert str(error) == f"AMI 127.0.0.1:{port}: no answer within 0.3 s"
    assert took < 1.5


def test_fetch_once_peer_hanging_up_at_once() -> None:
    async def body() -> tuple[AmiError, int]:
        fake = FakeAmi(hang_up_at_once=True)
        port = await fake.start()
        try:
            with pytest.raises(AmiError) as info:
                await AmiLimitsMonitor("127.0.0.1", port, USER, SECRET).fetch_once()
        finally:
            await fake.stop()
        return info.value, port

    error, port = run(body(), timeout_s=3.0)
    assert str(error) == f"AMI 127.0.0.1:{port}: connection closed before the login reply"


def test_fetch_once_malformed_value_names_the_pbx() -> None:
    bad = SESSION["coresettings-1"].replace(b"CoreMaxCalls: 50", b"CoreMaxCalls: many")

    async def body() -> tuple[ProtocolError, int]:
        fake = FakeAmi(settings=bad)
        port = await fake.start()
        try:
            with pytest.raises(ProtocolError) as info:
                await AmiLimitsMonitor("127.0.0.1", port, USER, SECRET).fetch_once()
        finally:
            await fake.stop()
        assert fake.actions[-1]["Action"] == "CoreStatus"  # closed without Logoff: fine
        return info.value, port

    error, port = run(body())
    assert str(error) == f"AMI 127.0.0.1:{port}: CoreMaxCalls: not a number: 'many'"


# --- the background monitor ------------------------------------------------------------------


def test_monitor_reconnects_after_the_server_drops_and_returns() -> None:
    async def body() -> None:
        fake = FakeAmi()
        port = await fake.start()
        ticks = iter(range(1, 10**6))
        monitor = AmiLimitsMonitor("127.0.0.1", port, USER, SECRET, poll_s=0.05,
                                   timeout_s=1.0, clock=lambda: float(next(ticks)),
                                   retry_min_s=0.05, retry_max_s=0.2)
        await monitor.start()
        try:
            assert await wait_until(lambda: monitor.latest is not None)
            first = monitor.latest
            assert first is not None and first.max_calls == 50 and first.current_calls == 3
            assert monitor.connected
            assert await wait_until(lambda: (monitor.latest or first).at > first.at)

            await fake.stop()  # AMI goes away: the reading is dropped at once, not kept stale
            assert await wait_until(lambda: monitor.latest is None, 2.0)
            assert not monitor.connected
            assert monitor.last_error is not None and f"127.0.0.1:{port}" in monitor.last_error
            await asyncio.sleep(0.3)  # a few refused reconnects
            assert monitor.latest is None

            await fake.start()  # same port
            assert await wait_until(lambda: monitor.latest is not None)
            again = monitor.latest
            assert again is not None and again.current_calls == 3 and again.at > first.at
            assert monitor.last_error is None
            # the dropped connection's manager does not reconnect by itself (panoramisk's
            # default would, 2 s after the drop, and keep a second session open)
            await asyncio.sleep(2.2)
            assert fake.connections == 2
        finally:
            await monitor.close()
        assert monitor.latest is None
        await fake.stop()

    run(body())


def test_monitor_backs_off_on_a_refused_login_and_stops_for_good(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)

    async def body() -> None:
        fake = FakeAmi(failed_login_delay_s=0.0)
        port = await fake.start()
        monitor = AmiLimitsMonitor("127.0.0.1", port, USER, WRONG, poll_s=0.05,
                                   retry_min_s=0.05, retry_max_s=0.2)
        await monitor.start()
        await asyncio.sleep(0.7)  # retries at ~0.05, 0.15, 0.35, 0.55 s
        assert monitor.latest is None and not monitor.connected
        assert monitor.last_error == (f"AMI 127.0.0.1:{port}: authentication failed for user"
                                      " 'labtest' (Authentication failed)")
        assert 3 <= fake.connections <= 6, fake.connections
        await monitor.close()
        after_close = fake.connections
        await asyncio.sleep(0.5)  # and nothing tries again
        assert fake.connections == after_close
        await fake.stop()

    run(body())
    assert WRONG not in caplog.text
    assert "authentication failed" in caplog.text


def test_ami_down_never_blocks() -> None:
    port = free_port()

    async def body() -> None:
        monitor = AmiLimitsMonitor("127.0.0.1", port, USER, SECRET, poll_s=0.05,
                                   retry_min_s=0.05, retry_max_s=0.1)
        started = time.monotonic()
        await monitor.start()
        assert time.monotonic() - started < 0.05
        assert monitor.latest is None
        assert await wait_until(lambda: monitor.last_error is not None, 2.0)
        assert monitor.last_error is not None
        assert monitor.last_error.startswith(f"AMI 127.0.0.1:{port}: cannot connect")
        await asyncio.sleep(0.3)
        assert monitor.latest is None and not monitor.connected
        started = time.monotonic()
        await monitor.close()
        assert time.monotonic() - started < 0.5

    run(body())


def test_start_twice_keeps_one_task() -> None:
    async def body() -> int:
        fake = FakeAmi()
        port = await fake.start()
        monitor = AmiLimitsMonitor("127.0.0.1", port, USER, SECRET, poll_s=0.05)
        await monitor.start()
        await monitor.start()
        assert await wait_until(lambda: monitor.latest is not None)
        await asyncio.sleep(0.2)
        await monitor.close()
        await fake.stop()
        return fake.connections

    assert run(body()) == 1


def test_log_handed_to_panoramisk_masks_the_secret(caplog: pytest.LogCaptureFixture) -> None:
    from agent.pbx.asterisk.ami import _RedactingLog

    caplog.set_level(logging.DEBUG)
    log = _RedactingLog(logging.getLogger("agent.pbx.asterisk.ami.panoramisk"), WRONG)
    try:
        raise OSError(f"write failed near {WRONG}")
    except OSError:
        # panoramisk's own line when a write fails: it prints the whole Login action
        log.exception("Fail to send %r", {"Action": "Login", "Secret": WRONG})
    log.debug("message %s", WRONG)
    assert WRONG not in caplog.text
    assert caplog.text.count("********") == 3
    assert "Fail to send" in caplog.text and "OSError" in caplog.text


# --- `pbx-agent limits --live` against the fake ------------------------------------------------


def test_limits_cli_live_reads_ami_and_never_prints_the_secret(
        tmp_path: Any, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    import threading

    from agent.cli import main

    loop = asyncio.new_event_loop()
    fake = FakeAmi()
    port = loop.run_until_complete(fake.start())
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        conf = tmp_path / "asterisk.conf"
        conf.write_text("[options]\nmaxcalls = 80\n")
        cfg = tmp_path / "agent.yaml"
        cfg.write_text(
            "transfers: {front-desk: PJSIP/100, billing: PJSIP/101, emergency: PJSIP/199}\n"
            "max_calls: 100\n"
            f"capacity:\n  pbx_conf: {conf}\n  capacity_report: {tmp_path / 'none.json'}\n"
            f"  live: {{address: 127.0.0.1:{port}, username: {USER}, "
            "secret_env: TEST_AMI_SECRET}\n")
        monkeypatch.setenv("TEST_AMI_SECRET", SECRET)
        assert main(["--config", str(cfg), "limits", "--live", "--json"]) == 0
        data = json.loads(capsys.readouterr().out)
        # the live CoreMaxCalls (50) wins over the file's maxcalls (80)
        assert (data["effective_capacity"], data["bound_by"]) == (50, "pbx")
        assert data["live"]["max_calls"] == 50 and data["live"]["current_calls"] == 3
        assert data["terms"][0]["source"] == f"ami 127.0.0.1:{port}"

        monkeypatch.setenv("TEST_AMI_SECRET", "wrong-" + SECRET)
        fake.failed_login_delay_s = 0.0
        assert main(["--config", str(cfg), "limits", "--live"]) == 0
        out = capsys.readouterr().out
        assert "authentication failed" in out and SECRET not in out
        assert "bound by pbx" in out and f"{conf}:2" in out  # back to the file's limit
    finally:
        asyncio.run_coroutine_threadsafe(fake.stop(), loop).result(5)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()
