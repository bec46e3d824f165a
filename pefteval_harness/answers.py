"""Answer parsing for generative tasks: the final number of a text, an `Answer: X` line, a label word.

Every parser returns the parsed answer or None when the text holds none. None is never an error here:
the metric hooks score it as wrong, so one unparseable generation cannot fail an evaluation.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from decimal import Decimal, InvalidOperation
from typing import Literal

# One number: an optional minus sign that does not join two numbers ("10-15" is two numbers, "x = -3"
# is one), digits with optional thousands separators ("1,000,000"), an optional decimal part ("3.50").
# A comma that does not group three digits separates numbers ("1,2" is 1 then 2); a full stop that
# ends a sentence ("is 18.") is not a decimal point.
_NUMBER = re.compile(r"(?<![\w.])-?(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?|(?<![\w.,])-?\.\d+")
_GSM8K_MARKER = "####"
# The word "answer" (any case) and a colon: "Answer: B", "Final answer: 42", "**Answer:** B".
_ANSWER_LINE = re.compile(r"\banswer\b\s*:(?P<value>[^\n]*)", re.IGNORECASE)
# Wrapping that models put around a value and that is never part of it.
_VALUE_WRAPPING = " \t*_`$"


def normalize_number(text: str) -> str | None:
    """The canonical form of one number written as text, or None if `text` is not a number.

    Rule: surrounding whitespace is ignored; thousands separators are removed ("1,000" -> "1000"); a
    number with no fractional part is written as an integer ("3.0" -> "3", "3." -> "3"); other
    decimals lose trailing zeros ("3.50" -> "3.5"); "-0" is "0"; a leading "+" is dropped. Two texts
    name the same number exactly when their canonical forms are equal.
    """
    candidate = text.strip().replace(",", "")
    if not re.fullmatch(r"[+-]?(?:\d+\.?\d*|\.\d+)", candidate):
        return None
    try:
        value = Decimal(candidate)
    except InvalidOperation:
        return None
    if value == value.to_integral_value():
        return str(int(value))
    return format(value.normalize(), "f")


def numbers(text: str) -> list[str]:
    """Every number in `text`, in order, each in its canonical form (see `normalize_number`)."""
    found = (normalize_number(match.group(0)) for match in _NUMBER.finditer(text))
    return [number for number in found if number is not None]


def last_number(text: str) -> str | None:
    """The last number in `text` in canonical form, or None when `text` has no number."""
    found = numbers(text)
    return found[-1] if found else None


def gsm8k_reference(answer: str) -> str | None:
    """The gold number of a GSM8K reference solution: the number after its (last) "####" marker.

    Rule: the first number after the last "####" ("... #### 70,000" -> "70000"); None without a marker
    or without a number after it.
    """
    if _GSM8K_MARKER not in answer:
        return None
    found = numbers(answer.rsplit(_GSM8K_MARKER, 1)[1])
    return found[0] if found else None


def final_number(text: str) -> str | None:
    """A model's final numeric answer: the number after its last "####" if it wrote one, else its last number.

    Rule: models fine-tuned on GSM8K end with "#### N"; text after that number (a new question the model
    starts inventing) is ignored. Without a marker, or with a marker followed by no number, the answer is
    the last number of the whole text. Canonical form as in `normalize_number`; None when there is no number.
    """
    if _GSM8K_MARKER in text:
        after = numbers(text.rsplit(_GSM8K_MARKER, 1)[1])
        if after:
            return after[0]
    return last_number(text)


def answer_line(text: str) -> str | None:
    """The value of the last `Answer: X` in `text`, or None when there is none or its value is empty.

    Rule: the word "answer" in any case followed by a colon ("Answer:", "final answer:", "**Answer:**"),
    the last such occurrence in the text; its value is the rest of that line, stripped of whitespace,
    of markdown and LaTeX wrapping (`*`, `_`, backquotes, `$`) and of one final full stop
    ("Answer: **B**." -> "B"). The value is returned as written otherwise: pass it to `normalize_number`
    or `find_label` to compare it with a gold answer.
    """
    matches = list(_ANSWER_LINE.finditer(text))
    if not matches:
        return None
    value = matches[-1].group("value").strip(_VALUE_WRAPPING)
    if value.endswith("."):
        value = value[:-1].strip(_VALUE_WRAPPING)
    return value or None


def find_label(text: str, labels: Sequence[str], position: Literal["first", "last"] = "first") -> str | None:
    """The first (or last) of the label words `labels` that occurs in `text`, spelt as in `labels`.

    Rule: a match ignores case and must stand as a whole word: no letter, digit or underscore directly
    before or after it ("positive" is not found in "positively", "not_entailment" is found in
    "not_entailment."). Where two labels overlap, the longer one wins ("not entailment" is one match of
    that label, not a match of "entailment"). `position` picks the match that starts first or last in
    the text. None when no label occurs.
    """
    if position not in ("first", "last"):
        raise ValueError(f"position must be 'first' or 'last', got {position!r}")
    # The first spelling of each label (case-insensitively) is the one returned.
    canonical: dict[str, str] = {}
    for label in labels:
        if label.strip():
            canonical.setdefault(label.lower(), label)
    if not canonical:
        return None
    alternatives = "|".join(re.escape(label) for label in sorted(canonical, key=len, reverse=True))
    pattern = re.compile(rf"(?<!\w)(?:{alternatives})(?!\w)", re.IGNORECASE)
    matches = list(pattern.finditer(text))
    if not matches:
        return None
    match = matches[0] if position == "first" else matches[-1]
    return canonical[match.group(0).lower()]
