"""`pbx-agent serve` as the daemon runs it: a subprocess, a real call, a clean SIGTERM."""

from __future__ import annotations

import asyncio

from agent.audio import is_silent
from agent.sim.asterisk import FakeAsterisk, SimAudioSocketPeer
from agent.sim.process import AgentProcess, free_port


def test_serve_answers_a_call_and_stops_on_sigterm() -> None:
    agi, media = free_port(), free_port()
    cfg = (f"listen:\n  fastagi: 127.0.0.1:{agi}\n  audiosocket: 127.0.0.1:{media}\n"
           "max_calls: 2\nlog_level: INFO\n"
           "transfers: {front-desk: PJSIP/100, billing: PJSIP/101, emergency: PJSIP/199}\n")
    with AgentProcess(cfg) as proc:
        heard: list[bool] = []

        async def caller(peer: SimAudioSocketPeer) -> None:
            end = asyncio.get_running_loop().time() + 2.0
            while asyncio.get_running_loop().time() < end:
                await peer.send_audio(bytes(320))
                try:
                    frame = await peer.read_frame(0.05)
                except TimeoutError:
                    continue
                if frame is not None:
                    heard.append(not is_silent(frame.payload))
                await asyncio.sleep(0.015)
            peer.hangup()

        result = asyncio.run(FakeAsterisk("127.0.0.1", agi, media=caller).place_call())
        assert any(heard), "no greeting audio reached the caller"
        assert result.answered
        assert result.variables.get("AGENT_RESULT") == "DONE"
        assert result.variables.get("AGENT_REASON") == "caller-hangup"
        assert proc.stop() == 0
        text = proc.log()
        assert "stopping" in text and f"127.0.0.1:{agi}" in text
        assert "Traceback" not in text
