"""The FreeSWITCH process: greenswitch's outbound-ESL server on gevent, unicast UDP media.

Never imported together with asyncio (the Asterisk runtime): `pbx-agent serve` imports this
module only when the config says ``pbx: freeswitch``. No monkey-patching: the engines and the
call session's worker threads are real threads; greenlets only do socket I/O and never block
on an engine. Call flow (DESIGN.md): ``connect`` (greenswitch does it), ``myevents``,
``linger``, admission (ours, before answering), ``answer``, ``unicast`` to a per-call UDP
socket on 127.0.0.1, the conversation, ``set agent_result=...``, ``exit``.
"""

from __future__ import annotations

import logging
import socket as pysocket
import time
import uuid as uuid_mod
from collections.abc import Callable
from typing import Any

import gevent
import gevent.event
import gevent.socket as gsocket
from gevent import Timeout
from greenswitch.esl import OutboundESLServer, OutboundSession

from agent.audio import FRAME_MS, frame_bytes
from agent.call.session import CallOutcome, CallResult, CallSession
from agent.capacity.admission import Refusal, Ticket
from agent.capacity.limits import LiveLimits
from agent.config import Config
from agent.dialog.policy import DialogPolicy
from agent.engine.bundle import EngineBundle
from agent.kpi.model import CallRecord
from agent.runtime import systemd
from agent.runtime.governor import Governor
from agent.runtime.kpi import build_call_services

_LOGGER = logging.getLogger(__name__)

COMMAND_TIMEOUT_S = 5.0
HANGUP_POLL_S = 0.05


