"""Dialog layer: default agent, FAQ matching, intents, reply guard and per-call policy."""

from __future__ import annotations

import pytest
import yaml

from agent.config import AgentConfig, FaqEntry, IntentConfig, default_agent_text, parse_agent
from agent.dialog.guard import ReplyGuard, sanitize, split_sentences
from agent.dialog.intents import IntentRecognizer
from agent.dialog.knowledge import KnowledgeBase, normalize_words, numbers_in, times_in
from agent.dialog.policy import (
    ANYTHING_ELSE,
    REPROMPT,
    WELCOME,
    AskLlm,
    DialogPolicy,
    Hangup,
    SayFixed,
    StartFlow,
    Transfer,
    build_llm_messages,
    finalize_llm_reply,
    system_prompt,
)

FALLBACK = "I don't have that information. Shall I connect you to someone?"


@pytest.fixture(scope="module")
def agent() -> AgentConfig:
    return parse_agent("x", "agent", yaml.safe_load(default_agent_text())["agent"])


@pytest.fixture(scope="module")
def kb(agent: AgentConfig) -> KnowledgeBase:
    return KnowledgeBase(agent.faq, (agent.name, agent.persona))


@pytest.fixture()
def policy(agent: AgentConfig) -> DialogPolicy:
    return DialogPolicy(agent)


def _answer(agent: AgentConfig, entry_id: str) -> str:
    return next(e.answer for e in agent.faq if e.id == entry_id)


# --- default agent -------------------------------------------------------------------------


def test_default_agent_parses_with_required_content(agent: AgentConfig) -> None:
    assert agent.name == "Bright Smile Dental"
    assert agent.fallback == FALLBACK
    ids = {e.id for e in agent.faq}
    assert {"hours", "address", "parking", "insurance", "checkup_price", "cleaning_price",
            "whitening_price", "filling_price", "new_patients", "emergency_policy",
            "cancellation"} <= ids
    targets = {i.target for i in agent.intents if i.kind == "transfer"}
    assert targets == {"front-desk", "billing", "emergency"}
    assert any(i.kind == "goodbye" for i in agent.intents)


def test_default_agent_texts_are_short_enough_to_speak(agent: AgentConfig) -> None:
    assert len(split_sentences(agent.greeting)) <= 2
    for entry in agent.faq:
        assert len(split_sentences(entry.answer)) <= 2, entry.id
        assert len(entry.answer.split()) <= 35, entry.id


# --- normalisation -------------------------------------------------------------------------


def test_normalize_expands_contractions_numbers_and_times() -> None:
    assert normalize_words("What's open at Eight A.M.?") == ["what", "is", "open", "at", "8", "am"]
    assert normalize_words("two hundred and fifty dollars") == ["250", "dollars"]
    assert numbers_in("It is $1,200 or ninety-five dollars") == ["1200", "95"]
    assert times_in("from 8 a.m. to six thirty p.m. or noon") == ["8am", "6:30pm", "12pm"]
    assert normalize_words("ninety five or one twenty") == ["95", "or", "one", "20"]


# --- knowledge base ------------------------------------------------------------------------


@pytest.mark.parametrize(("question", "entry_id"), [
    ("what time are you guys open on saturday", "hours"),
    ("your open on sundays", "hours"),
    ("when do you close today", "hours"),
    ("Hi, yes, I was calling to see if you're open tomorrow.", "hours"),
    ("how much is a cleaning", "cleaning_price"),
    ("how much does a check up cost", "checkup_price"),
    ("um hi yeah i was wondering how much you charge for teeth whitening", "whitening_price"),
    ("whats the price for a filling", "filling_price"),
    ("do you take delta dental", "insurance"),
    ("do you guys accept cigna insurance", "insurance"),
    ("where are you located", "address"),
    ("what's your address", "address"),
    ("can i park there", "parking"),
    ("im a new patient what should i bring", "new_patients"),
    ("what happens if i cancel", "cancellation"),
    ("who is the dentist", "dentists"),
])
def test_faq_matches_paraphrases(kb: KnowledgeBase, question: str, entry_id: str) -> None:
    match = kb.match(question)
    assert match is not None, question
    assert match.entry.id == entry_id
    assert 0.0 < match.score <= 1.0


@pytest.mark.parametrize("question", [
    "what's the weather",
    "who won the game",
    "can you help me with my taxes",
    "where can i get pizza",
    "how much is a new car",
    "tell me a joke",
    "do you take blue cross",
    "",
])
def test_faq_ignores_off_topic(kb: KnowledgeBase, question: str) -> None:
    assert kb.match(question) is None


def test_faq_prefers_the_specific_word(kb: KnowledgeBase) -> None:
    match = kb.match("how much for a cleaning without insurance")
    assert match is not None and match.entry.id == "cleaning_price"


def test_facts_text_lists_every_answer(agent: AgentConfig, kb: KnowledgeBase) -> None:
    lines = kb.facts_text().splitlines()
    assert len(lines) == len(agent.faq)
    assert all(line.startswith("- ") for line in lines)
    assert "$95" in kb.facts_text()


