"""Asterisk Manager Interface (AMI): live channel limits for the capacity governor.

Codec first: :func:`parse_ami_message` and :func:`limits_from_ami` are pure and turn the
``CoreSettings`` / ``CoreStatus`` replies into a :class:`~agent.capacity.limits.LiveLimits`.
Transport second: panoramisk 1.4's :class:`~panoramisk.Manager` speaks the protocol (banner,
``Login``, ``ActionID`` matching, buffering of replies split over TCP segments); this module puts
a bound on every wait around it.

What panoramisk 1.4 does on its own, and why it is wrapped here (``_BoundedManager``):

* after a refused connect or a lost connection it schedules ``connect()`` again every
  ``reconnect_timeout`` seconds, forever, with a handle that ``close()`` cannot cancel; a
  one-shot :meth:`AmiLimitsMonitor.fetch_once` against a down AMI would leak that loop. Here
  the monitor owns reconnection (capped exponential backoff) and the manager never retries;
* an action whose connection drops is parked in ``awaiting_actions`` to be resent after a
  reconnect, so its future never resolves; here every pending future fails at once;
* no action has a timeout; here each connect+login and each poll runs under ``timeout_s``;
* its keepalive ``Ping`` is turned off: the polls are the keepalive;
* it logs through the logger it is given, and one of its messages (``Fail to send``) would
  print the ``Login`` action with its ``Secret``; the logger handed to it masks the secret.

Recorded facts (``shared/fixtures/asterisk/ami/README.md``, Asterisk 22.10.1): the banner
``Asterisk Call Manager/11.0.0\\r\\n`` comes alone without a blank line; a failed login is
answered after 1.0 s with ``Response: Error`` / ``Message: Authentication failed`` and the
connection is closed; ``CoreSettings`` carries ``CoreMaxCalls`` (``maxcalls``, 0 = unlimited)
and ``CoreMaxLoadAvg`` (``maxload``, 0 = unlimited); ``CoreStatus`` carries ``CoreCurrentCalls``.
"""

from __future__ import annotations

import asyncio
import logging
import math
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any

from panoramisk import Manager

from agent.capacity.limits import LiveLimits
from agent.errors import AgentError, ProtocolError

_LOGGER = logging.getLogger(__name__)

AMI_PORT = 5038
"""The port Asterisk's manager.conf listens on by default."""

_MASK = "********"


class AmiError(AgentError):
    """AMI could not be reached, refused an action or did not answer in time."""


class AmiAuthError(AmiError):
    """AMI refused the username/secret (``Response: Error``, then Asterisk closes)."""


# --- codec -----------------------------------------------------------------------------------


def parse_ami_message(data: bytes | str) -> dict[str, str]:
    """Headers of one AMI message (``Key: value`` lines, CRLF or LF, an optional blank end).

    A key seen twice (``Output`` in a ``Command`` reply) keeps every value, joined with ``\\n``.
    Raises :class:`ProtocolError` for a line without ``:`` (the banner is not a message).
    """
    text = data.decode("utf-8", errors="replace") if isinstance(data, bytes) else data
    headers: dict[str, str] = {}
    for number, line in enumerate(text.replace("\r\n", "\n").split("\n"), start=1):
        if not line:
            continue
        key, colon, value = line.partition(":")
        if not colon or not key.strip():
            raise ProtocolError(f"AMI message line {number}: no 'Key: value' in {line[:80]!r}")
        key = key.strip()
        value = value[1:] if value.startswith(" ") else value
        headers[key] = f"{headers[key]}\n{value}" if key in headers else value
    return headers


def _field(message: Mapping[str, Any], name: str) -> str | None:
    """``message[name]`` looked up case-insensitively, as Asterisk compares header names."""
    value = message.get(name)
    if value is None:
        wanted = name.lower()
        value = next((v for k, v in message.items() if k.lower() == wanted), None)
    if isinstance(value, list):  # panoramisk turns a repeated header into a list
        value = value[-1] if value else None
    return None if value is None else str(value).strip()


