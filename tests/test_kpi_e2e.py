"""Call records and metrics from live calls through the simulator, with the real models.

A record is written for every call: completed, refused, abandoned by the caller, and dropped
because a call's worker died mid-call; the metrics move as calls run; the post-call rating is
recorded. Asterisk in-process; FreeSWITCH as `pbx-agent serve` with its records read back.
"""

from __future__ import annotations

import asyncio
import dataclasses
import re
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.call.session import CallSession
from agent.config import Config, default_config
from agent.engine.bundle import EngineBundle
from agent.engine.tts import PiperTts
from agent.kpi.records import RecordStore, read_records
from agent.models import require
from agent.runtime.aio import AsteriskAgent
from agent.runtime.engines import load_engines
from agent.sim.caller import builtin_script, parse_script
from agent.sim.process import AgentProcess, free_port
from agent.sim.run import SimCallReport, run_sim_call


@pytest.fixture(scope="module")
def config() -> Config:
    base = default_config()
    return dataclasses.replace(
        base, max_calls=2,
        capacity=dataclasses.replace(base.capacity, pbx_conf="none", engine_calls=0,
                                     capacity_report="/nonexistent.json"),
        kpi=dataclasses.replace(base.kpi, satisfaction=True, mask_caller="last4"))


@pytest.fixture(scope="module")
def engines(config: Config) -> Iterator[EngineBundle]:
    bundle = load_engines(config)
    yield bundle
    bundle.close()


@pytest.fixture(scope="module")
def voice() -> PiperTts:
    return PiperTts(str(require("piper-en-us-joe-medium")), out_rate_hz=8000, length_scale=1.15,
                    deterministic=True)


RATED = parse_script({"name": "rated", "caller": {"callerid": "+14155550177"},
                      "voice": {"length_scale": 1.15, "noise_snr_db": 35, "mulaw": False},
                      "turns": [{"say": "What are your opening hours?"},
                                {"say": "Thank you, goodbye."},
                                {"dtmf": "4"}],
                      "expect_result": "DONE"})


def _metric(text: str, name: str, **labels: str) -> float:
    """One sample's value from Prometheus text (0 when absent)."""
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        m = re.match(r"^([a-z_0-9]+)(?:\{([^}]*)\})? (\S+)$", line)
        if not m or m.group(1) != name:
            continue
        got = ",".join(sorted(p for p in (m.group(2) or "").split(",") if p))
        if got == want:
            return float(m.group(3))
    return 0.0