def test_fact_tokens_hold_numbers_times_and_names(kb: KnowledgeBase) -> None:
    facts = kb.fact_tokens()
    assert {"95", "120", "8am", "6pm", "1pm", "lopez", "delta", "emma", "springfield"} <= facts
    assert "9pm" not in facts
    assert "smith" not in facts


# --- intents -------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "name"), [
    ("can i talk to a real person", "human"),
    ("operator", "human"),
    ("could you uh transfer me to the front desk", "human"),
    ("no, I want a person", "human"),
    ("no thanks i want to talk to someone", "human"),
    ("i have a question about my bill", "billing"),
    ("this is an emergency", "emergency"),
    ("i knocked out my tooth playing hockey", "emergency"),
    ("I'm in severe pain, can I talk to someone", "emergency"),
    ("goodbye", "goodbye"),
    ("okay thank you bye", "goodbye"),
    ("thanks that's all", "goodbye"),
    ("no thanks", "goodbye"),
    ("nothing else", "goodbye"),
])
def test_intents_recognised(agent: AgentConfig, text: str, name: str) -> None:
    intent = IntentRecognizer(agent.intents).recognize(text)
    assert intent is not None, text
    assert intent.name == name


@pytest.mark.parametrize("text", [
    "I don't need a person",
    "thank you",
    "thanks so much",
    "what are your hours",
    "it's not an emergency",
    "that's all I wanted to know about the hours what about parking",
    "",
])
def test_intents_not_recognised(agent: AgentConfig, text: str) -> None:
    assert IntentRecognizer(agent.intents).recognize(text) is None


def test_intent_precedence_is_kind_then_order() -> None:
    intents = [
        IntentConfig("bye", "goodbye", ("bye",)),
        IntentConfig("joke", "say", ("joke",), reply="No jokes here."),
        IntentConfig("desk", "transfer", ("desk",), target="front-desk"),
    ]
    recognizer = IntentRecognizer(intents)
    assert recognizer.recognize("joke at the desk bye") == intents[2]
    assert recognizer.recognize("a joke bye") == intents[1]
    assert recognizer.recognize("ok bye") == intents[0]


# --- guard ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def guard(kb: KnowledgeBase) -> ReplyGuard:
    return ReplyGuard(kb, ("Bright Smile Dental",))


@pytest.mark.parametrize("reply", [
    "A regular cleaning is $120 without insurance.",
    "Yes, we're open on Saturday from 9 a.m. to 1 p.m.",
    "Dr. Maria Lopez is one of our dentists.",
    "Sure! We are in Springfield, next to the library.",
    "Thank you for calling Bright Smile Dental.",
    "I'm Emma, how can I help?",
    "Shall I connect you to someone?",
    "Whitening trays are one hundred eighty dollars.",
])
def test_guard_accepts_grounded_replies(guard: ReplyGuard, reply: str) -> None:
    verdict = guard.check(reply)
    assert verdict.ok, verdict


@pytest.mark.parametrize(("reply", "reason", "offending"), [
    ("A cleaning costs $80.", "price", "80"),
    ("It costs forty dollars.", "price", "40"),
    ("We're open until 9 p.m. on Fridays.", "time", "9pm"),
    ("We open at noon.", "time", "12pm"),
    ("Dr. Smith can see you tomorrow.", "name", "Smith"),
    ("We're located in Boston.", "name", "Boston"),
    ("Call us at 555-123-4567.", "phone number", "5551234567"),
    ("You can email info@brightsmile.com.", "email or web address", "info@brightsmile.com"),
    ("I'll transfer you to extension 204 now.", "claims an action", "I'll transfer"),
    ("Please dial 204.", "claims to dial a number", "204"),
    ("We see about seventy patients a day.", "number", "70"),
])
def test_guard_rejects_invented_facts(guard: ReplyGuard, reply: str, reason: str,
                                      offending: str) -> None:
    verdict = guard.check(reply)
    assert not verdict.ok
    assert verdict.reason == reason
    assert offending in verdict.offending


def test_guard_rejects_empty_and_long(guard: ReplyGuard) -> None:
    assert guard.check("  ...  ").reason == "empty"
    assert guard.check(" ".join(["word"] * 60)).reason == "too long"


def test_sanitize_strips_llm_artifacts() -> None:
    raw = "Assistant: **Sure!** \U0001F600 We're open\n- 8 a.m. to 6 p.m.\nUser: thanks<|im_end|>"
    assert sanitize(raw) == "Sure! We're open 8 a.m. to 6 p.m."
    assert sanitize("# Hours\n* Monday") == "Hours Monday"


# --- policy --------------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["", "   ", "[BLANK_AUDIO]", "um uh", "(coughs)", "you"])
def test_policy_reprompts_on_noise(policy: DialogPolicy, text: str) -> None:
    assert policy.decide(text) == SayFixed(REPROMPT)


