"""Runs one call flow (see `agent.flowconf`) against a caller, one step at a time.

Pure logic and runtime-neutral: everything that touches the call goes through a
:class:`FlowIO` (speak, listen for speech or keypad digits, call an integration, queue side
work, recognise a request to leave the flow, the local time). The call session implements it
over real audio; tests implement it with a scripted caller.

A flow ends in one of the KPI outcomes of :data:`agent.kpi.model.FLOW_OUTCOMES`:
``completed`` (its steps ran out, an `end`, or a designed `transfer`), ``fallback`` (an
integration failed and the declared fallback ran), ``escalated`` (the caller asked for a
person or said goodbye mid-flow), ``abandoned`` (the call ended mid-flow) and ``failed``
(re-prompts exhausted, a loop, an internal error: the caller goes to a human).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

from agent.dialog.slots import SlotRules, SlotValue, parse_dtmf, parse_speech, spoken_datetime
from agent.flowconf import (
    MAX_FLOW_STEPS,
    AskStep,
    BranchStep,
    CallStep,
    ConfirmStep,
    EndStep,
    FlowConfig,
    GotoStep,
    SayStep,
    Step,
    TransferStep,
    case_key,
)

_LOGGER = logging.getLogger(__name__)

#: Said (before handing over) when a flow cannot go on: re-prompts exhausted, an error.
HANDOFF_TEXT = "I'm sorry, let me connect you to someone who can help."

_VAR = re.compile(r"\{([A-Za-z_][\w-]*)((?:\.[\w-]+)*)\}")
_ISO = re.compile(r"^\d{4}-\d{2}-\d{2}(?:[T ]\d{2}:\d{2}(?::\d{2})?)?$")


@dataclass(frozen=True)
class Heard:
    """What the caller gave for one question: speech text and/or keypad digits."""

    text: str = ""
    dtmf: str = ""

    @property
    def empty(self) -> bool:
        """No words and no keys (the no-input timer fired)."""
        return not self.text.strip() and not self.dtmf


@dataclass(frozen=True)
class CallAnswer:
    """An integration's answer as the flow sees it."""

    ok: bool
    data: Any = None
    error: str = ""


@dataclass(frozen=True)
class FlowResult:
    """How a flow run ended and what the call does next."""

    outcome: str
    #: continue (back to the conversation), end (hang up), transfer (to `target`)
    action: str = "continue"
    #: a `transfers` name; "" with action transfer = the configured human fallback
    target: str = ""
    #: the last words to say before ending or transferring ("" = the agent's default)
    text: str = ""
    steps: int = 0
    detail: str = ""


class FlowAborted(Exception):
    """The call ended while the flow ran (raised by FlowIO methods)."""


class FlowIO(Protocol):
    """What a flow needs from the call."""

    def say(self, text: str) -> None:
        """Queue speech for the caller (returns once queued; barge-in is the IO's business)."""

    def listen(self, ask: AskStep) -> Heard | None:
        """The caller's next answer (speech or keypad), Heard() on no input, None when gone."""

    def call(self, integration: str, payload: dict[str, Any]) -> CallAnswer:
        """Call an integration; bounded by its timeout and breaker, never raises."""

    def background(self, integration: str, payload: dict[str, Any]) -> None:
        """Queue side work for an integration (never waits)."""

    def escape(self, text: str) -> FlowResult | None:
        """A request to leave the flow (a person, goodbye) in the caller's words, else None."""

    def now(self) -> datetime:
        """The local time in the business's timezone."""


class RenderError(ValueError):
    """A template names a variable with no value (e.g. a saved result without that field)."""


@dataclass
class _Goto:
    target: str


