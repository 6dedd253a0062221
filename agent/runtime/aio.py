"""The Asterisk process: FastAGI + AudioSocket servers on one asyncio loop, engines in threads.

Call flow (DESIGN.md): the FastAGI handler reserves a slot, answers, registers a fresh UUID with
the AudioSocket server and runs `EXEC AudioSocket <uuid>,<host:port>`; the media connection
runs the :class:`~agent.call.session.CallSession`; when it ends the handler sets
`AGENT_RESULT`, `AGENT_TRANSFER_TO` and `AGENT_REASON` for the dialplan.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from agent.audio import FRAME_MS, resample
from agent.call.session import CallOutcome, CallResult, CallSession
from agent.capacity.admission import Refusal, Ticket
from agent.capacity.limits import LiveLimits
from agent.config import Config
from agent.dialog.policy import DialogPolicy
from agent.engine.bundle import EngineBundle
from agent.kpi.model import CallRecord
from agent.pbx.asterisk.audiosocket import AudioSocketConnection, AudioSocketServer, Kind
from agent.pbx.asterisk.fastagi import AgiChannel, FastAgiServer
from agent.runtime import systemd
from agent.runtime.governor import Governor
from agent.runtime.kpi import build_call_services

_LOGGER = logging.getLogger(__name__)

MEDIA_CONNECT_TIMEOUT_S = 5.0
AGI_COMMAND_TIMEOUT_S = 5.0


class AudioSocketMedia:
    """The AudioSocket leg of a call, at the session's rate.

    The AudioSocket application sends 8 kHz slin (kind 0x10); the channel driver with
    ``c(slin16)`` sends 16 kHz (0x12). A frame at another rate than the session's is resampled
    here, so a rate mismatch costs quality, never the call.
    """

    def __init__(self, conn: AudioSocketConnection, rate_hz: int) -> None:
        self.conn = conn
        self.rate_hz = rate_hz

    async def pump_in(self, session: CallSession) -> None:
        """Read caller frames into the session until the caller hangs up or the call ends."""
        while not session.done:
            try:
                frame = await self.conn.read_frame(2.5)
            except TimeoutError:
                continue
            except (ConnectionError, OSError):
                frame = None
            if frame is None or frame.kind in (Kind.HANGUP, Kind.ERROR):
                session.on_hangup()
                return
            if frame.kind is Kind.DTMF:
                session.on_dtmf(frame.payload.decode("ascii", "replace"))
                continue
            audio = frame.payload
            frame_rate = frame.rate_hz or self.rate_hz
            if frame_rate != self.rate_hz:
                audio = resample(audio, frame_rate, self.rate_hz)
            session.on_audio(audio)

    async def pump_out(self, session: CallSession) -> None:
        """Send exactly one 20 ms frame every 20 ms on absolute deadlines (no drift, no bursts)."""
        loop = asyncio.get_running_loop()
        period = FRAME_MS / 1000.0
        next_at = loop.time()
        while not session.done:
            frame = session.next_frame()
            if self.conn.rate_hz != self.rate_hz:
                frame = resample(frame, self.rate_hz, self.conn.rate_hz)
            try:
                await self.conn.send_audio(frame)
            except (ConnectionError, OSError):
                session.on_hangup()
                return
            next_at += period
            delay = next_at - loop.time()
            if delay < -0.2:
                next_at = loop.time()  # we fell far behind (paused process): don't burst
                delay = 0.0
            await asyncio.sleep(max(0.0, delay))

    async def finish(self) -> None:
        """Send the 0x00 hangup frame: AudioSocket() returns 0 and the dialplan continues."""
        await self.conn.send_hangup()


async def drive_session(session: CallSession, media: AudioSocketMedia) -> CallOutcome:
    """Run one call's media I/O around its session until the call ends."""
    loop = asyncio.get_running_loop()
    ended = asyncio.Event()

    def on_done() -> None:
        loop.call_soon_threadsafe(ended.set)

    session.add_done_callback(on_done)
    session.start()
    tasks = [asyncio.create_task(media.pump_in(session), name=f"in-{session.call_id}"),
             asyncio.create_task(media.pump_out(session), name=f"out-{session.call_id}")]
    try:
        await ended.wait()
    finally:
        if not session.done:
            session.abort("cancelled")
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if not session.outcome.caller_hung_up:
            with contextlib.suppress(Exception):
                await media.finish()
        limit = loop.time() + 5.0
        while session.threads_alive() and loop.time() < limit:
            await asyncio.sleep(0.02)
    return session.outcome


@dataclass
class CallSummary:
    """What the FastAGI handler knows of a finished call (for logs, tests, the demo)."""

    uniqueid: str
    callerid: str
    outcome: CallOutcome


