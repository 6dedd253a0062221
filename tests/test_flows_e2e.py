"""Booking calls end to end through the simulator, with the real models, on both PBX kinds.

The calendar is `agent.sim.webhooks.WebhookServer` on 127.0.0.1. Asterisk runs in-process;
FreeSWITCH as `pbx-agent serve` (a child process), its call records read back from SQLite.
Also: the calendar stalling while several callers book (the fallback within the timeout, the
breaker opening), and after-hours from an injected wall clock.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from agent.config import Config, default_config, parse_config
from agent.engine.bundle import EngineBundle
from agent.engine.tts import PiperTts
from agent.kpi.model import CallRecord
from agent.kpi.records import RecordStore, read_records
from agent.models import require
from agent.runtime.aio import AsteriskAgent
from agent.runtime.engines import load_engines
from agent.sim.caller import CallerScript, parse_script
from agent.sim.process import AgentProcess, free_port
from agent.sim.run import SimCallReport, run_sim_call
from agent.sim.webhooks import WebhookServer


def booking_script(name: str, callerid: str, after_check: str = "Yes, please.",
                   end: str = "No, that's all. Goodbye.") -> CallerScript:
    return parse_script({
        "name": name, "caller": {"callerid": callerid},
        "voice": {"length_scale": 1.15, "noise_snr_db": 35, "mulaw": False},
        "turns": [{"say": "Hi, I'd like to book an appointment."},
                  {"say": "My name is John Smith."},
                  {"dtmf": "5551234567#"},
                  {"say": "Monday at 10 a.m."},
                  {"say": after_check}] + ([{"say": end}] if end else []),
    })


def integrations_yaml(url: str, timeout_ms: int = 1500) -> str:
    return f"""integrations:
  calendar-availability:
    url: {url}/calendar/availability
    idempotent: true
    timeout_ms: {timeout_ms}
    retries: 1
    breaker: {{failures: 3, window_s: 60, slow_ms: 1200, cooldown_s: 30}}
  calendar-booking:
    url: {url}/calendar/bookings
    timeout_ms: 2000
  messages:
    url: {url}/messages
