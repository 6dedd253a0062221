"""Call flows as declared in the agent definition (`agent.flows`), validated at load.

A flow is a named intent (phrases recognised without the LLM, or a start condition such as
after-hours) and a short list of steps::

    say:      speak a text (fixed text → cached audio; `{slot}` placeholders → synthesised)
    ask:      collect a slot (name, phone, datetime, text, yesno, choice, digits) by speech or
              keypad, with validation and up to `retries` re-prompts
    confirm:  a yes/no question; `on_no` steps run on "no" (e.g. `goto` an earlier step)
    call:     an integration (webhook); `save` keeps its JSON answer; on failure, timeout or an
              open breaker the step's `on_error` steps, else the flow's `fallback`, run at once;
              `background: true` sends it through the side-work queue instead (never waits)
    branch:   pick steps by a value (`on: "{urgent}"`, `cases: {yes: [...]}`, `default`)
    transfer: to a target of the `transfers` allowlist (or a choice slot whose every key is one)
    end:      say a last text and end the call
    goto:     continue at the step with that `id` (bounded: a flow cannot loop forever)

Every error names the file, the line, the dotted key and the reason, e.g.
``agent.yaml:57: agent.flows[0].steps[3]: unknown step 'sya' (use one of say, ask, ...)``.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

from agent.confbase import Section, kind_of, line_of
from agent.errors import ConfigError

#: slot types (the parsers live in agent.dialog.slots)
SLOT_TYPES = ("name", "phone", "datetime", "text", "yesno", "choice", "digits")
#: slot types that accept keypad entry unless `dtmf: false`
DTMF_SLOT_TYPES = frozenset(("phone", "digits", "yesno", "choice"))
STEP_KINDS = ("say", "ask", "confirm", "call", "branch", "transfer", "end", "goto")
FLOW_STARTS = ("intent", "after-hours")
#: variables every flow may use in templates
BUILTIN_VARS = frozenset(("caller_id", "did", "call_id", "agent", "now"))
#: at most this many steps run in one flow (goto loops end with outcome `failed`)
MAX_FLOW_STEPS = 60

_PLACEHOLDER = re.compile(r"\{([A-Za-z_][\w-]*)((?:\.[\w-]+)*)\}")
_ID = re.compile(r"^[A-Za-z_][\w-]*$")


def placeholders(text: str) -> list[str]:
    """The variable names (first path part) used in a template."""
    return [m.group(1) for m in _PLACEHOLDER.finditer(text)]


def is_template(text: str) -> bool:
    """Whether a text has `{var}` placeholders (so its audio cannot be cached)."""
    return bool(_PLACEHOLDER.search(text))


@dataclass(frozen=True)
class Step:
    """Fields every step has: an optional id (a `goto` target) and its line in the file."""

    id: str = ""
    line: int | None = None


@dataclass(frozen=True)
class SayStep(Step):
    """Speak a text."""

    text: str = ""


@dataclass(frozen=True)
class AskStep(Step):
    """Collect a slot by speech (and keypad where it fits) with validation and re-prompts."""

    slot: str = ""
    type: str = "text"
    prompt: str = ""
    reprompt: str = ""
    retries: int = 2
    dtmf: bool = False
    min_digits: int = 7
    max_digits: int = 15
    #: choice key → phrases (the key itself always counts)
    choices: Mapping[str, tuple[str, ...]] = field(default_factory=dict, hash=False)
    #: keypad digit → choice key
    choice_dtmf: Mapping[str, str] = field(default_factory=dict, hash=False)


@dataclass(frozen=True)
class ConfirmStep(Step):
    """A yes/no question: "yes" goes on, "no" runs `on_no` (then goes on unless it jumps)."""

    text: str = ""
    on_no: tuple[Step, ...] = ()
    retries: int = 2


@dataclass(frozen=True)
class CallStep(Step):
    """Call an integration with a templated JSON payload."""

    integration: str = ""
    payload: Mapping[str, Any] = field(default_factory=dict, hash=False)
    save: str = ""
    #: said (cached) before the call starts, so the caller hears something while it runs
    say_first: str = ""
    #: through the side-work queue: the flow never waits, failures are retried there
    background: bool = False
    #: steps run on failure; None = the flow's `fallback`
    on_error: tuple[Step, ...] | None = None


@dataclass(frozen=True)
class BranchStep(Step):
    """Run the steps of the case matching a value (compared lowercased), else `default`."""

    on: str = ""
    cases: Mapping[str, tuple[Step, ...]] = field(default_factory=dict, hash=False)
    default: tuple[Step, ...] = ()


@dataclass(frozen=True)
class TransferStep(Step):
    """Say a text, then transfer to an allowlisted target (a name, or a choice slot)."""

    target: str = ""
    text: str = ""


@dataclass(frozen=True)
class EndStep(Step):
    """Say a last text and end the call."""

    text: str = ""


@dataclass(frozen=True)
class GotoStep(Step):
    """Continue at the top-level step with this id."""

    target: str = ""


@dataclass(frozen=True)
class FlowConfig:
    """One call flow."""

    name: str
    steps: tuple[Step, ...]
    #: phrases that start it (recognised like intents, without the LLM)
    phrases: tuple[str, ...] = ()
    #: intent = when a phrase is heard; after-hours = at call start outside business hours
    start: str = "intent"
    #: steps run when an integration call fails and the step has no `on_error`
    fallback: tuple[Step, ...] = ()
    line: int | None = None

    def texts(self) -> tuple[str, ...]:
        """Every text this flow may say, templates (with `{placeholders}`) included."""
        texts: list[str] = []
        for step in walk_steps(self.steps + self.fallback):
            if isinstance(step, (SayStep, EndStep, TransferStep, ConfirmStep)):
                texts.append(step.text)
            elif isinstance(step, AskStep):
                texts += [step.prompt, step.reprompt]
            elif isinstance(step, CallStep):
                texts.append(step.say_first)
        return tuple(dict.fromkeys(t for t in texts if t))

    def fixed_phrases(self) -> tuple[str, ...]:
        """Texts without placeholders this flow may say: synthesised once at start-up."""
        return tuple(t for t in self.texts() if not is_template(t))


def case_key(value: Any) -> str:
    """A branch value as compared: lowercased text; true/yes and false/no are one value each
    (YAML reads an unquoted `yes:` key as true, JSON answers carry true/false)."""
    if isinstance(value, bool):
        return "yes" if value else "no"
    text = str(value).strip().lower()
    return {"true": "yes", "false": "no"}.get(text, text)


def walk_steps(steps: tuple[Step, ...]) -> list[Step]:
    """Every step, nested ones (on_no, on_error, cases, default) included, in order."""
    out: list[Step] = []
    for step in steps:
        out.append(step)
        if isinstance(step, ConfirmStep):
            out += walk_steps(step.on_no)
        elif isinstance(step, CallStep) and step.on_error is not None:
            out += walk_steps(step.on_error)
        elif isinstance(step, BranchStep):
            for case in step.cases.values():
                out += walk_steps(case)
            out += walk_steps(step.default)
    return out


class _FlowParser:
    """Parses one flow; knows the allowlists to check names against."""

    def __init__(self, path: str, transfers: Collection[str],
                 integrations: Collection[str]) -> None:
        self.path = path
        self.transfers = transfers
        self.integrations = integrations

    def error(self, key: str, line: int | None, reason: str) -> ConfigError:
        return ConfigError(self.path, key, reason, line)

    def steps(self, sec: Section, name: str, *, required: bool = False) -> tuple[Step, ...]:
        items = sec.items(name)
        if required and not items:
            raise sec.error(name, "must list at least one step")
        return tuple(self.step(key, item, line) for key, item, line in items)

    def step(self, key: str, item: Any, line: int | None) -> Step:
        if isinstance(item, str) and item.strip() == "end":
            return EndStep(line=line)
        if not isinstance(item, Mapping):
            raise self.error(key, line, f"a step must be a mapping such as `say: ...`, "
                                        f"got {kind_of(item)}")
        kinds = [k for k in item if k in STEP_KINDS]
        if "transfer" in kinds and "say" in kinds:
            kinds.remove("say")  # `say` is the transfer's last words
        if not kinds:
            first = next(iter(item), "")
            raise self.error(key, line_of(item, first) or line,
                             f"unknown step {str(first)!r} (use one of {', '.join(STEP_KINDS)})")
        # `transfer` with `say`, and `call` with `say_first`, are one step; anything else is two
        if len(kinds) > 1:
            raise self.error(key, line, f"one step per list item, found {' and '.join(kinds)}")
        sec = Section(self.path, key, item, line)
        step_id = sec.get_str("id", "")
        if step_id and not _ID.match(step_id):
            raise sec.error("id", f"must be a word (letters, digits, - or _), got {step_id!r}")
        kind = kinds[0]
        step: Step
        if kind == "say":
            step = SayStep(id=step_id, line=line, text=sec.text("say"))
        elif kind == "end":
            text = sec.raw("end")
            step = EndStep(id=step_id, line=line,
                           text="" if text in (None, True) else sec.get_str("end"))
        elif kind == "goto":
            step = GotoStep(id=step_id, line=line, target=sec.text("goto"))
        elif kind == "transfer":
            target = sec.text("transfer")
            if not is_template(target) and target not in self.transfers:
                raise sec.error("transfer", f"{target!r} is not in the `transfers` allowlist "
                                            f"({', '.join(self.transfers) or 'empty'})")
            step = TransferStep(id=step_id, line=line, target=target,
                                text=sec.get_str("say", ""))
        elif kind == "ask":
            step = self.ask(sec, step_id, line)
        elif kind == "confirm":
            step = ConfirmStep(id=step_id, line=line, text=sec.text("confirm"),
                               on_no=self.steps(sec, "on_no"),
                               retries=sec.get_int("retries", 2, 0, 5))
        elif kind == "call":
            integration = sec.text("call")
            if integration not in self.integrations:
                raise sec.error("call", f"unknown integration {integration!r} (declared: "
                                        f"{', '.join(self.integrations) or 'none'})")
            payload = sec.raw("with", {})
            if not isinstance(payload, Mapping):
                raise sec.error("with", f"must map payload keys to values, got "
                                        f"{kind_of(payload)}")
            background = sec.get_bool("background", False)
            save = sec.get_str("save", "")
            if save and not _ID.match(save):
                raise sec.error("save", f"must be a word, got {save!r}")
            if background and (save or "on_error" in sec.data):
                raise sec.error("background", "a background call cannot `save` or have "
                                              "`on_error`: the flow does not wait for it")
            step = CallStep(id=step_id, line=line, integration=integration,
                            payload=dict(payload), save=save,
                            say_first=sec.get_str("say_first", ""), background=background,
                            on_error=self.steps(sec, "on_error") if "on_error" in sec.data
                            else None)
            sec.used.add("on_error")
        else:  # branch
            raw_cases = sec.sub("cases")
            cases_sec = Section(self.path, raw_cases.prefix,
                                {case_key(k): v for k, v in raw_cases.data.items()},
                                raw_cases.line)
            cases: dict[str, tuple[Step, ...]] = {}
            for value in cases_sec.data:
                cases[value] = self.steps(cases_sec, value)
            if not cases:
                raise sec.error("cases", "a branch needs at least one case")
            step = BranchStep(id=step_id, line=line, on=sec.text("branch"), cases=cases,
                              default=self.steps(sec, "default"))
        sec.check_unknown()
        return step

    def ask(self, sec: Section, step_id: str, line: int | None) -> AskStep:
        slot = sec.text("ask")
        if not _ID.match(slot):
            raise sec.error("ask", f"a slot name must be a word, got {slot!r}")
        kind = sec.get_str("type", "text")
        if kind not in SLOT_TYPES:
            raise sec.error("type", f"unknown slot type {kind!r} (use one of "
                                    f"{', '.join(SLOT_TYPES)})")
        choices: dict[str, tuple[str, ...]] = {}
        choice_dtmf: dict[str, str] = {}
        if kind == "choice":
            raw = sec.sub("choices")
            for key in raw.data:
                opt = raw.sub(str(key))
                choices[str(key)] = opt.strings("phrases", required=False)
                digit = opt.get_str("dtmf", "")
                if digit:
                    if len(digit) != 1 or digit not in "0123456789*":
                        raise opt.error("dtmf", f"must be one keypad key, got {digit!r}")
                    if digit in choice_dtmf:
                        raise opt.error("dtmf", f"key {digit} is already used by "
                                                f"{choice_dtmf[digit]!r}")
                    choice_dtmf[digit] = str(key)
                opt.check_unknown()
            if len(choices) < 2:
                raise sec.error("choices", "a choice slot needs at least two choices")
        elif "choices" in sec.data:
            raise sec.error("choices", f"only a choice slot has choices (this is {kind})")
        min_digits = sec.get_int("min_digits", 7, 1, 32)
        max_digits = sec.get_int("max_digits", 15, 1, 32)
        if min_digits > max_digits:
            raise sec.error("min_digits", f"must not exceed max_digits ({max_digits})")
        return AskStep(id=step_id, line=line, slot=slot, type=kind, prompt=sec.text("prompt"),
                       reprompt=sec.get_str("reprompt", ""),
                       retries=sec.get_int("retries", 2, 0, 5),
                       dtmf=sec.get_bool("dtmf", kind in DTMF_SLOT_TYPES),
                       min_digits=min_digits, max_digits=max_digits,
                       choices=choices, choice_dtmf=choice_dtmf)

    def flow(self, key: str, item: Any, line: int | None) -> FlowConfig:
        sec = Section(self.path, key, item, line)
        name = sec.text("name")
        if not _ID.match(name):
            raise sec.error("name", f"must be a word (letters, digits, - or _), got {name!r}")
        start = sec.get_str("start", "intent", choices=FLOW_STARTS)
        phrases = sec.strings("phrases", required=start == "intent")
        flow = FlowConfig(name=name, steps=self.steps(sec, "steps", required=True),
                          phrases=phrases, start=start,
                          fallback=self.steps(sec, "fallback"), line=sec.line)
        sec.check_unknown()
        self.check_flow(flow, key)
        return flow

    def check_flow(self, flow: FlowConfig, key: str) -> None:
        """Cross-step checks: goto targets, variables defined, transfer templates, fallback."""
        ids = [s.id for s in flow.steps if s.id]
        dupes = {i for i in ids if ids.count(i) > 1}
        if dupes:
            raise self.error(key, flow.line, f"duplicate step id {sorted(dupes)[0]!r}")
        everything = walk_steps(flow.steps + flow.fallback)
        nested_ids = [s for s in everything if s.id and s.id not in ids]
        if nested_ids:
            step = nested_ids[0]
            raise self.error(key, step.line, f"step id {step.id!r}: only top-level steps may "
                                             "have an id (a goto target)")
        slots = {s.slot: s for s in everything if isinstance(s, AskStep)}
        defined = set(BUILTIN_VARS) | set(slots) | {
            s.save for s in everything if isinstance(s, CallStep) and s.save}
        needs_fallback = False
        for step in everything:
            if isinstance(step, GotoStep) and step.target not in ids:
                raise self.error(key, step.line, f"goto {step.target!r}: no top-level step "
                                                 f"has that id ({', '.join(ids) or 'none'})")
            for text in _texts_of(step):
                for var in placeholders(text):
                    if var not in defined:
                        raise self.error(key, step.line, f"{{{var}}} is not a slot, a saved "
                                                         "result or a built-in "
                                                         f"({', '.join(sorted(BUILTIN_VARS))})")
            if isinstance(step, TransferStep) and is_template(step.target):
                names = placeholders(step.target)
                slot = slots.get(names[0]) if len(names) == 1 else None
                if (slot is None or slot.type != "choice"
                        or step.target != "{" + names[0] + "}"):
                    raise self.error(key, step.line, f"transfer {step.target!r}: a template "
                                                     "target must be exactly one choice slot")
                missing = [c for c in slot.choices if c not in self.transfers]
                if missing:
                    raise self.error(key, step.line, f"transfer {step.target!r}: choice "
                                                     f"{missing[0]!r} is not in the "
                                                     "`transfers` allowlist")
            if isinstance(step, CallStep) and not step.background and step.on_error is None:
                needs_fallback = True
        if needs_fallback and not flow.fallback:
            raise self.error(key, flow.line, "a flow that calls an integration needs a "
                                             "`fallback` (or `on_error` on each call step): "
                                             "the caller must never wait on a dead system")


def _texts_of(step: Step) -> list[str]:
    if isinstance(step, (SayStep, EndStep, ConfirmStep)):
        return [step.text]
    if isinstance(step, TransferStep):
        return [step.text, step.target]
    if isinstance(step, AskStep):
        return [step.prompt, step.reprompt]
    if isinstance(step, BranchStep):
        return [step.on]
    if isinstance(step, CallStep):
        return [step.say_first, *_payload_texts(step.payload)]
    return []


def _payload_texts(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, Mapping):
        return [t for v in value.values() for t in _payload_texts(v)]
    if isinstance(value, list):
        return [t for v in value for t in _payload_texts(v)]
    return []


def parse_flows(sec: Section, transfers: Collection[str],
                integrations: Collection[str]) -> tuple[FlowConfig, ...]:
    """The `flows` list of an agent definition section."""
    parser = _FlowParser(sec.path, transfers, integrations)
    flows: list[FlowConfig] = []
    for key, item, line in sec.items("flows"):
        flow = parser.flow(key, item, line)
        if any(f.name == flow.name for f in flows):
            raise ConfigError(sec.path, f"{key}.name", f"duplicate flow name {flow.name!r}",
                              flow.line)
        flows.append(flow)
    if sum(1 for f in flows if f.start == "after-hours") > 1:
        raise sec.error("flows", "only one flow may start after-hours")
    return tuple(flows)
