"""Prometheus metrics of the agent, the status read back from them, and the Grafana dashboard."""

from __future__ import annotations

import ast
import json
import logging
import re
import socket
import threading
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from agent.kpi.metrics import (
    INTEGRATION_RESULTS,
    SIDEWORK_RESULTS,
    AgentMetrics,
    StatusSnapshot,
    fetch_metrics,
    format_status,
    integration_result,
    snapshot_from_metrics,
)
from agent.kpi.model import (
    BREAKER_STATES,
    FLOW_OUTCOMES,
    OUTCOMES,
    SHED_LEVELS,
    CallRecord,
    FlowRun,
    IntegrationCall,
    TurnKpi,
)

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "contrib" / "grafana" / "pbx-agent.json"

NAMES = (
    "pbx_agent_info", "pbx_agent_active_calls", "pbx_agent_starting_calls",
    "pbx_agent_capacity_calls", "pbx_agent_admissions_total", "pbx_agent_refusals_total",
    "pbx_agent_shed_level", "pbx_agent_shed_state", "pbx_agent_calls_total",
    "pbx_agent_response_latency_seconds", "pbx_agent_stage_latency_seconds",
    "pbx_agent_response_latency_p95_seconds", "pbx_agent_integration_calls_total",
    "pbx_agent_integration_timeouts_total", "pbx_agent_queue_depth",
    "pbx_agent_llm_queue_wait_seconds", "pbx_agent_engine_cpu_seconds_total",
    "pbx_agent_satisfaction_total", "pbx_agent_records_dropped_total",
    "pbx_agent_records_written_total", "pbx_agent_flow_runs_total",
    "pbx_agent_integration_latency_seconds", "pbx_agent_integration_breaker_state",
    "pbx_agent_integration_breaker_transitions_total", "pbx_agent_sidework_depth",
    "pbx_agent_sidework_jobs_total",
)


@dataclass
class QueueStats:
    """What the side-work queue's stats() answers."""

    depth: int = 3
    dropped: int = 1
    lost: int = 0
    delivered: int = 40
    failed: int = 2
    restored: int = 5


class Live:
    """Values the bound callbacks read (what the governor and engines would answer)."""

    def __init__(self) -> None:
        self.active = 2
        self.starting = 0
        self.terms: dict[str, float | None] = {"effective": 4.0, "pbx": 120.0, "config": 4.0,
                                               "engine": 4.0}
        self.level = "normal"
        self.queues = {"llm": 1, "stt": 0, "tts": 0}
        self.p95: float | None = 0.84
        self.cpu = {"stt": 12.5, "llm": 210.0, "tts": 8.25, "other": 3.0}
        self.records = (33, 0)

    def bind(self, m: AgentMetrics) -> None:
        m.bind(active=lambda: self.active, starting=lambda: self.starting,
               capacity_terms=lambda: dict(self.terms), shed_level=lambda: self.level,
               queue_depths=lambda: dict(self.queues), latency_p95_s=lambda: self.p95,
               cpu_seconds=lambda: dict(self.cpu), records=lambda: self.records)


def samples_of(m: AgentMetrics) -> dict[str, list[tuple[dict[str, str], float]]]:
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(m.render().decode()):
        for s in family.samples:
            out.setdefault(s.name, []).append((dict(s.labels), float(s.value)))
    return out


def value(m: AgentMetrics, name: str, **labels: str) -> float | None:
    """One sample's value (None when the sample is not exported)."""
    for got, v in samples_of(m).get(name, []):
        if got == labels:
            return v
    return None


def exported_names(m: AgentMetrics) -> set[str]:
    return {re.split(r"[{ ]", line, maxsplit=1)[0]
            for line in m.render().decode().splitlines() if line and not line.startswith("#")}