class AsteriskAgent:
    """The FastAGI + AudioSocket servers of one pbx-agent process."""

    def __init__(self, config: Config, engines: EngineBundle,
                 fastagi_port: int | None = None, audiosocket_port: int | None = None,
                 live: Callable[[], LiveLimits | None] = lambda: None) -> None:
        self.config = config
        self.engines = engines
        #: the wall clock for business hours and after-hours flows (injected in tests)
        self.wall_clock: Callable[[], datetime] = lambda: datetime.now(UTC)
        self.governor, self.stt_pool, self.tts_pool, self.kpi = build_call_services(
            config, engines, live)
        lis = config.listen
        agi_port = lis.fastagi.port if fastagi_port is None else fastagi_port
        self.fastagi = FastAgiServer(self._handle_agi, host=lis.fastagi.host, port=agi_port)
        self.audiosocket = AudioSocketServer(
            host=lis.audiosocket.host,
            port=lis.audiosocket.port if audiosocket_port is None else audiosocket_port)
        self.finished: list[CallSummary] = []
        self.sessions: dict[str, CallSession] = {}

    async def start(self) -> None:
        """Bind both listeners, start the load sensors and the side-work queue."""
        self.governor.start()
        self.kpi.integrations.start()
        await self.audiosocket.start()
        await self.fastagi.start()
        _LOGGER.info("listening: FastAGI %s:%d, AudioSocket %s:%d",
                     self.config.listen.fastagi.host, self.fastagi.port,
                     self.config.listen.audiosocket.host, self.audiosocket.port)

    async def drain(self, timeout_s: float, poll_s: float = 0.1) -> int:
        """Refuse new calls, let active ones finish for up to ``timeout_s``, then hand every
        call still running back to the dialplan (TRANSFER to the fallback); returns that count."""
        self.governor.start_drain()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while self.governor.admission.in_use and loop.time() < deadline:
            await asyncio.sleep(poll_s)
        handed_back = 0
        for call_id, session in list(self.sessions.items()):
            if not session.done:
                _LOGGER.warning("call %s: drain timeout, handing back to the dialplan", call_id)
                session.abort("drain-timeout", CallResult.TRANSFER)
                handed_back += 1
        # let the AGI handlers set AGENT_RESULT and return before the listeners close
        deadline = loop.time() + 5.0
        while self.governor.admission.in_use and loop.time() < deadline:
            await asyncio.sleep(poll_s)
        return handed_back

    async def close(self) -> None:
        """Stop listening, end live calls, stop the worker pools."""
        for session in list(self.sessions.values()):
            session.abort("shutdown", CallResult.TRANSFER)
        self.governor.stop()
        await self.fastagi.close()
        await self.audiosocket.close()
        self.stt_pool.shutdown(wait=True, cancel_futures=True)
        self.tts_pool.shutdown(wait=True, cancel_futures=True)
        # side work still pending is kept in its file (or counted lost when memory-only)
        await asyncio.get_running_loop().run_in_executor(None, self.kpi.integrations.close)

    def advertise(self) -> str:
        """The `host:port` Asterisk must connect its AudioSocket to."""
        adv = self.config.listen.audiosocket_advertise
        if adv is not None:
            return str(adv)
        return f"{self.config.listen.audiosocket.host}:{self.audiosocket.port}"

    async def _set_result(self, agi: AgiChannel, outcome: CallOutcome) -> None:
        with contextlib.suppress(Exception):
            await agi.set_variable("AGENT_RESULT", outcome.result.value)
            await agi.set_variable("AGENT_REASON", outcome.reason)
            if outcome.transfer_to:
                await agi.set_variable("AGENT_TRANSFER_TO", outcome.transfer_to)

    async def _handle_agi(self, agi: AgiChannel) -> None:
        env = agi.env
        call_id = env.uniqueid or uuid.uuid4().hex[:12]
        did = _did_of(agi)
        record = self.kpi.new_record(env.uniqueid, env.callerid, did)
        decision = self.governor.admit(env.callerid, did)
        if isinstance(decision, Refusal):
            _LOGGER.info("call %s: refused (%s) %s", call_id, decision.reason, decision.detail)
            outcome = CallOutcome(result=CallResult.BUSY, reason=decision.reason)
            await self._set_result(agi, outcome)
            self.kpi.refused(record, decision.reason)
            self.finished.append(CallSummary(call_id, env.callerid, outcome))
            return
        self.kpi.admitted(record, decision.priority)
        try:
            outcome = await self._run_call(agi, call_id, decision, record)
        except Exception as exc:  # the call boundary: hand the call back, keep serving
            _LOGGER.exception("call %s: failed", call_id)
            outcome = CallOutcome(result=CallResult.ERROR, reason=f"internal:{type(exc).__name__}")
        finally:
            decision.release()
        await self._set_result(agi, outcome)
        self.kpi.finished(record, outcome)
        self.finished.append(CallSummary(call_id, env.callerid, outcome))
        _LOGGER.info("call %s: %s %s %s", call_id, outcome.result.value, outcome.reason,
                     outcome.transfer_to)

    async def _run_call(self, agi: AgiChannel, call_id: str, ticket: Ticket,
                        record: CallRecord) -> CallOutcome:
        reply = await agi.answer()
        if reply.code != 200:
            return CallOutcome(result=CallResult.ERROR, reason=f"answer-failed:{reply.code}")
        self.kpi.answered(record)
        media_uuid = uuid.uuid4()
        connected: asyncio.Future[CallOutcome] = asyncio.get_running_loop().create_future()
        session_holder: list[CallSession] = []

        async def on_media(conn: AudioSocketConnection) -> None:
            session = CallSession(call_id, self.config, self.engines,
                                  DialogPolicy(self.config.agent), self.config.rate_hz,
                                  self.stt_pool, self.tts_pool,
                                  shed_level=lambda: self.governor.level,
                                  on_latency=self.governor.latency.add,
                                  wall_clock=self.wall_clock,
                                  **self.kpi.flow_context(record, agi.env.callerid,
                                                          _did_of(agi)))
            ticket.started()
            session_holder.append(session)
            self.sessions[call_id] = session
            try:
                outcome = await drive_session(session, AudioSocketMedia(conn, self.config.rate_hz))
            finally:
                self.sessions.pop(call_id, None)
            if not connected.done():
                connected.set_result(outcome)

        self.audiosocket.register(media_uuid, on_media)
        exec_task = asyncio.create_task(
            agi.exec("AudioSocket", f"{media_uuid},{self.advertise()}", timeout_s=None))
        try:
            waiters: set[asyncio.Future[Any]] = {exec_task, connected}
            await asyncio.wait(waiters, timeout=MEDIA_CONNECT_TIMEOUT_S,
                               return_when=asyncio.FIRST_COMPLETED)
            if not session_holder and not connected.done():
                # Asterisk never connected the media leg (or EXEC came back at once)
                return CallOutcome(result=CallResult.ERROR, reason="audiosocket-not-connected")
            while not connected.done():
                if exec_task.done():
                    # the AGI side ended (socket gone, EXEC returned): end the media session
                    for session in session_holder:
                        session.abort("agi-gone")
                    break
                await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
            outcome = await connected
            with contextlib.suppress(asyncio.TimeoutError, Exception):
                await asyncio.wait_for(asyncio.shield(exec_task), AGI_COMMAND_TIMEOUT_S)
            return outcome
        finally:
            self.audiosocket.unregister(media_uuid)
            if not exec_task.done():
                exec_task.cancel()
                with contextlib.suppress(BaseException):
                    await exec_task


