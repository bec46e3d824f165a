"""lm-eval hooks of the model-merging benchmarks (pefteval_merge_*) of knowledge and math: data, the
authors' zero-shot prompts, and the scoring of their `Answer: X` protocol.

The prompts are the wording of the evaluators of "Why Do More Experts Fail? A Theoretical Analysis of Model
Merging" (arXiv 2505.21226): a step-by-step instruction and a last line `Answer: X`. Scoring reads the first
`Answer:` line (pefteval_harness.answers); a generation without a parseable one is wrong, and each task
also reports `parsed`, the share of generations that had one (the authors' code guessed "C" for a
multiple-choice question without one).
"""

from __future__ import annotations

from collections.abc import Sequence

from pefteval_harness import answers
from pefteval_harness.tasks.data import load as load_data  # noqa: F401

# --- data -------------------------------------------------------------------------------------------

# --- prompts ----------------------------------------------------------------------------------------

_LETTER_INSTRUCTION = (
    "The last line of your response should be of the following format: 'Answer: $LETTER' (without quotes)"
    " where LETTER is one of {letters}."
)
_MATH_INSTRUCTION = (
    "Solve the following math problem step by step. The last line of your response should be of the form"
    " Answer: $ANSWER (without quotes) where $ANSWER is the answer to the problem.\n\n{question}\n\n"
    'Remember to put your answer on its own line after "Answer:", and you do not need to use a \\boxed command.'
)
_MGSM_INSTRUCTION = (
    "Solve the following math problem step by step. Provide your explanation and final answer in English, the"
    " last line of your response should be of the form Answer: $ANSWER (without quotes) where $ANSWER is the"
    ' answer to the problem.\n\n{question}\n\nRemember to put your answer on its own line after "Answer:", and'
    " you do not need to use a \\boxed command, always respond in English."
)


def _options(texts: Sequence[str], separator: str) -> str:
    """The options, one a line, lettered A, B, ... ("A. text" or "A) text", as each evaluator wrote them)."""
    letters = answers.choice_letters(len(texts))
    return "\n".join(f"{letter}{separator} {text}" for letter, text in zip(letters, texts, strict=True))


def mmlu_prompt(doc: dict) -> str:
    subject = doc["subject"].replace("_", " ")
    return _lettered_prompt(f"Answer the following {subject} question.", doc["question"], doc["choices"], ".")


def mmlu_pro_prompt(doc: dict) -> str:
    return _lettered_prompt(f"Answer the following {doc['category']} question.", doc["question"], doc["options"], ".")


def arc_prompt(doc: dict) -> str:
    return _lettered_prompt("Answer the following question.", doc["question"], doc["choices"]["text"], ")")


def commonsense_qa_prompt(doc: dict) -> str:
    # The authors' CommonsenseQA wording asks for steps in its first sentence and has no closing line.
    texts = doc["choices"]["text"]
    letters = answers.choice_letters(len(texts))
    head = f"Answer the following {doc['question_concept']} question step by step."
    return f"{head} {_LETTER_INSTRUCTION.format(letters=letters)}\n\n{doc['question']}\n\n{_options(texts, ')')}"


def _lettered_prompt(head: str, question: str, texts: Sequence[str], separator: str) -> str:
    letters = answers.choice_letters(len(texts))
    instruction = _LETTER_INSTRUCTION.format(letters=letters)
    return f"{head} {instruction}\n\n{question}\n\n{_options(texts, separator)}\n\nLet's think step by step."


def math_prompt(doc: dict) -> str:
    """GSM8K and MATH share the authors' wording (`question` or `problem`)."""
    return _MATH_INSTRUCTION.format(question=doc["question"] if "question" in doc else doc["problem"])


def mgsm_prompt(doc: dict) -> str:
    return _MGSM_INSTRUCTION.format(question=doc["question"])


# --- gold answers -----------------------------------------------------------------------------------


def mmlu_gold(doc: dict) -> int:
    return int(doc["answer"])


def mmlu_pro_gold(doc: dict) -> int:
    return int(doc["answer_index"])


def labelled_gold(doc: dict) -> int:
    # ARC and CommonsenseQA name the gold by its label ("C", or "3" in some ARC records); its position is
    # the lettered option's index.
    return doc["choices"]["label"].index(doc["answerKey"])


def mmlu_choices(doc: dict) -> list[str]:
    return list(doc["choices"])


def mmlu_pro_choices(doc: dict) -> list[str]:
    return list(doc["options"])


def labelled_choices(doc: dict) -> list[str]:
    return list(doc["choices"]["text"])


def gsm8k_gold(doc: dict) -> str:
    gold = answers.gsm8k_reference(doc["answer"])
    if gold is None:
        raise ValueError(f"GSM8K reference without a number after '####': {doc['answer'][-80:]!r}")
    return gold


def mgsm_gold(doc: dict) -> str:
    return answers.normalize_number(str(doc["answer_number"]))


def math_gold(doc: dict) -> str:
    gold = answers.math_reference(doc["solution"])
    if gold is None:
        raise ValueError(f"MATH solution without a \\boxed{{}} answer: {doc['solution'][-80:]!r}")
    return gold


def _letter(index: int) -> str:
    return answers.choice_letters(index + 1)[-1]


def mmlu_target(doc: dict) -> str:
    return _letter(mmlu_gold(doc))


def mmlu_pro_target(doc: dict) -> str:
    return _letter(mmlu_pro_gold(doc))


def labelled_target(doc: dict) -> str:
    return _letter(labelled_gold(doc))


# --- scoring (process_results): acc and parsed, both aggregated by mean --------------------------------


def _scores(correct: bool, parsed: bool) -> dict[str, float]:
    return {"acc": float(correct), "parsed": float(parsed)}


def _choice_results(gold: int, n_choices: int, results: Sequence[str]) -> dict[str, float]:
    chosen = answers.choice_letter(results[0], n_choices)
    return _scores(chosen == gold, chosen is not None)


def mmlu_results(doc: dict, results: Sequence[str]) -> dict[str, float]:
    return _choice_results(mmlu_gold(doc), len(doc["choices"]), results)


def mmlu_pro_results(doc: dict, results: Sequence[str]) -> dict[str, float]:
    return _choice_results(mmlu_pro_gold(doc), len(doc["options"]), results)


def labelled_results(doc: dict, results: Sequence[str]) -> dict[str, float]:
    return _choice_results(labelled_gold(doc), len(doc["choices"]["text"]), results)


def gsm8k_results(doc: dict, results: Sequence[str]) -> dict[str, float]:
    number = answers.answer_number(results[0])
    return _scores(number == gsm8k_gold(doc), number is not None)


def mgsm_results(doc: dict, results: Sequence[str]) -> dict[str, float]:
    number = answers.answer_number(results[0])
    return _scores(number == mgsm_gold(doc), number is not None)


def math_results(doc: dict, results: Sequence[str]) -> dict[str, float]:
    prediction = answers.math_answer(results[0])
    return _scores(answers.math_equivalent(prediction, math_gold(doc)), prediction is not None)
