"""Keyword intents (transfer, goodbye, fixed reply) recognised without the LLM."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from agent.config import IntentConfig
from agent.dialog.knowledge import normalize_words, stem

_LOGGER = logging.getLogger(__name__)

#: Words dropped from both phrase and caller text, so "book uh an appointment" still matches.
FILLER_WORDS = frozenset((
    "a", "an", "the", "um", "umm", "uh", "uhh", "er", "erm", "ah", "hmm", "mm", "like",
    "just", "please", "actually", "so", "well",
))
#: Words that negate a phrase starting within `NEGATION_WINDOW` words after them.
NEGATION_WORDS = frozenset((
    "not", "never", "without", "dont", "nobody",
))
#: "no" negates only when it directly precedes the phrase ("no, I want a person" is not one).
ADJACENT_NEGATIONS = frozenset((
    "no", "nope",
))
NEGATION_WINDOW = 3
#: A goodbye phrase counts only when it ends within this many words of the utterance's end.
GOODBYE_TAIL_WORDS = 4

#: an explicit request for a person wins; then a flow (book, route); then a fixed reply
_KIND_RANK = {"transfer": 0, "flow": 1, "say": 2, "goodbye": 3}


def intent_words(text: str) -> list[str]:
    """Normalised, stemmed words with filler words removed."""
    return [stem(w) for w in normalize_words(text) if w not in FILLER_WORDS]


class IntentRecognizer:
    """Matches caller text against the configured intent phrases, most urgent kind first."""

    def __init__(self, intents: Sequence[IntentConfig]) -> None:
        ordered = sorted(enumerate(intents), key=lambda p: (_KIND_RANK.get(p[1].kind, 9), p[0]))
        self._intents: list[tuple[IntentConfig, list[tuple[str, ...]]]] = []
        for _, intent in ordered:
            phrases = [tuple(intent_words(p)) for p in intent.phrases]
            self._intents.append((intent, [p for p in phrases if p]))

    def recognize(self, text: str) -> IntentConfig | None:
        """The intent the caller expressed, or None; transfers win over goodbyes."""
        words = intent_words(text)
        if not words:
            return None
        for intent, phrases in self._intents:
            for phrase in phrases:
                if self._matches(words, phrase, goodbye=intent.kind == "goodbye"):
                    _LOGGER.debug("intent %s from %r", intent.name, text)
                    return intent
        return None

    @staticmethod
    def _matches(words: list[str], phrase: tuple[str, ...], *, goodbye: bool) -> bool:
        size = len(phrase)
        for start in range(len(words) - size + 1):
            if tuple(words[start:start + size]) != phrase:
                continue
            if goodbye and len(words) - (start + size) > GOODBYE_TAIL_WORDS:
                continue
            if not _negated(words, start):
                return True
        return False


def _negated(words: list[str], start: int) -> bool:
    """Whether the phrase starting at `start` is preceded by a negation."""
    if start > 0 and words[start - 1] in ADJACENT_NEGATIONS:
        return True
    window = words[max(0, start - NEGATION_WINDOW):start]
    return any(w in NEGATION_WORDS for w in window)