@dataclass
class FlowRunner:
    """Runs one flow to its end; ``vars`` holds the slots and saved results afterwards."""

    flow: FlowConfig
    io: FlowIO
    #: the transfer allowlist names (checked again at run time)
    transfers: Collection[str]
    builtins: Mapping[str, Any] = field(default_factory=dict)
    vars: dict[str, Any] = field(default_factory=dict)
    steps_run: int = 0
    fallback_taken: bool = False
    #: called with (integration, ok) for every integration call made (for tests and logs)
    on_call: Callable[[str, bool], None] | None = None

    def run(self) -> FlowResult:
        """Execute the flow; never raises (errors become outcome ``failed``)."""
        self.vars.update(self.builtins)
        try:
            result = self._run_top()
        except FlowAborted:
            result = FlowResult("abandoned", action="end", detail="call ended")
        except RenderError as exc:
            _LOGGER.warning("flow %s: %s", self.flow.name, exc)
            result = FlowResult("failed", action="transfer", text=HANDOFF_TEXT,
                                detail=f"template: {exc}")
        except Exception as exc:  # a flow bug hands the caller to a person, never a dead line
            _LOGGER.exception("flow %s failed", self.flow.name)
            result = FlowResult("failed", action="transfer", text=HANDOFF_TEXT,
                                detail=f"error: {exc!r}")
        result = FlowResult(result.outcome, result.action, result.target, result.text,
                            self.steps_run, result.detail)
        _LOGGER.info("flow %s: %s after %d steps (%s)", self.flow.name, result.outcome,
                     result.steps, result.detail or result.action)
        return result

    # -- control ------------------------------------------------------------------------------

    def _run_top(self) -> FlowResult:
        steps = self.flow.steps
        index = 0
        while index < len(steps):
            signal = self._step(steps[index])
            if isinstance(signal, FlowResult):
                return signal
            if isinstance(signal, _Goto):
                index = self._index_of(signal.target)
                continue
            index += 1
        outcome = "fallback" if self.fallback_taken else "completed"
        return FlowResult(outcome, action="continue", detail="steps done")

    def _index_of(self, step_id: str) -> int:
        for i, step in enumerate(self.flow.steps):
            if step.id == step_id:
                return i
        raise ValueError(f"goto {step_id!r}: no such step")  # flowconf makes this unreachable

    def _block(self, steps: tuple[Step, ...]) -> FlowResult | _Goto | None:
        for step in steps:
            signal = self._step(step)
            if signal is not None:
                return signal
        return None

    def _step(self, step: Step) -> FlowResult | _Goto | None:
        self.steps_run += 1
        if self.steps_run > MAX_FLOW_STEPS:
            return FlowResult("failed", action="transfer", text=HANDOFF_TEXT,
                              detail=f"more than {MAX_FLOW_STEPS} steps")
        if isinstance(step, SayStep):
            self.io.say(self.render(step.text))
            return None
        if isinstance(step, AskStep):
            return self._ask(step)
        if isinstance(step, ConfirmStep):
            return self._confirm(step)
        if isinstance(step, CallStep):
            return self._call(step)
        if isinstance(step, BranchStep):
            value = case_key(self.render(step.on))
            case = step.cases.get(value, step.default)
            return self._block(case)
        if isinstance(step, TransferStep):
            target = self.render_value(step.target) if "{" in step.target else step.target
            if isinstance(target, SlotValue):
                target = target.value
            if target not in self.transfers:  # flowconf checks this; stay safe at run time
                return FlowResult("failed", action="transfer", text=HANDOFF_TEXT,
                                  detail=f"transfer target {target!r} not allowed")
            return FlowResult("fallback" if self.fallback_taken else "completed",
                              action="transfer", target=str(target),
                              text=self.render(step.text), detail=f"transfer {target}")
        if isinstance(step, EndStep):
            return FlowResult("fallback" if self.fallback_taken else "completed",
                              action="end", text=self.render(step.text), detail="end")
        if isinstance(step, GotoStep):
            return _Goto(step.target)
        raise TypeError(f"unknown step {step!r}")

    # -- steps --------------------------------------------------------------------------------

    def _ask(self, step: AskStep) -> FlowResult | None:
        rules = SlotRules(kind=step.type, choices=dict(step.choices),
                          choice_dtmf=dict(step.choice_dtmf), min_digits=step.min_digits,
                          max_digits=step.max_digits)
        prompt = step.prompt
        for _attempt in range(step.retries + 1):
            self.io.say(self.render(prompt))
            heard = self.io.listen(step)
            if heard is None:
                raise FlowAborted()
            prompt = step.reprompt or step.prompt
            value: SlotValue | None = None
            if heard.dtmf and step.dtmf:
                value = parse_dtmf(rules, heard.dtmf)
            elif heard.text.strip():
                parse_first = step.type in ("yesno", "choice")
                if not parse_first:
                    escape = self.io.escape(heard.text)
                    if escape is not None:
                        return escape
                value = parse_speech(rules, heard.text, self.io.now())
                if value is None and parse_first:
                    escape = self.io.escape(heard.text)
                    if escape is not None:
                        return escape
            if value is not None:
                self.vars[step.slot] = value
                _LOGGER.debug("flow %s: slot %s filled", self.flow.name, step.slot)
                return None
        return FlowResult("failed", action="transfer", text=HANDOFF_TEXT,
                          detail=f"no valid {step.slot} after {step.retries + 1} tries")

    def _confirm(self, step: ConfirmStep) -> FlowResult | _Goto | None:
        ask = AskStep(slot="_confirm", type="yesno", prompt=step.text, retries=step.retries,
                      dtmf=True, line=step.line)
        signal = self._ask(ask)
        if signal is not None:
            return signal
        answer = self.vars.pop("_confirm")
        if answer.value == "yes":
            return None
        return self._block(step.on_no)

    def _call(self, step: CallStep) -> FlowResult | _Goto | None:
        payload = self.render_payload(step.payload)
        if step.background:
            self.io.background(step.integration, payload)
            return None
        if step.say_first:
            self.io.say(self.render(step.say_first))
        answer = self.io.call(step.integration, payload)
        if self.on_call is not None:
            self.on_call(step.integration, answer.ok)
        if answer.ok:
            if step.save:
                self.vars[step.save] = answer.data if answer.data is not None else {}
            return None
        self.fallback_taken = True
        _LOGGER.info("flow %s: %s failed (%s): taking the %s", self.flow.name,
                     step.integration, answer.error or "error",
                     "step's on_error" if step.on_error is not None else "flow's fallback")
        if step.on_error is not None:
            return self._block(step.on_error)
        signal = self._block(self.flow.fallback)
        if signal is None:  # the flow's fallback ran to its end: the flow is over
            return FlowResult("fallback", action="continue",
                              detail=f"{step.integration}: {answer.error or 'failed'}")
        return signal

    # -- templates ----------------------------------------------------------------------------

    def render_value(self, template: str) -> Any:
        """The value of a template that is exactly one placeholder (raw, not stringified)."""
        m = _VAR.fullmatch(template.strip())
        if not m:
            return self.render(template)
        return self._lookup(m.group(1), m.group(2))

    def _lookup(self, name: str, path: str) -> Any:
        if name not in self.vars:
            raise RenderError(f"{{{name}}} has no value yet")
        value = self.vars[name]
        for part in [p for p in path.split(".") if p]:
            if isinstance(value, SlotValue) and part in ("value", "spoken"):
                value = getattr(value, part)
            elif isinstance(value, Mapping) and part in value:
                value = value[part]
            else:
                raise RenderError(f"{{{name}{path}}}: no field {part!r}")
        return value

    def render(self, template: str) -> str:
        """A text to speak: slots read back in their spoken form, ISO dates in words."""
        def spoken(m: re.Match[str]) -> str:
            return _spoken(self._lookup(m.group(1), m.group(2)))
        return _VAR.sub(spoken, template)

    def render_payload(self, payload: Any) -> Any:
        """An integration payload: placeholders replaced by machine values (raw when whole)."""
        if isinstance(payload, str):
            m = _VAR.fullmatch(payload.strip())
            if m:
                return _machine(self._lookup(m.group(1), m.group(2)))
            return _VAR.sub(lambda m: str(_machine(self._lookup(m.group(1), m.group(2)))),
                            payload)
        if isinstance(payload, Mapping):
            return {str(k): self.render_payload(v) for k, v in payload.items()}
        if isinstance(payload, list):
            return [self.render_payload(v) for v in payload]
        return payload


def _spoken(value: Any) -> str:
    if isinstance(value, SlotValue):
        return value.spoken
    if isinstance(value, bool):
        return "yes" if value else "no"
    if value is None:
        return ""
    if isinstance(value, str) and _ISO.match(value.strip()):
        return spoken_datetime(value.strip().replace(" ", "T")[:16]) or value
    return str(value)


def _machine(value: Any) -> Any:
    if isinstance(value, SlotValue):
        return value.value
    return value