def a_call(outcome: str = "completed", satisfaction: int | None = 4) -> CallRecord:
    return CallRecord(
        call_id="c1", pbx="asterisk", outcome=outcome, satisfaction=satisfaction,
        turns=[TurnKpi(0, "faq", response_ms=700.0, stt_ms=200.0, tts_first_audio_ms=0.0),
               TurnKpi(1, "llm", response_ms=1100.0, stt_ms=250.0, llm_first_token_ms=400.0,
                       tts_first_audio_ms=150.0),
               TurnKpi(2, "goodbye", response_ms=None)],
        integrations=[IntegrationCall("crm", ok=True, latency_ms=80.0),
                      IntegrationCall("crm", ok=False, latency_ms=3000.0, timed_out=True),
                      IntegrationCall("calendar", ok=False, latency_ms=20.0, error="500")],
        flows=[FlowRun("booking", "completed", steps=5),
               FlowRun("booking", "fallback", steps=2),
               FlowRun("routing", "escalated", steps=1)])


def observe_all(m: AgentMetrics, calls: list[IntegrationCall]) -> None:
    """What the webhook client does live, once per call."""
    for c in calls:
        m.observe_integration(c.name, c.ok, c.latency_ms, c.timed_out, c.error)


def use_everything(m: AgentMetrics) -> None:
    """One event of every kind, so that every family is exported."""
    Live().bind(m)
    m.admitted()
    m.refused("capacity")
    rec = a_call()
    observe_all(m, rec.integrations)
    m.call_ended(rec)
    m.observe_llm_wait(0.2)
    m.set_breaker("crm", "open")
    m.attach_sidework(QueueStats)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- exposition ---------------------------------------------------------------------------------

def test_every_metric_name_is_rendered_once_bound_and_used() -> None:
    m = AgentMetrics("asterisk", "0.1.0")
    use_everything(m)
    names = exported_names(m)
    for name in NAMES:
        assert name in names or f"{name}_count" in names, name
    assert value(m, "pbx_agent_info", pbx="asterisk", version="0.1.0") == 1.0


def test_labels_dashboards_plot_are_there_from_the_start() -> None:
    m = AgentMetrics("freeswitch")
    for outcome in OUTCOMES:
        assert value(m, "pbx_agent_calls_total", outcome=outcome) == 0.0
    for rating in "12345":
        assert value(m, "pbx_agent_satisfaction_total", rating=rating) == 0.0
    for stage in ("stt", "llm_first_token", "tts_first_audio"):
        assert value(m, "pbx_agent_stage_latency_seconds_count", stage=stage) == 0.0
    # no callbacks bound: the live families are simply absent, the scrape still works
    assert "pbx_agent_active_calls" not in exported_names(m)
    assert value(m, "pbx_agent_admissions_total") == 0.0


def test_events_move_counters_and_histograms_exactly() -> None:
    m = AgentMetrics("asterisk")
    for _ in range(3):
        m.admitted()
    m.refused("capacity")
    m.refused("shed:gpu-hot")
    m.call_ended(a_call())
    assert value(m, "pbx_agent_admissions_total") == 3.0
    assert value(m, "pbx_agent_refusals_total", reason="capacity") == 1.0
    assert value(m, "pbx_agent_refusals_total", reason="shed:gpu-hot") == 1.0
    assert value(m, "pbx_agent_calls_total", outcome="completed") == 1.0
    assert value(m, "pbx_agent_calls_total", outcome="refused") == 2.0
    # response latency by path (a turn with no response_ms is not observed)
    assert value(m, "pbx_agent_response_latency_seconds_count", path="faq") == 1.0
    assert value(m, "pbx_agent_response_latency_seconds_sum", path="faq") == pytest.approx(0.7)
    assert value(m, "pbx_agent_response_latency_seconds_bucket", path="faq", le="0.5") == 0.0
    assert value(m, "pbx_agent_response_latency_seconds_bucket", path="faq", le="0.75") == 1.0
    assert value(m, "pbx_agent_response_latency_seconds_bucket", path="llm", le="1.0") == 0.0
    assert value(m, "pbx_agent_response_latency_seconds_bucket", path="llm", le="1.2") == 1.0
    assert value(m, "pbx_agent_response_latency_seconds_count", path="goodbye") is None
    # stage timings
    assert value(m, "pbx_agent_stage_latency_seconds_count", stage="stt") == 2.0
    assert value(m, "pbx_agent_stage_latency_seconds_sum", stage="stt") == pytest.approx(0.45)
    assert value(m, "pbx_agent_stage_latency_seconds_count", stage="llm_first_token") == 1.0
    assert value(m, "pbx_agent_stage_latency_seconds_sum",
                 stage="llm_first_token") == pytest.approx(0.4)
    assert value(m, "pbx_agent_stage_latency_seconds_count", stage="tts_first_audio") == 2.0
    # integrations are counted live by observe_integration, never from the final record
    assert "pbx_agent_integration_calls_total" not in exported_names(m)
    assert "pbx_agent_integration_timeouts_total" not in exported_names(m)
    # flow runs
    assert value(m, "pbx_agent_flow_runs_total", flow="booking", outcome="completed") == 1.0
    assert value(m, "pbx_agent_flow_runs_total", flow="booking", outcome="fallback") == 1.0
    assert value(m, "pbx_agent_flow_runs_total", flow="routing", outcome="escalated") == 1.0
    assert value(m, "pbx_agent_flow_runs_total", flow="routing", outcome="failed") == 0.0
    assert value(m, "pbx_agent_satisfaction_total", rating="4") == 1.0
    m.observe_llm_wait(0.3)
    m.observe_llm_wait(0.02)
    assert value(m, "pbx_agent_llm_queue_wait_seconds_count") == 2.0
    assert value(m, "pbx_agent_llm_queue_wait_seconds_sum") == pytest.approx(0.32)
    assert value(m, "pbx_agent_llm_queue_wait_seconds_bucket", le="0.05") == 1.0