def test_asterisk_records_every_call_and_metrics_move(
        config: Config, engines: EngineBundle, voice: PiperTts, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    db = tmp_path / "calls.sqlite"

    async def main() -> tuple[dict[str, SimCallReport], str, str]:
        agent = AsteriskAgent(config, engines, fastagi_port=0, audiosocket_port=0)
        store = RecordStore(str(db))
        store.start()
        agent.kpi.store = store
        await agent.start()
        port = agent.fastagi.port
        before = agent.kpi.metrics.render().decode()
        out: dict[str, SimCallReport] = {}
        try:
            out["rated"] = await run_sim_call("127.0.0.1", port, RATED, voice)
            out["abandoned"] = await run_sim_call("127.0.0.1", port, builtin_script("hangup"),
                                                  voice, seed=1)
            # a call whose dialog worker dies mid-call (its first answer raises)
            original = CallSession._answer

            def broken(self: CallSession, utt: Any) -> None:
                raise RuntimeError("worker killed")

            monkeypatch.setattr(CallSession, "_answer", broken)
            out["dropped"] = await run_sim_call("127.0.0.1", port, builtin_script("overload"),
                                                voice, seed=2)
            monkeypatch.setattr(CallSession, "_answer", original)
            agent.governor.start_drain()
            out["refused"] = await run_sim_call("127.0.0.1", port, builtin_script("overload"),
                                                voice, seed=3)
        finally:
            await agent.close()
            store.close()
        return out, before, agent.kpi.metrics.render().decode()

    reports, before, after = asyncio.run(main())
    assert reports["rated"].result == "DONE"
    assert reports["dropped"].result == "TRANSFER" and reports["dropped"].reason == "engine-error"
    assert reports["refused"].result == "BUSY" and reports["refused"].reason == "draining"

    records = {r.pbx_call_id: r for r in read_records(str(db))}
    by_name = {name: records[rep.call_id] for name, rep in reports.items()}
    assert len(records) == 4
    rated = by_name["rated"]
    assert rated.outcome == "completed" and rated.reason == "caller-goodbye"
    assert rated.satisfaction == 4
    assert rated.caller == "+*******0177"  # last4 masking: the number itself is never stored
    assert rated.answered_at is not None and rated.ended_at > rated.answered_at
    assert [t.path for t in rated.turns] == ["faq", "goodbye"]
    assert all(t.response_ms is not None and t.response_ms > 0 for t in rated.turns)
    assert all(t.stt_ms is not None and t.stt_ms > 0 for t in rated.turns)
    assert by_name["abandoned"].outcome == "abandoned"
    assert by_name["dropped"].outcome == "dropped"
    assert by_name["dropped"].reason == "engine-error"
    refused = by_name["refused"]
    assert refused.outcome == "refused" and refused.reason == "draining"
    assert refused.answered_at is None and refused.turns == []

    # the metrics moved by exactly these calls
    assert _metric(after, "pbx_agent_admissions_total") - \
        _metric(before, "pbx_agent_admissions_total") == 3
    assert _metric(after, "pbx_agent_refusals_total", reason="draining") == 1
    for outcome in ("completed", "abandoned", "dropped", "refused"):
        assert _metric(after, "pbx_agent_calls_total", outcome=outcome) == 1, outcome
    turns_with_latency = sum(1 for r in records.values() for t in r.turns
                             if t.response_ms is not None)
    observed = sum(_metric(after, "pbx_agent_response_latency_seconds_count", path=p)
                   for p in ("faq", "goodbye", "llm", "transfer", "canned", "llm-brief"))
    assert observed == turns_with_latency >= 2
    assert _metric(after, "pbx_agent_satisfaction_total", rating="4") == 1
    assert _metric(after, "pbx_agent_engine_cpu_seconds_total", stage="stt") > 0
    assert _metric(after, "pbx_agent_engine_cpu_seconds_total", stage="tts") >= 0


def test_freeswitch_serve_writes_records_and_serves_metrics(voice: PiperTts) -> None:
    port = free_port()
    cfg = (f"pbx: freeswitch\nmax_calls: 2\nlisten:\n  esl: 127.0.0.1:{port}\n"
           "log_level: INFO\ncapacity: {pbx_conf: none}\n"
           "transfers: {front-desk: '1000', billing: '1001', emergency: '1999'}\n")
    with AgentProcess(cfg) as proc:
        report = asyncio.run(run_sim_call("127.0.0.1", port, builtin_script("overload"), voice,
                                          pbx="freeswitch"))
        with urllib.request.urlopen(proc.metrics_url, timeout=5) as resp:
            metrics = resp.read().decode()
        assert proc.stop() == 0  # the drain writes the queued records before exit
        records = read_records(str(proc.records_path))
    assert report.result == "DONE"
    assert len(records) == 1
    rec = records[0]
    assert rec.pbx == "freeswitch" and rec.pbx_call_id == report.call_id
    assert rec.outcome == "completed" and [t.path for t in rec.turns] == ["faq", "goodbye"]
    assert _metric(metrics, "pbx_agent_admissions_total") == 1
    assert _metric(metrics, "pbx_agent_calls_total", outcome="completed") == 1
    assert _metric(metrics, "pbx_agent_active_calls") == 0


def test_naive_baseline_mode_serves_a_call_without_phrase_cache_or_scheduler(
        config: Config, voice: PiperTts) -> None:
    """The baseline `pbx-agent capacity --compare-naive` measures really answers calls: the LLM
    runs behind one lock (not through the scheduler), phrases are synthesized at use."""
    naive = dataclasses.replace(config, naive=True,
                                kpi=dataclasses.replace(config.kpi, satisfaction=False))
    engines = load_engines(naive)
    assert len(engines.phrases) == 0  # no phrase cache
    script = parse_script({"name": "naive", "caller": {"callerid": "+14155550188"},
                           "voice": {"length_scale": 1.15, "noise_snr_db": 35, "mulaw": False},
                           "turns": [{"say": "Is it normal for my gums to bleed when I brush?"},
                                     {"say": "Thank you, goodbye."}],
                           "expect_result": "DONE"})

    async def main() -> tuple[SimCallReport, AsteriskAgent]:
        agent = AsteriskAgent(naive, engines, fastagi_port=0, audiosocket_port=0)
        await agent.start()
        try:
            return await run_sim_call("127.0.0.1", agent.fastagi.port, script, voice), agent
        finally:
            await agent.close()

    try:
        report, agent = asyncio.run(main())
    finally:
        engines.close()
    assert report.result == "DONE", report.reason
    turns = agent.finished[0].outcome.turns
    assert [t.path for t in turns] == ["llm", "goodbye"]
    assert turns[0].llm_first_token_ms is not None  # the LLM did answer
    assert all(r.latency_ms is not None for r in report.rows)
    # the scheduler reports every request it serves; the naive path never went through it
    metrics = agent.kpi.metrics.render().decode()
    assert "pbx_agent_llm_queue_wait_seconds_count 0.0" in metrics
