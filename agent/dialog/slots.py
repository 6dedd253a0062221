"""Slot filling: turn a caller's answer (speech or keypad) into a checked, machine-ready value.

Call flows ask the caller for slots: a name, a callback number, a preferred day and time, free
text, a yes/no answer, one of a few choices, or a run of digits. Caller text comes from
telephone speech recognition, so every parser here works on noisy, lowercase or mixed-case
transcripts with fillers, punctuation, and numbers as words or digits. A parser returns None
when the answer is not valid for the slot; the flow then asks again.

Each value has a machine form (`SlotValue.value`) for integrations and a spoken form
(`SlotValue.spoken`) the agent reads back to confirm it.

Dates and times are resolved against an injected ``now`` (the clinic's local time); nothing
here reads the clock.

Choices made where speech is ambiguous:

* A weekday name ("friday", "on friday", "this friday") is the nearest such day from today on;
  when that is today and the stated time has already passed, it is the same day next week.
* "next <weekday>" is that weekday in the following calendar week (weeks run Monday to
  Sunday): said on Friday 27 November 2026, "next monday" is 30 November and "next friday"
  and "next saturday" are 4 and 5 December.
* A month and day without a year is this year's date; if that date was up to 90 days ago the
  answer is rejected as a past date, if longer ago it is next year's date ("january 5" said in
  November). "the 20th" alone is the next 20th from today on.
* A clock hour without am/pm: 1-7 is afternoon, 8-11 morning, 12 noon; "in the morning",
  "in the afternoon", "this evening" and "tonight" settle it instead.
* A time with no day is today when still ahead of ``now``, otherwise tomorrow. "today" (or
  "this afternoon") with a time already past is rejected.
* A calendar date beats a weekday said with it ("tuesday the 30th" is the 30th), and the
  first day found wins over later ones; "any time" simply adds no time.
"""

from __future__ import annotations

import calendar
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, time, timedelta

from agent.dialog.knowledge import normalize_words, stem

SLOT_TYPES = ("name", "phone", "datetime", "text", "yesno", "choice", "digits")
#: slot types that take keypad entry by default
DTMF_TYPES = frozenset(("phone", "digits", "yesno", "choice"))

#: How far back a month-and-day without a year may lie before it means next year's date.
PAST_DATE_WINDOW_DAYS = 90

#: Recogniser annotations ("[BLANK_AUDIO]", "(coughs)"); a bracket holding digits is kept,
#: since "(555) 123-4567" is a phone number.
_ANNOTATION = re.compile(r"\[[^\]\d]*\]|\([^)\d]*\)|\*[^*\d]*\*|<[^>\d]*>")

#: Sounds and hesitations that carry no answer.
FILLERS = frozenset((
    "um", "umm", "uh", "uhh", "uhm", "er", "erm", "ah", "ahh", "hmm", "hm", "mm", "mhm",
    "huh", "eh", "oh",
))

# Yes/no vocabulary: our own copy, extended from the policy's sets (the policy will import
# this module, so importing it back would make a cycle).
YES_WORDS = frozenset((
    "yes", "yeah", "yep", "yup", "ya", "yah", "yea", "sure", "okay", "ok", "alright",
    "correct", "right", "absolutely", "definitely", "certainly", "exactly", "affirmative",
    "perfect", "fine", "great", "good", "works", "indeed", "true", "totally", "mhm",
))
NO_WORDS = frozenset((
    "no", "nope", "nah", "wrong", "incorrect", "negative", "cancel", "never",
))
_YES_PHRASES = (
    ("that", "works"), ("that", "would", "work"), ("go", "ahead"), ("of", "course"),
    ("why", "not"), ("no", "problem"), ("no", "worries"), ("uh", "huh"), ("mm", "hmm"),
    ("you", "got", "it"), ("please", "do"), ("i", "do"),
)
_NO_PHRASES = (
    ("not", "really"), ("not", "quite"), ("not", "exactly"), ("not", "right"),
    ("not", "correct"), ("not", "good"), ("not", "work"), ("not", "works"), ("do", "not"),
    ("does", "not"), ("never", "mind"), ("no", "way"), ("i", "do", "not"), ("i", "would", "not"),
    ("please", "do", "not"),
)
#: Yes and no phrases, longest first, each with its polarity (True = yes).
_POLAR_PHRASES = sorted([(p, True) for p in _YES_PHRASES] + [(p, False) for p in _NO_PHRASES],
                        key=lambda item: -len(item[0]))
