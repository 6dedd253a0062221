"""End to end over real sockets with the real models: the simulator plays Asterisk's side.

Calls run in real time (the agent paces its audio at 20 ms), so this module takes a couple of
minutes. Latency is measured and printed, never asserted; behaviour is asserted.
"""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import pytest

from agent.config import Config, default_config
from agent.engine.bundle import EngineBundle
from agent.engine.tts import PiperTts
from agent.models import require
from agent.pbx.asterisk.audiosocket import (
    FrameDecoder,
    Kind,
    audio_frame,
    uuid_frame,
)
from agent.runtime.aio import AsteriskAgent
from agent.runtime.engines import load_engines
from agent.sim.asterisk import build_agi_env_block
from agent.sim.caller import builtin_script
from agent.sim.run import SimCallReport, run_sim_call


@pytest.fixture(scope="module")
def config() -> Config:
    return default_config()


@pytest.fixture(scope="module")
def engines(config: Config) -> Iterator[EngineBundle]:
    bundle = load_engines(config)
    yield bundle
    bundle.close()


@pytest.fixture(scope="module")
def caller_voice(config: Config) -> PiperTts:
    return PiperTts(str(require("piper-en-us-joe-medium")), out_rate_hz=8000, length_scale=1.15,
                    deterministic=True)


def run_with_agent(config: Config, engines: EngineBundle,
                   body: Callable[[AsteriskAgent], Awaitable[Any]]) -> Any:
    async def main() -> Any:
        agent = AsteriskAgent(config, engines, fastagi_port=0, audiosocket_port=0)
        await agent.start()
        try:
            return await body(agent)
        finally:
            await agent.close()

    return asyncio.run(main())


def sim_call(config: Config, engines: EngineBundle, voice: PiperTts, script_name: str,
             check: Callable[[AsteriskAgent, SimCallReport], None] | None = None
             ) -> tuple[SimCallReport, Any]:
    script = builtin_script(script_name)

    def transcribe(pcm: bytes) -> str:
        stream = engines.stt.open_stream(8000)
        stream.accept(pcm)
        return stream.finish().text

    async def body(agent: AsteriskAgent) -> tuple[SimCallReport, Any]:
        def heard(uniqueid: str) -> list[tuple[str, str]]:
            for s in agent.finished:
                if s.uniqueid == uniqueid:
                    return [(t.caller_text, t.path) for t in s.outcome.turns]
            return []

        report = await run_sim_call("127.0.0.1", agent.fastagi.port, script, voice, transcribe,
                                    heard)
        await asyncio.sleep(0.3)
        outcome = next(s.outcome for s in agent.finished if s.uniqueid == report.pbx.uniqueid)
        if check is not None:
            check(agent, report)
        return report, outcome

    result: tuple[SimCallReport, Any] = run_with_agent(config, engines, body)
    return result


def test_three_turn_call_faq_llm_transfer(config: Config, engines: EngineBundle,
                                         caller_voice: PiperTts) -> None:
    report, outcome = sim_call(config, engines, caller_voice, "demo")
    print("\nlatencies ms:", [(r.path, r.latency_ms) for r in report.rows])
    assert [r.path for r in report.rows] == ["faq", "llm", "transfer"]
    # the agent understood the caller: ≤ 20 % word error against the script
    wer = report.mean_wer()
    assert wer is not None and wer <= 0.20, [(r.caller_said, r.agent_heard) for r in report.rows]
    # the FAQ answer is the knowledge base's exact answer, and it was heard on the line
    hours = next(e for e in config.agent.faq if e.id == "hours")
    assert outcome.turns[0].reply_text == hours.answer
    assert "saturday" in report.rows[0].agent_replied.lower()
    # the LLM turn produced audio the caller heard
    assert report.rows[1].latency_ms is not None and report.rows[1].agent_replied
    # "can I talk to a real person" → TRANSFER to the allowlisted front desk
    assert report.result == "TRANSFER"
    assert report.transfer_to == config.transfers["front-desk"]
    assert report.pbx.variables["AGENT_REASON"] == "intent:front-desk"
    # the agent paced its audio: never 2 s without a frame, Asterisk's idle timer never fired
    assert not report.pbx.idle_timeout_fired
    assert report.caller.max_agent_gap_ms < 2000
    assert report.pbx.exec_results[0].result == 0  # ended by our 0x00 frame
    assert report.pbx.fatal_errors == []


def test_barge_in_stops_agent_audio_quickly(config: Config, engines: EngineBundle,
                                           caller_voice: PiperTts) -> None:
    report, outcome = sim_call(config, engines, caller_voice, "bargein")
    cut = report.rows[0].barge_cut_ms
    print(f"\nbarge-in: agent audio stopped {cut} ms after the caller's speech onset")
    assert outcome.barge_ins >= 1
    assert cut is not None and cut <= 300
    # the interrupted caller was still understood (a pause in the question may split it into
    # two turns) and the call went on to a goodbye
    heard = " ".join(t.caller_text for t in outcome.turns).lower()
    assert "interrupt" in heard and "where" in heard, heard
    assert report.result == "DONE"