async def _keep_systemd_informed(governor: Governor) -> None:
    """WATCHDOG=1 from the running loop (a stuck loop gets restarted) and a STATUS= line."""
    interval = systemd.watchdog_interval_s()
    period = min(interval, 5.0) if interval else 5.0
    while True:
        states = [f"STATUS={governor.status_line()}"]
        if interval:
            states.append("WATCHDOG=1")
        systemd.notify(*states)
        await asyncio.sleep(period)


def _live_monitor(config: Config) -> Any:
    """The AMI live-limits monitor when `capacity.live` is configured, else None."""
    live = config.capacity.live
    if live is None:
        return None
    from agent.pbx.asterisk.ami import AmiLimitsMonitor

    return AmiLimitsMonitor(live.host, live.port, live.username, live.secret.read(),
                            poll_s=config.capacity.live_poll_s)


async def serve(config: Config, load: Callable[[Config], EngineBundle]) -> int:
    """Load engines, serve Asterisk calls until SIGTERM (drain) or SIGINT; the exit code."""
    t0 = time.perf_counter()
    loop = asyncio.get_running_loop()
    engines = await loop.run_in_executor(None, load, config)
    monitor = _live_monitor(config)
    if monitor is not None:
        await monitor.start()  # never blocks: AMI being down never stops calls
    agent = AsteriskAgent(config, engines,
                          live=(lambda: monitor.latest) if monitor is not None else lambda: None)
    await agent.start()
    agent.kpi.open()
    _LOGGER.info("ready in %.1f s; %s", time.perf_counter() - t0, agent.governor.status_line())
    systemd.notify("READY=1", f"STATUS={agent.governor.status_line()}")
    informer = asyncio.create_task(_keep_systemd_informed(agent.governor))
    stop = asyncio.Event()

    def reload() -> None:
        systemd.notify("RELOADING=1")
        agent.governor.reload()
        systemd.notify("READY=1", f"STATUS={agent.governor.status_line()}")

    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    loop.add_signal_handler(signal.SIGHUP, reload)
    await stop.wait()
    timeout = config.capacity.drain_timeout_s
    _LOGGER.info("stopping: draining %d call(s) for up to %d s",
                 agent.governor.admission.in_use, timeout)
    systemd.notify("STOPPING=1", f"STATUS=draining {agent.governor.admission.in_use} call(s)")
    handed_back = await agent.drain(timeout)
    _LOGGER.info("drained; %d call(s) handed back to the dialplan", handed_back)
    informer.cancel()
    await agent.close()
    await loop.run_in_executor(None, agent.kpi.close)  # writes the records still queued
    if monitor is not None:
        await monitor.close()
    engines.close()
    return 0


def _did_of(agi: AgiChannel) -> str:
    """The number the caller dialled: agi_dnid, else the extension."""
    env = agi.env
    return env.dnid if env.dnid and env.dnid != "unknown" else env.extension
