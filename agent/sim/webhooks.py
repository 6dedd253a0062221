"""A local HTTP server standing in for the systems behind the agent (calendar, CRM, messages).

The test double of the webhook client: tests, the simulator and an operator trying the
booking flow point integrations at it. It records every request, can stall, fail or flap on
demand, and answers a small calendar (opening hours Mon-Fri 08:00-18:00, Sat 09:00-13:00,
30-minute slots) so a booking flow can be tried end to end:

* ``POST /calendar/availability`` ``{"when": "YYYY-MM-DD[THH:MM]"}`` -> the first free slot
* ``POST /calendar/bookings`` ``{"start", "name", "phone"}`` -> 201 with a booking id (409 taken)
* ``POST /messages`` -> a message id; any other path -> ``{"ok": true, "path": ...}``
* ``GET`` anything -> ``{"ok": true, "path": ..., "query": {...}}``

``python -m agent.sim.webhooks --port 8095`` runs it in the foreground.
"""

from __future__ import annotations

import argparse
import json
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from datetime import time as dtime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any, cast
from urllib.parse import parse_qs, urlsplit

MODES = ("answer", "stall", "error", "flap")
SLOT = timedelta(minutes=30)
#: weekday (Monday = 0) -> (opens, closes); Sunday closed
OPENING_HOURS: dict[int, tuple[dtime, dtime]] = {
    **{day: (dtime(8, 0), dtime(18, 0)) for day in range(5)},
    5: (dtime(9, 0), dtime(13, 0)),
}
SEARCH_DAYS = 14
SLOT_FORMAT = "%Y-%m-%dT%H:%M"


@dataclass
class RecordedRequest:
    """One request the server received."""

    method: str
    path: str
    query: dict[str, str]
    #: header names in lower case
    headers: dict[str, str]
    #: the parsed JSON body, or None (no body, or not JSON)
    json: Any
    #: time.monotonic() when it arrived
    received_at: float
    #: the server has finished its reply (written, or the client was gone)
    answered: bool = False


def parse_when(value: Any) -> datetime:
    """``YYYY-MM-DDTHH:MM`` or ``YYYY-MM-DD`` (= from 08:00); ValueError otherwise."""
    if not isinstance(value, str):
        raise ValueError("'when' must be a string YYYY-MM-DD or YYYY-MM-DDTHH:MM")
    try:
        return datetime.strptime(value, SLOT_FORMAT)
    except ValueError:
        pass
    try:
        return datetime.strptime(value, "%Y-%m-%d").replace(hour=8)
    except ValueError:
        raise ValueError(f"bad 'when' {value!r}: expected YYYY-MM-DD or "
                         "YYYY-MM-DDTHH:MM") from None


def is_open_slot(start: datetime) -> bool:
    """Whether a 30-minute slot starting at ``start`` lies within the opening hours."""
    hours = OPENING_HOURS.get(start.weekday())
    if hours is None or start.minute % 30 or start.second or start.microsecond:
        return False
    opens = datetime.combine(start.date(), hours[0])
    closes = datetime.combine(start.date(), hours[1])
    return opens <= start and start + SLOT <= closes


