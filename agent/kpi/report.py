"""The KPI report over a window of call records: numbers, a plain-text table, JSON and HTML.

:func:`compute_kpis` turns a list of :class:`~agent.kpi.model.CallRecord` into :class:`Kpis`,
the capacity-planning checklist: load (concurrent calls), responsiveness (latency per stage),
how calls end (completion, escalation, abandoned, dropped, refused), the call flows, the
integrations, and the callers' ratings. :func:`format_table`, :func:`to_json` and
:func:`render_html` present it.
matplotlib is imported only by :func:`render_html`, so importing this module stays cheap.
"""

from __future__ import annotations

import base64
import html
import io
import logging
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from agent.kpi.model import BREAKER_OPEN_ERROR, FLOW_OUTCOMES, OUTCOMES, SHED_LEVELS, CallRecord

_LOGGER = logging.getLogger(__name__)

_UNITS_S = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_RELATIVE = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhd])$")
SINCE_FORMS = "30m, 24h, 7d, 90s, or an ISO date/datetime (2026-11-26, 2026-11-26T10:00[Z])"
STAGES = ("stt", "llm_first_token", "tts_first_audio")
"""The per-stage latencies of a turn, as ``TurnKpi`` names them without ``_ms``."""
_BUCKETS_S = (60, 120, 300, 600, 900, 1800, 3600, 7200, 10800, 21600, 43200, 86400, 604800)
_MAX_BUCKETS = 48
_ROLLING_TURNS = 20
_OUTCOME_COLOURS = {
    "completed": "#2ca02c",
    "transferred": "#1f77b4",
    "refused": "#7f7f7f",
    "abandoned": "#ff7f0e",
    "dropped": "#d62728",
}


def parse_since(text: str, now: float) -> float:
    """Epoch seconds from ``30m``/``24h``/``7d``/``90s`` before ``now`` or an ISO date (UTC)."""
    value = text.strip()
    match = _RELATIVE.match(value)
    if match:
        return now - float(match.group(1)) * _UNITS_S[match.group(2)]
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        raise ValueError(f"bad time {text!r}: expected {SINCE_FORMS}") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when.timestamp()


def percentile(values: Iterable[float], q: float) -> float:
    """The ``q``-th percentile (0..100) of ``values`` by linear interpolation between ranks."""
    data = sorted(values)
    if not data:
        raise ValueError("percentile of no values")
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"percentile q must be in 0..100, got {q!r}")
    rank = q / 100.0 * (len(data) - 1)
    low = math.floor(rank)
    high = min(low + 1, len(data) - 1)
    return data[low] + (data[high] - data[low]) * (rank - low)


@dataclass
class Latency:
    """Percentiles of one latency in milliseconds (None when there is no sample)."""

    n: int = 0
    p50_ms: float | None = None
    p95_ms: float | None = None
    p99_ms: float | None = None

    @classmethod
    def of(cls, values: Sequence[float]) -> Latency:
        """The percentiles of ``values``."""
        if not values:
            return cls()
        return cls(
            n=len(values),
            p50_ms=percentile(values, 50),
            p95_ms=percentile(values, 95),
            p99_ms=percentile(values, 99),
        )


@dataclass
class IntegrationCounts:
    """Calls made to one integration, and how they went."""

    calls: int = 0
    ok: int = 0
    timed_out: int = 0
    breaker_open: int = 0
    """Calls refused at once because the integration's breaker was open (never sent)."""
    latency: Latency = field(default_factory=Latency)
    """Of the calls sent (breaker refusals left out), timeouts and errors included."""


@dataclass
class FlowCounts:
    """Runs of one call flow, by outcome (:data:`~agent.kpi.model.FLOW_OUTCOMES`)."""

    runs: int = 0
    """Every run, one with an unknown outcome included."""
    completed: int = 0
    fallback: int = 0
    escalated: int = 0
    abandoned: int = 0
    failed: int = 0

    @property
    def completion_rate(self) -> float | None:
        """Completed runs over runs (None with no run)."""
        return _ratio(self.completed, self.runs)


