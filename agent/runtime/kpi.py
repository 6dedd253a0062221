"""KPIs of one agent process: a call record per call, the Prometheus endpoint, CPU per stage.

Runtime-neutral (threads only): the asyncio (Asterisk) and gevent (FreeSWITCH) processes each
build one :class:`RuntimeKpi`. Recording never runs on a call's hot path: the record is built
from what the call already measured and handed to the records writer thread at the end.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from agent.call.session import CallOutcome, TurnRecord
from agent.capacity.limits import LiveLimits
from agent.config import Config
from agent.integrations.service import IntegrationService
from agent.kpi.cpu import StageCpu, pool_initializer
from agent.kpi.metrics import AgentMetrics
from agent.kpi.model import CallRecord, FlowRun, IntegrationCall, TurnKpi, classify_outcome
from agent.kpi.records import RecordStore, mask_caller
from agent.runtime.governor import Governor

_LOGGER = logging.getLogger(__name__)


def _pool_depth(pool: ThreadPoolExecutor) -> int:
    queue = getattr(pool, "_work_queue", None)
    return int(queue.qsize()) if queue is not None else 0


class RuntimeKpi:
    """Call records, metrics and CPU-per-stage accounting for one agent process."""

    def __init__(self, config: Config, governor: Governor, engines: Any,
                 stt_pool: ThreadPoolExecutor, tts_pool: ThreadPoolExecutor,
                 clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.governor = governor
        self.clock = clock
        self.cpu = StageCpu()
        self.store: RecordStore | None = None
        self.metrics = AgentMetrics(config.pbx, _version())
        self.metrics_port: int | None = None
        #: the webhooks and side-work queue for flows (started in open())
        self.integrations = IntegrationService(
            config, on_result=self._observe_integration, on_breaker=self._breaker_changed)
        self.metrics.attach_sidework(self.integrations.sidework.stats)
        self.metrics.declare_flows(f.name for f in config.agent.flows)
        self._stop = threading.Event()
        llm = getattr(engines, "llm", None)

        def terms() -> dict[str, float | None]:
            cap = governor.capacity()
            out: dict[str, float | None] = {t.name: (None if t.value is None else float(t.value))
                                            for t in cap.terms}
            out["effective"] = float(cap.value)
            return out

        def p95_s() -> float | None:
            ms = governor.latency.p95()
            return None if ms is None else ms / 1000.0

        def records() -> tuple[int, int]:
            store = self.store
            return (store.written, store.dropped) if store is not None else (0, 0)

        self.metrics.bind(
            active=lambda: governor.admission.active,
            starting=lambda: governor.admission.reserved,
            capacity_terms=terms,
            shed_level=lambda: governor.level,
            queue_depths=lambda: {"llm": int(getattr(llm, "queue_depth", 0)),
                                  "stt": _pool_depth(stt_pool), "tts": _pool_depth(tts_pool)},
            latency_p95_s=p95_s,
            cpu_seconds=self.cpu.read,
            records=records,
        )

    def open(self) -> None:
        """Start the records writer and the metrics endpoint as configured.

        A failure of either is logged and the agent keeps serving calls without it: a full disk
        or a taken port must not stop the phones from being answered (`pbx-agent check` reports
        both before start).
        """
        kpi = self.config.kpi
        path = kpi.records_path(self.config.state_dir)
        if path is not None:
            store = RecordStore(path)
            try:
                store.start()
                self.store = store
                _LOGGER.info("call records: %s", path)
            except Exception as exc:
                _LOGGER.error("call records OFF: %s", exc)
        if kpi.metrics is not None:
            try:
                self.metrics_port = self.metrics.start_server(kpi.metrics.host, kpi.metrics.port)
                _LOGGER.info("metrics: http://%s:%d/metrics", kpi.metrics.host,
                             self.metrics_port)
            except OSError as exc:
                _LOGGER.error("metrics endpoint OFF: %s", exc)
        self.start_cpu_polling()
        try:
            self.integrations.start()
        except Exception as exc:
            _LOGGER.error("side-work queue OFF: %s", exc)

    def _observe_integration(self, outcome: Any) -> None:
        try:
            self.metrics.observe_integration(outcome.name, outcome.ok, outcome.latency_ms,
                                             outcome.timed_out, outcome.error)
        except Exception:
            _LOGGER.exception("integration metrics update failed")

    def _breaker_changed(self, name: str, old: str, new: str) -> None:
        _LOGGER.warning("integration %s: circuit breaker %s -> %s", name, old, new)
        self.metrics.set_breaker(name, new)

    def flow_context(self, record: CallRecord, caller: str, did: str) -> dict[str, Any]:
        """What a call session needs for flows: the integrations and the built-in variables."""
        return {"services": self.integrations,
                "call_info": {"caller_id": caller, "did": did, "call_id": record.call_id}}

    def start_cpu_polling(self, every_s: float = 1.0) -> None:
        """Read the per-thread CPU every second, so short-lived engine threads are counted."""
        def poll() -> None:
            while not self._stop.wait(every_s):
                try:
                    self.cpu.read()
                except Exception:
                    _LOGGER.debug("CPU reading failed", exc_info=True)

        threading.Thread(target=poll, name="kpi-cpu", daemon=True).start()

    def close(self) -> None:
        """Write the records still queued, stop the endpoint."""
        self._stop.set()
        self.integrations.close()
        if self.store is not None:
            self.store.close()
        self.metrics.stop_server()

    def observe_llm_wait(self, ms: float) -> None:
        """An LLM request's queue wait (ms): the shedding sensor and the metrics histogram."""
        self.governor.llm_wait.add(ms)
        self.metrics.observe_llm_wait(ms / 1000.0)

    def new_record(self, pbx_call_id: str, caller: str, did: str) -> CallRecord:
        """A record for a call the PBX just handed us (before admission)."""
        try:
            masked = mask_caller(caller, self.config.kpi.mask_caller)
        except ValueError:
            masked = ""
        return CallRecord(call_id=uuid.uuid4().hex, pbx=self.config.pbx,
                          pbx_call_id=pbx_call_id, caller=masked, did=did,
                          started_at=self.clock(), shed_level=self.governor.level)

    def refused(self, record: CallRecord, reason: str) -> None:
        """A refused call: counted and recorded."""
        self.metrics.refused(reason)
        record.ended_at = self.clock()
        record.result, record.reason, record.outcome = "BUSY", reason, "refused"
        self._write(record)

    def admitted(self, record: CallRecord, priority: str | None) -> None:
        """An admitted call (its slot is reserved)."""
        record.priority_class = priority or ""
        self.metrics.admitted()

    def answered(self, record: CallRecord) -> None:
        """The agent answered the call."""
        record.answered_at = self.clock()

    def finished(self, record: CallRecord, outcome: CallOutcome) -> None:
        """An admitted call ended (any way): fill in the outcome and turns, record it."""
        record.ended_at = self.clock()
        record.result = outcome.result.value
        record.reason = outcome.reason
        record.transfer_to = outcome.transfer_to
        record.outcome = classify_outcome(record.result, record.reason, outcome.caller_hung_up)
        record.barge_ins = outcome.barge_ins
        record.satisfaction = outcome.satisfaction
        record.turns = [turn_kpi(i, t) for i, t in enumerate(outcome.turns)]
        record.flows = [FlowRun(name=f.name, outcome=f.outcome, steps=f.steps,
                                started_at=f.started_at, ended_at=f.ended_at)
                        for f in outcome.flows]
        record.integrations = [IntegrationCall(name=o.name, ok=o.ok, latency_ms=o.latency_ms,
                                               timed_out=o.timed_out, error=o.error,
                                               attempts=o.attempts, breaker=o.breaker)
                               for o in outcome.integrations]
        self._write(record)
        if self.config.sidework.post_call:
            self.integrations.post_call(post_call_summary(record, outcome))

    def _write(self, record: CallRecord) -> None:
        try:
            self.metrics.call_ended(record)
        except Exception:
            _LOGGER.exception("call %s: metrics update failed", record.pbx_call_id)
        if self.store is not None:
            self.store.submit(record)


