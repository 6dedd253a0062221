"""Inbound ESL live limits, checked against byte-exact FreeSWITCH 1.10.12 recordings.

The parsers run here; the gevent transport runs only in subprocesses (this pytest process also
runs asyncio tests and must never import gevent or greenswitch), against a fake inbound ESL
server in a thread of this process that replays the recorded bytes.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from fixtures_path import FIXTURES

from agent.capacity.limits import LiveLimits
from agent.errors import ProtocolError
from agent.pbx.freeswitch.esl import CT_API_RESPONSE, CT_COMMAND_REPLY, EslMessage, parse_message
from agent.pbx.freeswitch.inbound import (
    EslStatus,
    limits_from_esl,
    parse_calls_count,
    parse_max_sessions,
    parse_sps,
    parse_status,
)

INBOUND = FIXTURES / "freeswitch" / "esl-inbound"
ROOT = Path(__file__).resolve().parents[1]
PASSWORD = "ClueCon"  # event_socket.conf.xml of the recording lab
WRONG = "WrongPassword-0815"


# --- the recordings ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Exchange:
    """One command our recording client sent and FreeSWITCH's reply to it."""

    command: str
    reply: EslMessage
    segments: tuple[bytes, ...]
    """The reply's bytes cut where FreeSWITCH's send()s were cut (chunks.jsonl)."""


def _fs_chunk_bounds(name: str) -> list[int]:
    text = (INBOUND / f"{name}.chunks.jsonl").read_text(encoding="utf-8")
    rows = [json.loads(line) for line in text.splitlines()]
    return [r["off"] for r in rows if r.get("dir") == "fs_to_client"]


def _cut(data: bytes, start: int, end: int, bounds: list[int]) -> tuple[bytes, ...]:
    cuts = [start, *[b for b in bounds if start < b < end], end]
    return tuple(data[a:b] for a, b in zip(cuts, cuts[1:], strict=False))


def recording(name: str) -> tuple[bytes, list[Exchange]]:
    """The greeting and every command/reply pair of one recording, in order."""
    data = (INBOUND / f"{name}.fs_to_client.bin").read_bytes()
    commands = (INBOUND / f"{name}.client_to_fs.bin").read_bytes().decode().split("\n\n")[:-1]
    bounds = _fs_chunk_bounds(name)
    replies: list[tuple[EslMessage, int, int]] = []
    offset = 0
    while offset < len(data):
        msg, used = parse_message(data[offset:])
        assert msg is not None, f"{name}: incomplete message at {offset}"
        if msg.content_type in (CT_COMMAND_REPLY, CT_API_RESPONSE):
            replies.append((msg, offset, offset + used))
        offset += used
    assert len(replies) == len(commands), name
    greeting = data[: data.index(b"\n\n") + 2]
    return greeting, [Exchange(cmd, msg, _cut(data, a, b, bounds))
                      for cmd, (msg, a, b) in zip(commands, replies, strict=True)]


GREETING, SESSION = recording("02_session")
_, MAXSESS = recording("03_max_sessions_3")
BAD_DATA = (INBOUND / "01_bad_password.fs_to_client.bin").read_bytes()


def body(exchanges: list[Exchange], command: str, nth: int = 0) -> str:
    """The api body of the nth reply to ``command``."""
    found = [e for e in exchanges if e.command == command]
    return found[nth].reply.body.decode("utf-8")


def test_recordings_pair_up_as_documented() -> None:
    assert GREETING == b"Content-Type: auth/request\n\n"
    assert [e.command for e in SESSION][:5] == [
        "auth ClueCon", "api status", "api fsctl max_sessions", "api fsctl sps",
        "api show calls count",
    ]
    assert SESSION[0].reply.reply_text == "+OK accepted"
    assert body(SESSION, "api fsctl max_sessions") == "+OK max sessions: 40\n"
    assert body(SESSION, "api show calls count") == "\n0 total.\n"
    # FreeSWITCH sent the `fsctl sps` reply in two pieces; the fake server does the same
    assert [len(s) for s in SESSION[3].segments] == [47, 28]
    assert SESSION[-1].command == "exit" and SESSION[-1].reply.reply_text == "+OK bye"
    assert BAD_DATA.startswith(GREETING)


# --- parsers -----------------------------------------------------------------------------------


def test_parse_recorded_status() -> None:
    assert parse_status(body(SESSION, "api status")) == EslStatus(
        current_sessions=0, max_sessions=40, sps_max=20, min_idle_cpu=0.0, idle_cpu=94.9)
    assert parse_status(body(SESSION, "api status", 1))["idle_cpu"] == 97.1