def first_free_slot(when: datetime, now: datetime, booked: set[str]) -> datetime | None:
    """The first open, unbooked slot at or after ``when`` and ``now``, within 14 days."""
    start = max(when, now)
    hour = start.replace(minute=0, second=0, microsecond=0)
    slot = hour + SLOT * math.ceil((start - hour) / SLOT)
    end = slot + timedelta(days=SEARCH_DAYS)
    while slot < end:
        hours = OPENING_HOURS.get(slot.weekday())
        next_day = datetime.combine(slot.date() + timedelta(days=1), dtime(0, 0))
        if hours is None:
            slot = next_day
            continue
        opens = datetime.combine(slot.date(), hours[0])
        slot = max(slot, opens)
        if slot + SLOT > datetime.combine(slot.date(), hours[1]):
            slot = next_day
            continue
        if slot.strftime(SLOT_FORMAT) not in booked:
            return slot
        slot += SLOT
    return None


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128  # the default listen backlog (5) drops bursts of connects
    owner: WebhookServer


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the webhook client's pool expects
    server_version = "pbx-agent-webhooks"
    timeout = 30  # idle keep-alive connections are closed after this (s)
    disable_nagle_algorithm = True  # headers and body go out at once (no 40 ms delayed ACK)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        """Quiet: tests and the simulator read ``requests`` instead."""

    def do_GET(self) -> None:
        """Every method goes through the same recorder."""
        self._handle()

    do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = do_GET

    def _handle(self) -> None:
        owner = cast(_HTTPServer, self.server).owner
        split = urlsplit(self.path)
        query = {key: values[-1] for key, values
                 in parse_qs(split.query, keep_blank_values=True).items()}
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = 0
        raw = self.rfile.read(length) if length > 0 else b""
        body: Any = None
        if raw.strip():
            try:
                body = json.loads(raw)
            except ValueError:
                body = None
        record = RecordedRequest(self.command, split.path, query,
                                 {key.lower(): value for key, value in self.headers.items()},
                                 body, time.monotonic())
        try:
            status, reply = owner._serve(record)
            self._send(status, reply)
        finally:
            owner._answered(record)

    def _send(self, status: int, reply: Any) -> None:
        data = b"" if reply is None or self.command == "HEAD" else json.dumps(reply).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if data:
                self.wfile.write(data)
            self.wfile.flush()
        except OSError:  # the client gave up (a stall outlasted its timeout)
            self.close_connection = True