def test_integrations_are_counted_once_live_and_not_again_at_call_end() -> None:
    m = AgentMetrics("asterisk")
    rec = a_call()
    rec.integrations.append(IntegrationCall("crm", ok=False, latency_ms=0.0,
                                            error="breaker-open", attempts=0, breaker="open"))
    observe_all(m, rec.integrations)  # live, as each call finishes
    m.call_ended(rec)  # the same calls are in the record: not counted again
    m.call_ended(rec)
    assert value(m, "pbx_agent_integration_calls_total", integration="crm", result="ok") == 1.0
    assert value(m, "pbx_agent_integration_calls_total", integration="crm",
                 result="timeout") == 1.0
    assert value(m, "pbx_agent_integration_calls_total", integration="crm",
                 result="breaker-open") == 1.0
    assert value(m, "pbx_agent_integration_calls_total", integration="crm", result="error") == 0.0
    assert value(m, "pbx_agent_integration_calls_total", integration="calendar",
                 result="error") == 1.0
    assert value(m, "pbx_agent_integration_timeouts_total", integration="crm") == 1.0
    assert value(m, "pbx_agent_integration_timeouts_total", integration="calendar") == 0.0
    calls = sum(v for _, v in samples_of(m)["pbx_agent_integration_calls_total"])
    assert calls == len(rec.integrations) == 4
    # latency of the calls sent: the breaker's refusal is left out
    assert value(m, "pbx_agent_integration_latency_seconds_count", integration="crm") == 2.0
    assert value(m, "pbx_agent_integration_latency_seconds_sum",
                 integration="crm") == pytest.approx(3.08)
    assert value(m, "pbx_agent_integration_latency_seconds_bucket", integration="crm",
                 le="0.1") == 1.0
    assert value(m, "pbx_agent_integration_latency_seconds_bucket", integration="crm",
                 le="3.0") == 2.0
    assert value(m, "pbx_agent_integration_latency_seconds_count",
                 integration="calendar") == 1.0


def test_integration_result_label() -> None:
    assert integration_result(True, False, "") == "ok"
    assert integration_result(False, True, "timeout") == "timeout"
    assert integration_result(False, False, "breaker-open") == "breaker-open"
    assert integration_result(False, False, "http-503") == "error"
    assert integration_result(False, False, "") == "error"
    assert set(INTEGRATION_RESULTS) == {"ok", "error", "timeout", "breaker-open"}


