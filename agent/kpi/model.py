"""The call record: what one call was, in plain types (the contract of records, metrics, report).

Times are Unix epoch seconds (``time.time()``); durations are milliseconds. Outcomes:

- ``completed``: the agent ended the call as designed (goodbye, no input, an ending intent);
- ``transferred``: handed to a human target (an intent, DTMF 0, the drain, max duration);
- ``refused``: never answered (admission: capacity, pbx-limit, shed:<rule>, draining);
- ``abandoned``: the caller hung up before the agent ended the call;
- ``dropped``: an error ended the call (engine worker crash, internal error, media failure);
  the caller was still handed back to the dialplan, but the agent failed them.

A call may run call flows (:class:`FlowRun`, outcomes :data:`FLOW_OUTCOMES`) and call external
systems (:class:`IntegrationCall`, breaker states :data:`BREAKER_STATES`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

OUTCOMES = ("completed", "transferred", "refused", "abandoned", "dropped")
SHED_LEVELS = ("normal", "brief", "canned", "reject-new")
FLOW_OUTCOMES = ("completed", "fallback", "escalated", "abandoned", "failed")
"""How a flow run ended:

- ``completed``: the flow reached its end (an ``end`` step, its last step, or a ``transfer``
  step that is part of the flow's design);
- ``fallback``: an integration failed, timed out or had its breaker open, and the flow took its
  declared fallback;
- ``escalated``: the caller asked for a person or otherwise left the flow mid-way;
- ``abandoned``: the caller hung up mid-flow;
- ``failed``: slot re-prompts were exhausted, or an internal error ended the flow.
"""
BREAKER_STATES = ("closed", "half-open", "open")
"""A circuit breaker's states, in the order of the breaker-state gauge (0, 1, 2)."""
BREAKER_OPEN_ERROR = "breaker-open"
"""The ``IntegrationCall.error`` of a call refused because the integration's breaker was open."""


@dataclass
class TurnKpi:
    """One caller turn: what was heard and said, by which path, with its stage timings."""

    index: int
    path: str
    """faq, llm, llm-brief, canned, transfer, goodbye, flow (flows may add their own)."""
    caller_text: str = ""
    reply_text: str = ""
    response_ms: float | None = None
    """End of caller speech -> first agent audio sent (endpointing silence included)."""
    stt_ms: float | None = None
    """End of speech detected -> STT final text."""
    llm_first_token_ms: float | None = None
    tts_first_audio_ms: float | None = None
    """Reply started -> first agent audio ready (0 for cached phrases)."""
    barged_in: bool = False
    shed_level: str = "normal"


@dataclass
class IntegrationCall:
    """One call to an external system (webhook, CRM, calendar) made during the call."""

    name: str
    ok: bool
    latency_ms: float
    """From the first attempt to the final answer (retries included); ~0 when refused."""
    timed_out: bool = False
    error: str = ""
    """Why it failed: ``timeout``, ``breaker-open`` (refused, never sent), ``http-503``, ..."""
    attempts: int = 1
    """Attempts made (retries included); 0 when the breaker refused the call."""
    breaker: str = "closed"
    """The integration's breaker state after the call: one of :data:`BREAKER_STATES`."""


@dataclass
class FlowRun:
    """One run of a call flow (booking, routing, after-hours) during a call."""

    name: str
    outcome: str
    """One of :data:`FLOW_OUTCOMES`."""
    steps: int = 0
    """Steps executed."""
    started_at: float = 0.0
    """Epoch seconds."""
    ended_at: float = 0.0


@dataclass
class CallRecord:
    """Everything kept about one call, refused and failed calls included."""

    call_id: str
    """Ours (unique per call)."""
    pbx: str
    """asterisk or freeswitch."""
    pbx_call_id: str = ""
    """Asterisk `uniqueid` / FreeSWITCH `Unique-ID`."""
    caller: str = ""
    """Caller ID, masked as configured (kpi.mask_caller) before it is stored."""
    did: str = ""
    priority_class: str = ""
    started_at: float = 0.0
    """The PBX handed us the call."""
    answered_at: float | None = None
    """The agent answered (None for refused calls)."""
    ended_at: float = 0.0
    outcome: str = "completed"
    result: str = ""
    """AGENT_RESULT: DONE, TRANSFER, BUSY, ERROR."""
    reason: str = ""
    """AGENT_REASON."""
    transfer_to: str = ""
    shed_level: str = "normal"
    """The shedding level when the call was admitted (or refused)."""
    satisfaction: int | None = None
    """Post-call DTMF rating 1-5 when the prompt is enabled and the caller pressed a key."""
    barge_ins: int = 0
    turns: list[TurnKpi] = field(default_factory=list)
    integrations: list[IntegrationCall] = field(default_factory=list)
    flows: list[FlowRun] = field(default_factory=list)

    @property
    def duration_s(self) -> float:
        """Seconds from the PBX handing us the call to the end."""
        return max(0.0, self.ended_at - self.started_at)


def classify_outcome(result: str, reason: str, caller_hung_up: bool = False) -> str:
    """The KPI outcome of an ended call from its AGENT_RESULT and AGENT_REASON."""
    if result == "BUSY":
        return "refused"
    if result == "ERROR" or reason == "engine-error" or reason.startswith("internal:"):
        return "dropped"
    if result == "TRANSFER":
        return "transferred"
    if caller_hung_up or reason == "caller-hangup":
        return "abandoned"
    return "completed"
