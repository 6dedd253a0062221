"""FreeSWITCH inbound Event Socket: live channel limits for the capacity governor.

Codec first: the parsers turn the bodies of ``api status``, ``api fsctl max_sessions``,
``api fsctl sps`` and ``api show calls count`` into numbers, and :func:`limits_from_esl` turns
those into a :class:`~agent.capacity.limits.LiveLimits`. They import neither gevent nor
asyncio, so the CLI and tests can use them anywhere.

Transport second: greenswitch 0.0.19's ``InboundESL`` on gevent, imported inside the functions
that need it. Used as is it can wait forever: ``connect()`` waits for the ``auth/request``
greeting without a timeout (and for ever when the peer closes before greeting), ``send()``
waits for its reply without a timeout (and for ever when the connection drops), and a body cut
short by EOF makes its reader loop on ``read()`` without yielding, which freezes the whole gevent
process. ``_bounded_inbound_class`` fixes the last two by subclassing; every call here also runs
under a ``gevent.Timeout``.

Recorded facts (``shared/fixtures/freeswitch/README.md``, FreeSWITCH 1.10.12): the greeting is
``Content-Type: auth/request``; ``auth <password>`` is answered ``+OK accepted`` or ``-ERR
invalid`` (then a disconnect notice and close); ``max-sessions`` N admits N-1 inbound SIP calls,
because sofia rejects an INVITE once ``sess_count >= sess_max`` counting the new session itself.
"""

from __future__ import annotations

import functools
import logging
import re
import time
from collections.abc import Callable
from typing import Any, TypedDict

from agent.capacity.limits import LiveLimits
from agent.errors import AgentError, ProtocolError

_LOGGER = logging.getLogger(__name__)

ESL_PORT = 8021
"""The port of FreeSWITCH's event_socket.conf.xml by default."""

# mod_commands.c status_function, one line each
_STATUS_SESSIONS = re.compile(r"^(\d+) session\(s\) - peak \d+", re.M)
_STATUS_SPS = re.compile(r"^\d+ session\(s\) per Sec out of max (\d+)", re.M)
_STATUS_MAX = re.compile(r"^(\d+) session\(s\) max\s*$", re.M)
_STATUS_IDLE = re.compile(r"^min idle cpu (\d+(?:\.\d+)?)/(\d+(?:\.\d+)?)\s*$", re.M)
# mod_commands.c ctl_function / show_function
_MAX_SESSIONS = re.compile(r"\+OK max sessions: (-?\d+)")
_SPS = re.compile(r"\+OK sessions per second: (-?\d+)")
_CALLS_COUNT = re.compile(r"(\d+) total\.")


class EslError(AgentError):
    """Inbound ESL could not be reached, closed early or did not answer in time."""


class EslAuthError(EslError):
    """FreeSWITCH refused the ESL password (``-ERR invalid``, then it disconnects)."""


class EslStatus(TypedDict):
    """Numbers read from ``api status``; None where the line is missing."""

    current_sessions: int | None
    """``N session(s) - peak ...``: sessions up now (what sofia compares with max-sessions)."""
    max_sessions: int | None
    """``N session(s) max``: the max-sessions setting."""
    sps_max: int | None
    """``... per Sec out of max N``: the sessions-per-second setting."""
    min_idle_cpu: float | None
    """``min idle cpu A/B``: A, the configured minimum (0.00 when not set)."""
    idle_cpu: float | None
    """``min idle cpu A/B``: B, the idle CPU percentage now."""


# --- codec -----------------------------------------------------------------------------------


def _short(text: str) -> str:
    return repr(text[:80])


def _is_error(text: str) -> bool:
    return text.lstrip().startswith("-ERR")


def parse_status(text: str) -> EslStatus:
    """The numbers in an ``api status`` body.

    Raises :class:`ProtocolError` for a ``-ERR`` reply or a body with none of the known lines.
    """
    if _is_error(text):
        raise ProtocolError(f"api status: {text.strip()[:80]}")
    sessions = _STATUS_SESSIONS.search(text)
    sps = _STATUS_SPS.search(text)
    most = _STATUS_MAX.search(text)
    idle = _STATUS_IDLE.search(text)
    if not (sessions or sps or most or idle):
        raise ProtocolError(f"api status: not a status reply: {_short(text)}")
    return EslStatus(
        current_sessions=int(sessions.group(1)) if sessions else None,
        max_sessions=int(most.group(1)) if most else None,
        sps_max=int(sps.group(1)) if sps else None,
        min_idle_cpu=float(idle.group(1)) if idle else None,
        idle_cpu=float(idle.group(2)) if idle else None,
    )