def test_parse_status_with_calls_up_and_max_sessions_3() -> None:
    assert parse_status(body(MAXSESS, "api status")) == EslStatus(
        current_sessions=3, max_sessions=3, sps_max=20, min_idle_cpu=0.0, idle_cpu=96.57)


def test_parse_status_with_min_idle_cpu_set() -> None:
    text = (FIXTURES / "freeswitch" / "config-samples" / "handwritten" / "validation.txt")
    section = text.read_text(encoding="utf-8").split("min_idle_cpu.xml loaded")[1]
    status = section.split("$ fs_cli -x status\n")[1].split("\n\n")[0]
    got = parse_status(status)
    assert got["min_idle_cpu"] == 25.0 and got["idle_cpu"] == 100.0
    assert got["max_sessions"] == 500 and got["sps_max"] == 50


def test_parse_one_line_replies() -> None:
    assert parse_max_sessions(body(SESSION, "api fsctl max_sessions")) == 40
    assert parse_max_sessions(body(MAXSESS, "api fsctl max_sessions 3")) == 3
    assert parse_max_sessions(body(MAXSESS, "api fsctl max_sessions 40")) == 40
    assert parse_sps(body(SESSION, "api fsctl sps")) == 20
    assert parse_calls_count(body(SESSION, "api show calls count")) == 0
    assert parse_calls_count(body(SESSION, "api show calls count", 1)) == 0
    assert parse_calls_count(body(MAXSESS, "api show calls count")) == 2


def test_parsers_refuse_what_they_do_not_know() -> None:
    assert parse_max_sessions("-ERR no reply\n") is None  # api refused: unknown, not an error
    assert parse_sps("-ERR permission denied\n") is None
    with pytest.raises(ProtocolError, match=r"^api fsctl sps: unexpected reply '\+OK\\n'$"):
        parse_sps("+OK\n")
    with pytest.raises(ProtocolError, match=r"^api fsctl max_sessions: unexpected reply "):
        parse_max_sessions(body(SESSION, "api fsctl sps"))
    with pytest.raises(ProtocolError, match=r"^api status: -ERR no reply$"):
        parse_status("-ERR no reply\n")
    with pytest.raises(ProtocolError, match=r"^api status: not a status reply: '\+OK max"):
        parse_status(body(SESSION, "api fsctl max_sessions"))


def test_limits_from_recorded_session() -> None:
    limits = limits_from_esl(
        parse_status(body(SESSION, "api status")),
        parse_max_sessions(body(SESSION, "api fsctl max_sessions")),
        parse_sps(body(SESSION, "api fsctl sps")),
        parse_calls_count(body(SESSION, "api show calls count")),
        "esl 127.0.0.1:8021", 3.5)
    assert limits == LiveLimits(pbx="freeswitch", source="esl 127.0.0.1:8021", at=3.5,
                                max_calls=39, current_calls=0, sessions_per_second=20.0,
                                min_idle_cpu=None, idle_cpu=94.9)


def test_limits_off_by_one_recording() -> None:
    # max_sessions 3 admitted 2 calls (2 x 503); status counted 3 sessions at that moment
    status = parse_status(body(MAXSESS, "api status"))
    calls = parse_calls_count(body(MAXSESS, "api show calls count"))
    limits = limits_from_esl(status, parse_max_sessions(body(MAXSESS, "api fsctl max_sessions 3")),
                             None, calls, "s", 0.0)
    assert limits.max_calls == 2
    assert limits.current_calls == 3
    assert limits.sessions_per_second == 20.0  # from the status line when fsctl sps is absent
    # without the status reply the call count stands in
    assert limits_from_esl(None, 3, None, calls, "s", 0.0).current_calls == 2


def test_limits_edges() -> None:
    status = parse_status(body(SESSION, "api status"))
    assert limits_from_esl(status, None, None, None, "s", 0.0).max_calls == 39  # status line
    assert limits_from_esl(status, 0, None, None, "s", 0.0).max_calls is None
    assert limits_from_esl(status, 1, None, None, "s", 0.0).max_calls == 0
    assert limits_from_esl(None, None, None, None, "s", 0.0) == LiveLimits("freeswitch", "s", 0.0)


# --- a fake FreeSWITCH inbound ESL (threads, no gevent) ---------------------------------------


