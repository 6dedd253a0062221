"""FAQ knowledge base: noise-tolerant matching of caller questions, and the facts it grounds.

Caller text comes from telephone speech recognition, so matching works on normalised,
lightly stemmed content words weighted by how specific they are to one entry (IDF), not on
exact strings. The same normalisation helpers serve the intent recogniser and the reply guard.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from agent.config import FaqEntry

_LOGGER = logging.getLogger(__name__)

#: Minimum score for a FAQ match; tuned on paraphrases and off-topic questions in the tests.
MATCH_THRESHOLD = 0.5

_UNITS = {
    "zero": 0, "oh": 0, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6,
    "seven": 7, "eight": 8, "nine": 9, "ten": 10, "eleven": 11, "twelve": 12, "thirteen": 13,
    "fourteen": 14, "fifteen": 15, "sixteen": 16, "seventeen": 17, "eighteen": 18,
    "nineteen": 19,
}
_TENS = {
    "twenty": 20, "thirty": 30, "forty": 40, "fifty": 50, "sixty": 60, "seventy": 70,
    "eighty": 80, "ninety": 90,
}
_SCALES = {"hundred": 100, "thousand": 1000}
NUMBER_WORDS = frozenset(_UNITS) - {"oh"} | frozenset(_TENS) | frozenset(_SCALES)

_CONTRACTIONS = (
    ("won't", "will not"), ("can't", "can not"), ("cannot", "can not"), ("n't", " not"),
    ("'re", " are"), ("'m", " am"), ("'ll", " will"), ("'ve", " have"), ("'d", " would"),
    ("'s", " is"),
)

#: Words that carry no topic: ignored when scoring FAQ matches.
STOP_WORDS = frozenset((
    "a", "about", "actually", "ah", "all", "also", "am", "an", "and", "any", "anything",
    "call", "calling", "see",
    "are", "as", "at", "be", "been", "being", "but", "by", "can", "could", "did", "do",
    "does", "doing", "for", "from", "get", "give", "go", "going", "got", "guy", "guys", "had",
    "has", "have", "hello", "hey", "hi", "how", "i", "if", "in", "into", "is", "it", "its",
    "just", "know", "let", "like", "may", "maybe", "me", "mm", "my", "need", "of", "oh", "ok",
    "okay", "on", "or", "our", "please", "really", "say", "should", "so", "some", "something",
    "tell", "thank", "thanks", "that", "the", "their", "them", "then", "there", "these",
    "they", "this", "to", "uh", "um", "umm", "us", "want", "wanted", "was", "we", "were",
    "what", "whats", "which", "will", "with", "wonder", "wondering", "would", "yeah", "yes",
    "you", "your", "yours", "er", "erm", "hmm", "well", "right", "sure", "one",
))

#: Spoken-variant → canonical word, applied before stemming on both sides of a match.
_SYNONYMS = {
    "accept": "take", "accepts": "take", "accepted": "take", "taking": "take",
    "cost": "price", "costs": "price", "charge": "price", "charges": "price", "much": "price",
    "pricing": "price", "prices": "price",
    "located": "address", "location": "address", "directions": "address",
    "doctor": "dentist", "doctors": "dentist", "dr": "dentist",
    "exam": "checkup", "exams": "checkup", "examination": "checkup",
    "hygiene": "clean", "bleaching": "whiten", "bleach": "whiten",
    "weekend": "saturday", "weekends": "saturday",
    "insured": "insurance", "plan": "insurance", "plans": "insurance",
}

_AM_PM = re.compile(r"\b([ap])\.?\s?m\b\.?", re.IGNORECASE)
_NON_WORD = re.compile(r"[^a-z0-9' ]+")


def _number_value(words: Sequence[str]) -> int:
    """The value of a run of number words ("two hundred and fifty" → 250)."""
    total = current = 0
    for word in words:
        if word in _UNITS:
            current += _UNITS[word]
        elif word in _TENS:
            current += _TENS[word]
        elif word == "hundred":
            current = max(current, 1) * 100
        elif word == "thousand":
            total += max(current, 1) * 1000
            current = 0
    return total + current


def digitize_words(words: Sequence[str]) -> list[str]:
    """Replace runs of lowercase number words with their digits, keeping a lone "one"."""
    out: list[str] = []
    i = 0
    while i < len(words):
        if words[i] not in NUMBER_WORDS:
            out.append(words[i])
            i += 1
            continue
        j = i
        while j < len(words) and (words[j] in NUMBER_WORDS
                                  or (words[j] == "and" and j + 1 < len(words)
                                      and words[j + 1] in NUMBER_WORDS and j > i)):
            j += 1
        for group in _number_groups([w for w in words[i:j] if w != "and"]):
            out.append("one" if group == ["one"] else str(_number_value(group)))
        i = j
    return out


def _number_groups(run: list[str]) -> list[list[str]]:
    """Split a run of number words where speech lists numbers ("six thirty" → six, thirty)."""
    groups: list[list[str]] = []
    for word in run:
        if groups:
            prev = groups[-1][-1]
            after_unit = prev in _UNITS and word not in _SCALES
            after_tens = prev in _TENS and (
                word in _TENS or _UNITS.get(word, 1) not in range(1, 10))
            new_number = after_unit or after_tens
            if not new_number:
                groups[-1].append(word)
                continue
        groups.append([word])
    return groups


def normalize_words(text: str) -> list[str]:
    """Lowercase words with contractions expanded, punctuation dropped, numbers as digits."""
    text = text.lower().replace("\u2019", "'").replace("\u2018", "'")
    text = _AM_PM.sub(lambda m: f" {m.group(1)}m ", text)
    text = re.sub(r"(\d),(\d{3})\b", r"\1\2", text)
    text = re.sub(r"(\d)([a-z])", r"\1 \2", text)
    for short, full in _CONTRACTIONS:
        text = text.replace(short, full)
    text = _NON_WORD.sub(" ", text).replace("'", " ")
    return digitize_words(text.split())


def stem(word: str) -> str:
    """A light suffix stripper (plural s, -ing, -ed, final e) that is applied to both sides."""
    if word.isdigit() or len(word) <= 3:
        return word
    if word.endswith("ies") and len(word) > 4:
        word = word[:-3] + "y"
    elif word.endswith(("sses", "xes", "ches", "shes", "zes")):
        word = word[:-2]
    elif word.endswith("s") and not word.endswith(("ss", "us", "is")):
        word = word[:-1]
    if word.endswith("ing") and len(word) > 5:
        word = word[:-3]
    elif word.endswith("ed") and len(word) > 4:
        word = word[:-2]
    if word.endswith("e") and len(word) > 4:
        word = word[:-1]
    return word


def canonical(word: str) -> str:
    """Synonym mapping then stemming of one normalised word."""
    return stem(_SYNONYMS.get(word, word))


@dataclass(frozen=True)
class FaqMatch:
    """The best FAQ entry for a caller's question and how well it matched (0–1)."""

    entry: FaqEntry
    score: float


