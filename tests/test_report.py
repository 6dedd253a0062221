"""The KPI report: every KPI of a hand-built set of calls, the table, JSON and HTML."""

from __future__ import annotations

import json
import logging
import random
import subprocess
import sys
from datetime import UTC, datetime

import numpy as np
import pytest

from agent.kpi.model import FLOW_OUTCOMES, CallRecord, FlowRun, IntegrationCall, TurnKpi
from agent.kpi.report import (
    FlowCounts,
    Kpis,
    Latency,
    bucket_seconds,
    compute_kpis,
    format_table,
    parse_since,
    percentile,
    render_html,
    to_json,
)

T0 = 1_800_000_000.0  # 2027-01-15 08:00:00 UTC
SINCE, UNTIL = T0, T0 + 3600.0


def turn(i: int, path: str, resp: float, stt: float, llm: float | None, tts: float) -> TurnKpi:
    return TurnKpi(index=i, path=path, response_ms=resp, stt_ms=stt, llm_first_token_ms=llm,
                   tts_first_audio_ms=tts)


def call(call_id: str, start: float, answer: float | None, end: float, outcome: str,
         **kw: object) -> CallRecord:
    return CallRecord(call_id=call_id, pbx="asterisk", started_at=T0 + start,
                      answered_at=None if answer is None else T0 + answer, ended_at=T0 + end,
                      outcome=outcome, **kw)  # type: ignore[arg-type]


def records() -> list[CallRecord]:
    """Ten calls in one hour; times in seconds after T0.

    Answered intervals clipped to the window: c1 1..301, c2 101..401, c3 200..500,
    c4 1000..1060, c5 1030..1090, c8 0..50 (began before the window), c9 3500..3600 (runs past
    it), c10 2001..2121 -> peak 3 (c1+c2+c3 at 200..301), 1290 call-seconds.

    Flow runs: booking 4 (completed, fallback, abandoned, failed), routing 2 (completed,
    escalated), after-hours 1 (completed) -> 3 of 7 completed.
    """
    return [
        call("c1", 0, 1, 301, "completed", reason="goodbye", satisfaction=5,
             turns=[turn(0, "faq", 800, 200, None, 0), turn(1, "llm", 1200, 250, 400, 150)],
             integrations=[IntegrationCall("crm", ok=True, latency_ms=120)],
             flows=[FlowRun("booking", "completed", steps=4)]),
        call("c2", 100, 101, 401, "completed", satisfaction=4, barge_ins=1,
             turns=[turn(0, "llm", 1000, 300, 500, 100)],
             integrations=[IntegrationCall("calendar", ok=True, latency_ms=200)],
             flows=[FlowRun("booking", "fallback", steps=3)]),
        call("c3", 200, 200, 500, "transferred", reason="intent:human", barge_ins=2,
             turns=[turn(0, "llm", 900, 220, 450, 120), turn(1, "transfer", 600, 180, None, 0)],
             integrations=[IntegrationCall("crm", ok=False, latency_ms=2000, timed_out=True,
                                           attempts=2)],
             flows=[FlowRun("routing", "completed", steps=2)]),
        call("c4", 1000, 1000, 1060, "abandoned", reason="caller-hangup",
             turns=[turn(0, "llm", 2000, 410, 900, 200)],
             flows=[FlowRun("booking", "abandoned", steps=1)]),
        call("c5", 1030, 1030, 1090, "dropped", reason="engine-error",
             turns=[turn(0, "llm", 1500, 350, 700, 180)],
             integrations=[IntegrationCall("crm", ok=False, latency_ms=30, error="HTTP 500")],
             flows=[FlowRun("booking", "failed", steps=2)]),
        call("c6", 1040, None, 1040, "refused", result="BUSY", reason="capacity"),
        call("c7", 1050, None, 1050, "refused", result="BUSY", reason="shed:gpu",
             shed_level="reject-new"),
        call("c8", -100, -100, 50, "completed", shed_level="brief",
             turns=[turn(0, "faq", 700, 150, None, 0)]),
        call("c9", 3500, 3500, 3700, "completed", shed_level="canned", satisfaction=2,
             turns=[turn(0, "canned", 500, 200, None, 0), turn(1, "goodbye", 1100, 260, None, 0)],
             flows=[FlowRun("after-hours", "completed", steps=2)]),
        call("c10", 2000, 2001, 2121, "transferred", reason="dtmf-0", satisfaction=3,
             barge_ins=1, flows=[FlowRun("routing", "escalated", steps=1)]),
    ]