class FakeInboundEsl:
    """Inbound ESL on 127.0.0.1 that answers with the recorded replies.

    ``plan`` gives each connection, in order, a behaviour: ``serve``; ``drop:N`` (close when
    the (N+1)th ``api status`` arrives); ``refuse`` (close before greeting); ``silent``
    (accept, never greet); ``truncate`` (the ``api status`` body stops short, then close);
    ``refused`` (``api status`` answered ``-ERR no reply``).
    Connections past the plan are served.
    """

    def __init__(self, password: str = PASSWORD, plan: tuple[str, ...] = ()) -> None:
        self.password = password
        self.plan = plan
        self.commands: list[list[str]] = []
        self.unknown: list[str] = []
        self.replies: dict[str, tuple[bytes, ...]] = {}
        for exchange in SESSION:
            self.replies.setdefault(exchange.command, exchange.segments)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.02)  # accept() wakes up to see _closed
        self._closed = threading.Event()
        self.port: int = self._listener.getsockname()[1]
        self._threads: list[threading.Thread] = []
        self._accepting = threading.Thread(target=self._accept, daemon=True)
        self._accepting.start()

    def __enter__(self) -> FakeInboundEsl:
        return self

    def __exit__(self, *_: object) -> None:
        self._closed.set()
        for thread in [self._accepting, *self._threads]:
            thread.join(timeout=5)

    def _accept(self) -> None:
        with self._listener:
            while not self._closed.is_set():
                try:
                    conn, _ = self._listener.accept()
                except TimeoutError:
                    continue
                self._start(conn)

    def _start(self, conn: socket.socket) -> None:
        conn.settimeout(5.0)  # accepted sockets inherit the listener's short timeout
        index = len(self.commands)
        self.commands.append([])
        mode = self.plan[index] if index < len(self.plan) else "serve"
        thread = threading.Thread(target=self._serve, args=(conn, index, mode), daemon=True)
        self._threads.append(thread)
        thread.start()

    @staticmethod
    def _send(conn: socket.socket, segments: tuple[bytes, ...]) -> None:
        for i, segment in enumerate(segments):
            if i:
                time.sleep(0.002)
            conn.sendall(segment)

    def _serve(self, conn: socket.socket, index: int, mode: str) -> None:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn.settimeout(5.0)
        with conn:
            if mode == "refuse":
                return
            if mode == "silent":
                try:
                    conn.recv(1)
                except OSError:
                    pass
                return
            conn.sendall(GREETING)
            buf, statuses = b"", 0
            while True:
                while b"\n\n" not in buf:
                    try:
                        data = conn.recv(4096)
                    except OSError:
                        return
                    if not data:
                        return
                    buf += data
                raw, buf = buf.split(b"\n\n", 1)
                command = raw.decode()
                self.commands[index].append(command)
                if command.startswith("auth "):
                    if command[5:] != self.password:
                        self._send(conn, (BAD_DATA[len(GREETING):],))
                        return  # FreeSWITCH closes at once
                    self._send(conn, self.replies["auth ClueCon"])
                elif command == "api status" and mode.startswith("drop:"):
                    statuses += 1
                    if statuses > int(mode.split(":")[1]):
                        return
                    self._send(conn, self.replies[command])
                elif command == "api status" and mode == "refused":
                    err = b"-ERR no reply\n"
                    conn.sendall(b"Content-Type: api/response\nContent-Length: %d\n\n%s"
                                 % (len(err), err))
                elif command == "api status" and mode == "truncate":
                    self._send(conn, (b"".join(self.replies[command])[:100],))
                    return
                elif command == "exit":
                    self._send(conn, self.replies[command])
                    return
                elif command in self.replies:
                    self._send(conn, self.replies[command])
                else:
                    self.unknown.append(command)
                    err = b"-ERR unknown command\n"
                    conn.sendall(b"Content-Type: api/response\nContent-Length: %d\n\n%s"
                                 % (len(err), err))


def py(code: str, *args: object, password: str = PASSWORD,
       timeout_s: float = 15.0) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh interpreter of this venv (gevent stays out of this process)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), ESL_PASSWORD=password)
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout_s, check=False)


FETCH = """
import dataclasses, json, logging, os, sys
logging.basicConfig(level=logging.DEBUG)
from agent.pbx.freeswitch.inbound import fetch_esl_limits
limits = fetch_esl_limits("127.0.0.1", int(sys.argv[1]), os.environ["ESL_PASSWORD"],
                          timeout_s=float(sys.argv[2]), clock=lambda: 7.0)
print(json.dumps({"limits": dataclasses.asdict(limits), "asyncio": "asyncio" in sys.modules}))
"""


def test_importing_the_parsers_pulls_in_no_event_loop() -> None:
    done = py("import sys, agent.pbx.freeswitch.inbound\n"
              "print(sorted({'gevent', 'greenswitch', 'asyncio'} & set(sys.modules)))")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_fetch_reads_the_recorded_limits() -> None:
    with FakeInboundEsl() as fake:
        done = py(FETCH, fake.port, 5.0)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert LiveLimits(**out["limits"]) == LiveLimits(
        pbx="freeswitch", source=f"esl 127.0.0.1:{fake.port}", at=7.0, max_calls=39,
        current_calls=0, sessions_per_second=20.0, min_idle_cpu=None, idle_cpu=94.9)
    assert out["asyncio"] is False
    assert fake.commands == [["auth ClueCon", "api status", "api fsctl max_sessions",
                              "api fsctl sps", "api show calls count", "exit"]]
    assert fake.unknown == []


