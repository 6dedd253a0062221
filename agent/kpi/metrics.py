"""Prometheus metrics of one agent process, and ``pbx-agent status`` read back from them.

Each :class:`AgentMetrics` owns its own ``CollectorRegistry`` (never the global one), so a test
or a process may build as many as it likes. Events (:meth:`AgentMetrics.admitted`,
:meth:`~AgentMetrics.refused`, :meth:`~AgentMetrics.call_ended`,
:meth:`~AgentMetrics.observe_llm_wait`, :meth:`~AgentMetrics.observe_integration`,
:meth:`~AgentMetrics.set_breaker`) update prometheus_client counters, gauges and histograms,
which take one short lock each: safe from any thread, and from a greenlet of an unpatched gevent
process (the locks are held for a few instructions, so a greenlet never waits on one).

Live values (active calls, capacity, shedding level, queue depths, CPU, records) are read by
zero-arg callbacks given to :meth:`AgentMetrics.bind` (and the side-work queue's statistics given
to :meth:`AgentMetrics.attach_sidework`), called only when the endpoint is scraped,
in the HTTP server's thread: they must be cheap and safe to call from a foreign thread. A
callback that raises is logged (at most once a minute per callback) and its metric is left out
of that scrape; the rest of the scrape is served.

Counting rule for ``pbx_agent_calls_total{outcome}``: every offered call is counted exactly
once. A refused call is counted by :meth:`AgentMetrics.refused` (``refusals_total{reason}`` and
``calls_total{outcome="refused"}``); :meth:`AgentMetrics.call_ended` counts the outcome of every
other call and skips ``calls_total`` for a record whose outcome is ``refused`` (the runtime hands
refused records to it as well). So ``sum(calls_total) == admissions_total + refusals_total``
once the admitted calls have ended.

Counting rule for integrations: each call to an external system is counted once, live, by
:meth:`AgentMetrics.observe_integration` (the webhook client calls it as each call finishes,
so the dashboard sees a failing system while calls are still in progress).
:meth:`AgentMetrics.call_ended` does **not** count ``record.integrations`` (that would count
every call twice); it counts the record's flow runs (``flow_runs_total``). A call the breaker
refused is counted in ``integration_calls_total{result="breaker-open"}`` but not observed in
the latency histogram (nothing was sent, so there is no latency to speak of). Breaker states
come from :meth:`AgentMetrics.set_breaker`, which the breaker's ``on_change`` hook calls.

The status side (:func:`fetch_metrics`, :func:`snapshot_from_metrics`, :func:`format_status`)
lets ``pbx-agent status`` use the metrics endpoint as its only control channel.
"""

from __future__ import annotations

import logging
import math
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any
from wsgiref.simple_server import WSGIServer

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    generate_latest,
)
from prometheus_client.exposition import start_http_server
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families

from agent.kpi.model import (
    BREAKER_OPEN_ERROR,
    BREAKER_STATES,
    FLOW_OUTCOMES,
    OUTCOMES,
    SHED_LEVELS,
    CallRecord,
)

_LOGGER = logging.getLogger(__name__)

PREFIX = "pbx_agent_"
RESPONSE_BUCKETS_S = (0.25, 0.5, 0.75, 1.0, 1.2, 1.5, 2.0, 3.0, 5.0, 10.0)
"""End of caller speech -> first agent audio: the 1.2 s bucket is the usual target."""
STAGE_BUCKETS_S = (0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0)
"""Per-stage timings are shorter than a whole response, so the low end is finer."""
LLM_WAIT_BUCKETS_S = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0)
STAGES = ("stt", "llm_first_token", "tts_first_audio")
CAPACITY_TERMS = ("effective", "pbx", "config", "engine")
QUEUE_ENGINES = ("llm", "stt", "tts")
RATINGS = (1, 2, 3, 4, 5)
INTEGRATION_RESULTS = ("ok", "error", "timeout", "breaker-open")
"""``result`` of ``integration_calls_total``; ``breaker-open``: refused without being sent."""
INTEGRATION_BUCKETS_S = (0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0)
"""Webhook latencies: a live call's integration timeout is typically 1-3 s."""
SIDEWORK_RESULTS = ("delivered", "failed", "dropped", "lost", "restored")
"""``result`` of ``sidework_jobs_total``: each is read from the stats attribute of that name."""
_LOG_EVERY_S = 60.0