def _free_udp_port(host: str) -> int:
    """A UDP port that is free now, for FreeSWITCH's end of the unicast stream."""
    with pysocket.socket(pysocket.AF_INET, pysocket.SOCK_DGRAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class EslCallApp:
    """One call on the outbound Event Socket (greenswitch hands us a connected session)."""

    def __init__(self, session: OutboundSession, agent: FreeSwitchAgent) -> None:
        self.esl = session
        self.agent = agent
        data: dict[str, str] = session.session_data or {}
        self.uuid = data.get("Unique-ID") or data.get("Channel-Unique-ID") or uuid_mod.uuid4().hex
        self.caller = data.get("Caller-Caller-ID-Number", "")
        self.did = data.get("Caller-Destination-Number", "")
        try:
            self.rate_hz = int(data.get("Channel-Read-Codec-Rate", "8000"))
        except ValueError:
            self.rate_hz = 8000
        if self.rate_hz not in (8000, 16000):
            self.rate_hz = 8000
        self.outcome = CallOutcome()

    def _send(self, raw: str) -> str:
        """Send a command and return its reply text; every wait has a timeout."""
        with Timeout(COMMAND_TIMEOUT_S):
            reply = self.esl.send(raw)
        return str(getattr(reply, "data", "") or "")

    def _set(self, name: str, value: str) -> None:
        value = value.replace("\n", " ")
        self._send(f"sendmsg\ncall-command: execute\nexecute-app-name: set\n"
                   f"execute-app-arg: {name}={value}")

    def _caller_gone(self) -> bool:
        esl = self.esl
        return (not esl.connected) or esl._lingering or not esl._outbound_connected

    def run(self) -> None:
        """The whole call; any failure hands the call back to the dialplan with a reason."""
        ticket: Ticket | None = None
        kpi = self.agent.kpi
        record = kpi.new_record(self.uuid, self.caller, self.did)
        refused = False
        try:
            self._send("myevents")
            self._send("linger")
            decision = self.agent.governor.admit(self.caller, self.did)
            if isinstance(decision, Refusal):
                _LOGGER.info("call %s: refused (%s) %s", self.uuid, decision.reason,
                             decision.detail)
                self.outcome = CallOutcome(result=CallResult.BUSY, reason=decision.reason)
                refused = True
            else:
                ticket = decision
                kpi.admitted(record, decision.priority)
                self.outcome = self._converse(ticket, record)
        except (Timeout, Exception) as exc:  # the call boundary: log, hand back, keep serving
            _LOGGER.exception("call %s: failed", self.uuid)
            self.outcome = CallOutcome(result=CallResult.ERROR,
                                       reason=f"internal:{type(exc).__name__}")
        finally:
            if ticket is not None:
                ticket.release()
        self._hand_back()
        if refused:
            kpi.refused(record, self.outcome.reason)
        else:
            kpi.finished(record, self.outcome)
        self.agent.finished.append((self.uuid, self.outcome))

    def _hand_back(self) -> None:
        if self._caller_gone() and not self.esl.connected:
            return
        variables = [("agent_result", self.outcome.result.value),
                     ("agent_reason", self.outcome.reason)]
        if self.outcome.transfer_to:
            variables.append(("agent_transfer_to", self.outcome.transfer_to))
        # in async mode `set` runs after its +OK; `exit` must wait until every set has run
        # (its CHANNEL_EXECUTE_COMPLETE), or the dialplan could resume without the variables
        completed = gevent.event.Event()
        count = [0]

        def on_complete(event: Any) -> None:
            if event.headers.get("Application") == "set":
                count[0] += 1
                if count[0] >= len(variables):
                    completed.set()

        self.esl.register_handle("CHANNEL_EXECUTE_COMPLETE", on_complete)
        try:
            for name, value in variables:
                self._set(name, value)
            # after a hangup FreeSWITCH accepts but no longer runs apps: don't wait for them
            if not self._caller_gone() and not completed.wait(timeout=COMMAND_TIMEOUT_S):
                _LOGGER.warning("call %s: variables not confirmed before exit", self.uuid)
        except (Timeout, Exception) as exc:
            _LOGGER.info("call %s: could not set variables: %r", self.uuid, exc)
        finally:
            self.esl.unregister_handle("CHANNEL_EXECUTE_COMPLETE", on_complete)
        _LOGGER.info("call %s: %s %s %s", self.uuid, self.outcome.result.value,
                     self.outcome.reason, self.outcome.transfer_to)
        # returning from run() makes greenswitch send `exit`: the dialplan resumes

    def _converse(self, ticket: Ticket, record: CallRecord) -> CallOutcome:
        reply = self._send("sendmsg\ncall-command: execute\nexecute-app-name: answer")
        if not reply.startswith("+OK"):
            return CallOutcome(result=CallResult.ERROR, reason="answer-failed")
        self.agent.kpi.answered(record)
        host = self.agent.config.listen.esl.host
        udp = gsocket.socket(pysocket.AF_INET, pysocket.SOCK_DGRAM)
        udp.bind((host, 0))
        our_port = udp.getsockname()[1]
        fs_addr = (host, _free_udp_port(host))
        governor = self.agent.governor
        session = CallSession(self.uuid, self.agent.config, self.agent.engines,
                              DialogPolicy(self.agent.config.agent), self.rate_hz,
                              self.agent.stt_pool, self.agent.tts_pool,
                              shed_level=lambda: governor.level,
                              on_latency=governor.latency.add,
                              **self.agent.kpi.flow_context(record, self.caller, self.did))
        ticket.started()
        self.agent.sessions[self.uuid] = session
        pumps: list[gevent.Greenlet] = []
        try:
            # unicast has no greenswitch helper: the raw sendmsg, without `flags: native`
            reply = self._send(f"sendmsg\ncall-command: unicast\nlocal-ip: {fs_addr[0]}\n"
                               f"local-port: {fs_addr[1]}\nremote-ip: {host}\n"
                               f"remote-port: {our_port}\ntransport: udp")
            if not reply.startswith("+OK"):
                return CallOutcome(result=CallResult.ERROR, reason="unicast-failed")
            self.esl.register_handle("DTMF", lambda ev: session.on_dtmf(
                str(ev.headers.get("DTMF-Digit", ""))[:1]))
            session.start()
            pumps = [gevent.spawn(self._pump_in, udp, session),
                     gevent.spawn(self._pump_out, udp, fs_addr, session)]
            while not session.done:
                if self._caller_gone():
                    session.on_hangup()
                    break
                gevent.sleep(HANGUP_POLL_S)
            return session.outcome
        finally:
            if not session.done:
                session.abort("app-ended")
            gevent.killall(pumps, timeout=1.0)
            udp.close()
            # joining the call's threads must not block the hub
            gevent.get_hub().threadpool.spawn(session.close).get(timeout=10)
            self.agent.sessions.pop(self.uuid, None)

    def _pump_in(self, udp: Any, session: CallSession) -> None:
        """Caller audio: raw L16 datagrams; all-0xFF frames mean 'no caller audio'."""
        size = frame_bytes(self.rate_hz)
        silence = bytes(size)
        while not session.done:
            try:
                with Timeout(1.0):
                    payload, _ = udp.recvfrom(4096)
            except Timeout:
                continue
            except OSError:
                return
            if payload and payload.count(0xFF) == len(payload):
                session.on_audio(silence)
            elif len(payload) % 2 == 0:
                session.on_audio(payload)

    def _pump_out(self, udp: Any, addr: tuple[str, int], session: CallSession) -> None:
        """One frame per 20 ms, never two at once: FreeSWITCH queues bursts and can't flush."""
        period = FRAME_MS / 1000.0
        next_at = time.monotonic()
        while not session.done:
            try:
                udp.sendto(session.next_frame(), addr)
            except OSError:
                return
            next_at += period
            delay = next_at - time.monotonic()
            if delay < -period / 2:
                # late (a busy hub): restart the schedule instead of catching up, because the
                # frames a catch-up would add sit in FreeSWITCH's UDP buffer as latency
                next_at = time.monotonic()
                delay = 0.0
            gevent.sleep(max(0.0, delay))


class _AgentEslServer(OutboundESLServer):
    """greenswitch's server with a bounded `connect` (its own waits forever)."""

    def _handle_call(self, session: OutboundSession) -> None:
        try:
            with Timeout(COMMAND_TIMEOUT_S):
                session.connect()
        except (Timeout, Exception) as exc:
            _LOGGER.warning("ESL peer %s: no valid connect reply (%r); closing",
                            session.client_address if hasattr(session, "client_address")
                            else "?", exc)
            try:
                session.sock.close()
            except OSError:
                pass
            return
        super()._handle_call(session)


class FreeSwitchAgent:
    """The outbound-ESL server of one pbx-agent process."""

    def __init__(self, config: Config, engines: EngineBundle, port: int | None = None,
                 live: Callable[[], LiveLimits | None] = lambda: None) -> None:
        self.config = config
        self.engines = engines
        self.governor, self.stt_pool, self.tts_pool, self.kpi = build_call_services(
            config, engines, live)
        self.sessions: dict[str, CallSession] = {}
        self.finished: list[tuple[str, CallOutcome]] = []
        app: Callable[[OutboundSession], EslCallApp] = lambda s: EslCallApp(s, self)  # noqa: E731
        # admission is ours (before answering): greenswitch's own limit only acts after connect
        self.server = _AgentEslServer(bind_address=config.listen.esl.host,
                                      bind_port=config.listen.esl.port if port is None else port,
                                      application=app, max_connections=100000)

    def serve_forever(self) -> None:
        """Accept calls until stop() (greenswitch polls its accept loop every 0.1 s)."""
        self.server.listen()

    def drain(self, timeout_s: float, poll_s: float = 0.1) -> int:
        """Refuse new calls, let active ones finish for up to ``timeout_s``, then hand every
        call still running back to the dialplan (TRANSFER to the fallback); returns that count."""
        self.governor.start_drain()
        deadline = time.monotonic() + timeout_s
        while self.governor.admission.in_use and time.monotonic() < deadline:
            gevent.sleep(poll_s)
        handed_back = 0
        for call_id, session in list(self.sessions.items()):
            if not session.done:
                _LOGGER.warning("call %s: drain timeout, handing back to the dialplan", call_id)
                session.abort("drain-timeout", CallResult.TRANSFER)
                handed_back += 1
        deadline = time.monotonic() + 2 * COMMAND_TIMEOUT_S
        while self.governor.admission.in_use and time.monotonic() < deadline:
            gevent.sleep(poll_s)  # each call sets its variables and exits
        return handed_back

    def stop(self) -> None:
        """Stop accepting, end live calls, stop the pools."""
        for session in list(self.sessions.values()):
            session.abort("shutdown", CallResult.TRANSFER)
        self.governor.stop()
        self.server.stop()

    def close(self) -> None:
        """Release the worker pools."""
        self.stt_pool.shutdown(wait=True, cancel_futures=True)
        self.tts_pool.shutdown(wait=True, cancel_futures=True)


def _keep_systemd_informed(governor: Governor) -> None:
    """WATCHDOG=1 from the gevent hub (a stuck hub gets restarted) and a STATUS= line."""
    interval = systemd.watchdog_interval_s()
    period = min(interval, 5.0) if interval else 5.0
    while True:
        states = [f"STATUS={governor.status_line()}"]
        if interval:
            states.append("WATCHDOG=1")
        systemd.notify(*states)
        gevent.sleep(period)


def serve(config: Config, load: Callable[[Config], EngineBundle],
          on_ready: Callable[[FreeSwitchAgent], None] | None = None) -> int:
    """Load engines, serve FreeSWITCH calls until SIGTERM (drain) or SIGINT; the exit code."""
    import signal

    engines = load(config)
    monitor = None
    live = config.capacity.live
    if live is not None:
        from agent.pbx.freeswitch.inbound import EslLimitsMonitor

        monitor = EslLimitsMonitor(live.host, live.port, live.secret.read(),
                                   poll_s=config.capacity.live_poll_s)
        monitor.start()  # never blocks: ESL being down never stops calls
    agent = FreeSwitchAgent(config, engines,
                            live=(lambda: monitor.latest) if monitor is not None else lambda: None)
    agent.governor.start()
    agent.kpi.open()
    server = gevent.spawn(agent.serve_forever)
    gevent.sleep(0.2)
    _LOGGER.info("listening: outbound ESL %s:%d; %s", config.listen.esl.host,
                 config.listen.esl.port, agent.governor.status_line())
    if on_ready is not None:
        on_ready(agent)
    systemd.notify("READY=1", f"STATUS={agent.governor.status_line()}")
    informer = gevent.spawn(_keep_systemd_informed, agent.governor)
    stopping = gevent.event.Event()

    def reload() -> None:
        systemd.notify("RELOADING=1")
        agent.governor.reload()
        systemd.notify("READY=1", f"STATUS={agent.governor.status_line()}")

    gevent.signal_handler(signal.SIGTERM, stopping.set)
    gevent.signal_handler(signal.SIGINT, stopping.set)
    gevent.signal_handler(signal.SIGHUP, reload)
    stopping.wait()
    timeout = config.capacity.drain_timeout_s
    _LOGGER.info("stopping: draining %d call(s) for up to %d s",
                 agent.governor.admission.in_use, timeout)
    systemd.notify("STOPPING=1", f"STATUS=draining {agent.governor.admission.in_use} call(s)")
    handed_back = agent.drain(timeout)
    _LOGGER.info("drained; %d call(s) handed back to the dialplan", handed_back)
    informer.kill()
    agent.stop()
    server.join(timeout=10)
    agent.close()
    gevent.get_hub().threadpool.spawn(agent.kpi.close).get(timeout=15)
    if monitor is not None:
        monitor.stop()
    engines.close()
    return 0