def test_policy_transfer_paths(policy: DialogPolicy, agent: AgentConfig) -> None:
    assert policy.decide("can I speak to a human") == Transfer("front-desk", agent.transfer_reply)
    assert policy.decide("I want to make an appointment") == StartFlow("booking")
    assert policy.decide("i need to schedule uh an appointment for my son") == \
        StartFlow("booking")
    billing = policy.decide("I was charged twice")
    assert isinstance(billing, Transfer) and billing.target_name == "billing"
    emergency = policy.decide("my tooth got knocked out")
    assert isinstance(emergency, Transfer) and emergency.target_name == "emergency"


def test_policy_goodbye_and_thanks(policy: DialogPolicy, agent: AgentConfig) -> None:
    assert policy.decide("ok that's all, bye") == Hangup(agent.goodbye)
    assert policy.decide("thank you") == SayFixed(WELCOME)
    assert policy.decide("no") == Hangup(agent.goodbye)


def test_policy_say_intent() -> None:
    base = parse_agent("x", "agent", yaml.safe_load(default_agent_text())["agent"])
    robot = IntentConfig("robot", "say", ("are you a robot",), reply="I'm a virtual assistant.")
    agent = AgentConfig(**{**base.__dict__, "intents": (robot,)})
    assert DialogPolicy(agent).decide("are you a robot") == SayFixed("I'm a virtual assistant.")


def test_policy_answers_faq(policy: DialogPolicy, agent: AgentConfig) -> None:
    decision = policy.decide("how much is a cleaning")
    assert decision == SayFixed(_answer(agent, "cleaning_price"))


def test_policy_asks_llm_otherwise(policy: DialogPolicy) -> None:
    assert policy.decide("do you do root canals") == AskLlm("do you do root canals")
    assert policy.decide("I don't need a person [noise]") == AskLlm("I don't need a person")


def test_policy_yes_after_offer_transfers(policy: DialogPolicy, agent: AgentConfig) -> None:
    assert policy.decide("yes please") == AskLlm("yes please")
    assert policy.finalize_llm_reply("Hmm, I'm not sure, 42 maybe.") == FALLBACK
    assert policy.decide("yes please") == Transfer("front-desk", agent.transfer_reply)


def test_policy_no_after_offer_asks_for_more(policy: DialogPolicy, agent: AgentConfig) -> None:
    policy.note_reply(FALLBACK)
    assert policy.decide("no") == SayFixed(ANYTHING_ELSE)
    assert policy.decide("nope") == Hangup(agent.goodbye)


def test_fixed_phrases_include_reprompt(policy: DialogPolicy, agent: AgentConfig) -> None:
    phrases = policy.fixed_phrases()
    assert REPROMPT in phrases and WELCOME in phrases and ANYTHING_ELSE in phrases
    assert set(agent.fixed_phrases()) <= set(phrases)
    assert len(phrases) == len(set(phrases))


def test_finalize_keeps_grounded_reply_and_truncates(policy: DialogPolicy) -> None:
    raw = ("Assistant: A regular cleaning is $120. Most plans cover it. "
           "Dr. Smith is great. We also")
    assert policy.finalize_llm_reply(raw) == "A regular cleaning is $120. Most plans cover it."


def test_finalize_replaces_ungrounded_reply(agent: AgentConfig, kb: KnowledgeBase) -> None:
    guard = ReplyGuard(kb)
    assert finalize_llm_reply("A cleaning is $80.", guard, agent.fallback) == FALLBACK
    assert finalize_llm_reply("", guard, agent.fallback) == FALLBACK
    assert finalize_llm_reply("We're open 8 a.m. Monday to Friday.", guard,
                              agent.fallback) == "We're open 8 a.m. Monday to Friday."


# --- LLM messages --------------------------------------------------------------------------


def test_system_prompt_is_identical_across_turns(agent: AgentConfig) -> None:
    first = build_llm_messages(agent, [], "do you do braces")
    second = build_llm_messages(agent, [("hi", "Hello!"), ("hours?", "8 to 6.")],
                                "and implants", brief=True)
    assert first[0]["role"] == "system"
    assert first[0]["content"] == second[0]["content"] == system_prompt(agent)
    assert agent.persona.split()[0] in first[0]["content"]
    assert "$95" in first[0]["content"]
    assert first[1:] == [{"role": "user", "content": "do you do braces"}]
    assert second[-1]["role"] == "user" and second[-1]["content"].startswith("and implants")
    assert second[-1]["content"] != "and implants"


def test_llm_messages_keep_last_two_exchanges(agent: AgentConfig) -> None:
    history = [(f"q{i}", f"a{i}") for i in range(5)]
    messages = build_llm_messages(agent, history, "now")
    assert [m["content"] for m in messages[1:]] == ["q3", "a3", "q4", "a4", "now"]
    assert [m["role"] for m in messages[1:]] == ["user", "assistant", "user", "assistant", "user"]


def test_knowledge_base_from_custom_entries() -> None:
    kb = KnowledgeBase([FaqEntry("wifi", ("is there wifi", "wifi password"), "Yes, it's free.")])
    match = kb.match("do you have wifi")
    assert match is not None and match.entry.id == "wifi"
    assert kb.match("what's the weather") is None
