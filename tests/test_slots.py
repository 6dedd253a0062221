"""Slot parsing: names, phone numbers, days and times, free text, yes/no, choices, digits."""

from __future__ import annotations

from datetime import date, datetime, time
from zoneinfo import ZoneInfo

import pytest

from agent.dialog.slots import (
    DTMF_TYPES,
    SLOT_TYPES,
    SlotRules,
    SlotValue,
    parse_dtmf,
    parse_speech,
    parse_when,
    spoken_datetime,
    spoken_digits,
    yes_no,
)

TZ = ZoneInfo("America/New_York")
#: Friday 27 November 2026, 10:00 in the clinic's timezone.
NOW = datetime(2026, 11, 27, 10, 0, tzinfo=TZ)

NAME = SlotRules("name")
PHONE = SlotRules("phone")
WHEN = SlotRules("datetime")
TEXT = SlotRules("text", max_words=8)
YESNO = SlotRules("yesno")
DIGITS = SlotRules("digits", min_digits=4, max_digits=6)
CHOICE = SlotRules(
    "choice",
    choices={
        "billing": ("my bill", "payment", "invoice", "insurance claim"),
        "appointments": ("book", "schedule", "reschedule", "appointment"),
        "front_desk": ("receptionist", "a person", "someone"),
        "cancel_appointment": ("cancel my appointment", "cancel"),
    },
    choice_dtmf={"1": "billing", "2": "appointments", "0": "front_desk"},
)


def test_slot_type_constants() -> None:
    assert SLOT_TYPES == ("name", "phone", "datetime", "text", "yesno", "choice", "digits")
    assert isinstance(DTMF_TYPES, frozenset)
    assert sorted(DTMF_TYPES) == ["choice", "digits", "phone", "yesno"]
    assert all(kind in SLOT_TYPES for kind in DTMF_TYPES)