_UNCLEAR_PHRASES = (
    ("not", "sure"), ("do", "not", "know"), ("maybe",), ("perhaps",), ("depends",),
    ("dunno",), ("what",), ("pardon",), ("repeat",), ("hold", "on"),
    ("i", "guess"), ("possibly",), ("probably",),
)
#: "i am good" / "i am fine" answer "no thanks" to an offer but "yes" to "is that right?".
_AMBIGUOUS_FINE = frozenset(("good", "fine", "ok", "okay", "alright", "set"))

# ---------------------------------------------------------------- names

_NAME_TOKEN = re.compile(r"[A-Za-z0-9]+(?:['-][A-Za-z0-9]+)*")
_NAME_LEAD_INS = (
    ("my", "first", "name", "is"), ("my", "last", "name", "is"), ("my", "full", "name", "is"),
    ("my", "name", "is"), ("the", "name", "is"), ("first", "name", "is"),
    ("last", "name", "is"), ("name", "is"), ("you", "can", "call", "me"), ("call", "me"),
    ("this", "is"), ("it", "is"), ("i", "am"), ("yes",), ("yeah",), ("yep",), ("sure",), ("no",),
    ("okay",), ("ok",), ("hi",), ("hello",), ("hey",), ("so",), ("well",),
)
#: A name ends where one of these starts ("john smith and i need an appointment").
_NAME_STOPS = frozenset((
    "and", "calling", "speaking", "here", "from", "with", "about", "regarding", "i", "but",
    "please", "thanks", "thank",
))
#: Words that show the answer is not a name.
_NOT_NAME = frozenset((
    "i", "me", "my", "mine", "you", "your", "we", "our", "us", "they", "he", "she", "it",
    "is", "am", "are", "was", "were", "be", "the", "an", "what", "why", "who", "how", "when",
    "where", "which", "sorry", "pardon", "repeat", "again", "not", "do", "does", "did",
    "know", "want", "need", "appointment", "book", "like", "can", "could", "would", "should",
    "will", "to", "that", "this", "there", "hello", "hi", "hey", "help", "name", "number",
    "phone", "call", "yes", "no", "yeah", "nope", "okay", "ok", "of", "for", "in", "on", "at",
    "please", "thanks", "thank",
))
_SUBJECT_CONTRACTIONS = frozenset(("it", "name", "that", "this", "he", "she", "who"))

# ---------------------------------------------------------------- dates and times

_MONTHS = {name.lower(): index for index, name in enumerate(calendar.month_name) if name}
_MONTHS.update({
    "jan": 1, "feb": 2, "mar": 3, "apr": 4, "jun": 6, "jul": 7, "aug": 8, "sep": 9, "sept": 9,
    "oct": 10, "nov": 11, "dec": 12,
})
_WEEKDAYS = {name.lower(): index for index, name in enumerate(calendar.day_name)}
_WEEKDAYS.update({f"{name}s": index for name, index in list(_WEEKDAYS.items())})
_WEEKDAYS.update({"tues": 1, "weds": 2, "thurs": 3})
_ORDINALS = {
    "first": 1, "second": 2, "third": 3, "fourth": 4, "fifth": 5, "sixth": 6, "seventh": 7,
    "eighth": 8, "ninth": 9, "tenth": 10, "eleventh": 11, "twelfth": 12, "thirteenth": 13,
    "fourteenth": 14, "fifteenth": 15, "sixteenth": 16, "seventeenth": 17,
    "eighteenth": 18, "nineteenth": 19, "twentieth": 20, "thirtieth": 30,
}
_ORDINAL_SUFFIXES = frozenset(("st", "nd", "rd", "th"))
_TIME_PREPS = frozenset(("at", "around", "about", "by", "after", "before", "say", "til",
                         "till", "until"))
#: Part-of-day words: their default time and whether a bare clock hour with them is pm.
_PERIODS = {
    "morning": (time(9, 0), False),
    "afternoon": (time(14, 0), True),
    "evening": (time(17, 0), True),
    "tonight": (time(17, 0), True),
    "night": (time(17, 0), True),
}
_PERIOD_MODIFIERS = {
    ("early", "morning"): time(8, 0), ("late", "morning"): time(11, 0),
    ("early", "afternoon"): time(13, 0), ("late", "afternoon"): time(16, 0),
    ("early", "evening"): time(17, 0),
}
_NOON_WORDS = frozenset(("noon", "midday", "lunch", "lunchtime"))