class KnowledgeBase:
    """The FAQ entries of one agent, indexed for matching and for grounding LLM replies."""

    def __init__(self, entries: Sequence[FaqEntry], context: Iterable[str] = ()) -> None:
        self._entries = tuple(entries)
        self._context = tuple(context)
        singles: set[str] = set()
        for entry in self._entries:
            for question in entry.questions:
                singles.update(canonical(w) for w in normalize_words(question)
                               if w not in STOP_WORDS)
        self._compounds = frozenset(singles)
        self._variants: list[tuple[int, frozenset[str]]] = []
        doc_freq: dict[str, int] = {}
        for index, entry in enumerate(self._entries):
            seen: set[str] = set()
            for question in entry.questions:
                tokens = self.content_tokens(question)
                if tokens:
                    self._variants.append((index, tokens))
                seen |= tokens
            for token in seen:
                doc_freq[token] = doc_freq.get(token, 0) + 1
        count = len(self._entries)
        self._idf = {t: math.log((count + 1) / (df + 0.5)) for t, df in doc_freq.items()}
        self._unknown_idf = math.log((count + 1) / 0.5) if count else 1.0
        self._facts = self._collect_fact_tokens()

    @property
    def entries(self) -> tuple[FaqEntry, ...]:
        """The FAQ entries in definition order."""
        return self._entries

    def content_tokens(self, text: str) -> frozenset[str]:
        """Canonical content words of a text, joining split compounds ("check up" → checkup)."""
        words = normalize_words(text)
        tokens: set[str] = set()
        i = 0
        while i < len(words):
            word = words[i]
            if (i + 1 < len(words) and word not in STOP_WORDS and words[i + 1] not in STOP_WORDS
                    and canonical(word + words[i + 1]) in self._compounds):
                tokens.add(canonical(word + words[i + 1]))
                i += 2
                continue
            if word not in STOP_WORDS:
                tokens.add(canonical(word))
            i += 1
        return frozenset(tokens)

    def _weight(self, tokens: Iterable[str]) -> float:
        return sum(self._idf.get(t, self._unknown_idf) for t in tokens)

    def match(self, text: str) -> FaqMatch | None:
        """The best entry for a caller's question, or None when nothing matches well enough."""
        query = self.content_tokens(text)
        if not query:
            return None
        query_weight = self._weight(query)
        best_index, best_score = -1, 0.0
        for index, tokens in self._variants:
            shared = self._weight(query & tokens)
            if shared <= 0.0:
                continue
            precision = shared / query_weight
            recall = shared / self._weight(tokens)
            score = 2 * precision * recall / (precision + recall)
            if score > best_score:
                best_index, best_score = index, score
        if best_index < 0 or best_score < MATCH_THRESHOLD:
            _LOGGER.debug("no FAQ match for %r (best %.2f)", text, best_score)
            return None
        return FaqMatch(self._entries[best_index], round(min(best_score, 1.0), 4))

    def facts_text(self) -> str:
        """All answers as a compact bulleted list for the LLM system prompt."""
        return "\n".join(f"- {' '.join(e.answer.split())}" for e in self._entries)

    def fact_tokens(self) -> frozenset[str]:
        """Numbers, times, prices, phone numbers and capitalised names the replies may use."""
        return self._facts

    def _collect_fact_tokens(self) -> frozenset[str]:
        facts: set[str] = set()
        texts = [e.answer for e in self._entries] + list(self._context)
        for text in texts:
            facts.update(numbers_in(text))
            facts.update(times_in(text))
            facts.update(phones_in(text))
            facts.update(addresses_in(text))
            for word in capitalized_words(text):
                facts.update((word.lower(), stem(word.lower())))
        return frozenset(facts)