def test_a_new_integration_exports_all_its_series_at_zero() -> None:
    m = AgentMetrics("asterisk")
    m.set_breaker("calendar", "closed")  # what the client does when it is built
    for result in INTEGRATION_RESULTS:
        assert value(m, "pbx_agent_integration_calls_total", integration="calendar",
                     result=result) == 0.0
    assert value(m, "pbx_agent_integration_timeouts_total", integration="calendar") == 0.0
    assert value(m, "pbx_agent_integration_latency_seconds_count", integration="calendar") == 0.0
    assert value(m, "pbx_agent_integration_breaker_state", integration="calendar") == 0.0
    for state in BREAKER_STATES:
        assert value(m, "pbx_agent_integration_breaker_transitions_total",
                     integration="calendar", to=state) == 0.0


def test_breaker_state_gauge_and_transitions() -> None:
    m = AgentMetrics("asterisk")

    def state() -> float | None:
        return value(m, "pbx_agent_integration_breaker_state", integration="crm")

    def moves(to: str) -> float | None:
        return value(m, "pbx_agent_integration_breaker_transitions_total", integration="crm",
                     to=to)

    m.set_breaker("crm", "closed")
    assert (state(), moves("closed")) == (0.0, 0.0)  # a breaker starts closed: no transition
    m.set_breaker("crm", "open")
    assert (state(), moves("open")) == (2.0, 1.0)
    m.set_breaker("crm", "open")  # the same state again is no transition
    assert moves("open") == 1.0
    m.set_breaker("crm", "half-open")
    assert (state(), moves("half-open")) == (1.0, 1.0)
    m.set_breaker("crm", "open")
    m.set_breaker("crm", "half-open")
    m.set_breaker("crm", "closed")
    assert state() == 0.0
    assert (moves("closed"), moves("half-open"), moves("open")) == (1.0, 2.0, 2.0)
    # another integration's first state is a transition from closed unless it is closed
    m.set_breaker("calendar", "open")
    assert value(m, "pbx_agent_integration_breaker_transitions_total", integration="calendar",
                 to="open") == 1.0


def test_breaker_on_change_hook_feeds_the_gauge() -> None:
    from agent.integrations.breaker import BreakerPolicy, CircuitBreaker

    m = AgentMetrics("asterisk")
    now = [0.0]
    breaker = CircuitBreaker("crm", BreakerPolicy(failures=2, cooldown_s=10.0),
                             clock=lambda: now[0],
                             on_change=lambda name, old, new: m.set_breaker(name, new))
    m.set_breaker("crm", breaker.state)
    for _ in range(2):
        assert breaker.allow()
        breaker.record(False)
    assert value(m, "pbx_agent_integration_breaker_state", integration="crm") == 2.0
    now[0] += 10.0
    assert breaker.allow()  # half-open: a trial call goes out
    assert value(m, "pbx_agent_integration_breaker_state", integration="crm") == 1.0
    breaker.record(True)
    assert value(m, "pbx_agent_integration_breaker_state", integration="crm") == 0.0
    assert [value(m, "pbx_agent_integration_breaker_transitions_total", integration="crm",
                  to=s) for s in BREAKER_STATES] == [1.0, 1.0, 1.0]


def test_an_unknown_breaker_state_is_logged_and_ignored(
        caplog: pytest.LogCaptureFixture) -> None:
    m = AgentMetrics("asterisk")
    m.set_breaker("crm", "open")
    with caplog.at_level(logging.WARNING, logger="agent.kpi.metrics"):
        m.set_breaker("crm", "ajar")
    assert "ajar" in caplog.text and "crm" in caplog.text
    assert value(m, "pbx_agent_integration_breaker_state", integration="crm") == 2.0
    assert value(m, "pbx_agent_integration_breaker_transitions_total", integration="crm",
                 to="ajar") is None