class _Reject(Exception):
    """An answer that names a day or time that cannot be used (past, nonexistent)."""


@dataclass(frozen=True)
class SlotValue:
    """A filled slot: the machine form for integrations and the form the agent reads back."""

    #: machine form: "John Smith", "5551234567", "2026-11-30T15:00", "yes", a choice key, ...
    value: str
    #: spoken form: "John Smith", "5 5 5, 1 2 3, 4 5 6 7", "Monday, November 30 at 3 PM", ...
    spoken: str


@dataclass(frozen=True)
class SlotRules:
    """What a slot accepts: its type and the type's limits."""

    kind: str
    #: choice key -> phrases that select it ("billing": ("billing", "my bill", "payment"))
    choices: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    #: keypad digit -> choice key ("1": "billing")
    choice_dtmf: Mapping[str, str] = field(default_factory=dict)
    #: digit count bounds for phone and digits slots
    min_digits: int = 7
    max_digits: int = 15
    #: word limit for text slots
    max_words: int = 60

    def __post_init__(self) -> None:
        if self.kind not in SLOT_TYPES:
            raise ValueError(f"unknown slot type {self.kind!r}; expected one of {SLOT_TYPES}")
        if not 1 <= self.min_digits <= self.max_digits:
            raise ValueError(f"bad digit bounds {self.min_digits}..{self.max_digits}")
        if self.max_words < 1:
            raise ValueError(f"max_words must be at least 1, got {self.max_words}")
        unknown = {k for k in self.choice_dtmf.values() if k not in self.choices}
        if unknown:
            raise ValueError(f"choice_dtmf names unknown choices {sorted(unknown)}")


# ================================================================ public entry points


def parse_speech(rules: SlotRules, text: str, now: datetime) -> SlotValue | None:
    """The slot value in a caller's spoken answer, or None when it is not valid (re-prompt).

    `now` is the current time in the clinic's timezone; datetime slots resolve against it.
    """
    cleaned = " ".join(_ANNOTATION.sub(" ", text).split())
    if not cleaned:
        return None
    kind = rules.kind
    if kind == "name":
        name = _parse_name(cleaned)
        return SlotValue(name, name) if name else None
    if kind in ("phone", "digits"):
        digits = _collect_digits(normalize_words(cleaned))
        if digits and rules.min_digits <= len(digits) <= rules.max_digits:
            return SlotValue(digits, spoken_digits(digits))
        return None
    if kind == "datetime":
        when = parse_when(cleaned, now)
        if when is None:
            return None
        iso = _iso(*when)
        return SlotValue(iso, spoken_datetime(iso) or iso)
    if kind == "text":
        return _parse_text(rules, cleaned)
    if kind == "yesno":
        answer = yes_no(cleaned)
        if answer is None:
            return None
        word = "yes" if answer else "no"
        return SlotValue(word, word)
    return _parse_choice(rules, cleaned)


def parse_dtmf(rules: SlotRules, digits: str) -> SlotValue | None:
    """The slot value of keypad entry (as typed, '#' already stripped), or None if not valid.

    Phone and digits slots take the digit string within the rules' bounds; yes/no slots take
    1 (yes) or 2 (no); choice slots take a digit of `choice_dtmf`. Other slot types take none.
    """
    digits = digits.strip()
    kind = rules.kind
    if kind in ("phone", "digits"):
        if (digits.isascii() and digits.isdigit()
                and rules.min_digits <= len(digits) <= rules.max_digits):
            return SlotValue(digits, spoken_digits(digits))
        return None
    if kind == "yesno":
        word = {"1": "yes", "2": "no"}.get(digits)
        return SlotValue(word, word) if word else None
    if kind == "choice":
        key = rules.choice_dtmf.get(digits)
        return SlotValue(key, _choice_spoken(key)) if key else None
    return None


