"""Answer parsing for generative tasks: the final number of a text, an `Answer: X` line, a label word, a
multiple-choice letter, a MATH answer (the last `\\boxed{}`, normalised for comparison).

Every parser returns the parsed answer or None when the text holds none. None is never an error here:
the metric hooks score it as wrong, so one unparseable generation cannot fail an evaluation.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from decimal import Decimal, InvalidOperation
from fractions import Fraction
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


def answer_line(text: str, position: Literal["first", "last"] = "last") -> str | None:
    """The value of the last (or first) `Answer: X` in `text`, or None when there is none or its value is empty.

    Rule: the word "answer" in any case followed by a colon ("Answer:", "final answer:", "**Answer:**"),
    the last such occurrence in the text (`position="first"`: the first, as a regex search finds it); its
    value is the rest of that line, stripped of whitespace,
    of markdown and LaTeX wrapping (`*`, `_`, backquotes, `$`) and of one final full stop
    ("Answer: **B**." -> "B"). The value is returned as written otherwise: pass it to `normalize_number`
    or `find_label` to compare it with a gold answer.
    """
    if position not in ("first", "last"):
        raise ValueError(f"position must be 'first' or 'last', got {position!r}")
    matches = list(_ANSWER_LINE.finditer(text))
    if not matches:
        return None
    value = matches[0 if position == "first" else -1].group("value").strip(_VALUE_WRAPPING)
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


# --- The `Answer: X` protocol of the merging benchmarks -------------------------------------------------
# The authors of "Why Do More Experts Fail?" ask for a last line `Answer: X` and read X with a regex search,
# which finds the first such line; these parsers read that same line (`answer_line(..., "first")`).

_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
# A choice letter at the start of the value, alone or bracketed: "B", "(B)", "B)", "[b]", "B: Paris", "B Paris".
_LEADING_LETTER = re.compile(r"[(\[{]?\s*([A-Za-z])\s*(?:[)\]}]|(?![A-Za-z0-9]))")
# LaTeX wrappers models put around a short answer; their argument is the answer.
_TEXT_COMMAND = re.compile(r"\\(?:text|textbf|textit|mathrm|mathbf|mbox)\s*\{([^{}]*)\}")


def choice_letter(text: str, n_choices: int) -> int | None:
    """The index (0 for A) of the option a model chose on its first `Answer:` line, or None.

    Rule: the value of the first `Answer:` line (see `answer_line`), with a `\\boxed{}` or `\\text{}` around
    it removed, must start with a letter in any case, alone or in brackets and not followed by another
    letter or digit: "Answer: (B)", "answer: b.", "Answer: **C**", "Answer: D) Paris" are parsed;
    "Answer: Paris" is not, and neither is "The answer is C" (no colon, as in the authors' regex). A letter
    beyond the `n_choices` options ("E" of four) is no answer either: None.
    """
    value = answer_line(text, position="first")
    return _leading_choice(value, n_choices) if value is not None else None


def _leading_choice(value: str, n_choices: int) -> int | None:
    """The option index named by the letter `value` starts with (see `choice_letter`), or None."""
    inner = boxed(value)
    value = _TEXT_COMMAND.sub(r"\1", inner if inner is not None else value).strip()
    match = _LEADING_LETTER.match(value)
    if match is None:
        return None
    index = _LETTERS.index(match.group(1).upper())
    return index if index < n_choices else None


def choice_letters(n_choices: int) -> str:
    """The letters that name `n_choices` options, in order: "ABCD" for four."""
    if not 0 < n_choices <= len(_LETTERS):
        raise ValueError(f"n_choices must be 1-{len(_LETTERS)}, got {n_choices}")
    return _LETTERS[:n_choices]


def answer_number(text: str) -> str | None:
    """The number a model gave on its first `Answer:` line, in canonical form (see `normalize_number`).

    Rule: the final number of that line's value (`final_number`), so units and currency around it do not
    matter ("Answer: $1,000 dollars" -> "1000", "Answer: 5 + 13 = 18" -> "18"). None without an `Answer:`
    line or without a number on it; a number elsewhere in the text is not used.
    """
    value = answer_line(text, position="first")
    return final_number(value) if value is not None else None


def boxed(text: str) -> str | None:
    """The content of the last `\\boxed{...}` (or `\\fbox{...}`) in `text`, braces balanced, or None.

    Rule: "... so $x = \\boxed{\\frac{1}{2}}$." -> "\\frac{1}{2}"; the unbraced form "\\boxed 5" gives the
    text up to the next space or `$` ("5"). None when there is no box or its braces never close.
    """
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    rest = text[start + (len("\\boxed") if text.startswith("\\boxed", start) else len("\\fbox")) :]
    if rest.startswith(" "):
        content = rest.lstrip(" ").split("$")[0].split(" ")[0]
        return content or None
    if not rest.startswith("{"):
        return None
    depth = 0
    for position, char in enumerate(rest):
        depth += {"{": 1, "}": -1}.get(char, 0)
        if depth == 0:
            return rest[1:position]
    return None


def math_answer(text: str) -> str | None:
    """A model's answer to a MATH problem: the value of its first `Answer:` line (a `\\boxed{}` in it is
    unwrapped), or None when it wrote no such line. Compare it with `math_equivalent`."""
    value = answer_line(text, position="first")
    if value is None:
        return None
    inner = boxed(value)
    return inner if inner is not None else value


def math_reference(solution: str) -> str | None:
    """The gold answer of a MATH solution: the content of its last `\\boxed{}` (None if it has none)."""
    return boxed(solution)


def math_equivalent(prediction: str | None, reference: str) -> bool:
    """Whether a predicted MATH answer equals the reference once both are normalised (`normalize_math`).
    A prediction of None (no answer) is never equal."""
    return prediction is not None and normalize_math(prediction) == normalize_math(reference)


# Spacing and sizing commands that never change a value.
_LATEX_NOISE = ("\\left", "\\right", "\\!", "\\,", "\\;", "\\:", "\\ ", "~", "\\displaystyle")
_DEGREES = re.compile(r"\^\s*\{?\s*\\circ\s*\}?")
# A unit after the value, written the way MATH solutions write one: "\text{ cm}" with a leading space.
_TRAILING_UNIT = re.compile(r"(?<=\S)\s*\\(?:text|mbox)\s*\{\s[^{}]*\}\s*$")
# "x = 5" or "k=5": a short variable name before the value (a longer left side is part of the answer).
_SHORT_ASSIGNMENT = re.compile(r"^[A-Za-z](?:_?[A-Za-z0-9])?=(?!=)")
_BARE_DECIMAL = re.compile(r"(?<![\d}])\.(\d)")
_SQRT_SHORT = re.compile(r"\\sqrt(\w)")
_GROUPED_INTEGER = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
_DECIMAL = re.compile(r"-?(?:\d+(?:\.\d*)?|\.\d+)")
_SLASH_FRACTION = re.compile(r"(-?\d+)/(\d+)")
_FRAC_OF_INTEGERS = re.compile(r"(-?)\\frac\{(-?\d+)\}\{(-?\d+)\}")


def normalize_math(answer: str) -> str:
    """A MATH answer in a canonical form, so that two ways of writing the same answer compare equal.

    In the manner of Hendrycks et al.'s `is_equiv` normalisation (our own rules, applied in this order):
    the last `\\boxed{}` is unwrapped; line breaks, `\\left`/`\\right`, LaTeX spacing, `$`, degree marks
    (`^\\circ`), percent signs and a trailing unit written `\\text{ unit}` are removed; `\\dfrac` and
    `\\tfrac` become `\\frac`; `\\text{X}` (and `\\mathrm`, `\\textbf`, `\\mbox`) becomes X; all
    whitespace is removed; a short variable assignment in front ("x=", "k_1=") and one trailing full stop
    are dropped; `\\frac12` and `\\sqrt3` get their braces (`\\frac{1}{2}`, `\\sqrt{3}`); a bare decimal
    gets its zero (".5" -> "0.5").

    Then one rule beyond Hendrycks' (which maps only the text "0.5" to `\\frac{1}{2}`): an answer that is a
    plain rational number, written as an integer, a decimal (thousands separators allowed), `a/b` or
    `\\frac{a}{b}`, with an optional minus sign, is rewritten as its exact value: an integer ("3.0" -> "3")
    or a reduced `\\frac{p}{q}` with the sign in front. So "0.5", "1/2", "\\dfrac12", "\\frac{2}{4}" and
    "\\boxed{\\frac{1}{2}}" are all `\\frac{1}{2}`; "0.33" is not `\\frac{1}{3}` (the values differ).
    Anything else (expressions, intervals, tuples, radicals) is compared as the normalised text.
    """
    text = answer.strip()
    inner = boxed(text)
    if inner is not None:
        text = inner
    text = text.replace("\n", " ").replace("\\$", "").replace("$", "")
    text = _TRAILING_UNIT.sub("", text)
    for noise in _LATEX_NOISE:
        text = text.replace(noise, "" if noise != "\\ " else " ")
    text = text.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    text = _DEGREES.sub("", text)
    text = text.replace("\\%", "").replace("%", "")
    text = _TEXT_COMMAND.sub(r"\1", text)
    text = re.sub(r"\s+", "", text)
    text = _SHORT_ASSIGNMENT.sub("", text, count=1)
    if text.endswith("."):
        text = text[:-1]
    text = _braced_fractions(_SQRT_SHORT.sub(r"\\sqrt{\1}", text))
    text = _BARE_DECIMAL.sub(r"0.\1", text)
    value = _rational(text)
    return _format_rational(value) if value is not None else text


def _braced_fractions(text: str) -> str:
    r"""`\frac` with both arguments in braces: "\frac12" -> "\frac{1}{2}", "\frac1{x}" -> "\frac{1}{x}"."""
    out, position = [], 0
    while (start := text.find("\\frac", position)) >= 0:
        out.append(text[position : start + len("\\frac")])
        position = start + len("\\frac")
        for _ in range(2):  # numerator, denominator
            if position >= len(text):
                break
            if text[position] == "{":
                depth, end = 0, position
                for end in range(position, len(text)):
                    depth += {"{": 1, "}": -1}.get(text[end], 0)
                    if depth == 0:
                        break
                out.append(text[position : end + 1])
                position = end + 1
            elif text[position] == "\\":  # a command argument (\pi) is left as written
                break
            else:
                out.append("{" + text[position] + "}")
                position += 1
    out.append(text[position:])
    return "".join(out)


def _rational(text: str) -> Fraction | None:
    """The exact value of a plain rational number written as text (see `normalize_math`), else None."""
    if _GROUPED_INTEGER.fullmatch(text):
        text = text.replace(",", "")
    try:
        if _DECIMAL.fullmatch(text):
            return Fraction(Decimal(text))
        if match := _SLASH_FRACTION.fullmatch(text):
            numerator, denominator = int(match.group(1)), int(match.group(2))
        elif match := _FRAC_OF_INTEGERS.fullmatch(text):
            numerator, denominator = int(match.group(2)), int(match.group(3))
            numerator = -numerator if match.group(1) else numerator
        else:
            return None
        return Fraction(numerator, denominator)
    except (ZeroDivisionError, InvalidOperation, ValueError):
        return None


def _format_rational(value: Fraction) -> str:
    if value.denominator == 1:
        return str(value.numerator)
    sign = "-" if value < 0 else ""
    return f"{sign}\\frac{{{abs(value.numerator)}}}{{{value.denominator}}}"


# --- The affective classification tasks (task_configs/affective) ----------------------------------------
# One rule serves the plain generative form (the reply after the prompt's own "Answer:" holds no marker)
# and chain of thought (whose `cot` filter keeps the text after the last marker): the label is read from
# the last `Answer:` line when there is one, else from the whole text.


def affect_label(text: str, labels: Sequence[str]) -> str | None:
    """The label word a model gave, spelt as in `labels`, or None.

    Rule: if `text` holds an `Answer:` marker (the word "answer" in any case and a colon, as `answer_line`
    finds it), the first of `labels` in the value of the LAST marker (the rest of its line; an empty value
    or one naming no label gives None, even if a label occurs elsewhere); otherwise the first of `labels`
    anywhere in the text. Labels match as `find_label` matches them: case ignored, whole words, the longer
    of two overlapping labels winning ("not offensive" is not "offensive").
    """
    if _ANSWER_LINE.search(text) is None:
        return find_label(text, labels, "first")
    value = answer_line(text, "last")
    return find_label(value, labels, "first") if value is not None else None


def affect_choice(text: str, n_choices: int) -> int | None:
    """The option index (0 for A) a model chose among `n_choices` lettered options, or None.

    Rule: the value of the LAST `Answer:` marker if the text holds one, else the whole text (stripped of
    whitespace and markdown wrapping), must start with an option letter as `choice_letter` reads it
    ("B", "(b)", "**C**", "D) Paris"); a letter beyond the options is no answer.
    """
    if _ANSWER_LINE.search(text) is None:
        value = text.strip(_VALUE_WRAPPING + "\n")
        return _leading_choice(value, n_choices) if value else None
    value = answer_line(text, "last")
    return _leading_choice(value, n_choices) if value is not None else None