@pytest.fixture(scope="module")
def kpis() -> Kpis:
    return compute_kpis(records(), SINCE, UNTIL)


# -- percentile --------------------------------------------------------------------------------


def test_percentile_linear_interpolation() -> None:
    assert percentile([1, 2, 3, 4], 50) == 2.5
    assert percentile([4, 1, 3, 2], 0) == 1
    assert percentile([4, 1, 3, 2], 100) == 4
    assert percentile([7.0], 95) == 7.0
    assert percentile(range(11), 95) == pytest.approx(9.5)


def test_percentile_matches_numpy() -> None:
    rng = random.Random(7)
    values = [rng.uniform(0, 5000) for _ in range(101)]
    for q in (0, 1, 50, 90, 95, 99, 100):
        assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)))


def test_percentile_errors() -> None:
    with pytest.raises(ValueError, match="no values"):
        percentile([], 50)
    with pytest.raises(ValueError, match="0..100"):
        percentile([1.0], 101)


# -- parse_since -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "ago_s"),
    [("30m", 1800), ("24h", 86400), ("7d", 604800), ("90s", 90), ("1.5h", 5400), (" 2d ", 172800)],
)
def test_parse_since_relative(text: str, ago_s: float) -> None:
    assert parse_since(text, now=T0) == T0 - ago_s


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2026-11-26", datetime(2026, 11, 26, tzinfo=UTC)),
        ("2026-11-26T10:00", datetime(2026, 11, 26, 10, 0, tzinfo=UTC)),
        ("2026-11-26T10:00Z", datetime(2026, 11, 26, 10, 0, tzinfo=UTC)),
        ("2026-11-26T10:00:30", datetime(2026, 11, 26, 10, 0, 30, tzinfo=UTC)),
        ("2026-11-26T12:00+02:00", datetime(2026, 11, 26, 10, 0, tzinfo=UTC)),
    ],
)
def test_parse_since_iso(text: str, expected: datetime) -> None:
    assert parse_since(text, now=T0) == expected.timestamp()


@pytest.mark.parametrize("text", ["yesterday", "", "-5m", "5w", "30 minutes", "2026-13-01"])
def test_parse_since_errors(text: str) -> None:
    with pytest.raises(ValueError) as err:
        parse_since(text, now=T0)
    assert repr(text) in str(err.value)
    assert "30m, 24h, 7d, 90s" in str(err.value)
    assert "ISO date" in str(err.value)


# -- compute_kpis ------------------------------------------------------------------------------


def test_counts_and_outcomes(kpis: Kpis) -> None:
    assert (kpis.since, kpis.until, kpis.window_s) == (SINCE, UNTIL, 3600.0)
    assert kpis.offered == 10
    assert kpis.answered == 8
    assert kpis.refused == 2
    assert kpis.refused_by_reason == {"capacity": 1, "shed:gpu": 1}
    assert kpis.outcomes == {
        "completed": 4, "transferred": 2, "refused": 2, "abandoned": 1, "dropped": 1,
    }


def test_concurrency(kpis: Kpis) -> None:
    assert kpis.concurrent_peak == 3
    assert kpis.concurrent_mean == pytest.approx(1290 / 3600)


def test_response_latency(kpis: Kpis) -> None:
    # 500 600 700 800 900 1000 1100 1200 1500 2000
    assert kpis.turns == 10
    assert kpis.response == Latency(n=10, p50_ms=950, p95_ms=pytest.approx(1775),
                                    p99_ms=pytest.approx(1955))
    by_path = kpis.response_by_path
    assert list(by_path) == ["canned", "faq", "goodbye", "llm", "transfer"]
    assert by_path["faq"].n == 2
    assert by_path["faq"].p50_ms == 750
    assert by_path["faq"].p95_ms == pytest.approx(795)
    # llm: 900 1000 1200 1500 2000
    assert (by_path["llm"].n, by_path["llm"].p50_ms) == (5, 1200)
    assert by_path["llm"].p95_ms == pytest.approx(1900)
    assert (by_path["transfer"].n, by_path["transfer"].p50_ms, by_path["transfer"].p95_ms) == (
        1, 600, 600)