def _parse_one(pattern: re.Pattern[str], text: str, what: str) -> int | None:
    match = pattern.fullmatch(text.strip())
    if match:
        return int(match.group(1))
    if _is_error(text):  # e.g. an ESL user whose api commands are restricted
        return None
    raise ProtocolError(f"{what}: unexpected reply {_short(text)}")


def parse_max_sessions(text: str) -> int | None:
    """``+OK max sessions: 40`` -> 40; a ``-ERR`` reply -> None; anything else: ProtocolError."""
    return _parse_one(_MAX_SESSIONS, text, "api fsctl max_sessions")


def parse_sps(text: str) -> int | None:
    """``+OK sessions per second: 20`` -> 20; a ``-ERR`` reply -> None; else ProtocolError."""
    return _parse_one(_SPS, text, "api fsctl sps")


def parse_calls_count(text: str) -> int | None:
    """``\\n0 total.\\n`` (note the leading newline) -> 0; ``-ERR`` -> None; else ProtocolError."""
    return _parse_one(_CALLS_COUNT, text, "api show calls count")


def limits_from_esl(
    status: EslStatus | None,
    max_sessions: int | None,
    sps: int | None,
    calls_count: int | None,
    source: str,
    at: float,
) -> LiveLimits:
    """LiveLimits from the parsed replies; the ``fsctl`` values win over the status lines.

    ``max_calls`` is max-sessions N minus one (N admits N-1 inbound calls); N 0 or unknown ->
    None. ``current_calls`` is the session count from ``api status``, the number FreeSWITCH
    holds against max-sessions (a bridged call counts twice there; ``show calls count`` counts
    it once and is used only when the status line is missing). A configured ``min idle cpu``
    of 0 means the check is off and becomes None; the idle CPU now is kept as read.
    """
    status = status if status is not None else EslStatus(
        current_sessions=None, max_sessions=None, sps_max=None, min_idle_cpu=None, idle_cpu=None
    )
    most = max_sessions if max_sessions is not None else status["max_sessions"]
    per_second = sps if sps is not None else status["sps_max"]
    current = status["current_sessions"]
    min_idle = status["min_idle_cpu"]
    return LiveLimits(
        pbx="freeswitch",
        source=source,
        at=at,
        max_calls=max(most - 1, 0) if most is not None and most > 0 else None,
        current_calls=current if current is not None else calls_count,
        sessions_per_second=float(per_second) if per_second is not None and per_second > 0
        else None,
        min_idle_cpu=min_idle if min_idle is not None and min_idle > 0 else None,
        idle_cpu=status["idle_cpu"],
    )


# --- transport (gevent, imported lazily) -----------------------------------------------------


class _ConnectionGone(Exception):
    """The socket closed inside a message body."""