def yes_no(text: str) -> bool | None:
    """True for a yes, False for a no, None when the answer is mixed, unclear or neither.

    Handles "yes please", "yeah that's right", "correct", "sure", "that works", "no",
    "no thanks", "nope", "that's wrong", "not really"; "no problem" and "why not" are yes.
    """
    words = normalize_words(_ANNOTATION.sub(" ", text))
    if not words:
        return None
    if _unclear(words):
        return None
    yes = no = please = 0
    phrases = _POLAR_PHRASES
    i = 0
    while i < len(words):
        for phrase, polarity in phrases:
            if tuple(words[i:i + len(phrase)]) == phrase:
                if polarity:
                    yes += 1
                else:
                    no += 1
                i += len(phrase)
                break
        else:
            word = words[i]
            if word == "not" and i + 1 < len(words) and words[i + 1] in YES_WORDS:
                no += 1
                i += 2
                continue
            if word in YES_WORDS:
                yes += 1
            elif word in NO_WORDS:
                no += 1
            elif word == "please":
                please += 1
            i += 1
    if yes and not no:
        return True
    if no and not yes:
        return False
    if please and not yes and not no:
        return True
    return None


def spoken_digits(digits: str) -> str:
    """Digits grouped for read-back: "5551234567" -> "5 5 5, 1 2 3, 4 5 6 7".

    Ten digits read 3-3-4, seven 3-4, eleven starting with 1 as "1, " then 3-3-4, up to four
    as one group; otherwise groups of three, the last taking four rather than leaving one.
    """
    n = len(digits)
    if n <= 4:
        sizes = [n] if n else []
    elif n == 7:
        sizes = [3, 4]
    elif n == 10:
        sizes = [3, 3, 4]
    elif n == 11 and digits.startswith("1"):
        sizes = [1, 3, 3, 4]
    else:
        sizes = [3] * (n // 3)
        if n % 3 == 1:
            sizes[-1] = 4
        elif n % 3 == 2:
            sizes.append(2)
    groups, start = [], 0
    for size in sizes:
        groups.append(" ".join(digits[start:start + size]))
        start += size
    return ", ".join(groups)


_ISO = re.compile(r"(\d{4})-(\d{2})-(\d{2})(?:T(\d{2}):(\d{2})(?::\d{2}(?:\.\d+)?)?)?")


def spoken_datetime(iso: str) -> str | None:
    """An ISO date or date-time read aloud: "2026-11-30T15:00" -> "Monday, November 30 at 3 PM".

    "2026-11-30T09:30" -> "Monday, November 30 at 9:30 AM"; "2026-11-30" -> "Monday,
    November 30"; anything that is not such an ISO string -> None.
    """
    match = _ISO.fullmatch(iso.strip())
    if not match:
        return None
    year, month, day, hour, minute = match.groups()
    try:
        day_value = date(int(year), int(month), int(day))
        clock = time(int(hour), int(minute)) if hour is not None else None
    except ValueError:
        return None
    spoken = f"{calendar.day_name[day_value.weekday()]}, " \
             f"{calendar.month_name[day_value.month]} {day_value.day}"
    if clock is None:
        return spoken
    twelve = clock.hour % 12 or 12
    half = "AM" if clock.hour < 12 else "PM"
    reading = f"{twelve}:{clock.minute:02d}" if clock.minute else str(twelve)
    return f"{spoken} at {reading} {half}"


def parse_when(text: str, now: datetime) -> tuple[date, time | None] | None:
    """The day and (optional) time a caller asks for, resolved against `now`, or None.

    None when the text names neither a day nor a time, names one that does not exist, or
    names one already past. The result is in `now`'s local time (no timezone conversion).
    """
    words = _when_words(normalize_words(_ANNOTATION.sub(" ", text)))
    used = [False] * len(words)
    today = now.date()
    try:
        day, weekday_only = _find_day(words, used, today)
        period = _find_period(words, used)
        clock = _find_clock(words, used, period)
    except _Reject:
        return None
    if clock is None and period is not None:
        clock = period[0]
    if day is None and clock is None:
        return None
    current = now.time().replace(tzinfo=None, second=0, microsecond=0)
    if day is None:
        assert clock is not None
        day = today if clock > current else today + timedelta(days=1)
        return day, clock
    if day < today:
        return None
    if day == today and clock is not None and clock <= current:
        if not weekday_only:
            return None
        day += timedelta(days=7)
    return day, clock


# ================================================================ names


def _parse_name(text: str) -> str | None:
    raw = _NAME_TOKEN.findall(text.replace("\u2019", "'").replace("\u2018", "'"))
    tokens = _join_spelling(_expand_name_contractions(raw))
    tokens = [t for t in tokens if t.lower() not in FILLERS]
    lowered = [t.lower() for t in tokens]
    changed = True
    while changed and tokens:
        changed = False
        for lead in _NAME_LEAD_INS:
            if tuple(lowered[:len(lead)]) == lead and len(tokens) > len(lead):
                tokens, lowered = tokens[len(lead):], lowered[len(lead):]
                changed = True
                break
    for index, word in enumerate(lowered):
        if word in _NAME_STOPS and index > 0:
            tokens, lowered = tokens[:index], lowered[:index]
            break
    if len(tokens) > 2 and lowered[-2:] == ["the", "name"]:  # "Maria's the name"
        tokens, lowered = tokens[:-2], lowered[:-2]
        if lowered[-1] == "is":
            tokens, lowered = tokens[:-1], lowered[:-1]
        elif lowered[-1].endswith("'s"):
            tokens[-1], lowered[-1] = tokens[-1][:-2], lowered[-1][:-2]
    if not 1 <= len(tokens) <= 4:
        return None
    if any(not re.fullmatch(r"[A-Za-z]+(?:['-][A-Za-z]+)*", t) for t in tokens):
        return None
    if any(w in _NOT_NAME or w in YES_WORDS or w in NO_WORDS for w in lowered):
        return None
    return " ".join(_title(t) for t in tokens)


def _expand_name_contractions(tokens: Sequence[str]) -> list[str]:
    out: list[str] = []
    for token in tokens:
        low = token.lower()
        if low.endswith("'s") and low[:-2] in _SUBJECT_CONTRACTIONS:
            out += [token[:-2], "is"]
        elif low == "i'm":
            out += ["i", "am"]
        else:
            out.append(token)
    return out


def _join_spelling(tokens: Sequence[str]) -> list[str]:
    """Spelled-out letters ("S-M-I-T-H" or "s m i t h") become one word; a repeat is dropped."""
    out: list[str] = []
    i = 0
    while i < len(tokens):
        token = tokens[i]
        if re.fullmatch(r"[A-Za-z](?:-[A-Za-z])+", token):
            word, i = token.replace("-", ""), i + 1
        else:
            j = i
            while j < len(tokens) and len(tokens[j]) == 1 and tokens[j].isalpha():
                j += 1
            if j - i >= 3:
                word, i = "".join(tokens[i:j]), j
            else:
                out.append(token)
                i += 1
                continue
        if not (out and out[-1].lower() == word.lower()):
            out.append(word)
    return out


def _title(word: str) -> str:
    if not (word.islower() or word.isupper()):
        return word[0].upper() + word[1:]
    parts = []
    for part in word.lower().split("-"):
        pieces = part.split("'")
        head = pieces[0].capitalize()
        tail = [p.capitalize() if len(pieces[0]) == 1 else p for p in pieces[1:]]
        parts.append("'".join([head, *tail]))
    return "-".join(parts)


# ================================================================ digits

_DIGIT_GLUE = FILLERS | frozenset((
    "and", "then", "dash", "hyphen", "area", "code", "the", "number", "is", "plus",
))


def _collect_digits(words: Sequence[str]) -> str:
    """The longest run of spoken or written digits (glue words like "um", "dash" allowed)."""
    runs: list[str] = []
    current = ""
    repeat = 1
    for index, word in enumerate(words):
        if word == "one":
            word = "1"
        if word.isdigit():
            current += word[0] * repeat + word[1:]
            repeat = 1
        elif word in ("double", "triple") and _next_is_digit(words, index):
            repeat = 2 if word == "double" else 3
        elif word in ("oh", "o") and current and (
                _next_is_digit(words, index) or index == len(words) - 1):
            current += "0" * repeat
            repeat = 1
        elif word in _DIGIT_GLUE:
            continue
        else:
            if current:
                runs.append(current)
            current = ""
            repeat = 1
    if current:
        runs.append(current)
    return max(runs, key=len, default="")


def _next_is_digit(words: Sequence[str], index: int) -> bool:
    """Whether a digit follows `index`, skipping further "oh"s and "double"/"triple"."""
    for word in words[index + 1:]:
        if word.isdigit() or word == "one":
            return True
        if word not in ("oh", "o", "double", "triple"):
            return False
    return False


# ================================================================ text and choice


def _parse_text(rules: SlotRules, text: str) -> SlotValue | None:
    words = text.split()
    content = [w for w in normalize_words(text) if w not in FILLERS]
    if not content or len(words) > rules.max_words:
        return None
    value = " ".join(words)
    return SlotValue(value, value)


def _phrase_words(phrase: str) -> tuple[str, ...]:
    return tuple(stem(w) for w in normalize_words(phrase.replace("_", " ").replace("-", " ")))


def _in_order(needle: Sequence[str], hay: Sequence[str]) -> bool:
    it = iter(hay)
    return all(any(w == h for h in it) for w in needle)


def _contiguous(needle: Sequence[str], hay: Sequence[str]) -> bool:
    n = len(needle)
    return any(tuple(hay[i:i + n]) == tuple(needle) for i in range(len(hay) - n + 1))


def _parse_choice(rules: SlotRules, text: str) -> SlotValue | None:
    words = [stem(w) for w in normalize_words(text) if w not in FILLERS]
    if not words:
        return None
    best: dict[str, tuple[int, int]] = {}
    for key, phrases in rules.choices.items():
        for phrase in (key, *phrases):
            needle = _phrase_words(phrase)
            if not needle or not _in_order(needle, words):
                continue
            score = (len(needle), 1 if _contiguous(needle, words) else 0)
            best[key] = max(best.get(key, (0, 0)), score)
    if best:
        top = max(best.values())
        keys = [k for k, s in best.items() if s == top]
        return SlotValue(keys[0], _choice_spoken(keys[0])) if len(keys) == 1 else None
    digits = [w for w in normalize_words(text) if w.isdigit() or w == "one"]
    if len(digits) == 1:
        picked = rules.choice_dtmf.get("1" if digits[0] == "one" else digits[0])
        if picked:
            return SlotValue(picked, _choice_spoken(picked))
    return None


def _choice_spoken(key: str) -> str:
    return " ".join(key.replace("_", " ").replace("-", " ").split())


# ================================================================ dates and times


def _iso(day: date, clock: time | None) -> str:
    return day.isoformat() if clock is None else f"{day.isoformat()}T{clock:%H:%M}"


def _when_words(words: list[str]) -> list[str]:
    """Normalised words with a lone "one" read as 1 where it is a clock hour."""
    out = list(words)
    for i, word in enumerate(words):
        if word != "one":
            continue
        before = words[i - 1] if i else ""
        after = words[i + 1] if i + 1 < len(words) else ""
        if (before in _TIME_PREPS or before in ("past", "to") or after in ("am", "pm", "o",
                                                                             "oclock")
                or _is_minute(after) or after == "in" and _period_after(words, i + 1)):
            out[i] = "1"
    return out


def _period_after(words: Sequence[str], index: int) -> bool:
    """Whether "in the morning" (or another part of the day) starts at `index`."""
    tail = words[index:index + 3]
    return len(tail) == 3 and tail[:2] == ["in", "the"] and tail[2] in _PERIODS


def _is_minute(word: str) -> bool:
    return word.isdigit() and (len(word) == 2 and int(word) < 60)


def _read_day_number(words: Sequence[str], i: int) -> tuple[int, int, bool] | None:
    """A day of the month at `i`: (day, index after it, whether it was an ordinal)."""
    if i >= len(words):
        return None
    word = words[i]
    if word in _ORDINALS:
        return _ORDINALS[word], i + 1, True
    if not word.isdigit():
        return None
    value = int(word)
    nxt = words[i + 1] if i + 1 < len(words) else ""
    if value in (20, 30) and nxt in _ORDINALS and _ORDINALS[nxt] < 10:
        return value + _ORDINALS[nxt], i + 2, True
    if not 1 <= value <= 31:
        return None
    if nxt in _ORDINAL_SUFFIXES:
        return value, i + 2, True
    return value, i + 1, False


def _mark(used: list[bool], start: int, end: int) -> None:
    for k in range(start, end):
        used[k] = True


def _find_day(words: Sequence[str], used: list[bool], today: date) -> tuple[date | None, bool]:
    """The day the words name, and whether it came from a bare weekday name."""
    day = _month_day(words, used, today)
    if day is not None:
        return day, False
    day = _ordinal_day(words, used, today)
    if day is not None:
        return day, False
    day = _relative_day(words, used, today)
    if day is not None:
        return day, False
    return _weekday(words, used, today)


def _month_day(words: Sequence[str], used: list[bool], today: date) -> date | None:
    for i, word in enumerate(words):
        month = _MONTHS.get(word)
        if month is not None:
            j = i + 1 + (1 if i + 1 < len(words) and words[i + 1] == "the" else 0)
            read = _read_day_number(words, j)
            if read is not None and not _looks_like_clock(words, read[1], read[2]):
                _mark(used, i, read[1])
                return _resolve_month_day(words, used, read[1], month, read[0], today)
        read = _read_day_number(words, i)
        if read is None:
            continue
        j = read[1] + (1 if read[1] < len(words) and words[read[1]] == "of" else 0)
        if j < len(words) and words[j] in _MONTHS:
            start = i - 1 if i and words[i - 1] == "the" else i
            _mark(used, start, j + 1)
            return _resolve_month_day(words, used, j + 1, _MONTHS[words[j]], read[0], today)
    return None


def _looks_like_clock(words: Sequence[str], after: int, ordinal: bool) -> bool:
    """Whether a number after a month is really a time ("may 3 pm" is not "may 3")."""
    if ordinal:
        return False
    nxt = words[after] if after < len(words) else ""
    return nxt in ("am", "pm", "o", "oclock")


def _resolve_month_day(words: Sequence[str], used: list[bool], after: int, month: int,
                       day: int, today: date) -> date:
    if after < len(words) and words[after].isdigit() and len(words[after]) == 4:
        year = int(words[after])
        used[after] = True
        try:
            return date(year, month, day)
        except ValueError as exc:
            raise _Reject from exc
    try:
        candidate = date(today.year, month, day)
    except ValueError:
        candidate = None
    if candidate is not None and candidate >= today:
        return candidate
    if candidate is not None and (today - candidate).days <= PAST_DATE_WINDOW_DAYS:
        raise _Reject
    try:
        return date(today.year + 1, month, day)
    except ValueError as exc:
        raise _Reject from exc


def _ordinal_day(words: Sequence[str], used: list[bool], today: date) -> date | None:
    for i in range(len(words)):
        if used[i]:
            continue
        after_the = i > 0 and words[i - 1] == "the"
        if words[i] in _ORDINALS and not after_the:
            continue
        read = _read_day_number(words, i)
        if read is None:
            continue
        value, end, ordinal = read
        if not ordinal and not (after_the and i > 1 and words[i - 2] == "on"
                                and not _looks_like_clock(words, end, False)):
            continue
        _mark(used, i - 1 if after_the else i, end)
        year, month = today.year, today.month
        for _ in range(13):
            try:
                candidate = date(year, month, value)
            except ValueError:
                candidate = None
            if candidate is not None and candidate >= today:
                return candidate
            year, month = (year + 1, 1) if month == 12 else (year, month + 1)
        raise _Reject
    return None


def _relative_day(words: Sequence[str], used: list[bool], today: date) -> date | None:
    for i, word in enumerate(words):
        if used[i]:
            continue
        if word == "tomorrow":
            if i >= 2 and words[i - 2:i] == ["day", "after"]:
                start = i - 3 if i >= 3 and words[i - 3] == "the" else i - 2
                _mark(used, start, i + 1)
                return today + timedelta(days=2)
            used[i] = True
            return today + timedelta(days=1)
        if word in ("today", "tonight"):
            if word == "today":
                used[i] = True
            return today
        if word == "this" and i + 1 < len(words) and words[i + 1] in _PERIODS:
            used[i] = True
            return today
        if word == "in" and i + 2 < len(words):
            count_word, unit = words[i + 1], words[i + 2]
            count = (1 if count_word in ("a", "an", "one") else
                     int(count_word) if count_word.isdigit() else None)
            if count is not None and unit in ("day", "days", "week", "weeks"):
                _mark(used, i, i + 3)
                return today + timedelta(days=count * (7 if unit.startswith("week") else 1))
    return None


def _weekday(words: Sequence[str], used: list[bool], today: date) -> tuple[date | None, bool]:
    for i, word in enumerate(words):
        if used[i] or word not in _WEEKDAYS:
            continue
        target = _WEEKDAYS[word]
        used[i] = True
        before = words[max(0, i - 2):i]
        after = words[i + 1:i + 3]
        if (before[-1:] == ["next"] or before == ["next", "week"]
                or after == ["next", "week"]):
            for k in range(max(0, i - 2), min(len(words), i + 3)):
                if words[k] in ("next", "week"):
                    used[k] = True
            monday = today - timedelta(days=today.weekday())
            return monday + timedelta(days=7 + target), False
        return today + timedelta(days=(target - today.weekday()) % 7), True
    return None, False


def _find_period(words: Sequence[str], used: list[bool]) -> tuple[time, bool] | None:
    """A part of the day: its default time and whether a bare hour with it is pm."""
    for i, word in enumerate(words):
        if used[i]:
            continue
        if word == "first" and i + 1 < len(words) and words[i + 1] == "thing":
            _mark(used, i, i + 2)
            return time(8, 0), False
    for i, word in enumerate(words):
        if used[i] or word not in _PERIODS:
            continue
        used[i] = True
        default, pm = _PERIODS[word]
        if i and (words[i - 1], word) in _PERIOD_MODIFIERS:
            used[i - 1] = True
            default = _PERIOD_MODIFIERS[(words[i - 1], word)]
        return default, pm
    return None


def _find_clock(words: Sequence[str], used: list[bool],
                period: tuple[time, bool] | None) -> time | None:
    """A clock time in the unused words, or noon/midnight words; None when there is none."""
    pm_hint = None if period is None else period[1]
    # "half past 3", "quarter past 3", "quarter to 4"
    for i in range(len(words) - 2):
        if used[i] or words[i] not in ("half", "quarter"):
            continue
        rel, hour_word = words[i + 1], words[i + 2]
        if rel in ("past", "after", "to", "til", "before") and hour_word.isdigit():
            hour = int(hour_word)
            if not 1 <= hour <= 12:
                continue
            minutes = 30 if words[i] == "half" else 15
            end = i + 3
            half = words[end] if end < len(words) and words[end] in ("am", "pm") else None
            _mark(used, i, end + (1 if half else 0))
            if rel not in ("to", "til", "before"):
                return _clock(hour, minutes, half, pm_hint)
            full = datetime.combine(date.min + timedelta(days=1), _clock(hour, 0, half, pm_hint))
            return (full - timedelta(minutes=minutes)).time()
    candidates: list[tuple[int, int, int, int]] = []  # (rank, index, end, minute)
    for i, word in enumerate(words):
        if used[i] or not word.isdigit() or len(word) > 2 or int(word) > 23:
            continue
        minute, end = 0, i + 1
        if end < len(words) and not used[end] and _is_minute(words[end]):
            minute, end = int(words[end]), end + 1
        elif (end + 1 < len(words) and words[end] in ("oh", "o") and words[end + 1].isdigit()
              and len(words[end + 1]) == 1):
            minute, end = int(words[end + 1]), end + 2
        nxt = words[end] if end < len(words) else ""
        if nxt in ("am", "pm"):
            rank = 0
        elif nxt == "oclock" or (nxt == "o" and end + 1 < len(words)
                                 and words[end + 1] == "clock"):
            rank = 1
        elif i and words[i - 1] in _TIME_PREPS:
            rank = 2
        elif _period_after(words, end) or nxt in _PERIODS:
            rank = 3
        else:
            rank = 4
        candidates.append((rank, i, end, minute))
    if candidates:
        rank, i, end, minute = min(candidates)
        half = None
        if rank == 0:
            half = words[end]
            end += 1
        elif rank == 1:
            end += 1 if words[end] == "oclock" else 2
        _mark(used, i, end)
        return _clock(int(words[i]), minute, half, pm_hint)
    for i, word in enumerate(words):
        if not used[i] and word in _NOON_WORDS:
            used[i] = True
            return time(12, 0)
        if not used[i] and word == "midnight":
            used[i] = True
            return time(0, 0)
    return None


def _clock(hour: int, minute: int, half: str | None, pm_hint: bool | None) -> time:
    """A 24-hour time from a spoken hour, minutes, am/pm, and the part of day if said."""
    if not 0 <= minute <= 59 or not 0 <= hour <= 23:
        raise _Reject
    if hour == 0 or hour >= 13:
        return time(hour, minute)
    if half is not None:
        return time(hour % 12 + (12 if half == "pm" else 0), minute)
    if pm_hint is not None:
        return time(hour % 12 + (12 if pm_hint else 0), minute)
    if hour == 12:
        return time(12, minute)
    return time(hour + 12 if hour <= 7 else hour, minute)


def _unclear(words: Sequence[str]) -> bool:
    for phrase in _UNCLEAR_PHRASES:
        n = len(phrase)
        if any(tuple(words[i:i + n]) == phrase for i in range(len(words) - n + 1)):
            return True
    for i in range(len(words) - 2):
        if words[i:i + 2] == ["i", "am"] and words[i + 2] in _AMBIGUOUS_FINE:
            rest = words[i + 3:i + 4]
            if rest != ["with"]:
                return True
    return False
