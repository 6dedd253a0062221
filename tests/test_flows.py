"""Flow engine with a scripted caller, and flow definitions refused at load with file:line."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from agent.config import default_config, parse_config
from agent.dialog.flows import CallAnswer, FlowResult, FlowRunner, Heard
from agent.dialog.policy import DialogPolicy, StartFlow, Transfer
from agent.errors import ConfigError
from agent.flowconf import AskStep, FlowConfig, TransferStep

TZ = ZoneInfo("America/New_York")
NOW = datetime(2026, 11, 27, 10, 0, tzinfo=TZ)  # a Friday morning


@dataclass
class ScriptedIO:
    """A caller who answers each question from a list; integrations answer from a function."""

    answers: list[Heard | None]
    integrations: Callable[[str, dict[str, Any]], CallAnswer] = (
        lambda name, payload: CallAnswer(True, {}))
    said: list[str] = field(default_factory=list)
    asked: list[str] = field(default_factory=list)
    calls: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    queued: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    policy: DialogPolicy | None = None

    def say(self, text: str) -> None:
        self.said.append(text)

    def listen(self, ask: AskStep) -> Heard | None:
        self.asked.append(ask.slot)
        if not self.answers:
            return None  # the caller hung up
        return self.answers.pop(0)

    def call(self, integration: str, payload: dict[str, Any]) -> CallAnswer:
        self.calls.append((integration, payload))
        return self.integrations(integration, payload)

    def background(self, integration: str, payload: dict[str, Any]) -> None:
        self.queued.append((integration, payload))

    def escape(self, text: str) -> FlowResult | None:
        if self.policy is None:
            return None
        decision = self.policy.escape(text)
        if isinstance(decision, Transfer):
            return FlowResult("escalated", "transfer", decision.target_name, decision.text)
        if decision is not None:
            return FlowResult("escalated", "end", text=decision.text)
        return None

    def now(self) -> datetime:
        return NOW


CONFIG = default_config()
TRANSFERS = tuple(CONFIG.transfers)


def flow(name: str) -> FlowConfig:
    found = CONFIG.agent.flow(name)
    assert found is not None
    return found


def calendar(name: str, payload: dict[str, Any]) -> CallAnswer:
    if name == "calendar-availability":
        assert payload == {"when": "2026-11-30T10:00"}
        return CallAnswer(True, {"available": True, "start": "2026-11-30T10:00"})
    if name == "calendar-booking":
        return CallAnswer(True, {"booking_id": "BK-0001", "start": payload["start"]})
    raise AssertionError(name)


def run(name: str, io: ScriptedIO) -> tuple[FlowResult, FlowRunner]:
    io.policy = DialogPolicy(CONFIG.agent)
    runner = FlowRunner(flow(name), io, TRANSFERS,
                        builtins={"caller_id": "+15551230000", "now": NOW.isoformat()})
    return runner.run(), runner


def test_booking_happy_path_with_keypad_phone_number() -> None:
    io = ScriptedIO([Heard("My name is John Smith."), Heard(dtmf="5551234567"),
                     Heard("Monday at 10 a.m."), Heard("Yes, please.")], calendar)
    result, runner = run("booking", io)
    assert result.outcome == "completed" and result.action == "continue"
    assert io.asked == ["name", "phone", "when", "_confirm"]
    assert runner.vars["name"].value == "John Smith"
    assert runner.vars["phone"].value == "5551234567"
    assert [c[0] for c in io.calls] == ["calendar-availability", "calendar-booking"]
    assert io.calls[1][1] == {"start": "2026-11-30T10:00", "name": "John Smith",
                              "phone": "5551234567", "caller_id": "+15551230000"}
    assert "Let me check the calendar." in io.said
    assert "The first free time is Monday, November 30 at 10 AM. Shall I book it for you?" \
        in io.said
    assert io.said[-1].startswith("You're booked, John Smith, for Monday, November 30 at 10 AM.")
    assert "5 5 5, 1 2 3, 4 5 6 7" in io.said[-1]


def test_invalid_answers_are_reprompted_then_accepted() -> None:
    io = ScriptedIO([Heard("John Smith"), Heard("uh I don't know"), Heard(""),
                     Heard("five five five one two three four five six seven"),
                     Heard("tomorrow at 10"), Heard("Sure.")],
                    lambda n, p: CallAnswer(True, {"available": True,
                                                   "start": "2026-11-28T10:00"}))
    result, runner = run("booking", io)
    assert result.outcome == "completed"
    assert io.asked == ["name", "phone", "phone", "phone", "when", "_confirm"]
    reprompt = "Please say your phone number digit by digit, or type it on your keypad."
    assert io.said.count(reprompt) == 2
    assert runner.vars["phone"].value == "5551234567"


def test_reprompts_exhausted_hand_the_caller_to_a_person() -> None:
    io = ScriptedIO([Heard("banana"), Heard("12"), Heard(""), Heard(dtmf="99")])
    result, _ = run("booking", io)
    # "banana" is accepted as a name; the phone number never comes
    assert result.outcome == "failed" and result.action == "transfer"
    assert result.target == ""  # the configured human fallback
    assert io.asked == ["name", "phone", "phone", "phone"]


def test_deny_goes_back_to_the_day_question() -> None:
    slots = iter(["2026-11-30T10:00", "2026-12-01T14:00"])

    def cal(name: str, payload: dict[str, Any]) -> CallAnswer:
        if name == "calendar-availability":
            return CallAnswer(True, {"available": True, "start": next(slots)})
        return CallAnswer(True, {"booking_id": "BK-1"})

    io = ScriptedIO([Heard("Ann Lee"), Heard(dtmf="5551234567"), Heard("Monday at 10"),
                     Heard("No, that doesn't work."), Heard("Tuesday afternoon"),
                     Heard(dtmf="1")], cal)
    result, _ = run("booking", io)
    assert result.outcome == "completed"
    assert io.asked == ["name", "phone", "when", "_confirm", "when", "_confirm"]
    assert io.calls[-1][1]["start"] == "2026-12-01T14:00"


def test_no_free_slot_asks_for_another_day() -> None:
    answers = iter([{"available": False}, {"available": True, "start": "2026-12-02T09:00"}])

    def cal(name: str, payload: dict[str, Any]) -> CallAnswer:
        return CallAnswer(True, next(answers) if name == "calendar-availability" else {})

    io = ScriptedIO([Heard("Ann Lee"), Heard(dtmf="5551234567"), Heard("Monday"),
                     Heard("Wednesday morning"), Heard("yes")], cal)
    result, _ = run("booking", io)
    assert result.outcome == "completed"
    assert "Sorry, I couldn't find a free time then." in io.said


def test_calendar_failure_takes_the_fallback_and_a_message_off_the_call_path() -> None:
    io = ScriptedIO([Heard("Ann Lee"), Heard(dtmf="5551234567"), Heard("Monday at 10"),
                     Heard("No thanks.")],
                    lambda n, p: CallAnswer(False, error="timeout"))
    result, _ = run("booking", io)
    assert result.outcome == "fallback" and result.action == "end"
    assert [c[0] for c in io.calls] == ["calendar-availability"]  # no booking attempted
    assert io.queued == [("messages", {"kind": "booking-request", "name": "Ann Lee",
                                       "phone": "5551234567", "when": "2026-11-30T10:00",
                                       "caller_id": "+15551230000"})]
    assert "we'll call you back on 5 5 5, 1 2 3, 4 5 6 7" in result.text


def test_calendar_failure_then_yes_transfers_to_the_front_desk() -> None:
    io = ScriptedIO([Heard("Ann Lee"), Heard(dtmf="5551234567"), Heard("Monday at 10"),
                     Heard("yes please")], lambda n, p: CallAnswer(False, error="breaker-open"))
    result, _ = run("booking", io)
    assert result.outcome == "fallback"
    assert (result.action, result.target) == ("transfer", "front-desk")


def test_asking_for_a_person_mid_flow_escalates() -> None:
    io = ScriptedIO([Heard("Can I just talk to a real person?")])
    result, _ = run("booking", io)
    assert result.outcome == "escalated"
    assert (result.action, result.target) == ("transfer", "front-desk")


def test_hangup_mid_flow_is_abandoned() -> None:
    io = ScriptedIO([Heard("Ann Lee")])
    result, _ = run("booking", io)
    assert result.outcome == "abandoned" and result.action == "end"


@pytest.mark.parametrize(("answer", "target"), [
    (Heard("billing please"), "billing"),
    (Heard("the front desk"), "front-desk"),
    (Heard(dtmf="3"), "emergency"),
    (Heard(dtmf="1"), "billing"),
])
def test_route_to_a_department_by_speech_or_keypad(answer: Heard, target: str) -> None:
    io = ScriptedIO([answer])
    result, _ = run("route", io)
    assert (result.outcome, result.action, result.target) == ("completed", "transfer", target)
    assert target in CONFIG.transfers


def test_route_refuses_a_key_with_no_department() -> None:
    io = ScriptedIO([Heard(dtmf="9"), Heard("pizza"), Heard(dtmf="2")])
    result, _ = run("route", io)
    assert result.target == "front-desk"
    assert io.asked == ["department"] * 3


def test_after_hours_urgent_caller_goes_to_on_call() -> None:
    io = ScriptedIO([Heard("yes")])
    result, _ = run("after-hours", io)
    assert (result.action, result.target) == ("transfer", "emergency")


def test_after_hours_message_is_queued_and_the_call_ends() -> None:
    io = ScriptedIO([Heard(dtmf="2"), Heard("It's Maria Garcia"), Heard(dtmf="5559876543"),
                     Heard("I need to move my cleaning next week.")])
    result, _ = run("after-hours", io)
    assert result.outcome == "completed" and result.action == "end"
    assert result.text.startswith("Thank you, Maria Garcia.")
    assert io.calls == []  # nothing on the call path
    [(name, payload)] = io.queued
    assert name == "messages" and payload["message"] == "I need to move my cleaning next week."
    assert payload["received"] == NOW.isoformat()


def test_a_missing_value_hands_the_caller_to_a_person() -> None:
    io = ScriptedIO([Heard(dtmf="2"), Heard("It's Maria Garcia"), Heard(dtmf="5559876543"),
                     Heard("I need to move my cleaning next week.")])
    io.policy = DialogPolicy(CONFIG.agent)
    result = FlowRunner(flow("after-hours"), io, TRANSFERS).run()  # no built-ins given
    assert result.outcome == "failed" and result.action == "transfer"
    assert "has no value" in result.detail


def test_policy_starts_flows_from_their_phrases() -> None:
    policy = DialogPolicy(CONFIG.agent)
    assert policy.decide("I'd like to book an appointment") == StartFlow("booking")
    assert policy.decide("Which department handles this?") == StartFlow("route")
    # an explicit request for a person still wins over a flow
    assert isinstance(policy.decide("I want a person to book an appointment"), Transfer)


def test_a_target_outside_the_allowlist_is_refused_at_run_time_too() -> None:
    # flowconf refuses it at load; a hand-built flow checks the runner's own guard
    bad = FlowConfig(name="x", steps=(TransferStep(target="+15559990000", text="Dialling."),))
    result = FlowRunner(bad, ScriptedIO([]), ("front-desk",)).run()
    assert (result.outcome, result.action, result.target) == ("failed", "transfer", "")
    assert "not allowed" in result.detail


def test_a_goto_loop_ends_as_failed() -> None:
    cfg = parse_config(FLOW_YAML.format(steps="""
        - id: top
          say: "Again."
        - goto: top"""), "loop.yaml")
    io = ScriptedIO([])
    result = FlowRunner(cfg.agent.flows[0], io, ("front-desk",)).run()
    assert result.outcome == "failed" and result.action == "transfer"


FLOW_YAML = """
transfers: {{front-desk: "PJSIP/100"}}
integrations:
  cal: {{url: "http://127.0.0.1:9/x"}}
