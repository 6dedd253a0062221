"""Text helpers for the engines: incremental sentence chunking, normalisation, WER."""

from __future__ import annotations

import logging
import re

_LOGGER = logging.getLogger(__name__)

_TERMINALS = ".!?"
_CLOSERS = "\"')]}\u201d\u2019"
_CLAUSE_MARKS = ",;"
_OPENERS = "\"'([{\u201c\u2018"

# Abbreviations after which a period never ends a sentence.
_NEVER_ENDS = frozenset(
    [
        "mr.",
        "mrs.",
        "ms.",
        "dr.",
        "prof.",
        "st.",
        "jr.",
        "sr.",
        "mt.",
        "ft.",
        "e.g.",
        "i.e.",
        "vs.",
        "approx.",
        "dept.",
        "apt.",
    ]
)
# Abbreviations that end a sentence only when the next word starts a new one.
_MAYBE_ENDS = frozenset(["a.m.", "p.m.", "etc.", "inc.", "ltd.", "co.", "corp."])
_DOTTED_ACRONYM = re.compile(r"^(?:[a-z]\.){2,}$")
_APOSTROPHES = re.compile(r"['\u2019`]")
_NON_WORD = re.compile(r"[\W_]+", re.UNICODE)


class SentenceChunker:
    """Split a token stream into speakable sentences as soon as each one is complete."""

    def __init__(self, min_clause_chars: int = 60, first_clause_chars: int | None = None) -> None:
        """``first_clause_chars`` lets the first chunk end at a comma sooner (earlier audio)."""
        self._buf = ""
        self._min_clause_chars = min_clause_chars
        self._first_clause_chars = first_clause_chars or min_clause_chars
        self._emitted = 0

    def push(self, token: str) -> list[str]:
        """Add a token and return every sentence it completed (possibly none)."""
        self._buf += token
        sentences: list[str] = []
        while True:
            cut = self._find_cut(self._buf)
            if cut is None:
                return sentences
            sentence = self._buf[:cut].strip()
            self._buf = self._buf[cut:].lstrip()
            if sentence:
                sentences.append(sentence)
                self._emitted += 1

    def flush(self) -> str | None:
        """Return whatever text remains (the last, unterminated sentence) and clear it."""
        rest = self._buf.strip()
        self._buf = ""
        return rest or None

    def _find_cut(self, buf: str) -> int | None:
        """Index just past the first sentence boundary in ``buf``, or None if not known yet."""
        n = len(buf)
        for i, ch in enumerate(buf):
            if ch == "\n":
                return i + 1
            if ch in _CLAUSE_MARKS:
                limit = self._min_clause_chars if self._emitted else self._first_clause_chars
                if i + 1 >= limit and i + 1 < n and buf[i + 1].isspace():
                    return i + 1
                continue
            if ch not in _TERMINALS:
                continue
            j = i + 1
            while j < n and (buf[j] in _TERMINALS or buf[j] in _CLOSERS):
                j += 1
            if j >= n:
                # The next token decides ("3." + "50", "Dr." + " Smith"): wait for it.
                return None
            if not buf[j].isspace():
                continue
            if ch == "." and not self._period_ends_sentence(buf, i, j):
                if self._next_word_start(buf, j) is None:
                    return None
                continue
            return j
        return None

    def _period_ends_sentence(self, buf: str, dot: int, after: int) -> bool:
        """Whether the period at ``dot``, followed by whitespace at ``after``, ends a sentence."""
        start = dot
        while start > 0 and not buf[start - 1].isspace():
            start -= 1
        word = buf[start : dot + 1].lstrip(_OPENERS).lower()
        if word in _NEVER_ENDS:
            return False
        if word == "no.":
            # "No. 5" is a number; "No. I can't" is an answer.
            k = self._next_word_start(buf, after)
            return k is not None and not buf[k].isdigit()
        # A single capital letter is an initial ("J. Smith").
        if len(word) == 2 and buf[dot - 1].isupper():
            return False
        if word in _MAYBE_ENDS or _DOTTED_ACRONYM.match(word):
            k = self._next_word_start(buf, after)
            if k is None:
                return False
            return buf[k].isupper()
        return True

    @staticmethod
    def _next_word_start(buf: str, pos: int) -> int | None:
        """Index of the first non-space character at or after ``pos``, or None."""
        while pos < len(buf) and buf[pos].isspace():
            pos += 1
        return pos if pos < len(buf) else None


def normalize(text: str) -> str:
    """Lowercase, drop punctuation and collapse whitespace (cache keys, WER)."""
    text = _APOSTROPHES.sub("", text.lower())
    return " ".join(_NON_WORD.sub(" ", text).split())


def word_error_rate(ref: str, hyp: str) -> float:
    """Word error rate of ``hyp`` against ``ref``: edit distance over normalised words."""
    ref_words = normalize(ref).split()
    hyp_words = normalize(hyp).split()
    if not ref_words:
        return 0.0 if not hyp_words else 1.0
    prev = list(range(len(hyp_words) + 1))
    for i, ref_word in enumerate(ref_words, start=1):
        cur = [i] + [0] * len(hyp_words)
        for j, hyp_word in enumerate(hyp_words, start=1):
            cost = 0 if ref_word == hyp_word else 1
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + cost)
        prev = cur
    return prev[-1] / len(ref_words)
