"""Per-call dialog policy: what to do with each recognised caller utterance.

Pure and synchronous. The order is: noise → re-prompt; keyword intents (transfer, goodbye,
fixed reply); an answer to the agent's own yes/no question; FAQ answer; otherwise the LLM,
whose reply is sanitised and checked by the guard before it is spoken.
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass

from agent.config import AgentConfig, IntentConfig
from agent.dialog.guard import ReplyGuard, sanitize, split_sentences
from agent.dialog.intents import IntentRecognizer
from agent.dialog.knowledge import KnowledgeBase, normalize_words
from agent.flowconf import is_template

_LOGGER = logging.getLogger(__name__)

#: Said when the caller's turn held no words (noise, a cough, a recogniser hallucination).
REPROMPT = "Sorry, I didn't catch that. Could you say it again?"
#: Said when the caller only thanks the agent.
WELCOME = "You're welcome. Is there anything else I can help you with?"
#: Said when the caller declines the offer to be connected.
ANYTHING_ELSE = "Alright. Is there anything else I can help you with?"
#: The transfer target used when the caller accepts an offer to be connected.
HANDOFF_TARGET = "front-desk"
#: Sentences kept from an LLM reply.
MAX_LLM_SENTENCES = 2

_ANNOTATION = re.compile(r"\[[^\]]*\]|\([^)]*\)|\*[^*]*\*|<[^>]*>")
_NOISE_WORDS = frozenset((
    "um", "umm", "uh", "uhh", "er", "erm", "ah", "hmm", "mm", "mhm", "huh", "oh", "eh", "you",
))
_HALLUCINATIONS = ("thanks for watching", "thank you for watching", "subscribe",
                   "please like", "see you next time")
_YES_CORE = frozenset((
    "yes", "yeah", "yep", "yup", "ya", "yah", "sure", "okay", "ok", "alright", "please", "go",
))
_YES_WORDS = _YES_CORE | frozenset((
    "ahead", "do", "it", "that", "would", "be", "great", "fine", "correct", "right", "thank",
    "thanks", "you", "sounds", "good",
))
_NO_CORE = frozenset((
    "no", "nope", "nah",
))
_NO_WORDS = _NO_CORE | frozenset((
    "not", "thanks", "thank", "you", "i", "am", "good", "fine", "that", "is", "ok", "okay",
    "it", "all", "really", "right", "now",
))
_THANKS_WORDS = frozenset((
    "thank", "thanks", "you", "so", "much", "very", "a", "lot", "okay", "ok", "great",
))


@dataclass(frozen=True)
class SayFixed:
    """Speak a phrase known before the call (its audio is cached); optionally hang up after."""

    text: str
    end_call: bool = False


@dataclass(frozen=True)
class Transfer:
    """Speak `text`, then transfer the call to an allowlisted target."""

    target_name: str
    text: str


@dataclass(frozen=True)
class Hangup:
    """Speak `text`, then hang up."""

    text: str


@dataclass(frozen=True)
class StartFlow:
    """Run the named call flow (recognised from its phrases, without the LLM)."""

    name: str


@dataclass(frozen=True)
class AskLlm:
    """Generate a reply with the LLM, then pass it through `DialogPolicy.finalize_llm_reply`."""

    user_text: str


Decision = SayFixed | Transfer | Hangup | StartFlow | AskLlm


def clean_transcript(text: str) -> str:
    """The transcript without recogniser annotations such as "[BLANK_AUDIO]" or "(coughs)"."""
    return " ".join(_ANNOTATION.sub(" ", text).split())


def is_noise(text: str) -> bool:
    """Whether a transcript holds no words the caller meant (fillers, hallucinated outros)."""
    cleaned = clean_transcript(text)
    words = normalize_words(cleaned)
    if not words or all(w in _NOISE_WORDS for w in words):
        return True
    joined = " ".join(words)
    return any(joined == h or joined.startswith(h) for h in _HALLUCINATIONS)


def _only(words: list[str], allowed: frozenset[str], core: frozenset[str]) -> bool:
    return bool(words) and all(w in allowed for w in words) and any(w in core for w in words)


def _offers_connection(text: str) -> bool:
    return text.rstrip().endswith("?") and "connect you" in " ".join(normalize_words(text))


def _asks_anything_else(text: str) -> bool:
    return text.rstrip().endswith("?") and "anything else" in " ".join(normalize_words(text))


class DialogPolicy:
    """Decides each turn of one call; remembers only the question it last asked the caller."""

    def __init__(self, agent: AgentConfig) -> None:
        self.agent = agent
        self.knowledge = knowledge_for(agent)
        self.guard = ReplyGuard(self.knowledge, (agent.name,))
        self.intents = IntentRecognizer(agent.intents + flow_intents(agent))
        self._handoff = _handoff_target(agent)
        self._offered_connection = False
        self._asked_anything_else = False

    def fixed_phrases(self) -> tuple[str, ...]:
        """Every phrase this policy may speak verbatim: pre-synthesise them at start-up."""
        # a templated flow text is spoken sentence by sentence: its fixed sentences are cached
        templated = [sentence for flow in self.agent.flows for text in flow.texts()
                     if is_template(text) for sentence in split_sentences(text)
                     if not is_template(sentence)]
        return tuple(dict.fromkeys(
            (*self.agent.fixed_phrases(), REPROMPT, WELCOME, ANYTHING_ELSE, *templated)))

    def note_reply(self, text: str) -> None:
        """Record what the agent just said, so a bare "yes" or "no" can be understood."""
        self._offered_connection = _offers_connection(text)
        self._asked_anything_else = _asks_anything_else(text)

    def decide(self, text: str) -> Decision:
        """The decision for one caller utterance."""
        decision = self._decide(text)
        if not (isinstance(decision, SayFixed) and decision.text == REPROMPT):
            self.note_reply(decision.text if isinstance(decision, SayFixed) else "")
        _LOGGER.debug("decision for %r: %s", text, decision)
        return decision

    def _decide(self, text: str) -> Decision:
        if is_noise(text):
            return SayFixed(REPROMPT)
        cleaned = clean_transcript(text)
        intent = self.intents.recognize(cleaned)
        if intent is not None:
            if intent.kind == "transfer" and intent.target:
                return Transfer(intent.target, intent.reply or self.agent.transfer_reply)
            if intent.kind == "goodbye":
                return Hangup(intent.reply or self.agent.goodbye)
            if intent.kind == "flow":
                return StartFlow(intent.name)
            if intent.reply:
                return SayFixed(intent.reply)
        words = normalize_words(cleaned)
        if self._offered_connection and self._handoff and _only(words, _YES_WORDS, _YES_CORE):
            return Transfer(self._handoff, self.agent.transfer_reply)
        if _only(words, _NO_WORDS, _NO_CORE):
            if self._asked_anything_else:
                return Hangup(self.agent.goodbye)
            if self._offered_connection:
                return SayFixed(ANYTHING_ELSE)
        if all(w in _THANKS_WORDS for w in words) and ("thank" in words or "thanks" in words):
            return SayFixed(WELCOME)
        match = self.knowledge.match(cleaned)
        if match is not None:
            return SayFixed(match.entry.answer)
        return AskLlm(cleaned)

    def escape(self, text: str) -> Transfer | Hangup | None:
        """Inside a flow: a request for a person (a transfer intent) or a goodbye, else None."""
        if is_noise(text):
            return None
        intent = self.intents.recognize(clean_transcript(text))
        if intent is None:
            return None
        if intent.kind == "transfer" and intent.target:
            return Transfer(intent.target, intent.reply or self.agent.transfer_reply)
        if intent.kind == "goodbye":
            return Hangup(intent.reply or self.agent.goodbye)
        return None

    def llm_messages(self, history: Sequence[tuple[str, str]], user_text: str,
                     brief: bool = False) -> list[dict[str, str]]:
        """Chat messages for the LLM (see `build_llm_messages`)."""
        return build_llm_messages(self.agent, history, user_text, brief)

    def finalize_llm_reply(self, raw: str) -> str:
        """The text to speak for a raw LLM reply: sanitised and guarded, else the fallback."""
        reply = finalize_llm_reply(raw, self.guard, self.agent.fallback)
        self.note_reply(reply)
        return reply


def finalize_llm_reply(raw: str, guard: ReplyGuard, fallback: str) -> str:
    """Sanitise, keep the first sentences, and return it if the guard passes it, else fallback."""
    text = sanitize(raw)
    sentences = split_sentences(text)
    complete = [s for s in sentences if s[-1:] in ".!?"]
    reply = " ".join((complete or sentences)[:MAX_LLM_SENTENCES])
    verdict = guard.check(reply)
    if not verdict.ok:
        _LOGGER.info("LLM reply rejected (%s %s): %r", verdict.reason, verdict.offending, raw)
        return fallback
    return reply


def build_llm_messages(agent: AgentConfig, history: Sequence[tuple[str, str]], user_text: str,
                       brief: bool = False) -> list[dict[str, str]]:
    """System prompt (identical on every call), the last two exchanges, then the caller's turn."""
    messages = [{"role": "system", "content": system_prompt(agent)}]
    for caller, assistant in list(history)[-2:]:
        messages.append({"role": "user", "content": caller})
        messages.append({"role": "assistant", "content": assistant})
    content = " ".join(user_text.split())
    if brief:
        content += "\n(Answer in a few words.)"
    messages.append({"role": "user", "content": content})
    return messages