_WORD = re.compile(r"[A-Za-z][A-Za-z'\u2019-]*")
_TIME = re.compile(r"\b(\d{1,2})(?::(\d{2}))?\s*(?:([ap])\.?\s?m\b\.?|(o'?clock)\b)",
                   re.IGNORECASE)
_SPOKEN_CLOCK = re.compile(r"\b(\d{1,2}) ([0-5]\d)(?=\s*(?:[ap]\.?\s?m\b|o'?clock))",
                           re.IGNORECASE)
_DIGITS = re.compile(r"\d[\d,]*(?:\.\d+)?")
_PHONE = re.compile(r"(?:\+?1[\s.-]?)?(?:\(\d{3}\)\s?|\d{3}[\s.-])?\d{3}[\s.-]\d{4}\b")
_ADDRESS = re.compile(r"\b[\w.+-]+@[\w-]+(?:\.[\w-]+)+\b|\bhttps?://\S+|\bwww\.\S+"
                      r"|\b[\w-]+\.(?:com|org|net|io|us|info|biz|co)\b", re.IGNORECASE)


def digitize_text(text: str) -> str:
    """The text with runs of number words replaced by digits, case and punctuation kept."""
    def replace(match: re.Match[str]) -> str:
        words = match.group(0).lower().replace("-", " ").split()
        return " ".join(digitize_words(words)) if words != ["one"] else match.group(0)

    names = "|".join(sorted(NUMBER_WORDS, key=len, reverse=True))
    run = rf"\b(?:{names})(?:(?:\s+and\s+|[\s-]+)(?:{names}))*\b"
    digits = re.sub(run, replace, text, flags=re.IGNORECASE)
    return _SPOKEN_CLOCK.sub(r"\1:\2", digits)


def numbers_in(text: str) -> list[str]:
    """Every number stated in a text (digits or number words other than a lone "one")."""
    values = []
    for raw in _DIGITS.findall(digitize_text(text)):
        value = raw.replace(",", "").rstrip(".")
        if "." in value:
            value = value.rstrip("0").rstrip(".")
        values.append(value)
    return values


def times_in(text: str) -> list[str]:
    """Clock times in canonical form ("8am", "8:30pm", "8oclock"; noon → 12pm)."""
    digits = digitize_text(text)
    times = []
    for hour, minute, half, oclock in _TIME.findall(digits):
        suffix = "oclock" if oclock else f"{half.lower()}m"
        times.append(f"{int(hour)}{':' + minute if minute and minute != '00' else ''}{suffix}")
    lowered = digits.lower()
    times += ["12pm"] * len(re.findall(r"\bnoon\b", lowered))
    times += ["12am"] * len(re.findall(r"\bmidnight\b", lowered))
    return times


def phones_in(text: str) -> list[str]:
    """Phone numbers as bare digit strings."""
    return [re.sub(r"\D", "", m) for m in _PHONE.findall(digitize_text(text))]


def addresses_in(text: str) -> list[str]:
    """Email addresses and web addresses, lowercased."""
    return [m.lower().rstrip(".") for m in _ADDRESS.findall(text)]


def capitalized_words(text: str) -> list[str]:
    """Every word that starts with a capital letter, wherever it stands."""
    return [w.strip("'\u2019-") for w in _WORD.findall(text) if w[0].isupper()]
