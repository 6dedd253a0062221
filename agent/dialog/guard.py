"""Reply guard: a tiny LLM's reply is spoken only if every fact it states is in the knowledge base.

The guard is deliberately conservative: a grounded reply that happens to be rejected costs one
fallback sentence, an invented price or phone number costs the clinic's credibility.
"""

from __future__ import annotations

import logging
import re
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass

from agent.dialog.knowledge import (
    STOP_WORDS,
    KnowledgeBase,
    addresses_in,
    digitize_text,
    numbers_in,
    phones_in,
    stem,
    times_in,
)

_LOGGER = logging.getLogger(__name__)

#: Longest reply the guard lets through, in words; the prompt asks for one short sentence.
MAX_REPLY_WORDS = 45
MAX_REPLY_CHARS = 300

#: Capitalised words that are not names (titles, interjections, the pronoun I).
COMMON_CAPITALIZED = STOP_WORDS | frozenset((
    "i", "i'm", "i'll", "i've", "i'd", "dr", "mr", "mrs", "ms", "sorry", "thank", "thanks",
    "yes", "no", "okay", "ok", "sure", "great", "hello", "hi", "please",
))

_DAY_AND_MONTH = frozenset((
    "monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday", "mondays",
    "tuesdays", "wednesdays", "thursdays", "fridays", "saturdays", "sundays", "january",
    "february", "march", "april", "june", "july", "august", "september", "october",
    "november", "december",
))

_ROLE_PREFIX = re.compile(
    r"^\s*(?:assistant|agent|receptionist|bot|ai|system|response|answer|reply)\s*:\s*",
    re.IGNORECASE)
_NEXT_TURN = re.compile(r"(?:^|\s|\n)(?:user|caller|customer|human|patient|assistant|system)\s*:",
                        re.IGNORECASE)
_SPECIAL_TOKEN = re.compile(r"<\|?/?[a-z_]+\|?>|<\|[^|>]*\|>", re.IGNORECASE)
_MARKDOWN = re.compile(r"[*_#`~>|\[\]{}]+")
_LIST_MARK = re.compile(r"(?m)^\s*(?:[-\u2022\u2013\u2014]+|\d+[.)])\s+")
_ACTION_CLAIM = re.compile(
    r"\b(?:i|i'm|i'll|i am|i will|i have|i've|let me|we'll|we will|we are|we're)\b[\w\s']{0,20}?"
    r"\b(?:dial|dialing|dialling|call|calling|ring|transfer|transferring|connect|connecting|"
    r"forward|forwarding|put you through|putting you through|book|booked|booking|schedule|"
    r"scheduled)\b", re.IGNORECASE)
_DIAL_NUMBER = re.compile(r"\b(?:dial|extension|ext)\b", re.IGNORECASE)
_PRICE = re.compile(r"\$|\b(?:dollars?|cents?|bucks)\b", re.IGNORECASE)
_SENTENCE_END = re.compile(r"[.!?]+[\"')\]]*\s+")
_WORD = re.compile(r"[A-Za-z][A-Za-z'\u2019-]*")
_ABBREVIATIONS = frozenset((
    "dr", "mr", "mrs", "ms", "st", "no", "vs", "etc", "e.g", "i.e",
))


@dataclass(frozen=True)
class GuardVerdict:
    """Whether a reply may be spoken; if not, why and which words offended."""

    ok: bool
    reason: str = ""
    offending: tuple[str, ...] = ()


def sanitize(reply: str) -> str:
    """Strip role prefixes, a continued next turn, special tokens, emojis and markdown."""
    text = _SPECIAL_TOKEN.sub(" ", reply)
    text = _ROLE_PREFIX.sub("", text)
    following = _NEXT_TURN.search(text, 1)
    if following:
        text = text[:following.start()]
    text = _ROLE_PREFIX.sub("", text)
    text = "".join(ch for ch in text if not _is_emoji(ch))
    text = _LIST_MARK.sub(" ", text)
    text = _MARKDOWN.sub("", text)
    text = " ".join(text.split())
    return text.strip(" \"'")