def flow_intents(agent: AgentConfig) -> tuple[IntentConfig, ...]:
    """The flows started by phrases, as intents of kind `flow` (named after the flow)."""
    return tuple(IntentConfig(name=f.name, kind="flow", phrases=f.phrases)
                 for f in agent.flows if f.start == "intent" and f.phrases)


@functools.lru_cache(maxsize=16)
def knowledge_for(agent: AgentConfig) -> KnowledgeBase:
    """The knowledge base of an agent, built once per agent definition."""
    return KnowledgeBase(agent.faq, (agent.name, agent.persona))


@functools.lru_cache(maxsize=16)
def system_prompt(agent: AgentConfig) -> str:
    """The fixed system prompt: persona, strict rules, then every fact the agent knows."""
    persona = " ".join(agent.persona.split())
    return (
        f"{persona}\n"
        f"You answer phone calls for {agent.name}.\n"
        "Rules: Answer in one short spoken sentence. Use only the facts below. "
        "Never make up prices, times, names or phone numbers. No lists, no emojis. "
        f"If the facts do not answer the question, say exactly: {agent.fallback}\n"
        f"Facts:\n{knowledge_for(agent).facts_text()}"
    )


def _handoff_target(agent: AgentConfig) -> str | None:
    """Where an accepted "shall I connect you?" goes: the front desk if configured."""
    targets = [i.target for i in agent.intents if i.kind == "transfer" and i.target]
    if HANDOFF_TARGET in targets:
        return HANDOFF_TARGET
    return targets[-1] if targets else None