class AgentMetrics:
    """The Prometheus metrics of one agent process, in a registry of its own."""

    def __init__(self, pbx: str, version: str = "", *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.pbx = pbx
        self.version = version
        self.registry = CollectorRegistry()
        self._clock = clock
        self._lock = threading.Lock()
        self._callbacks: dict[str, Callable[[], Any]] = {}
        self._last_logged: dict[str, float] = {}
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None
        reg = self.registry
        self.info = Info("pbx_agent", "The agent process: PBX kind and version.", registry=reg)
        self.info.info({"pbx": pbx, "version": version})
        self.admissions = Counter("pbx_agent_admissions", "Calls admitted.", registry=reg)
        self.refusals = Counter("pbx_agent_refusals", "Calls refused, by reason.", ["reason"],
                                registry=reg)
        self.calls = Counter("pbx_agent_calls", "Offered calls by outcome (each counted once).",
                             ["outcome"], registry=reg)
        self.response_latency = Histogram(
            "pbx_agent_response_latency_seconds",
            "End of caller speech to first agent audio, by reply path.", ["path"],
            buckets=RESPONSE_BUCKETS_S, registry=reg)
        self.stage_latency = Histogram(
            "pbx_agent_stage_latency_seconds", "Per-turn stage timings.", ["stage"],
            buckets=STAGE_BUCKETS_S, registry=reg)
        self.integration_calls = Counter(
            "pbx_agent_integration_calls", "Calls to external systems, by result.",
            ["integration", "result"], registry=reg)
        self.integration_timeouts = Counter(
            "pbx_agent_integration_timeouts", "Calls to external systems that timed out.",
            ["integration"], registry=reg)
        self.llm_queue_wait = Histogram(
            "pbx_agent_llm_queue_wait_seconds", "Time an LLM request waited for the engine.",
            buckets=LLM_WAIT_BUCKETS_S, registry=reg)
        self.satisfaction = Counter("pbx_agent_satisfaction", "Post-call ratings (1-5).",
                                    ["rating"], registry=reg)
        self.integration_latency = Histogram(
            "pbx_agent_integration_latency_seconds",
            "Latency of calls to external systems, retries included (breaker refusals left out).",
            ["integration"], buckets=INTEGRATION_BUCKETS_S, registry=reg)
        self.breaker_state = Gauge(
            "pbx_agent_integration_breaker_state",
            "Circuit breaker state per integration: 0 closed, 1 half-open, 2 open.",
            ["integration"], registry=reg)
        self.breaker_transitions = Counter(
            "pbx_agent_integration_breaker_transitions",
            "Circuit breaker state changes, by the state entered.", ["integration", "to"],
            registry=reg)
        self.flow_runs = Counter(
            "pbx_agent_flow_runs", "Call flow runs, by flow and outcome.", ["flow", "outcome"],
            registry=reg)
        self._breakers: dict[str, str] = {}
        """Last state given to set_breaker, by integration (under _lock)."""
        self._integrations: set[str] = set()
        """Integrations whose series are declared (under _lock)."""
        self._flows: set[str] = set()
        """Flows whose series are declared (under _lock)."""
        # every label a dashboard plots is there from the first scrape, at 0
        for outcome in OUTCOMES:
            self.calls.labels(outcome=outcome)
        for stage in STAGES:
            self.stage_latency.labels(stage=stage)
        for rating in RATINGS:
            self.satisfaction.labels(rating=str(rating))
        reg.register(_CallbackCollector(self))

    # -- live values -------------------------------------------------------------------------

    def bind(self, *, active: Callable[[], int] | None = None,
             starting: Callable[[], int] | None = None,
             capacity_terms: Callable[[], dict[str, float | None]] | None = None,
             shed_level: Callable[[], str] | None = None,
             queue_depths: Callable[[], dict[str, int]] | None = None,
             latency_p95_s: Callable[[], float | None] | None = None,
             cpu_seconds: Callable[[], dict[str, float]] | None = None,
             records: Callable[[], tuple[int, int]] | None = None) -> None:
        """Set the callbacks read at scrape time; an argument left None keeps its binding."""
        given = {"active": active, "starting": starting, "capacity_terms": capacity_terms,
                 "shed_level": shed_level, "queue_depths": queue_depths,
                 "latency_p95_s": latency_p95_s, "cpu_seconds": cpu_seconds,
                 "records": records}
        with self._lock:
            self._callbacks.update({k: v for k, v in given.items() if v is not None})

    def attach_sidework(self, stats: Callable[[], Any]) -> None:
        """Read the side-work queue's statistics at scrape time (replacing an earlier one).

        ``stats()`` returns an object (or a mapping) with int ``depth`` (jobs waiting) and the
        monotonic totals ``delivered``, ``failed``, ``dropped``, ``lost`` and ``restored``
        (see :data:`SIDEWORK_RESULTS`), exported as ``pbx_agent_sidework_depth`` and
        ``pbx_agent_sidework_jobs_total{result}``. Like a :meth:`bind` callback, it must be
        cheap and thread-safe; if it raises, both families are left out of that scrape.
        """
        with self._lock:
            self._callbacks["sidework"] = stats

    def _bound(self) -> dict[str, Callable[[], Any]]:
        with self._lock:
            return dict(self._callbacks)

    def _warn(self, key: str, msg: str, *args: Any) -> None:
        """Log a warning, at most once every minute per ``key`` (a scrape must stay cheap)."""
        now = self._clock()
        with self._lock:
            last = self._last_logged.get(key)
            if last is not None and now - last < _LOG_EVERY_S:
                return
            self._last_logged[key] = now
        _LOGGER.warning(msg + " (logged at most once a minute)", *args)

    # -- events ------------------------------------------------------------------------------

    def admitted(self) -> None:
        """A call was admitted (its slot reserved)."""
        self.admissions.inc()

    def refused(self, reason: str) -> None:
        """A call was refused (capacity, pbx-limit, shed:<rule>, draining): also its outcome."""
        self.refusals.labels(reason=reason).inc()
        self.calls.labels(outcome="refused").inc()

    def call_ended(self, record: CallRecord) -> None:
        """A call's record is final: its outcome (unless refused), turns, flow runs, rating.

        Its integrations are not counted here: :meth:`observe_integration` counted each one live.
        """
        if record.outcome != "refused":
            if record.outcome in OUTCOMES:
                self.calls.labels(outcome=record.outcome).inc()
            else:
                self._warn("outcome", "kpi.metrics: call %s: unknown outcome %r not counted",
                           record.call_id, record.outcome)
        for turn in record.turns:
            if turn.response_ms is not None:
                self.response_latency.labels(path=turn.path).observe(_seconds(turn.response_ms))
            for stage, ms in (("stt", turn.stt_ms),
                              ("llm_first_token", turn.llm_first_token_ms),
                              ("tts_first_audio", turn.tts_first_audio_ms)):
                if ms is not None:
                    self.stage_latency.labels(stage=stage).observe(_seconds(ms))
        for flow in record.flows:
            if flow.outcome in FLOW_OUTCOMES:
                self.declare_flows((flow.name,))
                self.flow_runs.labels(flow=flow.name, outcome=flow.outcome).inc()
            else:
                self._warn(f"flow-outcome:{flow.outcome}",
                           "kpi.metrics: call %s: flow %s: unknown outcome %r not counted",
                           record.call_id, flow.name, flow.outcome)
        if record.satisfaction in RATINGS:
            self.satisfaction.labels(rating=str(record.satisfaction)).inc()

    def observe_llm_wait(self, seconds: float) -> None:
        """An LLM request's wait in the engine queue."""
        self.llm_queue_wait.observe(max(0.0, seconds))

    def observe_integration(self, name: str, ok: bool, latency_ms: float,
                            timed_out: bool = False, error: str = "") -> None:
        """One call to an external system has finished: count it (once) and its latency.

        Called live by the webhook client, once per call (retries included in the one call).
        The result is ``timeout`` when ``timed_out``, else ``ok`` when ``ok``, else
        ``breaker-open`` when ``error == "breaker-open"`` (refused, never sent: not observed in
        the latency histogram), else ``error``.
        """
        result = integration_result(ok, timed_out, error)
        self._declare_integration(name)
        self.integration_calls.labels(integration=name, result=result).inc()
        if timed_out:
            self.integration_timeouts.labels(integration=name).inc()
        if result != BREAKER_OPEN_ERROR:
            self.integration_latency.labels(integration=name).observe(_seconds(latency_ms))

    def set_breaker(self, name: str, state: str) -> None:
        """The breaker of integration ``name`` is now in ``state`` (closed, half-open, open).

        Sets the state gauge, and counts a transition when the state differs from the last one
        given (a breaker starts closed, so a first ``closed`` is no transition). Call it with
        ``closed`` when the client is built, so the integration's series exist from the first
        scrape, and from the breaker's ``on_change(name, old, new)`` hook. An unknown state is
        logged and ignored. Never calls back into the breaker, so it is safe under its lock.
        """
        if state not in BREAKER_STATES:
            self._warn(f"breaker-state:{state}", "kpi.metrics: integration %s: unknown breaker "
                       "state %r ignored", name, state)
            return
        self._declare_integration(name)
        with self._lock:  # one writer at a time, so the gauge ends on the latest state
            old = self._breakers.get(name, BREAKER_STATES[0])
            self._breakers[name] = state
            self.breaker_state.labels(integration=name).set(BREAKER_STATES.index(state))
            if state != old:
                self.breaker_transitions.labels(integration=name, to=state).inc()

    def declare_flows(self, names: Iterable[str]) -> None:
        """Export ``flow_runs_total`` of these flows at 0 for every outcome (idempotent).

        Optional: a flow is declared on its first run anyway, but declaring the configured flows
        at start lets ``rate()`` see their first runs too.
        """
        for name in names:
            with self._lock:
                if name in self._flows:
                    continue
                self._flows.add(name)
            for outcome in FLOW_OUTCOMES:
                self.flow_runs.labels(flow=name, outcome=outcome)

    def _declare_integration(self, name: str) -> None:
        """Export every series of integration ``name`` (at 0) the first time it is seen."""
        with self._lock:
            if name in self._integrations:
                return
            self._integrations.add(name)
        for result in INTEGRATION_RESULTS:
            self.integration_calls.labels(integration=name, result=result)
        self.integration_timeouts.labels(integration=name)
        self.integration_latency.labels(integration=name)
        self.breaker_state.labels(integration=name)
        for state in BREAKER_STATES:
            self.breaker_transitions.labels(integration=name, to=state)

    # -- exposition --------------------------------------------------------------------------

    def render(self) -> bytes:
        """The Prometheus text exposition of this registry."""
        return generate_latest(self.registry)

    def start_server(self, host: str = "127.0.0.1", port: int = 9464) -> int:
        """Serve ``/metrics`` on host:port from a daemon thread; the bound port (port 0 works)."""
        if self._server is not None:
            raise RuntimeError(f"kpi.metrics: already serving on port {self.port}")
        try:
            server, thread = start_http_server(port, addr=host, registry=self.registry)
        except OSError as exc:
            raise OSError(exc.errno, f"kpi.metrics: cannot listen on {_hostport(host, port)}: "
                                     f"{exc.strerror or exc}") from exc
        self._server, self._thread = server, thread
        return int(server.server_address[1])

    @property
    def port(self) -> int | None:
        """The port being served, or None."""
        server = self._server
        return int(server.server_address[1]) if server is not None else None

    def stop_server(self) -> None:
        """Stop serving (a no-op when not serving)."""
        server, thread = self._server, self._thread
        self._server = self._thread = None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if thread is not None:
            thread.join(timeout=2.0)


class _CallbackCollector:
    """The metrics read from the bound callbacks at scrape time."""

    def __init__(self, owner: AgentMetrics) -> None:
        self._owner = owner

    def describe(self) -> list[Metric]:
        """The families this collector may yield (for the registry's duplicate check)."""
        return [
            GaugeMetricFamily("pbx_agent_active_calls", ""),
            GaugeMetricFamily("pbx_agent_starting_calls", ""),
            GaugeMetricFamily("pbx_agent_capacity_calls", "", labels=["term"]),
            GaugeMetricFamily("pbx_agent_shed_level", ""),
            GaugeMetricFamily("pbx_agent_shed_state", "", labels=["level"]),
            GaugeMetricFamily("pbx_agent_queue_depth", "", labels=["engine"]),
            GaugeMetricFamily("pbx_agent_response_latency_p95_seconds", ""),
            CounterMetricFamily("pbx_agent_engine_cpu_seconds", "", labels=["stage"]),
            CounterMetricFamily("pbx_agent_records_written", ""),
            CounterMetricFamily("pbx_agent_records_dropped", ""),
            GaugeMetricFamily("pbx_agent_sidework_depth", ""),
            CounterMetricFamily("pbx_agent_sidework_jobs", "", labels=["result"]),
        ]

    def collect(self) -> Iterator[Metric]:
        """One family per bound callback that answered."""
        owner = self._owner
        for name, fn in owner._bound().items():
            try:
                families = list(_FAMILIES[name](fn()))
            except Exception as exc:  # a broken callback must never break the scrape
                owner._warn(name, "kpi.metrics: callback %s failed, its metric is left out "
                            "of this scrape: %r", name, exc)
                continue
            yield from families


def _gauge(name: str, doc: str) -> Callable[[Any], list[Metric]]:
    def build(value: Any) -> list[Metric]:
        return [GaugeMetricFamily(name, doc, value=float(value))]
    return build


def _capacity(terms: dict[str, float | None]) -> list[Metric]:
    fam = GaugeMetricFamily("pbx_agent_capacity_calls",
                            "Concurrent-call limit by term; a term with no limit is left out.",
                            labels=["term"])
    for term, value in terms.items():
        if value is not None:
            fam.add_metric([term], float(value))
    return [fam]


def _shed(level: str) -> list[Metric]:
    if level not in SHED_LEVELS:  # logged by the collector, and left out of the scrape
        raise ValueError(f"unknown shedding level {level!r} (not one of {SHED_LEVELS})")
    index = SHED_LEVELS.index(level)
    state = GaugeMetricFamily("pbx_agent_shed_state", "1 for the current shedding level.",
                              labels=["level"])
    for i, name in enumerate(SHED_LEVELS):
        state.add_metric([name], 1.0 if i == index else 0.0)
    return [GaugeMetricFamily("pbx_agent_shed_level",
                              "Shedding level: 0 normal, 1 brief, 2 canned, 3 reject-new.",
                              value=float(index)), state]


def _queues(depths: dict[str, int]) -> list[Metric]:
    fam = GaugeMetricFamily("pbx_agent_queue_depth", "Requests waiting per engine.",
                            labels=["engine"])
    for engine, depth in depths.items():
        fam.add_metric([engine], float(depth))
    return [fam]


def _p95(value: float | None) -> list[Metric]:
    if value is None:
        return []
    return [GaugeMetricFamily("pbx_agent_response_latency_p95_seconds",
                              "Response latency p95 over the agent's recent window.",
                              value=float(value))]


def _cpu(seconds: dict[str, float]) -> list[Metric]:
    fam = CounterMetricFamily("pbx_agent_engine_cpu_seconds",
                              "CPU seconds used by each engine stage since start.",
                              labels=["stage"])
    for stage, value in seconds.items():
        fam.add_metric([stage], float(value))
    return [fam]


def _records(counts: tuple[int, int]) -> list[Metric]:
    written, dropped = counts
    return [CounterMetricFamily("pbx_agent_records_written", "Call records written.",
                                value=float(written)),
            CounterMetricFamily("pbx_agent_records_dropped",
                                "Call records dropped (queue full or write failed).",
                                value=float(dropped))]


def _sidework(stats: Any) -> list[Metric]:
    def read(name: str) -> float:
        raw = stats[name] if isinstance(stats, Mapping) else getattr(stats, name)
        return float(int(raw))

    depth = GaugeMetricFamily("pbx_agent_sidework_depth",
                              "Side-work jobs waiting to be delivered.", value=read("depth"))
    jobs = CounterMetricFamily(
        "pbx_agent_sidework_jobs",
        "Side-work jobs since start: delivered; failed (attempts exhausted); dropped (queue "
        "full); lost (never delivered, otherwise); restored (reloaded from disk at start).",
        labels=["result"])
    for result in SIDEWORK_RESULTS:
        jobs.add_metric([result], read(result))
    return [depth, jobs]


_FAMILIES: dict[str, Callable[[Any], list[Metric]]] = {
    "active": _gauge("pbx_agent_active_calls", "Calls in progress (answered)."),
    "starting": _gauge("pbx_agent_starting_calls", "Calls admitted but not yet answered."),
    "capacity_terms": _capacity,
    "shed_level": _shed,
    "queue_depths": _queues,
    "latency_p95_s": _p95,
    "cpu_seconds": _cpu,
    "records": _records,
    "sidework": _sidework,
}


def integration_result(ok: bool, timed_out: bool, error: str) -> str:
    """The ``result`` label of one integration call (one of :data:`INTEGRATION_RESULTS`)."""
    if timed_out:
        return "timeout"
    if ok:
        return "ok"
    return BREAKER_OPEN_ERROR if error == BREAKER_OPEN_ERROR else "error"


def _seconds(ms: float) -> float:
    return max(0.0, ms) / 1000.0


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# -- status over the endpoint ------------------------------------------------------------------

Samples = dict[str, list[tuple[dict[str, str], float]]]


def fetch_metrics(url: str, timeout_s: float = 2.0) -> Samples:
    """Scrape ``url`` (``host:port`` gets ``http://`` and ``/metrics``): sample name -> samples."""
    if "://" not in url:
        url = f"http://{url}"
        if "/" not in url.split("://", 1)[1]:
            url += "/metrics"
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:
            text = resp.read().decode("utf-8")
    except urllib.error.HTTPError as exc:
        raise ConnectionError(f"{url}: HTTP {exc.code}: not a pbx-agent metrics endpoint") from exc
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise ConnectionError(f"cannot reach {url} ({reason}): the agent is not running or "
                              "kpi.metrics is off") from exc
    out: Samples = {}
    try:
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                out.setdefault(sample.name, []).append((dict(sample.labels), float(sample.value)))
    except ValueError as exc:
        raise ValueError(f"{url}: not Prometheus text: {exc}") from exc
    return out


@dataclass
class StatusSnapshot:
    """What ``pbx-agent status`` shows, read from the metrics endpoint."""

    pbx: str = ""
    version: str = ""
    active: int | None = None
    starting: int | None = None
    capacity: dict[str, float] = field(default_factory=dict)
    """Limit by term (effective, pbx, config, engine); a term with no limit is absent."""
    shed_level: str | None = None
    admissions: int = 0
    refusals: dict[str, int] = field(default_factory=dict)
    calls: dict[str, int] = field(default_factory=dict)
    """Offered calls by outcome since start."""
    latency_p95_s: float | None = None
    """Over the agent's recent window (None when it has no data)."""
    latency_mean_s: float | None = None
    """Since start, from the response histogram (None before the first response)."""
    responses: int = 0
    queues: dict[str, int] = field(default_factory=dict)
    cpu_seconds: dict[str, float] = field(default_factory=dict)
    satisfaction: dict[str, int] = field(default_factory=dict)
    """Ratings given since start, by rating ("1".."5")."""
    records_written: int | None = None
    records_dropped: int | None = None
    breakers: dict[str, str] = field(default_factory=dict)
    """Circuit breaker state by integration (closed, half-open, open)."""
    sidework_depth: int | None = None
    sidework_jobs: dict[str, int] = field(default_factory=dict)
    """Side-work jobs since start by result (delivered, failed, dropped, lost, restored)."""


def _one(samples: Samples, name: str) -> float | None:
    rows = samples.get(name)
    return rows[0][1] if rows else None


def _by(samples: Samples, name: str, label: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for labels, value in samples.get(name, []):
        key = labels.get(label, "")
        out[key] = out.get(key, 0.0) + value
    return out


def _int(value: float | None) -> int | None:
    return None if value is None or math.isnan(value) else int(value)


def _ints(values: dict[str, float]) -> dict[str, int]:
    return {k: int(v) for k, v in values.items()}


def snapshot_from_metrics(samples: Samples) -> StatusSnapshot:
    """The status of a running agent from its scraped samples (see :func:`fetch_metrics`)."""
    info = samples.get(f"{PREFIX}info") or [({}, 1.0)]
    labels = info[0][0]
    level = _one(samples, f"{PREFIX}shed_level")
    shed: str | None = None
    if level is not None and 0 <= int(level) < len(SHED_LEVELS):
        shed = SHED_LEVELS[int(level)]
    count = sum(_by(samples, f"{PREFIX}response_latency_seconds_count", "path").values())
    total = sum(_by(samples, f"{PREFIX}response_latency_seconds_sum", "path").values())
    return StatusSnapshot(
        pbx=labels.get("pbx", ""),
        version=labels.get("version", ""),
        active=_int(_one(samples, f"{PREFIX}active_calls")),
        starting=_int(_one(samples, f"{PREFIX}starting_calls")),
        capacity=_by(samples, f"{PREFIX}capacity_calls", "term"),
        shed_level=shed,
        admissions=_int(_one(samples, f"{PREFIX}admissions_total")) or 0,
        refusals=_ints(_by(samples, f"{PREFIX}refusals_total", "reason")),
        calls=_ints(_by(samples, f"{PREFIX}calls_total", "outcome")),
        latency_p95_s=_one(samples, f"{PREFIX}response_latency_p95_seconds"),
        latency_mean_s=total / count if count else None,
        responses=int(count),
        queues=_ints(_by(samples, f"{PREFIX}queue_depth", "engine")),
        cpu_seconds=_by(samples, f"{PREFIX}engine_cpu_seconds_total", "stage"),
        satisfaction=_ints(_by(samples, f"{PREFIX}satisfaction_total", "rating")),
        records_written=_int(_one(samples, f"{PREFIX}records_written_total")),
        records_dropped=_int(_one(samples, f"{PREFIX}records_dropped_total")),
        breakers={name: BREAKER_STATES[int(v)] if 0 <= int(v) < len(BREAKER_STATES) else "?"
                  for name, v in _by(samples, f"{PREFIX}integration_breaker_state",
                                     "integration").items()},
        sidework_depth=_int(_one(samples, f"{PREFIX}sidework_depth")),
        sidework_jobs=_ints(_by(samples, f"{PREFIX}sidework_jobs_total", "result")),
    )


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:.3g}"


def _plural(n: int, one: str, many: str = "") -> str:
    return f"{n} {one if n == 1 else (many or one + 's')}"


def _opt(value: int | None) -> str:
    return "?" if value is None else str(value)


def format_status(s: StatusSnapshot) -> str:
    """A compact, human-readable multi-line status."""
    head = " ".join(p for p in ("pbx-agent", s.pbx, s.version) if p)
    others = ", ".join(f"{t} {_num(v)}" for t, v in s.capacity.items() if t != "effective")
    if "effective" in s.capacity:
        limit = f"of {_num(s.capacity['effective'])} (effective" + (f"; {others})" if others
                                                                     else ")")
    else:
        limit = "of no limit" + (f" ({others})" if others else "")
    lines = [head, f"calls: {_opt(s.active)} active + {_opt(s.starting)} starting {limit}",
             f"shedding: {s.shed_level or '?'}"]
    latency = ("latency p95 (recent): "
               + ("no data" if s.latency_p95_s is None else f"{s.latency_p95_s:.2f} s"))
    if s.latency_mean_s is not None:
        latency += f"; mean since start {s.latency_mean_s:.2f} s over "
        latency += _plural(s.responses, "reply", "replies")
    lines.append(latency)
    refused = sum(s.refusals.values())
    reasons = ", ".join(f"{r} {n}" for r, n in sorted(s.refusals.items()) if n)
    ended = ", ".join(f"{s.calls[o]} {o}" for o in OUTCOMES if s.calls.get(o))
    lines.append(f"since start: {s.admissions} admitted, {refused} refused"
                 + (f" ({reasons})" if reasons else "") + f"; {ended or 'no calls ended'}")
    if s.queues:
        lines.append("queues: " + ", ".join(f"{e} {n}" for e, n in _ordered(s.queues,
                                                                             QUEUE_ENGINES)))
    if s.cpu_seconds:
        lines.append("cpu: " + ", ".join(f"{st} {v:.1f} s" for st, v in _ordered(
            s.cpu_seconds, ("stt", "llm", "tts", "other"))))
    if s.breakers:
        lines.append("integrations: " + ", ".join(f"{n} {st}" for n, st in
                                                  sorted(s.breakers.items())))
    if s.sidework_depth is not None:
        jobs = ", ".join(f"{n} {r}" for r, n in sorted(s.sidework_jobs.items()) if n)
        lines.append(f"side work: {s.sidework_depth} pending" + (f"; {jobs}" if jobs else ""))
    rated = sum(s.satisfaction.values())
    if rated:
        mean = sum(int(r) * n for r, n in s.satisfaction.items()) / rated
        lines.append(f"satisfaction: {mean:.1f} average of {_plural(rated, 'rating')}")
    if s.records_written is not None:
        lines.append(f"records: {s.records_written} written, {_opt(s.records_dropped)} dropped")
    return "\n".join(lines)


def _ordered(values: dict[str, Any], first: tuple[str, ...]) -> list[tuple[str, Any]]:
    keys = [k for k in first if k in values] + sorted(k for k in values if k not in first)
    return [(k, values[k]) for k in keys]