def test_stage_latency(kpis: Kpis) -> None:
    stt, llm, tts = (kpis.stages[s] for s in ("stt", "llm_first_token", "tts_first_audio"))
    # stt: 150 180 200 200 220 250 260 300 350 410
    assert (stt.n, stt.p50_ms) == (10, 235)
    assert stt.p95_ms == pytest.approx(383)
    # llm first token: 400 450 500 700 900 (the faq/canned/transfer turns have none)
    assert (llm.n, llm.p50_ms) == (5, 500)
    assert llm.p95_ms == pytest.approx(860)
    # tts first audio: 0 x5, 100 120 150 180 200
    assert (tts.n, tts.p50_ms) == (10, 50)
    assert tts.p95_ms == pytest.approx(191)


def test_rates(kpis: Kpis) -> None:
    assert kpis.completion_rate == 4 / 8
    assert kpis.escalation_rate == 2 / 8
    assert kpis.abandoned_rate == 1 / 8
    assert kpis.dropped_rate == 1 / 8
    assert kpis.refusal_rate == 2 / 10


def test_integrations(kpis: Kpis) -> None:
    assert kpis.integration_calls == 4
    assert kpis.integration_timeouts == 1
    assert kpis.integration_timeout_rate == 0.25
    assert list(kpis.integrations) == ["calendar", "crm"]
    crm, cal = kpis.integrations["crm"], kpis.integrations["calendar"]
    assert (crm.calls, crm.ok, crm.timed_out, crm.breaker_open) == (3, 1, 1, 0)
    assert (cal.calls, cal.ok, cal.timed_out, cal.breaker_open) == (1, 1, 0, 0)
    # crm latencies 30 120 2000 (the timeout and the error included)
    assert (crm.latency.n, crm.latency.p50_ms) == (3, 120)
    assert crm.latency.p95_ms == pytest.approx(1812)
    assert (cal.latency.n, cal.latency.p50_ms, cal.latency.p95_ms) == (1, 200, 200)
    assert kpis.integration_breaker_open == 0


def breaker_records() -> list[CallRecord]:
    """crm: one ok, two refused by the open breaker, one timeout; billing: only refusals."""
    refused = {"ok": False, "latency_ms": 0.0, "error": "breaker-open", "attempts": 0,
               "breaker": "open"}
    return [
        call("b1", 0, 0, 60, "completed", integrations=[
            IntegrationCall("crm", ok=True, latency_ms=100),
            IntegrationCall("crm", ok=False, latency_ms=2000, timed_out=True, error="timeout",
                            attempts=2, breaker="open"),
        ]),
        call("b2", 100, 100, 160, "completed", integrations=[
            IntegrationCall("crm", **refused),  # type: ignore[arg-type]
            IntegrationCall("crm", **refused),  # type: ignore[arg-type]
            IntegrationCall("billing", **refused),  # type: ignore[arg-type]
        ]),
    ]


def test_breaker_open_refusals_and_latency_of_calls_sent() -> None:
    k = compute_kpis(breaker_records(), SINCE, UNTIL)
    crm, billing = k.integrations["crm"], k.integrations["billing"]
    assert (crm.calls, crm.ok, crm.timed_out, crm.breaker_open) == (4, 1, 1, 2)
    assert (crm.latency.n, crm.latency.p50_ms) == (2, 1050)  # the refusals have no latency
    assert crm.latency.p95_ms == pytest.approx(1905)
    assert (billing.calls, billing.breaker_open, billing.latency) == (1, 1, Latency())
    assert (k.integration_calls, k.integration_timeouts, k.integration_breaker_open) == (5, 1, 3)
    assert k.integration_timeout_rate == 1 / 5

    rows = table_rows(format_table(k))
    assert rows["  integration crm"].startswith(
        "4 calls, 1 ok, 1 timed out, 2 breaker-open, p50 / p95 1050 / 1905 ms  ")
    assert rows["  integration billing"].startswith(
        "1 call, 0 ok, 0 timed out, 1 breaker-open, p50 / p95 -  ")

    data = to_json(k)
    assert data["integrations"]["breaker_open"] == 3
    assert data["integrations"]["by_name"]["crm"] == {
        "calls": 4, "ok": 1, "timed_out": 1, "breaker_open": 2, "p50_ms": 1050,
        "p95_ms": pytest.approx(1905)}
    assert data["integrations"]["by_name"]["billing"] == {
        "calls": 1, "ok": 0, "timed_out": 0, "breaker_open": 1, "p50_ms": None, "p95_ms": None}
    assert json.loads(json.dumps(data)) == data