def test_flow_runs_by_flow_and_outcome(caplog: pytest.LogCaptureFixture) -> None:
    m = AgentMetrics("asterisk")
    m.declare_flows(["after-hours"])
    for outcome in FLOW_OUTCOMES:
        assert value(m, "pbx_agent_flow_runs_total", flow="after-hours", outcome=outcome) == 0.0
    rec = CallRecord("c", "asterisk", flows=[FlowRun("booking", o) for o in FLOW_OUTCOMES])
    rec.flows.append(FlowRun("booking", "completed"))
    rec.flows.append(FlowRun("booking", "exploded"))
    with caplog.at_level(logging.WARNING, logger="agent.kpi.metrics"):
        m.call_ended(rec)
    assert "exploded" in caplog.text and "booking" in caplog.text
    assert value(m, "pbx_agent_flow_runs_total", flow="booking", outcome="completed") == 2.0
    for outcome in FLOW_OUTCOMES[1:]:
        assert value(m, "pbx_agent_flow_runs_total", flow="booking", outcome=outcome) == 1.0
    assert value(m, "pbx_agent_flow_runs_total", flow="booking", outcome="exploded") is None
    refused = CallRecord("r", "asterisk", outcome="refused")
    m.call_ended(refused)  # no flows: nothing more
    assert sum(v for _, v in samples_of(m)["pbx_agent_flow_runs_total"]) == 6.0


def test_sidework_stats_are_read_at_scrape_time() -> None:
    m = AgentMetrics("asterisk")
    assert "pbx_agent_sidework_depth" not in exported_names(m)  # nothing attached
    stats = QueueStats()
    reads = []

    def read() -> QueueStats:
        reads.append(1)
        return stats

    m.attach_sidework(read)
    assert reads == []  # nothing is read until a scrape
    assert value(m, "pbx_agent_sidework_depth") == 3.0
    for result in SIDEWORK_RESULTS:
        assert value(m, "pbx_agent_sidework_jobs_total", result=result) == getattr(stats, result)
    stats.depth, stats.delivered, stats.lost = 0, 44, 1
    assert value(m, "pbx_agent_sidework_depth") == 0.0
    assert value(m, "pbx_agent_sidework_jobs_total", result="delivered") == 44.0
    assert value(m, "pbx_agent_sidework_jobs_total", result="lost") == 1.0
    assert set(SIDEWORK_RESULTS) == {"dropped", "lost", "delivered", "failed", "restored"}


def test_sidework_stats_as_a_mapping_and_a_broken_one(caplog: pytest.LogCaptureFixture) -> None:
    m = AgentMetrics("asterisk")
    m.admitted()
    m.attach_sidework(lambda: {"depth": 7, "dropped": 0, "lost": 0, "delivered": 1,
                               "failed": 0, "restored": 0})
    assert value(m, "pbx_agent_sidework_depth") == 7.0
    m.attach_sidework(lambda: object())  # replaces the first; has none of the attributes
    with caplog.at_level(logging.WARNING, logger="agent.kpi.metrics"):
        names = exported_names(m)
    assert "sidework" in caplog.text
    assert "pbx_agent_sidework_depth" not in names
    assert "pbx_agent_sidework_jobs_total" not in names
    assert "pbx_agent_admissions_total" in names


def test_calls_total_counts_every_offered_call_once() -> None:
    m = AgentMetrics("asterisk")
    # the runtime counts a refusal, then hands the refused record to call_ended as well
    m.refused("draining")
    m.call_ended(CallRecord("r", "asterisk", outcome="refused", reason="draining"))
    for outcome in ("completed", "transferred", "abandoned", "dropped"):
        m.admitted()
        m.call_ended(a_call(outcome, satisfaction=None))
    calls = sum(v for _, v in samples_of(m)["pbx_agent_calls_total"])
    offered = value(m, "pbx_agent_admissions_total") or 0.0
    offered += sum(v for _, v in samples_of(m)["pbx_agent_refusals_total"])
    assert calls == offered == 5.0
    assert value(m, "pbx_agent_calls_total", outcome="refused") == 1.0
    assert sum(v for _, v in samples_of(m)["pbx_agent_satisfaction_total"]) == 0.0


def test_an_unknown_outcome_or_rating_is_not_counted(caplog: pytest.LogCaptureFixture) -> None:
    m = AgentMetrics("asterisk")
    with caplog.at_level(logging.WARNING, logger="agent.kpi.metrics"):
        m.call_ended(CallRecord("x", "asterisk", outcome="exploded", satisfaction=9))
    assert sum(v for _, v in samples_of(m)["pbx_agent_calls_total"]) == 0.0
    assert value(m, "pbx_agent_calls_total", outcome="exploded") is None
    assert value(m, "pbx_agent_satisfaction_total", rating="9") is None
    assert "exploded" in caplog.text