def _number(message: Mapping[str, Any], name: str) -> float | None:
    """A numeric header as float, None when absent or empty; ProtocolError when not a number."""
    text = _field(message, name)
    if not text:
        return None
    try:
        value = float(text)
    except ValueError:
        raise ProtocolError(f"{name}: not a number: {text[:40]!r}") from None
    if not math.isfinite(value):
        raise ProtocolError(f"{name}: not a finite number: {text[:40]!r}")
    return value


def limits_from_ami(
    settings: Mapping[str, str],
    status: Mapping[str, str] | None,
    source: str,
    at: float,
) -> LiveLimits:
    """LiveLimits from a ``CoreSettings`` reply and, when read, a ``CoreStatus`` reply.

    ``CoreMaxCalls`` 0 (or absent) means no limit and becomes None, as does ``CoreMaxLoadAvg``
    0; ``CoreCurrentCalls`` is taken as is (0 calls is a reading). Asterisk reports no
    sessions-per-second or idle-CPU limit, so those stay None.
    """
    max_calls = _number(settings, "CoreMaxCalls")
    max_load = _number(settings, "CoreMaxLoadAvg")
    current = _number(status, "CoreCurrentCalls") if status is not None else None
    return LiveLimits(
        pbx="asterisk",
        source=source,
        at=at,
        max_calls=int(max_calls) if max_calls is not None and max_calls > 0 else None,
        current_calls=int(current) if current is not None and current >= 0 else None,
        max_load=max_load if max_load is not None and max_load > 0 else None,
    )


# --- transport -------------------------------------------------------------------------------


class _RedactingLog:
    """The logger handed to panoramisk: formats its message, masks the secret, forwards it."""

    def __init__(self, logger: logging.Logger, secret: str) -> None:
        self._logger = logger
        self._secret = secret

    def _log(self, level: int, msg: object, args: tuple[object, ...], exc: bool = False) -> None:
        if not self._logger.isEnabledFor(level):
            return
        try:
            text = str(msg) % args if args else str(msg)
        except (TypeError, ValueError):
            text = " ".join(str(part) for part in (msg, *args))
        if exc:
            error = sys.exc_info()[1]
            if error is not None:
                text = f"{text}: {type(error).__name__}: {error}"
        if self._secret:
            text = text.replace(self._secret, _MASK)
        self._logger.log(level, "%s", text)

    def debug(self, msg: object, *args: object, **_: object) -> None:
        self._log(logging.DEBUG, msg, args)

    def info(self, msg: object, *args: object, **_: object) -> None:
        self._log(logging.INFO, msg, args)

    def warning(self, msg: object, *args: object, **_: object) -> None:
        self._log(logging.WARNING, msg, args)

    def error(self, msg: object, *args: object, **_: object) -> None:
        self._log(logging.ERROR, msg, args)

    def exception(self, msg: object, *args: object, **_: object) -> None:
        self._log(logging.ERROR, msg, args, exc=True)


class _BoundedManager(Manager):
    """panoramisk's Manager for one connection: no self-reconnect, no parked actions.

    ``lost`` resolves when the connection goes (peer close, error or :meth:`close`); every
    action still waiting for its reply then fails with :class:`ConnectionError`.
    """

    def __init__(self, **config: Any) -> None:
        super().__init__(**config)
        self._pending: set[asyncio.Future[Any]] = set()
        self.lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def send_action(self, action: Any, as_list: bool | None = None, **kwargs: Any) -> Any:
        """Send one action; the returned future fails if the connection goes first."""
        if self.protocol is None or self.lost.done():
            raise ConnectionError("not connected")
        future = super().send_action(action, as_list=as_list, **kwargs)
        self._pending.add(future)
        future.add_done_callback(self._pending.discard)
        return future

    def connection_made(self, f: asyncio.Future[Any]) -> None:
        # panoramisk reschedules connect() forever on failure; the caller sees the failure
        # by awaiting the connect task and decides itself whether to try again.
        if f.cancelled() or f.exception() is not None:
            return
        super().connection_made(f)

    def login(self, future: asyncio.Future[Any]) -> bool:
        if future.cancelled() or future.exception() is not None:
            self.authenticated_future = None
            return False
        return bool(super().login(future))

    def ping(self) -> None:
        """No keepalive pings: the monitor's polls keep the connection busy enough."""

    def connection_lost(self, exc: BaseException | None) -> None:
        # replaces panoramisk's version, which logs an error and schedules a reconnect
        self._connected = False
        pinger = getattr(self, "pinger", None)
        if pinger is not None:
            pinger.cancel()
            self.pinger = None
        self._fail_pending("connection lost")

    def close(self) -> None:
        """Close the connection and fail whatever is still waiting."""
        super().close()
        self._fail_pending("connection closed")

    def _fail_pending(self, reason: str) -> None:
        self.awaiting_actions.clear()
        for future in list(self._pending):
            if not future.done():
                future.set_exception(ConnectionError(reason))
                future.exception()  # retrieved: no "never retrieved" warning if nobody awaits
        self._pending.clear()
        if not self.lost.done():
            self.lost.set_result(None)