def build_call_services(config: Config, engines: Any,
                        live: Callable[[], LiveLimits | None]
                        ) -> tuple[Governor, ThreadPoolExecutor, ThreadPoolExecutor, RuntimeKpi]:
    """What both runtimes build around their engines: the governor, the STT and TTS pools
    (threads named for CPU per stage) and the KPIs, with the LLM's queue waits observed."""
    llm = getattr(engines, "llm", None)
    governor = Governor(config, live=live, llm_depth=lambda: int(getattr(llm, "queue_depth", 0)))
    stt_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="stt",
                                  initializer=pool_initializer("stt"))
    tts_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="tts",
                                  initializer=pool_initializer("tts"))
    kpi = RuntimeKpi(config, governor, engines, stt_pool, tts_pool)
    if llm is not None and hasattr(llm, "wait_observer"):
        llm.wait_observer = kpi.observe_llm_wait
    return governor, stt_pool, tts_pool, kpi


def post_call_summary(record: CallRecord, outcome: CallOutcome) -> dict[str, Any]:
    """The JSON a post-call webhook gets: the call, how it ended, and its flows' slots."""
    return {
        "call_id": record.call_id, "pbx": record.pbx, "pbx_call_id": record.pbx_call_id,
        "caller": record.caller, "did": record.did, "started_at": record.started_at,
        "ended_at": record.ended_at, "outcome": record.outcome, "result": record.result,
        "reason": record.reason, "transfer_to": record.transfer_to,
        "turns": len(record.turns),
        "flows": [{"name": f.name, "outcome": f.outcome, "slots": dict(f.slots)}
                  for f in outcome.flows],
    }


def turn_kpi(index: int, turn: TurnRecord) -> TurnKpi:
    """A session's turn as a KPI turn."""
    return TurnKpi(index=index, path=turn.path, caller_text=turn.caller_text,
                   reply_text=turn.reply_text, response_ms=turn.endpoint_to_audio_ms,
                   stt_ms=turn.stt_ms, llm_first_token_ms=turn.llm_first_token_ms,
                   tts_first_audio_ms=turn.tts_first_audio_ms, barged_in=turn.barged_in,
                   shed_level=turn.shed_level)


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("pbx-agent")
    except Exception:
        return ""
