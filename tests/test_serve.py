"""`pbx-agent serve` as the daemon runs it: a subprocess, a real call, a clean SIGTERM."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from agent.audio import is_silent
from agent.sim.asterisk import FakeAsterisk, SimAudioSocketPeer


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_serve_answers_a_call_and_stops_on_sigterm(tmp_path: Path) -> None:
    agi, media = free_port(), free_port()
    cfg = tmp_path / "agent.yaml"
    cfg.write_text(f"listen:\n  fastagi: 127.0.0.1:{agi}\n  audiosocket: 127.0.0.1:{media}\n"
                   "max_calls: 2\nlog_level: INFO\n"
                   "transfers: {front-desk: PJSIP/100, billing: PJSIP/101, emergency: PJSIP/199}\n")
    log = tmp_path / "serve.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "agent.cli", "--config", str(cfg), "serve"],
                                stdout=out, stderr=subprocess.STDOUT, env=dict(os.environ))
    try:
        deadline = time.monotonic() + 180
        while b"ready in" not in log.read_bytes():
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "serve did not get ready"
            time.sleep(0.2)
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
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        text = log.read_text()
        assert "stopping" in text and f"127.0.0.1:{agi}" in text
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