class AmiLimitsMonitor:
    """Reads CoreSettings + CoreStatus from AMI: once (:meth:`fetch_once`) or every ``poll_s``.

    ``latest`` is the last reading while the connection is up, and None while the values are
    unknown: before the first reading, and from the moment the connection is lost, a login is
    refused or a poll fails until a new reading arrives. The governor then falls back to the
    limits read from the config files. A reading is never kept after its connection is gone,
    so while one is there it is at most about ``poll_s`` old (``LiveLimits.at`` says exactly).
    Reconnects back off from ``retry_min_s``,
    doubling up to ``retry_max_s``. The secret never appears in a log line or an exception.
    """

    def __init__(
        self,
        host: str,
        port: int,
        username: str,
        secret: str,
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
        self.username = username
        self._secret = secret
        self.poll_s = poll_s
        self.timeout_s = timeout_s
        self._clock = clock
        self._retry_min_s = retry_min_s
        self._retry_max_s = retry_max_s
        self._latest: LiveLimits | None = None
        self._last_error: str | None = None
        self._connected = False
        self._task: asyncio.Task[None] | None = None
        self._manager: _BoundedManager | None = None

    def __repr__(self) -> str:
        return f"AmiLimitsMonitor({self.where}, user={self.username!r})"

    @property
    def where(self) -> str:
        """``host:port`` of the AMI endpoint."""
        return f"{self.host}:{self.port}"

    @property
    def source(self) -> str:
        """The ``LiveLimits.source`` of every reading (no credential in it)."""
        return f"ami {self.where}"

    @property
    def latest(self) -> LiveLimits | None:
        """The last reading, or None while unknown (see the class docstring)."""
        return self._latest

    @property
    def connected(self) -> bool:
        """True while the background task holds a logged-in connection."""
        return self._connected

    @property
    def last_error(self) -> str | None:
        """Why the last connect or poll failed (no secret in it); None after a good reading."""
        return self._last_error

    # -- one-shot --

    async def fetch_once(self) -> LiveLimits:
        """Connect, log in, read CoreSettings and CoreStatus, log off; all within ``timeout_s``.

        Raises :class:`AmiAuthError` when the login is refused, :class:`AmiError` when AMI is
        unreachable, closes early, refuses an action or does not answer in time, and
        :class:`ProtocolError` for a malformed value; each message names ``host:port``.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout_s
        manager: _BoundedManager | None = None
        try:
            async with asyncio.timeout_at(deadline):
                manager = await self._login()
                limits = await self._read(manager)
            try:
                async with asyncio.timeout_at(deadline):
                    await manager.send_action({"Action": "Logoff"})
            except (TimeoutError, OSError):
                _LOGGER.debug("AMI %s: no Logoff reply; closing anyway", self.where)
            return limits
        except TimeoutError:
            raise AmiError(f"AMI {self.where}: no answer within {self.timeout_s:g} s") from None
        finally:
            if manager is not None:
                manager.close()

    # -- background polling --

    async def start(self) -> None:
        """Start polling in a background task; returns at once and never raises."""
        if self._task is not None and not self._task.done():
            return
        self._task = asyncio.get_running_loop().create_task(
            self._run(), name=f"ami-limits {self.where}"
        )

    async def close(self, timeout_s: float = 2.0) -> None:
        """Stop polling, close the connection and wait (bounded) for the task to end."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.wait({task}, timeout=timeout_s)
        if self._manager is not None:
            self._manager.close()
            self._manager = None
        self._latest = None
        self._connected = False

    async def _run(self) -> None:
        delay = self._retry_min_s
        down_logged = False
        try:
            while True:
                manager: _BoundedManager | None = None
                try:
                    async with asyncio.timeout(self.timeout_s):
                        manager = self._manager = await self._login()
                    delay = self._retry_min_s
                    self._connected = True
                    _LOGGER.info("AMI %s: connected, polling every %g s", self.where, self.poll_s)
                    down_logged = False
                    while True:
                        async with asyncio.timeout(self.timeout_s):
                            reading = await self._read(manager)
                        self._latest, self._last_error = reading, None
                        await asyncio.wait({manager.lost}, timeout=self.poll_s)
                        if manager.lost.done():
                            raise AmiError(f"AMI {self.where}: connection lost")
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # every failure means: unknown now, try again later
                    self._latest, self._connected = None, False
                    self._last_error = self._describe(exc)
                    level = logging.DEBUG if down_logged else logging.WARNING
                    _LOGGER.log(level, "%s; retrying in %g s", self._last_error, delay,
                                exc_info=not isinstance(exc, (AgentError, OSError)))
                    down_logged = True
                finally:
                    if manager is not None:
                        manager.close()
                    self._manager = None
                await asyncio.sleep(delay)
                delay = min(delay * 2, self._retry_max_s)
        finally:
            self._latest, self._connected = None, False

    def _describe(self, exc: BaseException) -> str:
        if isinstance(exc, AgentError):
            text = str(exc)
        elif isinstance(exc, TimeoutError):
            text = f"AMI {self.where}: no answer within {self.timeout_s:g} s"
        else:
            text = f"AMI {self.where}: {type(exc).__name__}: {exc}"
        return text.replace(self._secret, _MASK) if self._secret else text

    # -- the protocol steps (callers bound them) --

    async def _login(self) -> _BoundedManager:
        """Connect and log in (``Events: off``); the caller bounds the wait."""
        manager = _BoundedManager(
            host=self.host,
            port=self.port,
            username=self.username,
            secret=self._secret,
            events="off",
            loop=asyncio.get_running_loop(),
            log=_RedactingLog(_LOGGER.getChild("panoramisk"), self._secret),
        )
        try:
            try:
                # connection_made (which sends Login) is the connect task's first done-callback,
                # so it has run by the time this await resumes
                await manager.connect()
            except OSError as exc:
                reason = exc.strerror or str(exc) or type(exc).__name__
                raise AmiError(f"AMI {self.where}: cannot connect: {reason}") from None
            login = manager.authenticated_future
            if login is None:
                raise AmiError(f"AMI {self.where}: connected but no Login was sent")
            try:
                reply = await login
            except ConnectionError:
                raise AmiError(f"AMI {self.where}: connection closed before the login reply") \
                    from None
            if not reply.success:
                message = _field(reply, "Message") or "no message"
                raise AmiAuthError(
                    f"AMI {self.where}: authentication failed for user {self.username!r}"
                    f" ({message})"
                )
        except BaseException:
            manager.close()
            raise
        return manager

    async def _read(self, manager: _BoundedManager) -> LiveLimits:
        """One CoreSettings + CoreStatus round trip on a logged-in connection."""
        settings = await self._action(manager, "CoreSettings")
        status = await self._action(manager, "CoreStatus")
        try:
            return limits_from_ami(settings, status, self.source, self._clock())
        except ProtocolError as exc:
            raise ProtocolError(f"AMI {self.where}: {exc}") from None

    async def _action(self, manager: _BoundedManager, name: str) -> Mapping[str, str]:
        try:
            reply = await manager.send_action({"Action": name})
        except ConnectionError:
            raise AmiError(f"AMI {self.where}: connection lost waiting for {name}") from None
        if not reply.success:
            message = _field(reply, "Message") or "no message"
            raise AmiError(f"AMI {self.where}: {name} refused ({message})")
        result: Mapping[str, str] = reply
        return result