@dataclass
class Kpis:
    """The capacity-planning KPIs of the calls in a window."""

    since: float
    until: float
    offered: int = 0
    """Every record given, refused ones included."""
    answered: int = 0
    refused: int = 0
    refused_by_reason: dict[str, int] = field(default_factory=dict)
    outcomes: dict[str, int] = field(default_factory=dict)
    concurrent_peak: int = 0
    """Most answered calls at once within the window."""
    concurrent_mean: float = 0.0
    """Answered call-seconds within the window over the window's seconds (= erlangs carried)."""
    turns: int = 0
    response: Latency = field(default_factory=Latency)
    response_by_path: dict[str, Latency] = field(default_factory=dict)
    stages: dict[str, Latency] = field(default_factory=dict)
    """Keyed by :data:`STAGES`."""
    completion_rate: float | None = None
    escalation_rate: float | None = None
    abandoned_rate: float | None = None
    dropped_rate: float | None = None
    refusal_rate: float | None = None
    integration_calls: int = 0
    integration_timeouts: int = 0
    integration_timeout_rate: float | None = None
    integration_breaker_open: int = 0
    integrations: dict[str, IntegrationCounts] = field(default_factory=dict)
    flow_runs: int = 0
    flow_completed: int = 0
    flow_completion_rate: float | None = None
    """Completed flow runs over all flow runs, every flow together."""
    flows: dict[str, FlowCounts] = field(default_factory=dict)
    """By flow name, sorted."""
    satisfaction_n: int = 0
    satisfaction_mean: float | None = None
    satisfaction_distribution: dict[int, int] = field(default_factory=dict)
    """Rating 1..5 -> number of calls (all five keys, zeros included)."""
    mean_duration_s: float | None = None
    """Mean of ``duration_s`` (PBX handing us the call -> end) over answered calls."""
    turns_per_call: float | None = None
    barge_ins_per_call: float | None = None
    shed_levels: dict[str, int] = field(default_factory=dict)
    """Shedding level at admission -> number of answered calls."""

    @property
    def window_s(self) -> float:
        """Length of the window in seconds."""
        return self.until - self.since


def _ratio(num: float, den: float) -> float | None:
    return num / den if den else None


def _intervals(
    records: Iterable[CallRecord], since: float, until: float
) -> list[tuple[float, float]]:
    """Answered..ended of each answered call, clipped to the window (empty ones dropped)."""
    out = []
    for rec in records:
        if rec.answered_at is None:
            continue
        start, end = max(rec.answered_at, since), min(rec.ended_at, until)
        if end > start:
            out.append((start, end))
    return out