class WebhookServer:
    """The stand-in integration server; ``with WebhookServer() as server: ...``."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *,
                 today: Callable[[], datetime] | None = None) -> None:
        """``port`` 0 = ephemeral; ``today`` is "now" for the calendar (default datetime.now)."""
        self.host = host
        self.port = port
        self.today: Callable[[], datetime] = today or datetime.now
        #: how long "stall" holds a request (released early by release())
        self.stall_s = 30.0
        #: the status of "error" answers (and of the failing half of "flap")
        self.error_status = 503
        self._mode = "answer"
        self._lock = threading.Lock()
        self._released = threading.Event()
        self._requests: list[RecordedRequest] = []
        self._stalling = 0
        self._flap_count = 0
        self._bookings: list[dict[str, Any]] = []
        self._messages = 0
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- control --------------------------------------------------------------------------

    @property
    def mode(self) -> str:
        """answer | stall | error | flap (odd-numbered requests answer, even ones fail)."""
        return self._mode

    @mode.setter
    def mode(self, value: str) -> None:
        if value not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {value!r}")
        with self._lock:
            self._mode = value
            self._flap_count = 0
            self._released.clear()

    def release(self) -> None:
        """End every stall now; no request stalls again until ``mode`` is set again."""
        self._released.set()

    @property
    def url(self) -> str:
        """``http://HOST:PORT`` (once started)."""
        if self._httpd is None:
            raise RuntimeError("the webhook server is not started")
        return f"http://{self.host}:{self._httpd.server_address[1]}"

    @property
    def requests(self) -> list[RecordedRequest]:
        """A snapshot of the requests received so far, oldest first."""
        with self._lock:
            return [replace(r, query=dict(r.query), headers=dict(r.headers))
                    for r in self._requests]

    @property
    def stalling(self) -> int:
        """Requests currently held in a stall."""
        with self._lock:
            return self._stalling

    @property
    def bookings(self) -> list[dict[str, Any]]:
        """Bookings made so far."""
        with self._lock:
            return [dict(b) for b in self._bookings]

    def start(self) -> WebhookServer:
        """Listen and serve in a background thread."""
        if self._httpd is not None:
            return self
        httpd = _HTTPServer((self.host, self.port), _Handler)
        httpd.owner = self
        self._httpd = httpd
        self._thread = threading.Thread(target=httpd.serve_forever, args=(0.05,),
                                        name="webhook-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Release stalls, stop serving and close the socket."""
        httpd, self._httpd = self._httpd, None
        self._released.set()
        if httpd is None:
            return
        httpd.shutdown()
        httpd.server_close()
        if self._thread is not None:
            self._thread.join(5.0)

    def __enter__(self) -> WebhookServer:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    # -- serving (handler threads) --------------------------------------------------------

    def _serve(self, record: RecordedRequest) -> tuple[int, Any]:
        failing = False
        with self._lock:
            self._requests.append(record)
            mode = self._mode
            if mode == "flap":
                self._flap_count += 1
                failing = self._flap_count % 2 == 0
        if mode == "stall":
            with self._lock:
                self._stalling += 1
            try:
                self._released.wait(self.stall_s)
            finally:
                with self._lock:
                    self._stalling -= 1
        elif mode == "error" or (mode == "flap" and failing):
            return self.error_status, {"error": "simulated failure"}
        return self._answer(record)

    def _answered(self, record: RecordedRequest) -> None:
        with self._lock:
            record.answered = True

    def _answer(self, record: RecordedRequest) -> tuple[int, Any]:
        if record.method == "HEAD":
            return 200, None
        if record.method == "GET":
            return 200, {"ok": True, "path": record.path, "query": record.query}
        if record.method == "POST":
            if record.path == "/calendar/availability":
                return self._availability(record.json)
            if record.path == "/calendar/bookings":
                return self._book(record.json)
            if record.path == "/messages":
                with self._lock:
                    self._messages += 1
                    return 200, {"ok": True, "message_id": f"MSG-{self._messages:04d}"}
        return 200, {"ok": True, "path": record.path}

    def _now(self) -> datetime:
        return self.today().replace(tzinfo=None)

    def _availability(self, body: Any) -> tuple[int, Any]:
        try:
            when = parse_when(body.get("when") if isinstance(body, dict) else None)
        except ValueError as exc:
            return 400, {"error": str(exc)}
        now = self._now()
        with self._lock:
            booked = {b["start"] for b in self._bookings}
        slot = first_free_slot(when, now, booked)
        if slot is None:
            return 200, {"available": False}
        return 200, {"available": True, "start": slot.strftime(SLOT_FORMAT),
                     "end": (slot + SLOT).strftime(SLOT_FORMAT)}

    def _book(self, body: Any) -> tuple[int, Any]:
        if not isinstance(body, dict):
            return 400, {"error": "expected a JSON object with start, name, phone"}
        try:
            start = datetime.strptime(str(body.get("start")), SLOT_FORMAT)
        except ValueError:
            return 400, {"error": "bad 'start': expected YYYY-MM-DDTHH:MM"}
        if not is_open_slot(start):
            return 400, {"error": "not a 30-minute slot within the opening hours"}
        if start < self._now():
            return 400, {"error": "slot is in the past"}
        key = start.strftime(SLOT_FORMAT)
        with self._lock:
            if any(b["start"] == key for b in self._bookings):
                return 409, {"error": "slot taken"}
            booking = {"booking_id": f"BK-{len(self._bookings) + 1:04d}", "start": key,
                       "name": str(body.get("name", "")), "phone": str(body.get("phone", ""))}
            self._bookings.append(booking)
        return 201, {"booking_id": booking["booking_id"], "start": key}


def main(argv: list[str] | None = None) -> int:
    """Run the server in the foreground until Ctrl-C."""
    parser = argparse.ArgumentParser(
        prog="python -m agent.sim.webhooks",
        description="A stand-in calendar/CRM webhook server for trying integrations.")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (127.0.0.1)")
    parser.add_argument("--port", type=int, default=8095, help="port (8095; 0 = any free)")
    parser.add_argument("--mode", choices=MODES, default="answer", help="answer, stall, ...")
    args = parser.parse_args(argv)
    server = WebhookServer(args.host, args.port)
    server.mode = args.mode
    server.start()
    print(f"webhook test server on {server.url} (Ctrl-C to stop)", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