def test_fetch_wrong_password() -> None:
    with FakeInboundEsl() as fake:
        done = py(FETCH, fake.port, 5.0, password=WRONG)
    assert fake.commands == [[f"auth {WRONG}"]]  # it was sent, so it could have leaked
    assert done.returncode != 0
    assert (f"EslAuthError: ESL 127.0.0.1:{fake.port}: authentication failed (-ERR invalid)"
            in done.stderr)
    assert WRONG not in done.stdout + done.stderr


def test_fetch_silent_peer_is_bounded() -> None:
    with FakeInboundEsl(plan=("silent",)) as fake:
        started = time.monotonic()
        done = py(FETCH, fake.port, 0.5)
        took = time.monotonic() - started
    assert done.returncode != 0
    assert f"ESL 127.0.0.1:{fake.port}: no auth/request greeting within 0.5 s" in done.stderr
    assert took < 5.0


def test_fetch_peer_closing_before_greeting() -> None:
    with FakeInboundEsl(plan=("refuse",)) as fake:
        done = py(FETCH, fake.port, 5.0)
    assert done.returncode != 0
    assert f"ESL 127.0.0.1:{fake.port}: closed before authentication" in done.stderr


def test_fetch_body_cut_short_does_not_freeze() -> None:
    # greenswitch alone spins in read() here and freezes every greenlet
    with FakeInboundEsl(plan=("truncate",)) as fake:
        done = py(FETCH, fake.port, 3.0, timeout_s=10.0)
    assert done.returncode != 0
    assert f"ESL 127.0.0.1:{fake.port}: connection lost during api status" in done.stderr


def test_fetch_unreadable_status_names_the_pbx() -> None:
    with FakeInboundEsl(plan=("refused",)) as fake:
        done = py(FETCH, fake.port, 3.0)
    assert done.returncode != 0
    assert f"ProtocolError: ESL 127.0.0.1:{fake.port}: api status: -ERR no reply" in done.stderr
    assert fake.commands[0][-1] == "exit"


def test_fetch_nothing_listening() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    done = py(FETCH, port, 2.0)
    assert done.returncode != 0
    assert f"ESL 127.0.0.1:{port}: cannot connect: " in done.stderr


MONITOR = """
import dataclasses, json, os, sys, time
import gevent
from agent.pbx.freeswitch.inbound import EslLimitsMonitor

mon = EslLimitsMonitor("127.0.0.1", int(sys.argv[1]), os.environ["ESL_PASSWORD"], poll_s=0.05,
                       timeout_s=2.0, retry_min_s=0.05, retry_max_s=0.2)
started = time.monotonic()
mon.start()
out = {"start_s": time.monotonic() - started}

def until(pred, limit=4.0):
    end = time.monotonic() + limit
    while time.monotonic() < end:
        if pred():
            return True
        gevent.sleep(0.005)
    return pred()

out["first"] = until(lambda: mon.latest is not None)
out["first_limits"] = dataclasses.asdict(mon.latest) if mon.latest else None
out["dropped"] = until(lambda: mon.latest is None)
out["error"] = mon.last_error
out["again"] = until(lambda: mon.latest is not None)
out["again_limits"] = dataclasses.asdict(mon.latest) if mon.latest else None
started = time.monotonic()
mon.stop()
out["stop_s"] = time.monotonic() - started
out["after_stop"] = mon.latest
print(json.dumps(out))
"""


def test_monitor_reconnects_after_a_drop() -> None:
    # connection 1 serves 2 polls and drops, 2 closes before greeting, 3 serves
    with FakeInboundEsl(plan=("drop:2", "refuse")) as fake:
        done = py(MONITOR, fake.port)
    assert done.returncode == 0, done.stderr
    out: dict[str, Any] = json.loads(done.stdout)
    assert out["start_s"] < 0.05
    assert out["first"] and out["dropped"] and out["again"]
    assert out["first_limits"]["max_calls"] == 39
    assert out["again_limits"]["max_calls"] == 39
    assert out["again_limits"]["at"] > out["first_limits"]["at"]
    assert out["error"].startswith(f"ESL 127.0.0.1:{fake.port}: ")
    assert out["stop_s"] < 2.0 and out["after_stop"] is None
    assert len(fake.commands) >= 3
    assert fake.commands[0][:2] == ["auth ClueCon", "api status"]
    assert fake.commands[1] == []
    assert fake.commands[2][-1] == "exit"  # stop() says goodbye
    assert fake.unknown == []