@pytest.mark.parametrize("kwargs", [
    {"kind": "colour"},
    {"kind": "phone", "min_digits": 0},
    {"kind": "phone", "min_digits": 9, "max_digits": 8},
    {"kind": "text", "max_words": 0},
    {"kind": "choice", "choices": {"a": ()}, "choice_dtmf": {"1": "b"}},
])
def test_rules_reject_bad_settings(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        SlotRules(**kwargs)  # type: ignore[arg-type]


def test_rules_defaults() -> None:
    rules = SlotRules("phone")
    assert (rules.min_digits, rules.max_digits, rules.max_words) == (7, 15, 60)
    assert dict(rules.choices) == {} and dict(rules.choice_dtmf) == {}


# ---------------------------------------------------------------- name


@pytest.mark.parametrize("text, expected", [
    ("My name is John Smith.", "John Smith"),
    ("It's Maria Garcia", "Maria Garcia"),
    ("it\u2019s maria garcia", "Maria Garcia"),
    ("john smith", "John Smith"),
    ("JOHN SMITH", "John Smith"),
    ("This is Dana Lee.", "Dana Lee"),
    ("I'm Bob.", "Bob"),
    ("i am bob", "Bob"),
    ("The name is Bond, James Bond.", "Bond James Bond"),
    ("name's Alex", "Alex"),
    ("Call me Ishmael", "Ishmael"),
    ("you can call me Liz", "Liz"),
    ("Hi, yes, my name is um Dana Lee, thank you.", "Dana Lee"),
    ("John Smith please", "John Smith"),
    ("John Smith, thanks.", "John Smith"),
    ("This is John Smith calling about my appointment.", "John Smith"),
    ("john smith and i need a cleaning", "John Smith"),
    ("o'brien", "O'Brien"),
    ("this is mary-jane o'connor", "Mary-Jane O'Connor"),
    ("McDonald", "McDonald"),
    ("Jean-Luc de la Cruz", "Jean-Luc De La Cruz"),
    ("john a smith", "John A Smith"),
    ("my last name is Smith, S-M-I-T-H.", "Smith"),
    ("smith s m i t h", "Smith"),
    ("Maria's the name", "Maria"),
    ("Uh, Priya Patel.", "Priya Patel"),
    ("No, it's Jon Smyth.", "Jon Smyth"),
    ("[BLANK_AUDIO] Priya Patel", "Priya Patel"),
])
def test_name_accepts(text: str, expected: str) -> None:
    assert parse_speech(NAME, text, NOW) == SlotValue(expected, expected)


@pytest.mark.parametrize("text", [
    "", "   ", "um", "uh, um.", "Yes.", "no", "yeah sure", "Nope.",
    "john 3", "R2D2", "five five five one two three four",
    "Anna Maria Lucia Sofia Rossi",
    "I don't know", "what?", "Can you repeat that?", "my name is",
    "I want to book an appointment", "[BLANK_AUDIO]",
])
def test_name_rejects(text: str) -> None:
    assert parse_speech(NAME, text, NOW) is None


# ---------------------------------------------------------------- phone


@pytest.mark.parametrize("text, value", [
    ("5 5 5, 1 2 3, 4 5 6 7.", "5551234567"),
    ("555-123-4567", "5551234567"),
    ("555.123.4567", "5551234567"),
    ("(555) 123-4567", "5551234567"),
    ("+1 (555) 123-4567", "15551234567"),
    ("1-555-123-4567", "15551234567"),
    ("My number is 555-1234.", "5551234"),
    ("five five five one two three four", "5551234"),
    ("Five, five, five, one, two, three, four, five, six, seven.", "5551234567"),
    ("double five five one two three four five six seven", "5551234567"),
    ("triple five one two three four", "5551234"),
    ("five oh five, five five five, one two one two", "5055551212"),
    ("um six one seven five five five oh one nine nine", "6175550199"),
    ("six one seven five five five one two three oh", "6175551230"),
    ("fifty five fifty one two three four", "5551234"),
    ("area code 617 and then 555 0199", "6175550199"),
    ("It's 555 1234, call me after 3", "5551234"),
    ("five five five, um, one two three, four five six seven", "5551234567"),
])
def test_phone_accepts(text: str, value: str) -> None:
    assert parse_speech(PHONE, text, NOW) == SlotValue(value, spoken_digits(value))


@pytest.mark.parametrize("text", [
    "", "um", "my number", "one two three", "555 12",
    "1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6",
    "oh oh", "I don't have one",
])
def test_phone_rejects(text: str) -> None:
    assert parse_speech(PHONE, text, NOW) is None


def test_phone_spoken_form() -> None:
    assert parse_speech(PHONE, "555-123-4567", NOW) == SlotValue(
        "5551234567", "5 5 5, 1 2 3, 4 5 6 7")
    assert parse_speech(PHONE, "+1 555 123 4567", NOW) == SlotValue(
        "15551234567", "1, 5 5 5, 1 2 3, 4 5 6 7")


def test_phone_bounds_follow_rules() -> None:
    short = SlotRules("phone", min_digits=10, max_digits=11)
    assert parse_speech(short, "555 1234", NOW) is None
    assert parse_speech(short, "555 123 4567", NOW) is not None
    assert parse_speech(short, "44 20 7946 0958 1", NOW) is None


# ---------------------------------------------------------------- digits


@pytest.mark.parametrize("text, value", [
    ("1 2 3 4", "1234"),
    ("one two three four", "1234"),
    ("my member number is 48213", "48213"),
    ("4 8 2, 1 3 9.", "482139"),
    ("zero zero seven one", "0071"),
])
def test_digits_accepts(text: str, value: str) -> None:
    assert parse_speech(DIGITS, text, NOW) == SlotValue(value, spoken_digits(value))


@pytest.mark.parametrize("text", ["", "um", "1 2 3", "1 2 3 4 5 6 7", "I don't know it"])
def test_digits_rejects(text: str) -> None:
    assert parse_speech(DIGITS, text, NOW) is None


# ---------------------------------------------------------------- spoken digits


@pytest.mark.parametrize("digits, spoken", [
    ("5551234567", "5 5 5, 1 2 3, 4 5 6 7"),
    ("5551234", "5 5 5, 1 2 3 4"),
    ("15551234567", "1, 5 5 5, 1 2 3, 4 5 6 7"),
    ("25551234567", "2 5 5, 5 1 2, 3 4 5, 6 7"),
    ("12345678", "1 2 3, 4 5 6, 7 8"),
    ("123456789", "1 2 3, 4 5 6, 7 8 9"),
    ("1234567890123", "1 2 3, 4 5 6, 7 8 9, 0 1 2 3"),
    ("123456", "1 2 3, 4 5 6"),
    ("12345", "1 2 3, 4 5"),
    ("1234", "1 2 3 4"),
    ("7", "7"),
    ("", ""),
])
def test_spoken_digits(digits: str, spoken: str) -> None:
    assert spoken_digits(digits) == spoken


# ---------------------------------------------------------------- datetime


def d(month: int, day: int, year: int = 2026) -> date:
    return date(year, month, day)


@pytest.mark.parametrize("text, expected", [
    # relative days
    ("today", (d(11, 27), None)),
    ("Tomorrow.", (d(11, 28), None)),
    ("tomorrow at 10 a.m.", (d(11, 28), time(10, 0))),
    ("Tomorrow at 10 a.m.", (d(11, 28), time(10, 0))),
    ("day after tomorrow", (d(11, 29), None)),
    ("the day after tomorrow at one", (d(11, 29), time(13, 0))),
    ("in 3 days", (d(11, 30), None)),
    ("in three days", (d(11, 30), None)),
    ("in a week", (d(12, 4), None)),
    ("in two weeks", (d(12, 11), None)),
    ("tonight", (d(11, 27), time(17, 0))),
    ("tonight at 8", (d(11, 27), time(20, 0))),
    ("this afternoon", (d(11, 27), time(14, 0))),
    ("any time tomorrow", (d(11, 28), None)),
    ("tomorrow anytime", (d(11, 28), None)),
    # weekdays (today is Friday 27 November)
    ("monday", (d(11, 30), None)),
    ("On Monday.", (d(11, 30), None)),
    ("Sunday", (d(11, 29), None)),
    ("sunday at 11", (d(11, 29), time(11, 0))),
    ("saturday morning", (d(11, 28), time(9, 0))),
    ("this friday", (d(11, 27), None)),
    ("Friday at 3:30 p.m.", (d(11, 27), time(15, 30))),
    ("friday at 9", (d(12, 4), time(9, 0))),
    ("next monday", (d(11, 30), None)),
    ("Next Monday afternoon", (d(11, 30), time(14, 0))),
    ("next tuesday", (d(12, 1), None)),
    ("next friday", (d(12, 4), None)),
    ("next saturday", (d(12, 5), None)),
    ("monday next week", (d(11, 30), None)),
    ("next week wednesday at 4", (d(12, 2), time(16, 0))),
    ("thursdays at 2 pm", (d(12, 3), time(14, 0))),
    ("late afternoon on tuesday", (d(12, 1), time(16, 0))),
    ("first thing monday", (d(11, 30), time(8, 0))),
    ("first thing in the morning", (d(11, 28), time(8, 0))),
    # calendar dates
    ("November 30th at 2", (d(11, 30), time(14, 0))),
    ("november 30", (d(11, 30), None)),
    ("december 3rd", (d(12, 3), None)),
    ("December the first", (d(12, 1), None)),
    ("december twenty first at noon", (d(12, 21), time(12, 0))),
    ("the 30th", (d(11, 30), None)),
    ("on the 30th at 3 pm", (d(11, 30), time(15, 0))),
    ("30th of november", (d(11, 30), None)),
    ("the 3rd of december at 9:15 am", (d(12, 3), time(9, 15))),
    ("the 20th", (d(12, 20), None)),
    ("the 31st", (d(12, 31), None)),
    ("on the 2nd", (d(12, 2), None)),
    ("january 5", (d(1, 5, 2027), None)),
    ("Jan 5th at 4", (d(1, 5, 2027), time(16, 0))),
    ("november 30 2027", (d(11, 30, 2027), None)),
    ("monday the 30th", (d(11, 30), None)),
    # times only: today when still ahead, else tomorrow
    ("3 pm", (d(11, 27), time(15, 0))),
    ("3pm", (d(11, 27), time(15, 0))),
    ("3 30 pm", (d(11, 27), time(15, 30))),
    ("three thirty in the afternoon", (d(11, 27), time(15, 30))),
    ("15:00", (d(11, 27), time(15, 0))),
    ("at 9", (d(11, 28), time(9, 0))),
    ("9 am", (d(11, 28), time(9, 0))),
    ("10 in the morning", (d(11, 28), time(10, 0))),
    ("2 in the afternoon", (d(11, 27), time(14, 0))),
    ("at 7", (d(11, 27), time(19, 0))),
    ("at 8", (d(11, 28), time(8, 0))),
    ("at 12", (d(11, 27), time(12, 0))),
    ("twelve thirty", (d(11, 27), time(12, 30))),
    ("noon", (d(11, 27), time(12, 0))),
    ("midday", (d(11, 27), time(12, 0))),
    ("morning", (d(11, 28), time(9, 0))),
    ("afternoon", (d(11, 27), time(14, 0))),
    ("in the evening", (d(11, 27), time(17, 0))),
    ("4 o'clock", (d(11, 27), time(16, 0))),
    ("around 11", (d(11, 27), time(11, 0))),
    ("at 10", (d(11, 28), time(10, 0))),
    ("half past two", (d(11, 27), time(14, 30))),
    ("quarter to 4 tomorrow", (d(11, 28), time(15, 45))),
    ("quarter to 8 tomorrow", (d(11, 28), time(7, 45))),
    ("tomorrow at three oh five", (d(11, 28), time(15, 5))),
    ("Um, maybe Tuesday, uh, around 2:30?", (d(12, 1), time(14, 30))),
    ("[BLANK_AUDIO] tomorrow at 10", (d(11, 28), time(10, 0))),
    ("12 am tomorrow", (d(11, 28), time(0, 0))),
])
def test_parse_when_accepts(text: str, expected: tuple[date, time | None]) -> None:
    assert parse_when(text, NOW) == expected


@pytest.mark.parametrize("text", [
    "", "um", "hello", "I don't know", "anytime", "whenever works",
    "next week",
    "november 20",            # a week ago
    "the 26th of november",   # yesterday
    "november 1 2026",        # past, year stated
    "today at 9",             # earlier today
    "this morning",
    "february 30",            # no such day
    "the 32nd",
    "at 25",
])
def test_parse_when_rejects(text: str) -> None:
    assert parse_when(text, NOW) is None


def test_parse_when_is_relative_to_now() -> None:
    late = datetime(2026, 11, 27, 16, 0, tzinfo=TZ)
    assert parse_when("3 pm", late) == (d(11, 28), time(15, 0))
    assert parse_when("friday at 3 pm", late) == (d(12, 4), time(15, 0))
    assert parse_when("today at 5 pm", late) == (d(11, 27), time(17, 0))
    assert parse_when("today at 3 pm", late) is None
    sunday = datetime(2026, 11, 29, 9, 0, tzinfo=TZ)
    assert parse_when("next monday", sunday) == (d(11, 30), None)
    assert parse_when("monday", sunday) == (d(11, 30), None)
    monday = datetime(2026, 11, 23, 9, 0, tzinfo=TZ)
    assert parse_when("next tuesday", monday) == (d(12, 1), None)
    assert parse_when("tuesday", monday) == (d(11, 24), None)
    new_year = datetime(2026, 12, 30, 9, 0, tzinfo=TZ)
    assert parse_when("the 2nd", new_year) == (d(1, 2, 2027), None)
    assert parse_when("tomorrow", datetime(2026, 12, 31, 9, 0, tzinfo=TZ)) == (d(1, 1, 2027), None)


def test_parse_when_keeps_local_time_across_dst() -> None:
    before_dst = datetime(2026, 3, 7, 10, 0, tzinfo=TZ)  # Saturday; DST starts 8 March
    assert parse_when("tomorrow at 9 am", before_dst) == (d(3, 8), time(9, 0))


@pytest.mark.parametrize("text, value, spoken", [
    ("Tomorrow at 10 a.m.", "2026-11-28T10:00", "Saturday, November 28 at 10 AM"),
    ("Next Monday afternoon", "2026-11-30T14:00", "Monday, November 30 at 2 PM"),
    ("Friday at 3:30 p.m.", "2026-11-27T15:30", "Friday, November 27 at 3:30 PM"),
    ("November 30th at 2", "2026-11-30T14:00", "Monday, November 30 at 2 PM"),
    ("sunday", "2026-11-29", "Sunday, November 29"),
    ("december 3rd", "2026-12-03", "Thursday, December 3"),
])
def test_datetime_slot(text: str, value: str, spoken: str) -> None:
    assert parse_speech(WHEN, text, NOW) == SlotValue(value, spoken)


@pytest.mark.parametrize("text", ["november 20", "yes", "um", "today at 8"])
def test_datetime_slot_rejects(text: str) -> None:
    assert parse_speech(WHEN, text, NOW) is None


@pytest.mark.parametrize("iso, spoken", [
    ("2026-11-30T15:00", "Monday, November 30 at 3 PM"),
    ("2026-11-30T09:30", "Monday, November 30 at 9:30 AM"),
    ("2026-11-30", "Monday, November 30"),
    ("2026-11-30T12:00", "Monday, November 30 at 12 PM"),
    ("2026-11-30T12:45", "Monday, November 30 at 12:45 PM"),
    ("2026-11-30T00:05", "Monday, November 30 at 12:05 AM"),
    ("2026-12-01T17:00:00", "Tuesday, December 1 at 5 PM"),
    ("2027-01-01", "Friday, January 1"),
])
def test_spoken_datetime(iso: str, spoken: str) -> None:
    assert spoken_datetime(iso) == spoken


@pytest.mark.parametrize("iso", [
    "", "tomorrow", "2026-02-30", "2026-11-30T25:00", "2026-11-30T10:61", "30/11/2026",
    "2026-11-30 extra", "2026-11-3",
])
def test_spoken_datetime_rejects(iso: str) -> None:
    assert spoken_datetime(iso) is None


# ---------------------------------------------------------------- text


@pytest.mark.parametrize("text, value", [
    ("My tooth hurts.", "My tooth hurts."),
    ("  um   my  crown   fell out  ", "um my crown fell out"),
    ("I need a cleaning\nand a checkup", "I need a cleaning and a checkup"),
    ("(coughs) Broken filling", "Broken filling"),
    ("yes", "yes"),
    ("one two three four five six seven eight", "one two three four five six seven eight"),
])
def test_text_accepts(text: str, value: str) -> None:
    assert parse_speech(TEXT, text, NOW) == SlotValue(value, value)


@pytest.mark.parametrize("text", [
    "", "   ", "um", "uh, um... hmm", "[BLANK_AUDIO]",
    "one two three four five six seven eight nine",
])
def test_text_rejects(text: str) -> None:
    assert parse_speech(TEXT, text, NOW) is None


# ---------------------------------------------------------------- yes / no


@pytest.mark.parametrize("text", [
    "yes", "Yes.", "yes please", "Yeah, that's right.", "yeah that's right", "correct",
    "That's correct.", "sure", "Sure thing", "that works", "That works for me.", "yep",
    "Yup!", "absolutely", "definitely", "of course", "okay", "OK", "alright", "sounds good",
    "perfect", "that's fine", "go ahead", "please do", "please", "no problem", "why not",
    "uh-huh", "mm-hmm", "I do", "I'm fine with that", "right", "exactly", "um, yes",
])
def test_yes(text: str) -> None:
    assert yes_no(text) is True


@pytest.mark.parametrize("text", [
    "no", "No.", "no thanks", "No, thank you.", "nope", "nah", "that's wrong",
    "No, that's wrong.", "no that's wrong", "not really", "Not quite.", "incorrect",
    "that's not right", "that is not correct", "cancel", "please don't", "don't",
    "I don't", "never mind", "that doesn't work", "no way", "not right now", "wrong",
])
def test_no(text: str) -> None:
    assert yes_no(text) is False


@pytest.mark.parametrize("text", [
    "", "um", "hello", "maybe", "I'm not sure", "I don't know", "yes no", "yeah no",
    "no, yes", "perhaps", "what?", "yes, what time?", "I'm good", "I guess",
    "tomorrow at 3", "can you repeat that", "[BLANK_AUDIO]",
])
def test_yes_no_unclear(text: str) -> None:
    assert yes_no(text) is None


@pytest.mark.parametrize("text, value", [
    ("yes please", "yes"), ("that's right", "yes"), ("no that's wrong", "no"),
    ("nope", "no"),
])
def test_yesno_slot(text: str, value: str) -> None:
    assert parse_speech(YESNO, text, NOW) == SlotValue(value, value)


@pytest.mark.parametrize("text", ["maybe", "um", "blue"])
def test_yesno_slot_rejects(text: str) -> None:
    assert parse_speech(YESNO, text, NOW) is None


# ---------------------------------------------------------------- choice


@pytest.mark.parametrize("text, key", [
    ("billing", "billing"),
    ("Billing, please.", "billing"),
    ("I have a question about my bill", "billing"),
    ("it's about a payment", "billing"),
    ("an insurance claim", "billing"),
    ("I want to book an appointment", "appointments"),
    ("schedule a cleaning", "appointments"),
    ("appointments", "appointments"),
    ("can I talk to a person", "front_desk"),
    ("the front desk", "front_desk"),
    ("receptionist please", "front_desk"),
    ("I need to cancel my appointment", "cancel_appointment"),
    ("cancel", "cancel_appointment"),
    ("option two", "appointments"),
    ("one", "billing"),
    ("zero", "front_desk"),
])
def test_choice_accepts(text: str, key: str) -> None:
    value = parse_speech(CHOICE, text, NOW)
    assert value is not None and value.value == key
    assert value.spoken == key.replace("_", " ")


@pytest.mark.parametrize("text", [
    "", "um", "the weather", "payment for my appointment",  # tie: billing vs appointments
    "option seven", "yes",
])
def test_choice_rejects(text: str) -> None:
    assert parse_speech(CHOICE, text, NOW) is None


def test_choice_without_phrases_matches_key() -> None:
    rules = SlotRules("choice", choices={"hygienist": (), "dentist": ()})
    assert parse_speech(rules, "the hygienist please", NOW) == SlotValue("hygienist", "hygienist")
    assert parse_speech(rules, "a dentist", NOW) == SlotValue("dentist", "dentist")
    assert parse_speech(rules, "whoever", NOW) is None


# ---------------------------------------------------------------- DTMF


@pytest.mark.parametrize("rules, digits, expected", [
    (PHONE, "5551234567", SlotValue("5551234567", "5 5 5, 1 2 3, 4 5 6 7")),
    (PHONE, "5551234", SlotValue("5551234", "5 5 5, 1 2 3 4")),
    (PHONE, "555123", None),
    (PHONE, "5551234567890123", None),
    (PHONE, "555*1234", None),
    (PHONE, "", None),
    (DIGITS, "1234", SlotValue("1234", "1 2 3 4")),
    (DIGITS, "123", None),
    (DIGITS, "1234567", None),
    (YESNO, "1", SlotValue("yes", "yes")),
    (YESNO, "2", SlotValue("no", "no")),
    (YESNO, "3", None),
    (YESNO, "12", None),
    (CHOICE, "1", SlotValue("billing", "billing")),
    (CHOICE, "0", SlotValue("front_desk", "front desk")),
    (CHOICE, "9", None),
    (NAME, "1", None),
    (WHEN, "1130", None),
    (TEXT, "42", None),
])
def test_parse_dtmf(rules: SlotRules, digits: str, expected: SlotValue | None) -> None:
    assert parse_dtmf(rules, digits) == expected


def test_slot_value_is_frozen() -> None:
    value = SlotValue("yes", "yes")
    with pytest.raises(AttributeError):
        value.value = "no"  # type: ignore[misc]