def test_flows(kpis: Kpis) -> None:
    assert list(kpis.flows) == ["after-hours", "booking", "routing"]
    assert kpis.flows["booking"] == FlowCounts(runs=4, completed=1, fallback=1, abandoned=1,
                                               failed=1)
    assert kpis.flows["routing"] == FlowCounts(runs=2, completed=1, escalated=1)
    assert kpis.flows["after-hours"] == FlowCounts(runs=1, completed=1)
    assert kpis.flows["booking"].completion_rate == 0.25
    assert kpis.flows["routing"].completion_rate == 0.5
    assert kpis.flows["after-hours"].completion_rate == 1.0
    assert (kpis.flow_runs, kpis.flow_completed) == (7, 3)
    assert kpis.flow_completion_rate == 3 / 7


def test_flow_counts_with_no_run() -> None:
    assert FlowCounts().completion_rate is None
    k = compute_kpis([call("a", 0, 0, 60, "completed")], SINCE, UNTIL)
    assert (k.flow_runs, k.flow_completed, k.flow_completion_rate, k.flows) == (0, 0, None, {})


def test_every_flow_outcome_is_counted_and_an_unknown_one_only_as_a_run(
        caplog: pytest.LogCaptureFixture) -> None:
    runs = [FlowRun("f", o) for o in FLOW_OUTCOMES] + [FlowRun("f", "exploded")]
    with caplog.at_level(logging.WARNING, logger="agent.kpi.report"):
        k = compute_kpis([call("a", 0, 0, 60, "completed", flows=runs)], SINCE, UNTIL)
    assert "1 flow runs with an unknown outcome" in caplog.text
    assert k.flows["f"] == FlowCounts(runs=6, completed=1, fallback=1, escalated=1,
                                      abandoned=1, failed=1)
    assert k.flow_completion_rate == 1 / 6


def test_a_flow_reply_path_gets_its_own_latency() -> None:
    recs = [call("a", 0, 0, 60, "completed",
                 turns=[turn(0, "flow", 400, 150, None, 30), turn(1, "flow", 600, 160, None, 40),
                        turn(2, "llm", 1000, 200, 300, 100)])]
    k = compute_kpis(recs, SINCE, UNTIL)
    assert list(k.response_by_path) == ["flow", "llm"]
    assert (k.response_by_path["flow"].n, k.response_by_path["flow"].p50_ms) == (2, 500)
    assert to_json(k)["latency"]["by_path"]["flow"]["n"] == 2
    assert table_rows(format_table(k))["  path flow (n, p50 / p95)"].startswith("2, 500 / 590 ms")


def test_satisfaction_and_per_call(kpis: Kpis) -> None:
    assert kpis.satisfaction_n == 4
    assert kpis.satisfaction_mean == 3.5
    assert kpis.satisfaction_distribution == {1: 0, 2: 1, 3: 1, 4: 1, 5: 1}
    # durations started..ended of answered calls: 301 301 300 60 60 150 200 121
    assert kpis.mean_duration_s == pytest.approx(1493 / 8)
    assert kpis.turns_per_call == 10 / 8
    assert kpis.barge_ins_per_call == 4 / 8
    assert kpis.shed_levels == {"normal": 6, "brief": 1, "canned": 1, "reject-new": 0}


def test_touching_calls_do_not_overlap() -> None:
    recs = [call("a", 0, 0, 100, "completed"), call("b", 100, 100, 200, "completed"),
            call("c", 150, 150, 150, "abandoned")]  # zero-length: never in progress
    k = compute_kpis(recs, SINCE, SINCE + 400)
    assert k.concurrent_peak == 1
    assert k.concurrent_mean == 0.5


def test_calls_outside_the_window_add_no_load() -> None:
    recs = [call("early", -500, -500, -10, "completed"),
            call("late", 4000, 4000, 4100, "completed")]
    k = compute_kpis(recs, SINCE, UNTIL)
    assert (k.concurrent_peak, k.concurrent_mean) == (0, 0.0)
    assert k.offered == 2  # the caller picks the records; all of them are counted