def test_live_values_from_callbacks() -> None:
    m = AgentMetrics("asterisk")
    live = Live()
    live.bind(m)
    assert value(m, "pbx_agent_active_calls") == 2.0
    assert value(m, "pbx_agent_starting_calls") == 0.0
    for term, limit in live.terms.items():
        assert value(m, "pbx_agent_capacity_calls", term=term) == limit
    assert value(m, "pbx_agent_queue_depth", engine="llm") == 1.0
    assert value(m, "pbx_agent_response_latency_p95_seconds") == 0.84
    assert value(m, "pbx_agent_engine_cpu_seconds_total", stage="llm") == 210.0
    assert value(m, "pbx_agent_records_written_total") == 33.0
    assert value(m, "pbx_agent_records_dropped_total") == 0.0
    live.active, live.records = 3, (40, 2)
    assert value(m, "pbx_agent_active_calls") == 3.0
    assert value(m, "pbx_agent_records_dropped_total") == 2.0


def test_a_term_with_no_limit_and_a_missing_p95_are_not_exported() -> None:
    m = AgentMetrics("asterisk")
    live = Live()
    live.bind(m)
    live.terms["pbx"] = None
    live.p95 = None
    assert value(m, "pbx_agent_capacity_calls", term="pbx") is None
    assert value(m, "pbx_agent_capacity_calls", term="effective") == 4.0
    assert "pbx_agent_response_latency_p95_seconds" not in exported_names(m)


def test_shed_state_flips_with_the_level() -> None:
    m = AgentMetrics("asterisk")
    live = Live()
    live.bind(m)
    for index, level in enumerate(SHED_LEVELS):
        live.level = level
        assert value(m, "pbx_agent_shed_level") == float(index)
        states = {labels["level"]: v for labels, v in samples_of(m)["pbx_agent_shed_state"]}
        assert states == {name: float(name == level) for name in SHED_LEVELS}


def test_bind_keeps_what_an_argument_leaves_out() -> None:
    m = AgentMetrics("asterisk")
    m.bind(active=lambda: 1)
    m.bind(starting=lambda: 2)
    assert value(m, "pbx_agent_active_calls") == 1.0
    assert value(m, "pbx_agent_starting_calls") == 2.0


def test_a_raising_callback_is_logged_rate_limited_and_skipped(
        caplog: pytest.LogCaptureFixture) -> None:
    now = [1000.0]
    m = AgentMetrics("asterisk", clock=lambda: now[0])
    Live().bind(m)

    def broken() -> dict[str, int]:
        raise RuntimeError("queue gone")

    m.bind(queue_depths=broken, shed_level=lambda: "panic")
    m.admitted()
    with caplog.at_level(logging.WARNING, logger="agent.kpi.metrics"):
        for _ in range(3):
            names = exported_names(m)
        assert caplog.text.count("queue_depths") == 1
        now[0] += 61.0
        m.render()
    assert caplog.text.count("queue_depths") == 2
    assert "shed_level" in caplog.text and "panic" in caplog.text
    assert "pbx_agent_queue_depth" not in names
    assert "pbx_agent_shed_level" not in names and "pbx_agent_shed_state" not in names
    assert "pbx_agent_active_calls" in names and "pbx_agent_admissions_total" in names


def test_two_instances_do_not_collide() -> None:
    a, b = AgentMetrics("asterisk", "1"), AgentMetrics("freeswitch", "2")
    a.bind(active=lambda: 5)
    b.bind(active=lambda: 7)
    a.admitted()
    a.refused("capacity")
    assert value(a, "pbx_agent_admissions_total") == 1.0
    assert value(b, "pbx_agent_admissions_total") == 0.0
    assert value(b, "pbx_agent_refusals_total", reason="capacity") is None
    assert value(a, "pbx_agent_active_calls") == 5.0
    assert value(b, "pbx_agent_active_calls") == 7.0
    assert value(b, "pbx_agent_info", pbx="freeswitch", version="2") == 1.0