def _is_emoji(ch: str) -> bool:
    if ch in "\u200d\ufe0f\ufe0e":
        return True
    return unicodedata.category(ch) in ("So", "Sk", "Cs", "Co") and ch not in "$%&+=<>^`|~"


def split_sentences(text: str) -> list[str]:
    """Split at sentence ends, not at "Dr." or at "a.m." that runs on into a weekday."""
    sentences: list[str] = []
    start = 0
    for match in _SENTENCE_END.finditer(text):
        before = text[start:match.start()].split()
        last = before[-1].lower().rstrip(".") if before else ""
        following = text[match.end():].split()
        nxt = following[0].lower().strip(",.") if following else ""
        if last in _ABBREVIATIONS or (last in ("a.m", "p.m") and nxt in _DAY_AND_MONTH):
            continue
        if following and not (following[0][0].isupper() or following[0][0].isdigit()):
            continue
        sentences.append(text[start:match.end()].strip())
        start = match.end()
    tail = text[start:].strip()
    if tail:
        sentences.append(tail)
    return sentences


def proper_names(text: str) -> list[str]:
    """Capitalised words that are not at a sentence start (plus any weekday or month)."""
    names: list[str] = []
    for sentence in split_sentences(text):
        for index, match in enumerate(_WORD.finditer(sentence)):
            word = match.group(0).strip("'\u2019-")
            if word[:1].isupper() and (index > 0 or word.lower() in _DAY_AND_MONTH):
                names.append(word)
    return names


class ReplyGuard:
    """Checks LLM replies against the facts of one knowledge base."""

    def __init__(self, knowledge: KnowledgeBase, extra_allowed: Iterable[str] = ()) -> None:
        extra = [w.lower() for w in extra_allowed]
        self._facts = knowledge.fact_tokens() | frozenset(extra) | frozenset(map(stem, extra))

    def _known_word(self, word: str) -> bool:
        lowered = word.lower().strip("'\u2019-")
        return (lowered in self._facts or stem(lowered) in self._facts
                or lowered in COMMON_CAPITALIZED)

    def check(self, reply: str) -> GuardVerdict:
        """Verdict on one (already sanitised) reply."""
        text = " ".join(reply.split())
        if not any(ch.isalpha() for ch in text):
            return GuardVerdict(False, "empty")
        if len(text) > MAX_REPLY_CHARS or len(text.split()) > MAX_REPLY_WORDS:
            return GuardVerdict(False, "too long", (f"{len(text.split())} words",))
        addresses = [a for a in addresses_in(text) if a not in self._facts]
        if addresses:
            return GuardVerdict(False, "email or web address", tuple(addresses))
        phones = [p for p in phones_in(text) if p not in self._facts]
        if phones:
            return GuardVerdict(False, "phone number", tuple(phones))
        claims = [m.group(0) for sentence in split_sentences(text)
                  if not sentence.rstrip().endswith("?")
                  for m in _ACTION_CLAIM.finditer(sentence)]
        if claims:
            return GuardVerdict(False, "claims an action", tuple(claims))
        if _DIAL_NUMBER.search(text) and numbers_in(text):
            return GuardVerdict(False, "claims to dial a number", tuple(numbers_in(text)))
        times = [t for t in times_in(text) if t not in self._facts
                 and not (t.endswith("oclock") and self._oclock_known(t))]
        if times:
            return GuardVerdict(False, "time", tuple(times))
        numbers = [n for n in numbers_in(text) if n not in self._facts]
        if numbers:
            reason = "price" if _PRICE.search(digitize_text(text)) else "number"
            return GuardVerdict(False, reason, tuple(numbers))
        bare_price = _PRICE.search(text)
        if bare_price and not numbers_in(text):
            return GuardVerdict(False, "price", (bare_price.group(0),))
        names = [n for n in proper_names(text) if not self._known_word(n)]
        if names:
            return GuardVerdict(False, "name", tuple(names))
        return GuardVerdict(True)

    def _oclock_known(self, time: str) -> bool:
        hour = time[:-len("oclock")]
        return f"{hour}am" in self._facts or f"{hour}pm" in self._facts