sidework: {{path: "off"}}
"""


def agent_config(url: str, **overrides: object) -> Config:
    base = default_config()
    extra = parse_config("transfers: {front-desk: '1000', billing: '1001', emergency: '1999'}\n"
                         + integrations_yaml(url), "test.yaml")
    return dataclasses.replace(
        base, max_calls=4, integrations=extra.integrations, sidework=extra.sidework,
        capacity=dataclasses.replace(base.capacity, pbx_conf="none", engine_calls=0,
                                     capacity_report="/nonexistent.json"),
        **overrides)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def engines() -> Iterator[EngineBundle]:
    bundle = load_engines(default_config())
    yield bundle
    bundle.close()


@pytest.fixture(scope="module")
def voice() -> PiperTts:
    return PiperTts(str(require("piper-en-us-joe-medium")), out_rate_hz=8000, length_scale=1.15,
                    deterministic=True)


async def _asterisk_calls(config: Config, engines: EngineBundle, voice: PiperTts, db: Path,
                          scripts: list[CallerScript]) -> list[SimCallReport]:
    agent = AsteriskAgent(config, engines, fastagi_port=0, audiosocket_port=0)
    store = RecordStore(str(db))
    store.start()
    agent.kpi.store = store
    await agent.start()
    try:
        return list(await asyncio.gather(*(
            run_sim_call("127.0.0.1", agent.fastagi.port, s, voice, seed=i)
            for i, s in enumerate(scripts))))
    finally:
        await agent.close()
        store.close()


def _check_booked(report: SimCallReport, record: CallRecord, server: WebhookServer) -> None:
    assert report.result == "DONE", (report.reason, record.turns)
    assert record.reason == "caller-goodbye"
    assert record.barge_ins == 0  # answering a flow question is a turn, not a barge-in
    [flow] = record.flows
    assert (flow.name, flow.outcome) == ("booking", "completed")
    assert [(i.name, i.ok) for i in record.integrations] == [
        ("calendar-availability", True), ("calendar-booking", True)]
    [booking] = server.bookings
    assert booking["name"] == "John Smith" and booking["phone"] == "5551234567"
    assert booking["start"].endswith("T10:00")
    paths = [t.path for t in record.turns]
    assert paths[0] == "flow" and paths.count("flow") == 5 and paths[-1] == "goodbye"
    spoken = [t for t in record.turns if t.path == "flow" and not t.caller_text.startswith("[")]
    assert all(t.response_ms is not None and t.response_ms > 0 for t in spoken)


def test_asterisk_booking_call_books_through_the_calendar(
        engines: EngineBundle, voice: PiperTts, tmp_path: Path) -> None:
    with WebhookServer() as server:
        config = agent_config(server.url)
        [report] = asyncio.run(_asterisk_calls(config, engines, voice, tmp_path / "c.sqlite",
                                               [booking_script("book", "+14155550101")]))
    [record] = read_records(str(tmp_path / "c.sqlite"))
    _check_booked(report, record, server)


def test_freeswitch_booking_call_books_through_the_calendar(voice: PiperTts) -> None:
    port = free_port()
    with WebhookServer() as server:
        cfg = (f"pbx: freeswitch\nmax_calls: 2\nlisten:\n  esl: 127.0.0.1:{port}\n"
               "log_level: INFO\ncapacity: {pbx_conf: none}\n"
               "transfers: {front-desk: '1000', billing: '1001', emergency: '1999'}\n"
               + integrations_yaml(server.url))
        with AgentProcess(cfg) as proc:
            report = asyncio.run(run_sim_call("127.0.0.1", port,
                                              booking_script("book-fs", "+14155550102"), voice,
                                              pbx="freeswitch"))
            assert proc.stop() == 0
            [record] = read_records(str(proc.records_path))
    assert record.pbx == "freeswitch"
    _check_booked(report, record, server)


def test_stalled_calendar_while_four_callers_book(
        engines: EngineBundle, voice: PiperTts, tmp_path: Path) -> None:
    """The calendar holds every request for 30 s: each caller gets the fallback question within
    the integration's timeout (never the stall), the breaker opens after 3 failures, and the
    calls are handed to the front desk."""
    db = tmp_path / "stall.sqlite"
    with WebhookServer() as server:
        server.stall_s = 30.0
        server.mode = "stall"
        config = agent_config(server.url)
        scripts = [booking_script(f"stall-{i}", f"+1415555020{i}", after_check="Yes, please.",
                                  end="") for i in range(4)]
        reports = asyncio.run(_asterisk_calls(config, engines, voice, db, scripts))
        still_stalling = server.stalling
        requests = [r for r in server.requests if r.path == "/calendar/availability"]
        server.release()
    records = {r.pbx_call_id: r for r in read_records(str(db))}
    assert len(records) == 4
    for report in reports:
        record = records[report.call_id]
        assert report.result == "TRANSFER", (report.reason, record.turns)
        assert report.transfer_to == config.transfers["front-desk"]
        [flow] = record.flows
        assert flow.outcome == "fallback"
        [call] = record.integrations
        assert call.name == "calendar-availability" and not call.ok
        assert call.error in ("timeout", "breaker-open")
    errors = sorted(records[r.call_id].integrations[0].error for r in reports)
    # the calls came back while the calendar still held requests: nobody waited on it
    assert still_stalling >= 1 and not any(r.answered for r in requests)
    assert errors.count("timeout") >= 3 or "breaker-open" in errors
    assert server.bookings == []


def test_after_hours_flow_runs_from_the_injected_clock(
        engines: EngineBundle, voice: PiperTts, tmp_path: Path) -> None:
    """Outside the configured hours (a Sunday in New York) the call starts in the after-hours
    flow: the caller is not an emergency, leaves a message, and the message goes to the
    side-work queue, which delivers it to the webhook."""
    with WebhookServer() as server:
        hours = dataclasses.replace(
            agent_config(server.url).hours, timezone="America/New_York",
            windows=tuple((day, 8 * 60, 18 * 60) for day in range(5)))
        config = agent_config(server.url, hours=hours)
        script = parse_script({
            "name": "after-hours", "caller": {"callerid": "+14155550150"},
            "voice": {"length_scale": 1.15, "noise_snr_db": 35, "mulaw": False},
            "turns": [{"dtmf": "2"}, {"say": "My name is Maria Garcia."},
                      {"dtmf": "5559876543#"},
                      {"say": "I need to move my cleaning to next week."}]})
        sunday = datetime(2026, 11, 29, 15, 0, tzinfo=UTC)

        async def main() -> SimCallReport:
            agent = AsteriskAgent(config, engines, fastagi_port=0, audiosocket_port=0)
            agent.wall_clock = lambda: sunday
            await agent.start()
            try:
                return await run_sim_call("127.0.0.1", agent.fastagi.port, script, voice)
            finally:
                await agent.close()

        report = asyncio.run(main())
        messages = [r for r in server.requests if r.path == "/messages"]
    assert report.result == "DONE" and report.reason == "flow:after-hours"
    [message] = messages
    assert message.json is not None
    assert message.json["name"] == "Maria Garcia" and message.json["phone"] == "5559876543"
    assert "cleaning" in message.json["message"]
