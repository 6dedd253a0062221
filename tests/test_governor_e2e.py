"""The capacity governor through the simulator with the real models, on both PBX kinds.

Overload: ``max_calls: 3`` and 6 callers at once -> 3 calls complete, 3 are refused with
``BUSY`` and a reason within a second, none hang. Daemon behaviour of `pbx-agent serve`: READY and
WATCHDOG datagrams on a test ``NOTIFY_SOCKET``, SIGHUP with a bad then a good rule file, SIGTERM
drain (new calls refused with ``draining``, a live call handed back with ``TRANSFER``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.audio import is_silent
from agent.capacity.admission import Refusal
from agent.config import Config, default_config
from agent.engine.bundle import EngineBundle
from agent.engine.tts import PiperTts
from agent.models import require
from agent.runtime.aio import AsteriskAgent
from agent.runtime.engines import load_engines
from agent.sim.asterisk import FakeAsterisk, SimAudioSocketPeer
from agent.sim.caller import builtin_script
from agent.sim.process import AgentProcess, free_port
from agent.sim.run import SimCallReport, run_sim_call

TRANSFERS = "transfers: {front-desk: PJSIP/100, billing: PJSIP/101, emergency: PJSIP/199}\n"
CALLERS = 6
MAX_CALLS = 3


@pytest.fixture(scope="module")
def config() -> Config:
    base = default_config()
    return dataclasses.replace(base, max_calls=MAX_CALLS, capacity=dataclasses.replace(
        base.capacity, pbx_conf="none", engine_calls=0, capacity_report="/nonexistent.json"))


@pytest.fixture(scope="module")
def engines(config: Config) -> Iterator[EngineBundle]:
    bundle = load_engines(config)
    yield bundle
    bundle.close()


@pytest.fixture(scope="module")
def caller_voice() -> PiperTts:
    return PiperTts(str(require("piper-en-us-joe-medium")), out_rate_hz=8000, length_scale=1.15,
                    deterministic=True)


async def _six_callers(host: str, port: int, voice: PiperTts, pbx: str) -> list[SimCallReport]:
    script = builtin_script("overload")
    calls = [run_sim_call(host, port, script, voice, seed=i, pbx=pbx) for i in range(CALLERS)]
    return list(await asyncio.wait_for(asyncio.gather(*calls), 180))


def _check_overload(reports: list[SimCallReport]) -> None:
    done = [r for r in reports if r.result == "DONE"]
    busy = [r for r in reports if r.result == "BUSY"]
    summary = [(r.result, r.reason, round(r.call_s, 2)) for r in reports]
    print("overload:", summary)
    assert len(done) == MAX_CALLS, summary
    assert len(busy) == CALLERS - MAX_CALLS, summary
    assert all(r.reason == "capacity" for r in busy), summary
    # a refused caller reaches the dialplan's fallback within a second, never silence
    assert all(r.call_s < 1.0 for r in busy), summary
    assert all(r.reason == "caller-goodbye" for r in done), summary


def test_asterisk_overload_three_complete_three_refused(config: Config, engines: EngineBundle,
                                                        caller_voice: PiperTts) -> None:
    async def main() -> tuple[list[SimCallReport], dict[str, int], int]:
        agent = AsteriskAgent(config, engines, fastagi_port=0, audiosocket_port=0)
        await agent.start()
        try:
            reports = await _six_callers("127.0.0.1", agent.fastagi.port, caller_voice,
                                         "asterisk")
            return reports, agent.governor.admission.counts(), agent.governor.admission.peak
        finally:
            await agent.close()

    reports, counts, peak = asyncio.run(main())
    _check_overload(reports)
    assert counts["admitted"] == MAX_CALLS and counts["refused_capacity"] == CALLERS - MAX_CALLS
    assert peak == MAX_CALLS


def test_freeswitch_overload_three_complete_three_refused(caller_voice: PiperTts) -> None:
    port = free_port()
    cfg = (f"pbx: freeswitch\nmax_calls: {MAX_CALLS}\nlisten:\n  esl: 127.0.0.1:{port}\n"
           "log_level: INFO\ncapacity: {pbx_conf: none}\n" + TRANSFERS)
    with AgentProcess(cfg) as proc:
        reports = asyncio.run(_six_callers("127.0.0.1", port, caller_voice, "freeswitch"))
        assert proc.stop() == 0
        log = proc.log()
    _check_overload(reports)
    assert log.count("refused (capacity)") == CALLERS - MAX_CALLS


# -- shedding levels and priority, in a live agent ---------------------------------------------

OPEN_QUESTION = {"name": "open", "caller": {"callerid": "+14155550123"},
                 "voice": {"length_scale": 1.15, "noise_snr_db": 35, "mulaw": False},
                 "turns": [{"say": "Is it normal for my gums to bleed when I brush my teeth?"},
                           {"say": "Thank you, goodbye."}]}


def _shedding_config(config: Config, tmp_path: Path, level: str, extra: str = "") -> Config:
    """The test config with one rule that trips at the first reading (free RAM is above 0)."""
    from agent.config import parse_config

    rules = tmp_path / "shedding.yaml"
    rules.write_text(f"rules:\n  - name: always-{level}\n    sensor: mem_available_mib\n"
                     f"    above: 0\n    for: 0s\n    level: {level}\n")
    text = (f"max_calls: {MAX_CALLS}\n" + TRANSFERS +
            f"capacity:\n  pbx_conf: none\n  capacity_report: /nonexistent.json\n"
            f"  shedding: {rules}\n{extra}")
    return parse_config(text, str(tmp_path / "agent.yaml"))


@pytest.mark.parametrize(("level", "path"), [("brief", "llm-brief"), ("canned", "canned")])
def test_shedding_level_changes_the_open_question_path(
        config: Config, engines: EngineBundle, caller_voice: PiperTts, tmp_path: Path,
        level: str, path: str) -> None:
    from agent.sim.caller import parse_script

    shed_config = _shedding_config(config, tmp_path, level)

    async def main() -> tuple[SimCallReport, list[str], str]:
        agent = AsteriskAgent(shed_config, engines, fastagi_port=0, audiosocket_port=0)
        await agent.start()
        try:
            assert agent.governor.level == level
            report = await run_sim_call("127.0.0.1", agent.fastagi.port,
                                        parse_script(OPEN_QUESTION), caller_voice)
            turns = agent.finished[-1].outcome.turns
            return report, [t.path for t in turns], turns[0].reply_text
        finally:
            await agent.close()

    report, paths, first_reply = asyncio.run(main())
    assert report.result == "DONE", (report.result, report.reason)
    assert paths[0] == path, paths
    if level == "canned":  # no LLM at all: the fixed offer to connect a person
        assert first_reply == default_config().agent.fallback
    else:  # one short sentence at most
        assert first_reply.count(". ") == 0, first_reply


def test_reject_new_refuses_ordinary_callers_but_not_priority(
        config: Config, engines: EngineBundle, caller_voice: PiperTts, tmp_path: Path) -> None:
    extra = ("  priority:\n    - name: vip\n      callerid: ['_+1415555019X']\n")
    shed_config = _shedding_config(config, tmp_path, "reject-new", extra)

    async def main() -> tuple[SimCallReport, SimCallReport]:
        agent = AsteriskAgent(shed_config, engines, fastagi_port=0, audiosocket_port=0)
        await agent.start()
        try:
            script = builtin_script("hangup")
            ordinary = await run_sim_call("127.0.0.1", agent.fastagi.port, script, caller_voice)
            vip = await run_sim_call("127.0.0.1", agent.fastagi.port,
                                     dataclasses.replace(script, callerid="+14155550199"),
                                     caller_voice)
            return ordinary, vip
        finally:
            await agent.close()

    ordinary, vip = asyncio.run(main())
    assert (ordinary.result, ordinary.reason) == ("BUSY", "shed:always-reject-new")
    assert ordinary.pbx.exec_results == [] and ordinary.call_s < 1.0
    assert vip.result == "DONE" and vip.pbx.answered


def test_priority_headroom_through_the_simulator(
        config: Config, engines: EngineBundle, caller_voice: PiperTts) -> None:
    from agent.config import parse_config

    text = ("max_calls: 2\n" + TRANSFERS + "capacity:\n  pbx_conf: none\n"
            "  capacity_report: /nonexistent.json\n  shedding: ''\n  priority_headroom: 1\n"
            "  priority:\n    - {name: vip, callerid: ['+14155550199']}\n")
    cfg = parse_config(text, "<test>")

    async def main() -> tuple[SimCallReport, SimCallReport, int]:
        agent = AsteriskAgent(cfg, engines, fastagi_port=0, audiosocket_port=0)
        await agent.start()
        try:
            held = agent.governor.admit("+14155550100", "510")  # one ordinary call starting
            assert not isinstance(held, Refusal)
            script = builtin_script("hangup")
            ordinary = await run_sim_call("127.0.0.1", agent.fastagi.port, script, caller_voice)
            vip = await run_sim_call("127.0.0.1", agent.fastagi.port,
                                     dataclasses.replace(script, callerid="+14155550199"),
                                     caller_voice)
            held.release()
            return ordinary, vip, agent.governor.admission.counts()["priority_admitted"]
        finally:
            await agent.close()

    ordinary, vip, priority_admitted = asyncio.run(main())
    assert (ordinary.result, ordinary.reason) == ("BUSY", "capacity")
    assert vip.result == "DONE" and priority_admitted == 1


# -- the daemon: notify, reload, drain ---------------------------------------------------------

class NotifyListener:
    """A test NOTIFY_SOCKET: collects the datagrams `serve` sends to systemd."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(0.2)
        self.messages: list[str] = []

    def collect(self, until: str, timeout_s: float = 30.0) -> bool:
        """Read datagrams until one contains ``until`` (True) or the timeout (False)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                self.messages.append(self.sock.recv(65536).decode())
            except TimeoutError:
                continue
            if until in self.messages[-1]:
                return True
        return False

    def close(self) -> None:
        self.sock.close()


async def _long_caller(peer: SimAudioSocketPeer) -> None:
    """Stays on the line (silence) until the agent ends the call or 60 s pass."""
    loop = asyncio.get_running_loop()
    end = loop.time() + 60.0
    while loop.time() < end:
        await peer.send_audio(bytes(320))
        try:
            frame = await peer.read_frame(0.02)
        except TimeoutError:
            continue
        if frame is None:
            return
        if not is_silent(frame.payload):
            pass


def test_serve_notifies_reloads_and_drains(tmp_path: Path) -> None:
    agi, media = free_port(), free_port()
    rules = tmp_path / "shedding.yaml"
    rules.write_text("rules: []\n")
    cfg = (f"listen:\n  fastagi: 127.0.0.1:{agi}\n  audiosocket: 127.0.0.1:{media}\n"
           f"max_calls: 2\nlog_level: INFO\nturn: {{no_input_timeout_ms: 60000}}\n"
           f"capacity: {{pbx_conf: none, drain_timeout_s: 3, shedding: {rules}}}\n" + TRANSFERS)
    listener = NotifyListener(tmp_path / "notify.sock")
    env = {"NOTIFY_SOCKET": listener.path, "WATCHDOG_USEC": "1000000"}
    try:
        with AgentProcess(cfg, env=env) as proc:
            assert listener.collect("READY=1"), listener.messages
            assert listener.collect("WATCHDOG=1", 5), listener.messages
            assert any("STATUS=" in m for m in listener.messages)

            # SIGHUP with a broken rule file: refused, old rules stay, the daemon keeps serving
            rules.write_text("rules:\n  - name: hot\n    sensor: cpu_percent\n    above: 90\n"
                             "    for: 10s\n    level: panic\n")
            proc.signal(signal.SIGHUP)
            assert proc.wait_log("reload refused"), proc.log()
            assert f"{rules}:6" in proc.log()  # file:line of the bad key
            rules.write_text("rules:\n  - name: hot\n    sensor: cpu_percent\n    above: 99.9\n"
                             "    for: 30s\n    level: brief\n")
            proc.signal(signal.SIGHUP)
            assert proc.wait_log("reloaded: 1 shedding rules"), proc.log()
            assert proc.proc is not None and proc.proc.poll() is None

            async def drain_run() -> tuple[dict[str, str], dict[str, str], float]:
                pbx = FakeAsterisk("127.0.0.1", agi, media=_long_caller)
                live = asyncio.create_task(pbx.place_call(callerid="+14155550101"))
                await asyncio.sleep(2.0)  # the call is up and greeted
                proc.signal(signal.SIGTERM)
                await asyncio.sleep(0.5)
                t0 = asyncio.get_running_loop().time()
                late = await FakeAsterisk("127.0.0.1", agi).place_call(callerid="+14155550102")
                late_s = asyncio.get_running_loop().time() - t0
                first = await asyncio.wait_for(live, 30)
                return first.variables, late.variables, late_s

            live_vars, late_vars, late_s = asyncio.run(drain_run())
            assert late_vars.get("AGENT_RESULT") == "BUSY", late_vars
            assert late_vars.get("AGENT_REASON") == "draining" and late_s < 1.0
            assert live_vars.get("AGENT_RESULT") == "TRANSFER", live_vars
            assert live_vars.get("AGENT_REASON") == "drain-timeout"
            assert live_vars.get("AGENT_TRANSFER_TO") == "PJSIP/100"
            assert proc.proc is not None and proc.proc.wait(30) == 0
            assert listener.collect("STOPPING=1", 5), listener.messages
            log = proc.log()
            assert "1 call(s) handed back" in log and "Traceback" not in log
    finally:
        listener.close()


def test_freeswitch_serve_notifies_reloads_and_drains(tmp_path: Path) -> None:
    from agent.sim.freeswitch import FakeFreeSwitch

    port = free_port()
    rules = tmp_path / "shedding.yaml"
    rules.write_text("rules: []\n")
    cfg = (f"pbx: freeswitch\nlisten:\n  esl: 127.0.0.1:{port}\nmax_calls: 2\nlog_level: INFO\n"
           f"turn: {{no_input_timeout_ms: 60000}}\n"
           f"capacity: {{pbx_conf: none, drain_timeout_s: 3, shedding: {rules}}}\n" + TRANSFERS)
    listener = NotifyListener(tmp_path / "notify.sock")
    env = {"NOTIFY_SOCKET": listener.path, "WATCHDOG_USEC": "1000000"}
    try:
        with AgentProcess(cfg, env=env) as proc:
            assert listener.collect("READY=1"), listener.messages
            assert listener.collect("WATCHDOG=1", 5), listener.messages
            rules.write_text("rules: {}\n")
            proc.signal(signal.SIGHUP)
            assert proc.wait_log("reload refused"), proc.log()
            assert proc.proc is not None and proc.proc.poll() is None

            async def drain_run() -> tuple[dict[str, str], dict[str, str], float]:
                fs = FakeFreeSwitch("127.0.0.1", port)
                live = asyncio.create_task(fs.place_call(caller_id_number="+14155550101"))
                await asyncio.sleep(2.5)
                proc.signal(signal.SIGTERM)
                await asyncio.sleep(0.5)
                t0 = asyncio.get_running_loop().time()
                late = await FakeFreeSwitch("127.0.0.1", port).place_call(
                    caller_id_number="+14155550102")
                late_s = asyncio.get_running_loop().time() - t0
                first = await asyncio.wait_for(live, 30)
                return first.variables, late.variables, late_s

            live_vars, late_vars, late_s = asyncio.run(drain_run())
            assert late_vars.get("agent_result") == "BUSY", late_vars
            assert late_vars.get("agent_reason") == "draining" and late_s < 1.0
            assert live_vars.get("agent_result") == "TRANSFER", live_vars
            assert live_vars.get("agent_reason") == "drain-timeout"
            assert live_vars.get("agent_transfer_to") == "PJSIP/100"
            assert proc.proc is not None and proc.proc.wait(30) == 0
            assert listener.collect("STOPPING=1", 5), listener.messages
            log = proc.log()
            assert "1 call(s) handed back" in log and "Traceback" not in log
    finally:
        listener.close()