agent:
  name: Shop
  persona: You sell bikes.
  greeting: Hello.
  goodbye: Bye.
  fallback: I don't know.
  transfer_reply: One moment.
  flows:
    - name: test
      phrases: [test me]
      steps:{steps}
"""


@pytest.mark.parametrize(("steps", "line", "reason"), [
    ("""
        - sya: "Hello\"""", 16, "unknown step 'sya'"),
    ("""
        - say: "Hi"
        - transfer: sales""", 17, "'sales' is not in the `transfers` allowlist"),
    ("""
        - ask: n
          type: colour
          prompt: "Which?\"""", 17, "unknown slot type 'colour'"),
    ("""
        - call: crm
          with: {}""", 16, "unknown integration 'crm'"),
    ("""
        - call: cal""", 13, "needs a `fallback`"),
    ("""
        - say: "Hello {nobody}\"""", 16, "{nobody} is not a slot"),
    ("""
        - goto: nowhere""", 16, "goto 'nowhere'"),
    ("""
        - ask: d
          type: choice
          prompt: "Which?"
          choices: {a: {dtmf: "1"}, b: {dtmf: "1"}}""", 19, "key 1 is already used"),
    ("""
        - ask: d
          type: choice
          prompt: "Which?"
          choices: {a: {}, b: {}}
        - transfer: "{d}\"""", 20, "choice 'a' is not in the `transfers` allowlist"),
])
def test_bad_flows_are_refused_with_file_line_and_reason(steps: str, line: int,
                                                         reason: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(FLOW_YAML.format(steps=steps), "/etc/pbx-agent/agent.yaml")
    assert reason in info.value.reason
    assert info.value.line == line, str(info.value)
    assert str(info.value).startswith(f"/etc/pbx-agent/agent.yaml:{line}: agent.flows[0]")


def test_flow_fixed_texts_are_cached_phrases_and_templates_are_not() -> None:
    phrases = CONFIG.agent.fixed_phrases()
    assert "Let me check the calendar." in phrases
    assert "What day and time would suit you?" in phrases
    assert not any("{" in p for p in phrases)
