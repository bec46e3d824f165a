"""Answer parsing for generative tasks: each rule on hand-made texts, and None (never an error) for no answer."""

from __future__ import annotations

import pytest

from pefteval_harness import answers


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("42", "42"),
        ("-3", "-3"),
        ("+3", "3"),
        ("3.50", "3.5"),
        ("3.5", "3.5"),
        ("3.0", "3"),
        ("3.", "3"),
        ("-0", "0"),
        (".5", "0.5"),
        ("1,000", "1000"),
        ("1,234,567.890", "1234567.89"),
        (" 7 ", "7"),
        ("007", "7"),
        ("seven", None),
        ("", None),
        ("1e5", None),
        ("3/4", None),
    ],
)
def test_normalize_number(text, expected):
    assert answers.normalize_number(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("He paid $1,000,000 for it.", ["1000000"]),
        ("The answer is 18.", ["18"]),  # a sentence's full stop is not a decimal point
        ("from 10-15 people", ["10", "15"]),  # a hyphen between numbers is no minus sign
        ("x = -3, y = 3.50", ["-3", "3.5"]),
        ("1,2 and 3", ["1", "2", "3"]),  # a comma that does not group thousands separates numbers
        ("COVID-19 in 2020", ["19", "2020"]),
        ("x2 and abc123", []),  # digits inside a word are no number
        ("costs .5 now", ["0.5"]),
        ("no digits at all", []),
    ],
)
def test_numbers(text, expected):
    assert answers.numbers(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n#### 72", "72"),
        ("So he made 70,000 dollars.\n#### 70,000", "70000"),
        ("It drops by 3.\n#### -3", "-3"),
        ("#### 1 #### 2", "2"),  # the last marker counts
        ("No marker: 5 apples", None),
        ("####", None),
    ],
)
def test_gsm8k_reference(text, expected):
    assert answers.gsm8k_reference(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("She has 5 apples and buys 3, so 5 + 3 = 8.", "8"),  # no marker: the last number
        ("5 + 3 = 8\n#### 8\n\nQuestion: Tom has 4 cars", "8"),  # after the marker, what follows is ignored
        ("#### 3.50", "3.5"),
        ("The total is $1,250.", "1250"),
        ("#### none\nbut 12 after all", "12"),  # a marker with no number after it: the last number
        ("I cannot tell.", None),
        ("", None),
    ],
)
def test_final_number(text, expected):
    assert answers.final_number(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Step by step... so B.\nAnswer: B", "B"),
        ("answer: A\nWait, no.\nANSWER: C", "C"),  # the last occurrence, any case
        ("Final answer: 42.", "42"),
        ("**Answer:** **D**", "D"),
        ("Answer: $\\frac{1}{2}$", "\\frac{1}{2}"),
        ("Answer: 3.5", "3.5"),
        ("Answer: the Eiffel Tower\nThat is all.", "the Eiffel Tower"),
        ("Answer:   \n", None),
        ("The answers: are many", None),  # "answers" is another word
        ("I think it is B.", None),
    ],
)
def test_answer_line(text, expected):
    assert answers.answer_line(text) == expected


LABELS = ["positive", "negative", "neutral"]


@pytest.mark.parametrize(
    ("text", "labels", "position", "expected"),
    [
        ("The sentiment is Positive.", LABELS, "first", "positive"),
        ("Not negative, rather POSITIVE", LABELS, "first", "negative"),
        ("Not negative, rather POSITIVE", LABELS, "last", "positive"),
        ("positively great", LABELS, "first", None),  # whole words only
        ("it is not_entailment.", ["entailment", "not_entailment"], "first", "not_entailment"),
        ("not entailment", ["entailment", "not entailment"], "last", "not entailment"),  # the longer label wins
        ("Answer: yes", ["Yes", "No"], "first", "Yes"),  # returned as spelt in the labels
        ("nothing relevant", LABELS, "first", None),
        ("", LABELS, "last", None),
        ("positive", [], "first", None),
    ],
)
def test_find_label(text, labels, position, expected):
    assert answers.find_label(text, labels, position) == expected


def test_find_label_rejects_an_unknown_position():
    with pytest.raises(ValueError, match="position"):
        answers.find_label("positive", LABELS, "middle")  # type: ignore[arg-type]


def test_parsers_compose_for_multiple_choice():
    # The merging suite's protocol: the `Answer: X` line, then the letter among the choices.
    value = answers.answer_line("Let me think.\nAnswer: (c) because...")
    assert answers.find_label(value, ["A", "B", "C", "D"]) == "C"