def test_caller_hangup_mid_reply_leaks_nothing(config: Config, engines: EngineBundle,
                                              caller_voice: PiperTts) -> None:
    before = set(threading.enumerate())
    tasks_left: list[asyncio.Task[Any]] = []

    def check(agent: AsteriskAgent, report: SimCallReport) -> None:
        tasks_left.extend(t for t in asyncio.all_tasks() if t is not asyncio.current_task())

    report, outcome = sim_call(config, engines, caller_voice, "hangup", check)
    assert report.caller.hung_up
    assert outcome.caller_hung_up and outcome.result.value == "DONE"
    assert report.pbx.exec_results[0].result == -1
    assert ("from_asterisk", "HANGUP") in report.pbx.transcript
    # nothing of the call is left running: no task of the call, no new thread after close
    assert not [t for t in tasks_left if "-" in t.get_name() and not t.done()], tasks_left
    after = {t for t in threading.enumerate() if t.is_alive()}
    assert after <= before, after - before


def test_refused_call_gets_busy(config: Config, engines: EngineBundle,
                                caller_voice: PiperTts) -> None:
    async def body(agent: AsteriskAgent) -> SimCallReport:
        held = [agent.governor.admit("+15550000000", "") for _ in
                range(agent.governor.capacity().value)]  # reserved, not started: they count
        assert agent.governor.admission.reserved == len(held)
        script = builtin_script("hangup")
        return await run_sim_call("127.0.0.1", agent.fastagi.port, script, caller_voice)

    report: SimCallReport = run_with_agent(config, engines, body)
    assert report.result == "BUSY"
    assert report.pbx.variables["AGENT_REASON"] == "capacity"
    assert report.pbx.exec_results == []  # never answered, never streamed


def test_call_ends_when_the_agi_side_vanishes(config: Config, engines: EngineBundle) -> None:
    async def body(agent: AsteriskAgent) -> tuple[bool, int]:
        reader, writer = await asyncio.open_connection("127.0.0.1", agent.fastagi.port)
        writer.write(build_agi_env_block(agi_port=agent.fastagi.port, uniqueid="vanish.1"))
        await writer.drain()
        assert (await reader.readline()).strip() == b"ANSWER"
        writer.write(b"200 result=0\n")
        await writer.drain()
        line = (await reader.readline()).decode().strip()
        assert line.startswith("EXEC AudioSocket ")
        media_uuid, address = line.split(" ", 2)[2].strip('"').split(",")
        host, port = address.split(":")
        mr, mw = await asyncio.open_connection(host, int(port))
        mw.write(uuid_frame(uuid.UUID(media_uuid)))
        for _ in range(10):
            mw.write(audio_frame(bytes(320)))
        await mw.drain()
        await asyncio.sleep(0.3)
        assert agent.sessions  # the call is live
        writer.close()  # the AGI connection disappears (Asterisk crashed, channel gone)
        decoder = FrameDecoder()
        frames = 0
        closed = False
        try:
            async with asyncio.timeout(10):
                while True:
                    data = await mr.read(65536)
                    if not data:
                        closed = True
                        break
                    frames += sum(1 for f in decoder.feed(data) if f.kind is Kind.AUDIO_8K)
        except TimeoutError:
            closed = False
        mw.close()
        await asyncio.sleep(0.2)
        return closed and not agent.sessions, frames

    ended, frames = run_with_agent(config, engines, body)
    assert frames > 0
    assert ended


def test_bad_agi_header_does_not_stop_the_next_call(config: Config, engines: EngineBundle,
                                                    caller_voice: PiperTts) -> None:
    async def body(agent: AsteriskAgent) -> SimCallReport:
        r, w = await asyncio.open_connection("127.0.0.1", agent.fastagi.port)
        w.write(b"agi_network: yes\nagi_request: agi://127.0.0.1/pbx-agent\nagi_chan")
        await w.drain()
        w.close()  # closes mid-header
        r2, w2 = await asyncio.open_connection("127.0.0.1", agent.audiosocket.port)
        w2.write(audio_frame(bytes(320)))  # no UUID frame: refused
        await w2.drain()
        agent.governor.start_drain()
        report = await asyncio.wait_for(
            run_sim_call("127.0.0.1", agent.fastagi.port, builtin_script("hangup"),
                         caller_voice), 30)
        w2.close()
        assert agent.audiosocket.stats.malformed >= 1
        return report

    report: SimCallReport = run_with_agent(config, engines, body)
    assert report.result == "BUSY"
    assert report.pbx.variables["AGENT_REASON"] == "draining"


def test_slin16_call_gets_16khz_frames_back(config: Config, engines: EngineBundle) -> None:
    from agent.audio import is_silent
    from agent.sim.asterisk import FakeAsterisk, SimAudioSocketPeer

    async def caller(peer: SimAudioSocketPeer) -> None:
        loop = asyncio.get_running_loop()
        end = loop.time() + 2.5
        while loop.time() < end:
            await peer.send_audio(bytes(640))  # kind 0x12: 20 ms of 16 kHz slin
            await asyncio.sleep(0.02)
        peer.hangup()

    async def body(agent: AsteriskAgent) -> Any:
        fake = FakeAsterisk("127.0.0.1", agent.fastagi.port, media=caller, rate_hz=16000)
        return await fake.place_call()

    result = run_with_agent(config, engines, body)
    frames = [r.frame for r in result.peers[0].received if r.frame.is_audio]
    late = frames[5:]  # the first frames may leave before Asterisk's first frame tells the rate
    assert late and all(f.kind is Kind.AUDIO_16K and len(f.payload) == 640 for f in late)
    assert any(not is_silent(f.payload) for f in late)  # the greeting, resampled to 16 kHz
    assert result.variables["AGENT_RESULT"] == "DONE"