def test_none_when_denominator_is_zero() -> None:
    refused = [call("r", 10, None, 10, "refused", reason="capacity")]
    k = compute_kpis(refused, SINCE, UNTIL)
    assert (k.offered, k.answered, k.refusal_rate) == (1, 0, 1.0)
    for rate in (k.completion_rate, k.escalation_rate, k.abandoned_rate, k.dropped_rate,
                 k.integration_timeout_rate, k.satisfaction_mean, k.mean_duration_s,
                 k.turns_per_call, k.barge_ins_per_call):
        assert rate is None
    assert k.flow_completion_rate is None
    assert k.response == Latency()
    assert k.satisfaction_distribution == {1: 0, 2: 0, 3: 0, 4: 0, 5: 0}

    empty = compute_kpis([], SINCE, UNTIL)
    assert empty.refusal_rate is None
    assert (empty.offered, empty.concurrent_peak, empty.concurrent_mean) == (0, 0, 0.0)


def test_empty_window_is_an_error() -> None:
    with pytest.raises(ValueError, match="until"):
        compute_kpis([], SINCE, SINCE)


def test_out_of_range_rating_is_ignored() -> None:
    k = compute_kpis([call("x", 0, 0, 10, "completed", satisfaction=9)], SINCE, UNTIL)
    assert (k.satisfaction_n, k.satisfaction_mean) == (0, None)


# -- presentation ------------------------------------------------------------------------------


def table_rows(table: str) -> dict[str, str]:
    """KPI name -> the rest of its line (value and meaning) of a formatted table."""
    lines = table.splitlines()
    value_col = lines[1].index("  -") + 2
    return {line[:value_col].rstrip(): line[value_col:] for line in lines[2:]}


def test_format_table(kpis: Kpis) -> None:
    table = format_table(kpis)
    lines = table.splitlines()
    assert lines[0].split() == ["KPI", "value", "what", "it", "tells", "you"]
    assert set(lines[1]) == {"-", " "}
    expected = {
        "window": "2027-01-15 08:00Z .. 09:00Z (1.0 h)",
        "calls offered / answered": "10 / 8",
        "concurrent calls (peak / mean)": "3 / 0.36",
        "response latency p50 / p95": "950 / 1775 ms",
        "response latency p99": "1955 ms",
        "  path llm (n, p50 / p95)": "5, 1200 / 1900 ms",
        "STT latency p50 / p95": "235 / 383 ms",
        "LLM first token p50 / p95": "500 / 860 ms",
        "TTS first audio p50 / p95": "50 / 191 ms",
        "completion rate": "50.0 %",
        "escalation rate": "25.0 %",
        "abandoned rate": "12.5 %",
        "dropped rate": "12.5 %",
        "refusal rate": "20.0 %",
        "refusals by reason": "capacity 1, shed:gpu 1",
        "flow completion rate": "42.9 % (3 of 7)",
        "  flow booking": ("4 runs, 1 completed (25.0 %), 1 fallback, 0 escalated, 1 abandoned, "
                           "1 failed"),
        "  flow routing": ("2 runs, 1 completed (50.0 %), 0 fallback, 1 escalated, 0 abandoned, "
                           "0 failed"),
        "  flow after-hours": ("1 run, 1 completed (100.0 %), 0 fallback, 0 escalated, "
                               "0 abandoned, 0 failed"),
        "integration timeout rate": "25.0 % (1 of 4)",
        "  integration crm": "3 calls, 1 ok, 1 timed out, 0 breaker-open, p50 / p95 120 / 1812 ms",
        "  integration calendar": ("1 call, 1 ok, 0 timed out, 0 breaker-open, "
                                   "p50 / p95 200 / 200 ms"),
        "satisfaction (n, mean)": "4, 3.50",
        "satisfaction distribution": "1:0 2:1 3:1 4:1 5:1",
        "mean call duration": "186.6 s",
        "turns per answered call": "1.25",
        "barge-ins per answered call": "0.50",
        "shed level of admitted calls": "normal 6, brief 1, canned 1",
    }
    rows = table_rows(table)
    for name, value in expected.items():
        assert name in rows, name
        assert rows[name].startswith(value + "  "), (name, rows[name])


def test_format_table_shows_dash_for_none() -> None:
    table = format_table(compute_kpis([], SINCE, UNTIL))
    for name in ("completion rate", "escalation rate", "integration timeout rate",
                 "response latency p50 / p95", "refusals by reason", "flow completion rate"):
        line = next(li for li in table.splitlines() if li.startswith(name))
        assert line[len(name):].split()[0] == "-", line
    assert "satisfaction (n, mean)" in table
    assert "  flow " not in table and "  integration " not in table