def test_events_from_many_threads_are_all_counted() -> None:
    m = AgentMetrics("asterisk")
    Live().bind(m)

    def work() -> None:
        for _ in range(200):
            m.admitted()
            m.call_ended(a_call(satisfaction=None))
            m.observe_llm_wait(0.1)
            m.observe_integration("crm", True, 50.0)

    threads = [threading.Thread(target=work) for _ in range(8)]
    scraper = threading.Thread(target=lambda: [m.render() for _ in range(20)])
    for t in [*threads, scraper]:
        t.start()
    for t in [*threads, scraper]:
        t.join()
    assert value(m, "pbx_agent_admissions_total") == 1600.0
    assert value(m, "pbx_agent_calls_total", outcome="completed") == 1600.0
    assert value(m, "pbx_agent_response_latency_seconds_count", path="faq") == 1600.0
    assert value(m, "pbx_agent_llm_queue_wait_seconds_count") == 1600.0
    assert value(m, "pbx_agent_integration_calls_total", integration="crm", result="ok") == 1600.0
    assert value(m, "pbx_agent_integration_latency_seconds_count", integration="crm") == 1600.0
    assert value(m, "pbx_agent_flow_runs_total", flow="booking", outcome="completed") == 1600.0


def test_metrics_is_a_leaf() -> None:
    tree = ast.parse((ROOT / "agent" / "kpi" / "metrics.py").read_text(encoding="utf-8"))
    mods = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    mods |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    agent = {m for m in mods if m.startswith("agent")}
    assert agent == {"agent.kpi.model"}
    assert not {m for m in mods if m.split(".")[0] in {"asyncio", "gevent"}}


# -- the endpoint and the status read back from it ------------------------------------------

def test_server_on_port_0_serves_metrics_and_status_reads_them() -> None:
    m = AgentMetrics("asterisk", "0.1.0")
    live = Live()
    live.terms["engine"] = None
    live.bind(m)
    for _ in range(35):
        m.admitted()
    m.refused("capacity")
    m.refused("capacity")
    m.refused("draining")
    for _ in range(30):
        m.call_ended(a_call("completed", satisfaction=None))
    m.call_ended(a_call("transferred", satisfaction=5))
    m.call_ended(a_call("transferred", satisfaction=3))
    port = m.start_server("127.0.0.1", 0)
    try:
        assert port > 0 and m.port == port
        url = f"http://127.0.0.1:{port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"].startswith("text/plain")
            body = resp.read().decode()
        assert "pbx_agent_admissions_total 35.0" in body
        samples = fetch_metrics(url)
        assert fetch_metrics(f"127.0.0.1:{port}").keys() == samples.keys()
    finally:
        m.stop_server()
    assert m.port is None
    m.stop_server()  # idempotent

    snap = snapshot_from_metrics(samples)
    assert snap == StatusSnapshot(
        pbx="asterisk", version="0.1.0", active=2, starting=0,
        capacity={"effective": 4.0, "pbx": 120.0, "config": 4.0}, shed_level="normal",
        admissions=35, refusals={"capacity": 2, "draining": 1},
        calls={"completed": 30, "transferred": 2, "refused": 3, "abandoned": 0, "dropped": 0},
        latency_p95_s=0.84, latency_mean_s=pytest.approx((0.7 + 1.1) / 2), responses=64,
        queues={"llm": 1, "stt": 0, "tts": 0},
        cpu_seconds={"stt": 12.5, "llm": 210.0, "tts": 8.25, "other": 3.0},
        satisfaction={"1": 0, "2": 0, "3": 1, "4": 0, "5": 1},
        records_written=33, records_dropped=0)
    text = format_status(snap)
    lines = text.splitlines()
    assert lines[0] == "pbx-agent asterisk 0.1.0"
    assert "calls: 2 active + 0 starting of 4 (effective; pbx 120, config 4)" in lines
    assert "shedding: normal" in lines
    assert "latency p95 (recent): 0.84 s; mean since start 0.90 s over 64 replies" in lines
    assert ("since start: 35 admitted, 3 refused (capacity 2, draining 1); "
            "30 completed, 2 transferred, 3 refused") in lines
    assert "queues: llm 1, stt 0, tts 0" in lines
    assert "cpu: stt 12.5 s, llm 210.0 s, tts 8.2 s, other 3.0 s" in lines
    assert "satisfaction: 4.0 average of 2 ratings" in lines
    assert "records: 33 written, 0 dropped" in lines


