"""Tests for sentence chunking, normalisation and word error rate."""

from __future__ import annotations

import pytest

from agent.engine.text import SentenceChunker, normalize, word_error_rate


def _chunk(tokens: list[str]) -> tuple[list[str], str | None]:
    chunker = SentenceChunker()
    sentences: list[str] = []
    for token in tokens:
        sentences += chunker.push(token)
    return sentences, chunker.flush()


def test_splits_on_terminal_punctuation_followed_by_space() -> None:
    sentences, rest = _chunk(["Hello", " there", ".", " How", " are you", "?", " Fine", "!"])
    assert sentences == ["Hello there.", "How are you?"]
    assert rest == "Fine!"


def test_sentence_is_emitted_as_soon_as_the_next_token_starts() -> None:
    chunker = SentenceChunker()
    assert chunker.push("We are open.") == []
    assert chunker.push(" Come") == ["We are open."]
    assert chunker.flush() == "Come"
    assert chunker.flush() is None


@pytest.mark.parametrize(
    "text",
    [
        "Dr. Smith will see you now.",
        "Bring documents, e.g. your insurance card.",
        "That comes to 3.50 dollars.",
        "We open at 9:00 a.m. tomorrow.",
        "Mrs. Jones and J. Smith called.",
        "See item no. 5 please.",
    ],
)
def test_does_not_split_inside(text: str) -> None:
    sentences, rest = _chunk(list(text))
    assert sentences == []
    assert rest == text


def test_abbreviation_before_a_capitalised_word_ends_the_sentence() -> None:
    sentences, rest = _chunk(["We open at 9 a.m.", " Come", " by."])
    assert sentences == ["We open at 9 a.m."]
    assert rest == "Come by."


def test_decimal_split_across_tokens() -> None:
    sentences, rest = _chunk(["It costs $3", ".", "50", " today. Thanks"])
    assert sentences == ["It costs $3.50 today."]
    assert rest == "Thanks"


def test_no_as_an_answer_is_a_sentence() -> None:
    assert _chunk(["No.", " I", " can't."]) == (["No."], "I can't.")


def test_long_clause_splits_on_comma_or_semicolon() -> None:
    text = "This is a long clause that keeps going and going for quite a while, and more follows"
    sentences, rest = _chunk([word + " " for word in text.split(" ")])
    assert sentences == ["This is a long clause that keeps going and going for quite a while,"]
    assert rest == "and more follows"


def test_short_clause_does_not_split_on_comma() -> None:
    assert _chunk(["Yes, I can help; sure, go on"]) == ([], "Yes, I can help; sure, go on")


def test_closing_quote_stays_with_its_sentence_and_newline_splits() -> None:
    sentences, rest = _chunk(['He said "hi." Then', " left\nNext line"])
    assert sentences == ['He said "hi."', "Then left"]
    assert rest == "Next line"


def test_ellipsis_and_multiple_marks() -> None:
    assert _chunk(["Well... really?! Yes"]) == (["Well...", "really?!"], "Yes")


def test_normalize() -> None:
    assert normalize("  Hello, WORLD!  It's   9:00 a.m.  ") == "hello world its 9 00 a m"
    assert normalize("well-known") == "well known"
    assert normalize("...") == ""


def test_word_error_rate() -> None:
    assert word_error_rate("Hello world.", "hello, world") == 0.0
    assert word_error_rate("a b c d", "a x c d") == 0.25
    assert word_error_rate("a b c d", "a c d") == 0.25
    assert word_error_rate("a b", "a b c d") == 1.0
    assert word_error_rate("", "") == 0.0
    assert word_error_rate("", "noise") == 1.0
    assert word_error_rate("one", "") == 1.0


def test_first_chunk_may_end_at_an_earlier_comma() -> None:
    text = "Our hygienist can help with that, and the dentist will check your gums, too."
    early = SentenceChunker(first_clause_chars=24)
    late = SentenceChunker()
    early_out = [s for tok in text.split(" ") for s in early.push(tok + " ")]
    late_out = [s for tok in text.split(" ") for s in late.push(tok + " ")]
    assert early_out[0] == "Our hygienist can help with that,"
    # without it the first cut waits for a comma past 60 characters
    assert late_out[0] == "Our hygienist can help with that, and the dentist will check your gums,"