def test_to_json(kpis: Kpis) -> None:
    data = to_json(kpis)
    assert json.loads(json.dumps(data)) == data
    assert data["calls"] == {"offered": 10, "answered": 8, "refused": 2}
    assert data["concurrency"] == {"peak": 3, "mean": pytest.approx(1290 / 3600)}
    assert data["latency"]["response"]["p50_ms"] == 950
    assert data["latency"]["by_path"]["faq"]["n"] == 2
    assert data["latency"]["stt"]["p50_ms"] == 235
    assert data["rates"]["integration_timeout"] == 0.25
    assert data["integrations"]["by_name"]["crm"] == {
        "calls": 3, "ok": 1, "timed_out": 1, "breaker_open": 0, "p50_ms": 120,
        "p95_ms": pytest.approx(1812)}
    assert data["integrations"]["breaker_open"] == 0
    assert data["rates"]["flow_completion"] == pytest.approx(3 / 7)
    assert data["flows"]["runs"] == 7
    assert data["flows"]["completed"] == 3
    assert data["flows"]["completion_rate"] == pytest.approx(3 / 7)
    assert list(data["flows"]["by_name"]) == ["after-hours", "booking", "routing"]
    assert data["flows"]["by_name"]["booking"] == {
        "runs": 4, "completed": 1, "fallback": 1, "escalated": 0, "abandoned": 1, "failed": 1,
        "completion_rate": 0.25}
    assert data["satisfaction"]["distribution"] == {"1": 0, "2": 1, "3": 1, "4": 1, "5": 1}
    assert data["per_call"]["turns"] == 1.25
    assert data["shed_levels"]["normal"] == 6
    assert set(data) == {"window", "calls", "outcomes", "refused_by_reason", "concurrency",
                         "latency", "rates", "integrations", "flows", "satisfaction",
                         "per_call", "shed_levels"}


def test_to_json_none_is_null() -> None:
    data = to_json(compute_kpis([], SINCE, UNTIL))
    text = json.dumps(data)
    assert json.loads(text)["rates"]["completion"] is None
    assert json.loads(text)["latency"]["response"] == {
        "n": 0, "p50_ms": None, "p95_ms": None, "p99_ms": None}
    assert json.loads(text)["rates"]["flow_completion"] is None
    assert json.loads(text)["flows"] == {"runs": 0, "completed": 0, "completion_rate": None,
                                         "by_name": {}}
    assert json.loads(text)["integrations"] == {"calls": 0, "timed_out": 0, "breaker_open": 0,
                                                "by_name": {}}


def test_bucket_seconds() -> None:
    assert bucket_seconds(1800) == 60
    assert bucket_seconds(3600) == 120
    assert bucket_seconds(86400) == 1800
    assert bucket_seconds(7 * 86400) == 21600
    for window in (1800, 3600, 7200, 6 * 3600, 86400, 3 * 86400, 7 * 86400, 30 * 86400):
        assert window / bucket_seconds(window) <= 48


def test_render_html(kpis: Kpis) -> None:
    page = render_html(kpis, records(), title="Q1 <load> & co")
    assert page.startswith("<!DOCTYPE html>")
    assert page.rstrip().endswith("</html>")
    assert "<title>Q1 &lt;load&gt; &amp; co</title>" in page
    assert "<load>" not in page
    assert page.count('src="data:image/png;base64,') == 3
    for value in ("950 / 1775 ms", "3 / 0.36", "50.0 %", "25.0 % (1 of 4)", "4, 3.50",
                  "flow completion rate", "42.9 % (3 of 7)", "  flow booking",
                  "4 runs, 1 completed (25.0 %), 1 fallback",
                  "1 timed out, 0 breaker-open, p50 / p95 120 / 1812 ms"):
        assert value in page
    assert "http://" not in page and "https://" not in page  # self-contained


def test_render_html_escapes_record_text() -> None:
    recs = [call("x", 0, None, 0, "refused", reason="shed:<script>")]
    page = render_html(compute_kpis(recs, SINCE, UNTIL), recs)
    assert "<script>" not in page
    assert "shed:&lt;script&gt; 1" in page


def test_render_html_empty() -> None:
    page = render_html(compute_kpis([], SINCE, UNTIL), [])
    assert page.startswith("<!DOCTYPE html>")
    assert "No calls in the window" in page
    assert "data:image" not in page


def test_importing_report_does_not_import_matplotlib() -> None:
    code = "import sys, agent.kpi.report; print('matplotlib' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