def test_status_of_a_fresh_agent_with_nothing_bound() -> None:
    m = AgentMetrics("freeswitch")
    snap = snapshot_from_metrics(samples_of(m))
    assert snap.active is None and snap.shed_level is None and snap.latency_mean_s is None
    text = format_status(snap)
    assert "calls: ? active + ? starting of no limit" in text
    assert "latency p95 (recent): no data" in text
    assert "since start: 0 admitted, 0 refused; no calls ended" in text
    json.dumps(snap.__dict__, sort_keys=True)  # `pbx-agent status --json` can dump it


def test_status_shows_breakers_and_side_work() -> None:
    from agent.integrations.sidework import SideWorkStats

    m = AgentMetrics("asterisk")
    m.set_breaker("calendar", "open")
    m.set_breaker("crm", "closed")
    m.attach_sidework(lambda: SideWorkStats(depth=3, dropped=2, lost=0, delivered=7, failed=1,
                                            restored=0))
    snap = snapshot_from_metrics(samples_of(m))
    assert snap.breakers == {"calendar": "open", "crm": "closed"}
    lines = format_status(snap).splitlines()
    assert "integrations: calendar open, crm closed" in lines
    assert "side work: 3 pending; 7 delivered, 2 dropped, 1 failed" in lines


def test_fetch_metrics_on_a_closed_port_names_the_url() -> None:
    url = f"http://127.0.0.1:{closed_port()}/metrics"
    with pytest.raises(ConnectionError) as err:
        fetch_metrics(url, timeout_s=2.0)
    assert url in str(err.value)
    assert "not running" in str(err.value) and "kpi.metrics" in str(err.value)


def test_a_taken_port_raises_oserror_naming_host_port() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = int(taken.getsockname()[1])
        m = AgentMetrics("asterisk")
        with pytest.raises(OSError) as err:
            m.start_server("127.0.0.1", port)
    assert f"127.0.0.1:{port}" in str(err.value) and "kpi.metrics" in str(err.value)
    assert m.port is None


# -- the Grafana dashboard ----------------------------------------------------------------------

def _exprs(node: object) -> list[str]:
    if isinstance(node, dict):
        out = [v for k, v in node.items() if k in ("expr", "definition") and isinstance(v, str)]
        for v in node.values():
            out += _exprs(v)
        return out
    if isinstance(node, list):
        return [e for v in node for e in _exprs(v)]
    return []


def test_grafana_dashboard_uses_only_exported_metric_names() -> None:
    dash = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    assert dash["__inputs"][0]["name"] == "DS_PROMETHEUS"
    assert dash["__inputs"][0]["pluginId"] == "prometheus"
    assert 36 <= dash["schemaVersion"] <= 41
    panels = [p for p in dash["panels"] if p["type"] != "row"]
    assert len(panels) >= 11
    for p in panels:
        assert p["datasource"]["uid"] == "${DS_PROMETHEUS}", p["title"]
        assert p["targets"] and all(t["expr"] for t in p["targets"]), p["title"]
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))

    m = AgentMetrics("asterisk")
    use_everything(m)
    exported = exported_names(m)
    referenced = {name for e in _exprs(dash) for name in re.findall(r"pbx_agent_[a-z0-9_]+", e)}
    assert len(referenced) >= 15
    for name in referenced:
        base = re.sub(r"_(bucket|sum|count)$", "", name)
        assert name in exported or f"{base}_count" in exported, name
    for name in NAMES:  # every metric is on the dashboard somewhere (records included)
        if name not in ("pbx_agent_shed_state",):
            assert any(r == name or r.startswith(name + "_") for r in referenced), name