@functools.cache
def _bounded_inbound_class() -> type:
    """greenswitch's InboundESL, fixed so that no wait outlives the connection."""
    from greenswitch.esl import InboundESL, NotConnectedError

    class BoundedInboundESL(InboundESL):
        """InboundESL whose reader ends on EOF and fails every command still waiting."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            import gevent.event

            super().__init__(*args, **kwargs)
            self.gone = gevent.event.Event()

        @staticmethod
        def _read_socket(sock: Any, length: int) -> str:
            # greenswitch loops on read() forever when EOF cuts a body short
            data = b""
            while len(data) < length:
                chunk = sock.read(length - len(data))
                if not chunk:
                    raise _ConnectionGone(f"connection closed inside a {length}-byte body")
                data += chunk
            return data.decode("utf-8", errors="replace")

        def receive_events(self) -> None:
            try:
                super().receive_events()
            except Exception as exc:  # a reader must end, never die noisily
                _LOGGER.debug("ESL %s:%s reader stopped: %s", self.host, self.port, exc)
            finally:
                state: Any = self  # greenswitch's attributes carry no types
                state.connected = False
                state._run = False
                pending, state._commands_sent = state._commands_sent, []
                for result in pending:
                    result.set_exception(NotConnectedError("connection closed"))
                state._auth_request_event.set()  # connect() sees connected False, gives up
                self.gone.set()

        def authenticate(self) -> None:
            response = self.send(f"auth {self.password}")
            reply = response.headers.get("Reply-Text", "")
            if reply != "+OK accepted":
                # the reply is FreeSWITCH's ("-ERR invalid"), never the password
                raise EslAuthError(
                    f"ESL {self.host}:{self.port}: authentication failed ({reply[:60]})"
                )

    return BoundedInboundESL


def _close(conn: Any) -> None:
    """Say ``exit`` (bounded), close the socket, end both greenlets."""
    import gevent

    if conn.connected:
        with gevent.Timeout(1.0, False):
            try:
                conn.send("exit")
            except Exception:  # closing anyway
                pass
    conn._run = False
    conn.connected = False
    for closable in (getattr(conn, "sock_file", None), getattr(conn, "sock", None)):
        if closable is not None:
            try:
                closable.close()
            except OSError:
                pass
    greenlets = [g for g in (conn._receive_events_greenlet, conn._process_events_greenlet) if g]
    gevent.killall(greenlets, block=True, timeout=1.0)


def _open(host: str, port: int, password: str, timeout_s: float) -> Any:
    """Connect and authenticate within ``timeout_s``; raises EslError / EslAuthError."""
    import gevent
    from greenswitch.esl import NotConnectedError

    where = f"{host}:{port}"
    conn = _bounded_inbound_class()(host, port, password, timeout=timeout_s)
    timer = gevent.Timeout(timeout_s)
    timer.start()
    try:
        conn.connect()
    except gevent.Timeout as exc:
        _close(conn)
        if exc is not timer:
            raise
        raise EslError(f"ESL {where}: no auth/request greeting within {timeout_s:g} s") from None
    except EslError:
        _close(conn)
        raise
    except NotConnectedError as exc:  # greenswitch's connect timeout, or the peer closed
        _close(conn)
        reason = str(exc) if "timed out" in str(exc) else "closed before authentication"
        raise EslError(f"ESL {where}: {reason}") from None
    except OSError as exc:
        _close(conn)
        stage = "cannot connect" if getattr(conn, "sock_file", None) is None else "socket error"
        raise EslError(f"ESL {where}: {stage}: {exc.strerror or exc}") from None
    finally:
        timer.cancel()
    return conn


def _api(conn: Any, command: str) -> str:
    """One ``api`` command on an open connection; the caller bounds the wait."""
    from greenswitch.esl import NotConnectedError

    try:
        reply = conn.send(f"api {command}")
    except (NotConnectedError, OSError):
        raise EslError(f"ESL {conn.host}:{conn.port}: connection lost during api {command}") \
            from None
    if reply.headers.get("Content-Type") != "api/response":
        raise ProtocolError(f"api {command}: got {reply.headers.get('Content-Type')!r}")
    return str(getattr(reply, "data", ""))


def _read(conn: Any, source: str, clock: Callable[[], float]) -> LiveLimits:
    """``api status``, ``fsctl max_sessions``, ``fsctl sps``, ``show calls count``."""
    try:
        status = parse_status(_api(conn, "status"))
        max_sessions = parse_max_sessions(_api(conn, "fsctl max_sessions"))
        sps = parse_sps(_api(conn, "fsctl sps"))
        calls = parse_calls_count(_api(conn, "show calls count"))
    except ProtocolError as exc:
        raise ProtocolError(f"ESL {conn.host}:{conn.port}: {exc}") from None
    return limits_from_esl(status, max_sessions, sps, calls, source, clock())


def _bounded(timeout_s: float, where: str, step: Callable[[], LiveLimits]) -> LiveLimits:
    import gevent

    timer = gevent.Timeout(timeout_s)
    timer.start()
    try:
        return step()
    except gevent.Timeout as exc:
        if exc is not timer:
            raise
        raise EslError(f"ESL {where}: no answer within {timeout_s:g} s") from None
    finally:
        timer.cancel()


def fetch_esl_limits(
    host: str,
    port: int,
    password: str,
    timeout_s: float = 5.0,
    clock: Callable[[], float] = time.monotonic,
) -> LiveLimits:
    """Connect, authenticate, read the limits, say ``exit``; blocks the calling greenlet.

    Connect+auth+reading take ``timeout_s`` at most; the ``exit`` goodbye adds 1 s at most.

    Raises :class:`EslAuthError` for a wrong password, :class:`EslError` when FreeSWITCH is
    unreachable, closes early or does not answer in time, :class:`ProtocolError` for a reply it
    cannot read; each message names ``host:port`` and never the password.
    """
    where = f"{host}:{port}"
    started = time.monotonic()
    conn = _open(host, port, password, timeout_s)
    try:
        left = max(timeout_s - (time.monotonic() - started), 0.001)
        return _bounded(left, where, lambda: _read(conn, f"esl {where}", clock))
    finally:
        _close(conn)


class EslLimitsMonitor:
    """Polls the limits every ``poll_s`` over one inbound ESL connection, in a greenlet.

    ``latest`` is the last reading while the connection is up and None while unknown: before
    the first reading, and from the moment the connection drops, the password is refused or a
    poll fails until a new reading arrives (the governor then uses the config-file limits).
    Reconnects back off from ``retry_min_s``, doubling up to ``retry_max_s``.
    """

    def __init__(
        self,
        host: str,
        port: int,
        password: str,
        poll_s: float = 10.0,
        timeout_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
        *,
        retry_min_s: float = 1.0,
        retry_max_s: float = 60.0,
    ) -> None:
        if poll_s <= 0 or timeout_s <= 0:
            raise ValueError("poll_s and timeout_s must be > 0")
        if not 0 < retry_min_s <= retry_max_s:
            raise ValueError("need 0 < retry_min_s <= retry_max_s")
        self.host = host
        self.port = port
        self._password = password
        self.poll_s = poll_s
        self.timeout_s = timeout_s
        self._clock = clock
        self._retry_min_s = retry_min_s
        self._retry_max_s = retry_max_s
        self._latest: LiveLimits | None = None
        self._last_error: str | None = None
        self._connected = False
        self._greenlet: Any = None
        self._stopping: Any = None

    def __repr__(self) -> str:
        return f"EslLimitsMonitor({self.where})"

    @property
    def where(self) -> str:
        """``host:port`` of the inbound ESL endpoint."""
        return f"{self.host}:{self.port}"

    @property
    def latest(self) -> LiveLimits | None:
        """The last reading, or None while unknown (see the class docstring)."""
        return self._latest

    @property
    def connected(self) -> bool:
        """True while the greenlet holds an authenticated connection."""
        return self._connected

    @property
    def last_error(self) -> str | None:
        """Why the last connect or poll failed (no password in it); None after a good reading."""
        return self._last_error

    def start(self) -> None:
        """Spawn the polling greenlet; returns at once and never raises."""
        import gevent
        import gevent.event

        if self._greenlet is not None and not self._greenlet.dead:
            return
        self._stopping = gevent.event.Event()
        self._greenlet = gevent.spawn(self._run)

    def stop(self, timeout_s: float = 2.0) -> None:
        """Stop polling and close the connection; waits ``timeout_s`` at most, then kills."""
        greenlet, self._greenlet = self._greenlet, None
        if greenlet is not None:
            self._stopping.set()
            greenlet.join(timeout=timeout_s)
            if not greenlet.dead:
                greenlet.kill(block=True, timeout=1.0)
        self._latest = None
        self._connected = False

    def _run(self) -> None:
        import gevent

        delay = self._retry_min_s
        down_logged = False
        try:
            while not self._stopping.is_set():
                conn = None
                try:
                    conn = _open(self.host, self.port, self._password, self.timeout_s)
                    delay = self._retry_min_s
                    self._connected = True
                    _LOGGER.info("ESL %s: connected, polling every %g s", self.where, self.poll_s)
                    down_logged = False
                    while True:
                        step = functools.partial(_read, conn, f"esl {self.where}", self._clock)
                        reading = _bounded(self.timeout_s, self.where, step)
                        self._latest, self._last_error = reading, None
                        gevent.wait([self._stopping, conn.gone], timeout=self.poll_s, count=1)
                        if self._stopping.is_set():
                            return
                        if conn.gone.is_set():
                            raise EslError(f"ESL {self.where}: connection lost")
                except Exception as exc:  # every failure means: unknown now, try again later
                    self._latest, self._connected = None, False
                    self._last_error = self._describe(exc)
                    level = logging.DEBUG if down_logged else logging.WARNING
                    _LOGGER.log(level, "%s; retrying in %g s", self._last_error, delay,
                                exc_info=not isinstance(exc, (AgentError, OSError)))
                    down_logged = True
                finally:
                    if conn is not None:
                        _close(conn)
                if self._stopping.wait(delay):
                    return
                delay = min(delay * 2, self._retry_max_s)
        finally:
            self._latest, self._connected = None, False

    def _describe(self, exc: BaseException) -> str:
        if isinstance(exc, AgentError):
            text = str(exc)
        else:
            text = f"ESL {self.where}: {type(exc).__name__}: {exc}"
        return text.replace(self._password, "********") if self._password else text
