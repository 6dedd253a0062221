"""Run scripted calls against an agent over the real protocols and report what happened."""

from __future__ import annotations

import asyncio
import contextlib
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from agent.engine.text import word_error_rate
from agent.sim.asterisk import FakeAsterisk
from agent.sim.caller import CallerReport, CallerScript, ScriptedCaller, Synth, render_turn_audio

Transcriber = Callable[[bytes], str]


@dataclass
class TurnRow:
    """One row of the demo table."""

    caller_said: str
    agent_heard: str
    agent_replied: str
    latency_ms: float | None
    path: str = ""
    barge_cut_ms: float | None = None
    wer: float | None = None


@dataclass
class SimCallReport:
    """A simulated call seen from both sides."""

    script: str
    pbx: Any  # SimCallResult (Asterisk) or SimFsCallResult (FreeSWITCH)
    caller: CallerReport
    rows: list[TurnRow] = field(default_factory=list)
    greeting_text: str = ""
    #: seconds from the PBX connecting to the agent until the dialplan got the call back
    call_s: float = 0.0

    @property
    def result(self) -> str:
        """`AGENT_RESULT` (Asterisk) or `agent_result` (FreeSWITCH) as the dialplan sees it."""
        return str(self.pbx.variables.get("AGENT_RESULT") or
                   self.pbx.variables.get("agent_result", ""))

    @property
    def transfer_to(self) -> str:
        """`AGENT_TRANSFER_TO` / `agent_transfer_to` as the dialplan sees it."""
        return str(self.pbx.variables.get("AGENT_TRANSFER_TO") or
                   self.pbx.variables.get("agent_transfer_to", ""))

    @property
    def reason(self) -> str:
        """`AGENT_REASON` / `agent_reason` as the dialplan sees it."""
        return str(self.pbx.variables.get("AGENT_REASON") or
                   self.pbx.variables.get("agent_reason", ""))

    @property
    def call_id(self) -> str:
        """The PBX's id of the call (Asterisk uniqueid, FreeSWITCH Unique-ID)."""
        return str(getattr(self.pbx, "uniqueid", "") or getattr(self.pbx, "uuid", ""))

    def latencies(self, path: str | None = None) -> list[float]:
        """Measured response latencies (ms), optionally for one path (faq, llm, transfer...)."""
        return [r.latency_ms for r in self.rows
                if r.latency_ms is not None and (path is None or r.path == path)]

    def mean_wer(self) -> float | None:
        """Mean word error of the agent's transcript of the caller."""
        values = [r.wer for r in self.rows if r.wer is not None]
        return statistics.fmean(values) if values else None


async def run_sim_call(agi_host: str, agi_port: int, script: CallerScript, synth: Synth,
                       transcribe: Transcriber | None = None,
                       agent_turns: Callable[[str], list[tuple[str, str]]] | None = None,
                       rate_hz: int = 8000, seed: int = 0,
                       pbx: str = "asterisk") -> SimCallReport:
    """Place one scripted call into an Asterisk (FastAGI port) or FreeSWITCH (outbound ESL
    port) agent; ``agent_turns(call_id)`` gives (heard, path) per turn if known."""
    loop = asyncio.get_running_loop()
    audio = [await loop.run_in_executor(None, render_turn_audio, script, t, synth, rate_hz,
                                        seed + i)
             for i, t in enumerate(script.turns)]
    caller = ScriptedCaller(script, audio, rate_hz)

    async def media(peer: Any) -> None:
        await caller.run(peer)

    started = loop.time()
    if pbx == "freeswitch":
        from agent.sim.freeswitch import FakeFreeSwitch

        fs = FakeFreeSwitch(agi_host, agi_port, media=media, rate_hz=rate_hz)
        result: Any = await fs.place_call(caller_id_number=script.callerid,
                                          caller_id_name=script.calleridname,
                                          destination_number=script.dnid)
    else:
        fake = FakeAsterisk(agi_host, agi_port, media=media, rate_hz=rate_hz)
        result = await fake.place_call(callerid=script.callerid,
                                       calleridname=script.calleridname, dnid=script.dnid)
    report = SimCallReport(script.name, result, caller.report, call_s=loop.time() - started)
    heard = agent_turns(report.call_id) if agent_turns else []
    for i, m in enumerate(caller.report.turns):
        row = TurnRow(caller_said=m.said, agent_heard="", agent_replied="",
                      latency_ms=m.latency_ms, barge_cut_ms=m.barge_cut_ms)
        if i < len(heard):
            row.agent_heard, row.path = heard[i]
            if script.turns[i].text:
                row.wer = word_error_rate(script.turns[i].text, row.agent_heard)
        if transcribe is not None and m.agent_audio:
            row.agent_replied = await loop.run_in_executor(None, transcribe, bytes(m.agent_audio))
        report.rows.append(row)
    if transcribe is not None and caller.report.greeting_audio:
        with contextlib.suppress(Exception):
            report.greeting_text = await loop.run_in_executor(
                None, transcribe, bytes(caller.report.greeting_audio))
    return report


def format_table(report: SimCallReport) -> str:
    """The demo's table: caller said / agent heard / agent replied / latency."""
    headers = ("#", "caller said", "agent heard", "agent replied", "path", "latency ms")
    rows = [(str(i + 1), r.caller_said, r.agent_heard, r.agent_replied, r.path,
             "-" if r.latency_ms is None else f"{r.latency_ms:.0f}")
            for i, r in enumerate(report.rows)]
    widths = [min(40, max(len(h), *(len(row[c]) for row in rows))) if rows else len(h)
              for c, h in enumerate(headers)]

    def fmt(cells: tuple[str, ...]) -> str:
        out = []
        for cell, w in zip(cells, widths, strict=True):
            cell = cell if len(cell) <= w else cell[: w - 1] + "…"
            out.append(cell.ljust(w))
        return " | ".join(out)

    lines = [fmt(headers), "-+-".join("-" * w for w in widths)]
    lines += [fmt(r) for r in rows]
    return "\n".join(lines)