def _concurrency_steps(intervals: Sequence[tuple[float, float]]) -> list[tuple[float, int]]:
    """(time, calls in progress from then on) at every start and end, in time order."""
    events = [(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals]
    # Ends before starts at the same instant: a call that ends as another begins is no overlap.
    events.sort()
    steps: list[tuple[float, int]] = []
    level = 0
    for t, delta in events:
        level += delta
        if steps and steps[-1][0] == t:
            steps[-1] = (t, level)
        else:
            steps.append((t, level))
    return steps


def compute_kpis(records: list[CallRecord], since: float, until: float) -> Kpis:
    """The KPIs of ``records`` (the caller picks them) over the window ``since``..``until``."""
    if not until > since:
        raise ValueError(f"empty window: until ({until}) must be after since ({since})")
    k = Kpis(since=since, until=until, offered=len(records))
    k.outcomes = dict.fromkeys(OUTCOMES, 0)
    answered = [r for r in records if r.answered_at is not None]
    k.answered = len(answered)
    for rec in records:
        k.outcomes[rec.outcome] = k.outcomes.get(rec.outcome, 0) + 1
        if rec.outcome == "refused":
            reason = rec.reason or "(none)"
            k.refused_by_reason[reason] = k.refused_by_reason.get(reason, 0) + 1
    k.refused = k.outcomes["refused"]
    k.refused_by_reason = dict(sorted(k.refused_by_reason.items(), key=lambda kv: (-kv[1], kv[0])))

    intervals = _intervals(records, since, until)
    steps = _concurrency_steps(intervals)
    k.concurrent_peak = max((level for _, level in steps), default=0)
    k.concurrent_mean = sum(e - s for s, e in intervals) / (until - since)

    turns = [t for rec in records for t in rec.turns]
    k.turns = len(turns)
    k.response = Latency.of([t.response_ms for t in turns if t.response_ms is not None])
    by_path: dict[str, list[float]] = {}
    for t in turns:
        if t.response_ms is not None:
            by_path.setdefault(t.path, []).append(t.response_ms)
    k.response_by_path = {path: Latency.of(v) for path, v in sorted(by_path.items())}
    for stage in STAGES:
        values = [getattr(t, f"{stage}_ms") for t in turns]
        k.stages[stage] = Latency.of([v for v in values if v is not None])

    k.completion_rate = _ratio(k.outcomes["completed"], k.answered)
    k.escalation_rate = _ratio(k.outcomes["transferred"], k.answered)
    k.abandoned_rate = _ratio(k.outcomes["abandoned"], k.answered)
    k.dropped_rate = _ratio(k.outcomes["dropped"], k.answered)
    k.refusal_rate = _ratio(k.refused, k.offered)

    latencies: dict[str, list[float]] = {}
    for rec in records:
        for call in rec.integrations:
            counts = k.integrations.setdefault(call.name, IntegrationCounts())
            counts.calls += 1
            counts.ok += call.ok
            counts.timed_out += call.timed_out
            if call.error == BREAKER_OPEN_ERROR and not call.ok and not call.timed_out:
                counts.breaker_open += 1
            else:
                latencies.setdefault(call.name, []).append(call.latency_ms)
    for name, counts in k.integrations.items():
        counts.latency = Latency.of(latencies.get(name, []))
    k.integrations = dict(sorted(k.integrations.items()))
    k.integration_calls = sum(c.calls for c in k.integrations.values())
    k.integration_timeouts = sum(c.timed_out for c in k.integrations.values())
    k.integration_timeout_rate = _ratio(k.integration_timeouts, k.integration_calls)
    k.integration_breaker_open = sum(c.breaker_open for c in k.integrations.values())

    unknown = 0
    for rec in records:
        for run in rec.flows:
            flow = k.flows.setdefault(run.name, FlowCounts())
            flow.runs += 1
            if run.outcome in FLOW_OUTCOMES:
                setattr(flow, run.outcome, getattr(flow, run.outcome) + 1)
            else:
                unknown += 1
    if unknown:
        _LOGGER.warning("%d flow runs with an unknown outcome counted as runs only", unknown)
    k.flows = dict(sorted(k.flows.items()))
    k.flow_runs = sum(f.runs for f in k.flows.values())
    k.flow_completed = sum(f.completed for f in k.flows.values())
    k.flow_completion_rate = _ratio(k.flow_completed, k.flow_runs)

    ratings = [r.satisfaction for r in records if r.satisfaction is not None]
    valid = [x for x in ratings if 1 <= x <= 5]
    if len(valid) != len(ratings):
        _LOGGER.warning("ignoring %d satisfaction ratings outside 1..5", len(ratings) - len(valid))
    k.satisfaction_n = len(valid)
    k.satisfaction_mean = _ratio(sum(valid), len(valid))
    k.satisfaction_distribution = {x: valid.count(x) for x in range(1, 6)}

    k.mean_duration_s = _ratio(sum(r.duration_s for r in answered), k.answered)
    k.turns_per_call = _ratio(sum(len(r.turns) for r in answered), k.answered)
    k.barge_ins_per_call = _ratio(sum(r.barge_ins for r in answered), k.answered)
    k.shed_levels = dict.fromkeys(SHED_LEVELS, 0)
    for rec in answered:
        k.shed_levels[rec.shed_level] = k.shed_levels.get(rec.shed_level, 0) + 1
    return k


# -- presentation ------------------------------------------------------------------------------


def _pct(rate: float | None) -> str:
    return "-" if rate is None else f"{rate * 100:.1f} %"


def _num(value: float | None, fmt: str = ".2f") -> str:
    return "-" if value is None else format(value, fmt)


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def _p50_p95(lat: Latency) -> str:
    if lat.n == 0:
        return "-"
    return f"{_ms(lat.p50_ms)} / {_ms(lat.p95_ms)} ms"


def _counts(counts: dict[str, int]) -> str:
    shown = [f"{name} {n}" for name, n in counts.items() if n]
    return ", ".join(shown) if shown else "-"


def _utc(ts: float) -> str:
    return datetime.fromtimestamp(ts, tz=UTC).strftime("%Y-%m-%d %H:%MZ")


def _window(k: Kpis) -> str:
    start, end = _utc(k.since), _utc(k.until)
    if end[:10] == start[:10]:
        end = end[11:]
    return f"{start} .. {end} ({k.window_s / 3600:.1f} h)"


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _rows(k: Kpis) -> list[tuple[str, str, str]]:
    """(KPI, value, what it tells you) for each line of the checklist."""
    rows = [
        ("window", _window(k), "the period these numbers cover (UTC)"),
        ("calls offered / answered", f"{k.offered} / {k.answered}", "demand, and what was served"),
        ("concurrent calls (peak / mean)", f"{k.concurrent_peak} / {k.concurrent_mean:.2f}",
         "lines + engine slots needed; mean = erlangs carried"),
        ("response latency p50 / p95", _p50_p95(k.response),
         "caller stops speaking -> agent audio"),
        ("response latency p99", "-" if k.response.n == 0 else f"{_ms(k.response.p99_ms)} ms",
         "the worst turns callers notice"),
    ]
    for path, lat in k.response_by_path.items():
        rows.append((f"  path {path} (n, p50 / p95)", f"{lat.n}, {_p50_p95(lat)}",
                     "latency by reply path"))
    rows += [
        ("STT latency p50 / p95", _p50_p95(k.stages["stt"]), "end of speech -> final text"),
        ("LLM first token p50 / p95", _p50_p95(k.stages["llm_first_token"]),
         "LLM queueing + prompt prefill"),
        ("TTS first audio p50 / p95", _p50_p95(k.stages["tts_first_audio"]),
         "reply text -> first audio"),
        ("completion rate", _pct(k.completion_rate), "answered calls the agent finished"),
        ("escalation rate", _pct(k.escalation_rate), "answered calls handed to a human"),
        ("abandoned rate", _pct(k.abandoned_rate), "callers who hung up first"),
        ("dropped rate", _pct(k.dropped_rate), "calls the agent failed (errors)"),
        ("refusal rate", _pct(k.refusal_rate), "offered calls turned away (too little capacity)"),
        ("refusals by reason", _counts(k.refused_by_reason), "which limit turned calls away"),
        ("flow completion rate",
         _pct(k.flow_completion_rate)
         + (f" ({k.flow_completed} of {k.flow_runs})" if k.flow_runs else ""),
         "call flow runs that reached their end"),
    ]
    for name, f in k.flows.items():
        rows.append((f"  flow {name}",
                     f"{_plural(f.runs, 'run')}, {f.completed} completed "
                     f"({_pct(f.completion_rate)}), {f.fallback} fallback, "
                     f"{f.escalated} escalated, {f.abandoned} abandoned, {f.failed} failed",
                     "per call flow"))
    rows.append(
        ("integration timeout rate",
         _pct(k.integration_timeout_rate)
         + (f" ({k.integration_timeouts} of {k.integration_calls})" if k.integration_calls else ""),
         "external systems too slow for a live call"))
    for name, c in k.integrations.items():
        rows.append((f"  integration {name}",
                     f"{_plural(c.calls, 'call')}, {c.ok} ok, {c.timed_out} timed out, "
                     f"{c.breaker_open} breaker-open, p50 / p95 {_p50_p95(c.latency)}",
                     "per external system (breaker-open: refused, not sent)"))
    dist = " ".join(f"{x}:{n}" for x, n in k.satisfaction_distribution.items())
    rows += [
        ("satisfaction (n, mean)", f"{k.satisfaction_n}, {_num(k.satisfaction_mean)}",
         "post-call rating 1..5"),
        ("satisfaction distribution", dist or "-", "ratings 1..5"),
        ("mean call duration", "-" if k.mean_duration_s is None else f"{k.mean_duration_s:.1f} s",
         "holding time: the AHT for Erlang B sizing"),
        ("turns per answered call", _num(k.turns_per_call), "conversation length"),
        ("barge-ins per answered call", _num(k.barge_ins_per_call),
         "callers interrupting the agent"),
        ("shed level of admitted calls", _counts(k.shed_levels),
         "how often overload degraded replies"),
    ]
    return rows


def format_table(k: Kpis) -> str:
    """The KPI checklist as a plain-text table: KPI, value, what it tells you."""
    header = ("KPI", "value", "what it tells you")
    rows = [header, *_rows(k)]
    widths = [max(len(row[i]) for row in rows) for i in range(2)]
    lines = []
    for i, (name, value, meaning) in enumerate(rows):
        lines.append(f"{name:<{widths[0]}}  {value:<{widths[1]}}  {meaning}".rstrip())
        if i == 0:
            lines.append(f"{'-' * widths[0]}  {'-' * widths[1]}  {'-' * len(header[2])}")
    return "\n".join(lines) + "\n"


def _latency_json(lat: Latency) -> dict[str, Any]:
    return {"n": lat.n, "p50_ms": lat.p50_ms, "p95_ms": lat.p95_ms, "p99_ms": lat.p99_ms}


def to_json(k: Kpis) -> dict[str, Any]:
    """The KPIs as a JSON-serialisable dict with stable keys (rates 0..1, null when undefined).

    Keys::

        window: {since, until, seconds}                        epoch seconds
        calls: {offered, answered, refused}
        outcomes: {completed, transferred, refused, abandoned, dropped, ...}
        refused_by_reason: {reason: count}
        concurrency: {peak, mean}
        latency: {turns, response, by_path: {path: ...}, stt, llm_first_token, tts_first_audio}
                 each latency is {n, p50_ms, p95_ms, p99_ms}
        rates: {completion, escalation, abandoned, dropped, refusal, integration_timeout,
                flow_completion}
        integrations: {calls, timed_out, breaker_open,
                       by_name: {name: {calls, ok, timed_out, breaker_open, p50_ms, p95_ms}}}
        flows: {runs, completed, completion_rate,
                by_name: {name: {runs, completed, fallback, escalated, abandoned, failed,
                                 completion_rate}}}
        satisfaction: {n, mean, distribution: {"1": count, ..., "5": count}}
        per_call: {mean_duration_s, turns, barge_ins}          over answered calls
        shed_levels: {level: count}                            of answered calls
    """
    return {
        "window": {"since": k.since, "until": k.until, "seconds": k.window_s},
        "calls": {"offered": k.offered, "answered": k.answered, "refused": k.refused},
        "outcomes": dict(k.outcomes),
        "refused_by_reason": dict(k.refused_by_reason),
        "concurrency": {"peak": k.concurrent_peak, "mean": k.concurrent_mean},
        "latency": {
            "turns": k.turns,
            "response": _latency_json(k.response),
            "by_path": {p: _latency_json(lat) for p, lat in k.response_by_path.items()},
            **{stage: _latency_json(k.stages[stage]) for stage in STAGES},
        },
        "rates": {
            "completion": k.completion_rate,
            "escalation": k.escalation_rate,
            "abandoned": k.abandoned_rate,
            "dropped": k.dropped_rate,
            "refusal": k.refusal_rate,
            "integration_timeout": k.integration_timeout_rate,
            "flow_completion": k.flow_completion_rate,
        },
        "integrations": {
            "calls": k.integration_calls,
            "timed_out": k.integration_timeouts,
            "breaker_open": k.integration_breaker_open,
            "by_name": {
                name: {"calls": c.calls, "ok": c.ok, "timed_out": c.timed_out,
                       "breaker_open": c.breaker_open, "p50_ms": c.latency.p50_ms,
                       "p95_ms": c.latency.p95_ms}
                for name, c in k.integrations.items()
            },
        },
        "flows": {
            "runs": k.flow_runs,
            "completed": k.flow_completed,
            "completion_rate": k.flow_completion_rate,
            "by_name": {
                name: {"runs": f.runs, "completed": f.completed, "fallback": f.fallback,
                       "escalated": f.escalated, "abandoned": f.abandoned, "failed": f.failed,
                       "completion_rate": f.completion_rate}
                for name, f in k.flows.items()
            },
        },
        "satisfaction": {
            "n": k.satisfaction_n,
            "mean": k.satisfaction_mean,
            "distribution": {str(x): n for x, n in k.satisfaction_distribution.items()},
        },
        "per_call": {
            "mean_duration_s": k.mean_duration_s,
            "turns": k.turns_per_call,
            "barge_ins": k.barge_ins_per_call,
        },
        "shed_levels": dict(k.shed_levels),
    }


# -- HTML and plots ----------------------------------------------------------------------------


def bucket_seconds(window_s: float) -> int:
    """A round bucket size that splits ``window_s`` into at most 48 buckets (≈24-48)."""
    for size in _BUCKETS_S:
        if window_s / size <= _MAX_BUCKETS:
            return size
    return int(math.ceil(window_s / _MAX_BUCKETS))


def _turn_times(rec: CallRecord) -> list[float]:
    """When each turn happened: spread evenly over the answered call (turns carry no time)."""
    if rec.answered_at is None or not rec.turns:
        return []
    span = max(0.0, rec.ended_at - rec.answered_at)
    n = len(rec.turns)
    return [rec.answered_at + span * (i + 0.5) / n for i in range(n)]


def _dt(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, tz=UTC)


def _png(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=96)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _plots(k: Kpis, records: list[CallRecord]) -> list[tuple[str, str]]:
    """(caption, PNG data URI) for load, latency and outcomes over time."""
    # Lazy: matplotlib costs ~0.5 s to import and only the HTML report needs it. Figure objects
    # render PNG through the Agg canvas without pyplot: no display, no GUI backend, no global
    # figure registry (so no leak and no thread hazard), whatever backend the process has set.
    from matplotlib import dates
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    unix_epoch = float(dates.date2num(_dt(0.0)))  # date2num per point is slow on big windows

    def x(ts: float) -> float:
        """Epoch seconds on matplotlib's date axis (days), shown in UTC."""
        return unix_epoch + ts / 86400.0

    def time_axis(ax: Any) -> None:
        """Window-wide x axis with UTC date ticks."""
        ax.set_xlim(lo, hi)
        locator = dates.AutoDateLocator(tz=UTC)
        ax.xaxis.set_major_locator(locator)
        ax.xaxis.set_major_formatter(dates.ConciseDateFormatter(locator, tz=UTC))

    lo, hi = x(k.since), x(k.until)
    plots = []

    fig = Figure(figsize=(9, 3), layout="constrained")
    ax = fig.add_subplot()
    steps = _concurrency_steps(_intervals(records, k.since, k.until))
    xs = [lo] + [x(t) for t, _ in steps] + [hi]
    ys = [0] + [level for _, level in steps] + [steps[-1][1] if steps else 0]
    ax.step(xs, ys, where="post", color="#1f77b4")
    time_axis(ax)
    ax.set_ylim(0, max(1, k.concurrent_peak) * 1.1)
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("concurrent calls")
    ax.set_title(f"load: answered calls in progress (peak {k.concurrent_peak})")
    ax.grid(alpha=0.3)
    plots.append(("load over time", _png(fig)))

    fig = Figure(figsize=(9, 3), layout="constrained")
    ax = fig.add_subplot()
    points = sorted(
        (t, turn.response_ms)
        for rec in records
        for t, turn in zip(_turn_times(rec), rec.turns, strict=True)
        if turn.response_ms is not None and k.since <= t <= k.until
    )
    if points:
        ax.scatter([x(t) for t, _ in points], [v for _, v in points], s=8, alpha=0.5,
                   label="turns")
        # About one outcome bucket's worth of turns, at least 20, so the line stays readable.
        span = max(_ROLLING_TURNS, len(points) // _MAX_BUCKETS)
        rolling = [
            percentile([v for _, v in points[max(0, i - span + 1): i + 1]], 95)
            for i in range(len(points))
        ]
        ax.plot([x(t) for t, _ in points], rolling, color="#d62728",
                label=f"rolling p95 (last {span} turns)")
        ax.legend(loc="upper left", fontsize="small")
    time_axis(ax)
    ax.set_ylim(bottom=0)
    ax.set_ylabel("response ms")
    ax.set_title("response latency (turns placed evenly within their call)")
    ax.grid(alpha=0.3)
    plots.append(("response latency over time", _png(fig)))

    fig = Figure(figsize=(9, 3), layout="constrained")
    ax = fig.add_subplot()
    size = bucket_seconds(k.window_s)
    n_buckets = max(1, math.ceil(k.window_s / size))
    outcomes = list(OUTCOMES) + sorted({r.outcome for r in records} - set(OUTCOMES))
    counts = {o: [0] * n_buckets for o in outcomes}
    for rec in records:
        if k.since <= rec.started_at < k.until:
            counts[rec.outcome][int((rec.started_at - k.since) // size)] += 1
    starts = [x(k.since + i * size) for i in range(n_buckets)]
    width = size / 86400.0 * 0.9  # bar width in days, matplotlib's date unit
    bottom = [0] * n_buckets
    for outcome in outcomes:
        ax.bar(starts, counts[outcome], width=width, bottom=bottom, align="edge",
               label=outcome, color=_OUTCOME_COLOURS.get(outcome))
        bottom = [b + c for b, c in zip(bottom, counts[outcome], strict=True)]
    time_axis(ax)
    ax.set_ylim(0, max(1, *bottom) * 1.3)  # headroom for the legend
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel(f"calls per {_duration(size)}")
    ax.set_title("outcomes by start time")
    ax.legend(loc="upper left", fontsize="small", ncols=len(outcomes))
    ax.grid(alpha=0.3, axis="y")
    plots.append(("outcomes over time", _png(fig)))
    return plots


def _duration(seconds: int) -> str:
    for unit, name in ((86400, "d"), (3600, "h"), (60, "min")):
        if seconds % unit == 0:
            return f"{seconds // unit} {name}"
    return f"{seconds} s"


_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; margin-bottom: 2em; }
th, td { text-align: left; padding: 0.25em 0.8em; border-bottom: 1px solid #ddd; }
td.value { font-family: ui-monospace, monospace; white-space: nowrap; }
td.meaning { color: #666; }
figure { margin: 0 0 1.5em 0; }
figcaption { font-weight: bold; }
img { max-width: 100%; }
"""


def render_html(k: Kpis, records: list[CallRecord], title: str = "pbx-agent report") -> str:
    """A self-contained HTML page: the KPI table and load, latency and outcome plots (PNG)."""
    esc = html.escape
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        f"<title>{esc(title)}</title>",
        f"<style>{_CSS}</style>",
        "</head>",
        "<body>",
        f"<h1>{esc(title)}</h1>",
        f"<p>{esc(_window(k))}</p>",
    ]
    if not records:
        parts.append("<p>No calls in the window.</p>")
    else:
        parts.append("<table>")
        parts.append("<tr><th>KPI</th><th>value</th><th>what it tells you</th></tr>")
        for name, value, meaning in _rows(k):
            parts.append(
                f'<tr><td>{esc(name)}</td><td class="value">{esc(value)}</td>'
                f'<td class="meaning">{esc(meaning)}</td></tr>'
            )
        parts.append("</table>")
        for caption, uri in _plots(k, records):
            parts.append(
                f'<figure><figcaption>{esc(caption)}</figcaption>'
                f'<img alt="{esc(caption)}" src="{uri}"></figure>'
            )
    parts += ["</body>", "</html>"]
    return "\n".join(parts) + "\n"
