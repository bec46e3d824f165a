"""lm-eval hooks of the affective-understanding classification tasks (pefteval_affect_<key> and _gen):
data, prompts, label words and scoring (metrics in pefteval_harness.metrics, re-exported here so the YAMLs
can name them `!function utils.<name>`).

Every task's records come through `load_affect`, which tags each record with its data key
(`affect_task`); the templates' hooks then look the task up in `TASKS`, so a leaf YAML names only its data,
splits, metrics and metadata. The prompt wording and the label words are this project's choices
(docs/affective_benchmarks.md): an instruction naming the label words, the input, then the answer cue
("Answer:", the generative form's `gen_prefix`; the log-likelihood form ends its text with it).
"""

# No `from __future__ import annotations`: lm-eval imports this file without registering it in sys.modules,
# where dataclasses look string annotations up.
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import datasets

from pefteval_harness import answers
from pefteval_harness.errors import BadInput
from pefteval_harness.metrics import (  # noqa: F401
    EMORYNLP_EMOTIONS,
    MELD_EMOTIONS,
    TWEET_IRONY_LABELS,
    TWEET_STANCE_LABELS,
    irony_f1,
    label_choice_results,
    label_generation_results,
    macro_f1,
    macro_recall,
    stance_f1,
    weighted_f1,
)
from pefteval_harness.tasks import data
from pefteval_harness.tasks.dialogue import load_dialogues

TAG = "affect_task"  # the field load_affect adds to every record: the data key of its task


@dataclass(frozen=True)
class AffectTask:
    """One classification task: `labels` are its label words (prompt and choice order); `gold` maps a
    record to its label word; `text` renders its input. `lettered`: the options are a record's own
    sentences, lettered A, B, ... (EmoBench); the label words are then the letters."""

    question: str
    labels: tuple[str, ...]
    text: Callable[[dict], str]
    gold: Callable[[dict], str]
    metrics: tuple[str, ...]
    lettered: bool = False


def _by_id(field: str, labels: Sequence[str]) -> Callable[[dict], str]:
    """Gold from an integer class id (the HF schema's `label`): its label word."""
    return lambda doc: labels[int(doc[field])]


def _by_name(field: str, labels: Sequence[str]) -> Callable[[dict], str]:
    """Gold from a class name as the data spells it ("Mad", "not-given"): the label word equal to it once
    both are lower-cased with hyphens read as spaces."""
    index = {label.lower(): label for label in labels}

    def gold(doc: dict) -> str:
        name = str(doc[field]).strip().lower().replace("-", " ")
        if name not in index:
            raise BadInput(f"{field} {doc[field]!r} is none of the label words {list(labels)}")
        return index[name]

    return gold


def _line(label: str, field: str) -> Callable[[dict], str]:
    return _lines((label, field))


def _lines(*parts: tuple[str, str]) -> Callable[[dict], str]:
    return lambda doc: "\n".join(f"{label}: {str(doc[field]).strip()}" for label, field in parts)


def _stance_text(target: str) -> Callable[[dict], str]:
    return lambda doc: f"Tweet: {doc['text'].strip()}\nTarget: {target}"


def _dialogue_text(doc: dict) -> str:
    turns = "\n".join(doc["history"]) or "(none: the utterance opens the conversation)"
    return f"Conversation so far:\n{turns}\nUtterance: {doc['speaker']}: {doc['Utterance']}"


def _lettered_text(doc: dict) -> str:
    options = "\n".join(f"{letter}. {option}" for letter, option in zip(answers.choice_letters(len(doc["options"])),
                                                                      doc["options"], strict=True))  # fmt: skip
    return f"Scenario: {doc['scenario']}\nQuestion: {doc['question']}\nOptions:\n{options}"


SENTIMENT = ("negative", "neutral", "positive")
SST5 = ("very negative", "negative", "neutral", "positive", "very positive")
TWEET_EMOTIONS = ("anger", "joy", "optimism", "sadness")  # tweet_eval emotion ids 0-3
SOUL_LABELS = ("true", "false", "not given")  # the data's "not-given", written as words
# SemEval-2016 task 6's targets of tweet_eval's stance configs.
STANCE_TARGETS = {
    "abortion": "legalization of abortion",
    "atheism": "atheism",
    "climate": "climate change is a real concern",
    "feminist": "feminist movement",
    "hillary": "Hillary Clinton",
}
_ASPECT = "What sentiment does the sentence express towards the aspect?"
_STANCE = "What is the stance of the tweet towards the target: against it, in favor of it, or none?"

TASKS: dict[str, AffectTask] = {
    "sst2": AffectTask("What is the sentiment of the sentence?", ("negative", "positive"),
                       _line("Sentence", "sentence"), _by_id("label", ("negative", "positive")), ("acc",)),
    "sst5": AffectTask("What is the sentiment of the sentence?", SST5,
                       _line("Sentence", "text"), _by_id("label", SST5), ("acc", "macro_f1")),
    "tweet_eval_sentiment": AffectTask("What is the sentiment of the tweet?", SENTIMENT,
                                       _line("Tweet", "text"), _by_id("label", SENTIMENT), ("macro_recall", "acc")),
    "tweet_eval_emotion": AffectTask("Which emotion does the tweet express?", TWEET_EMOTIONS,
                                     _line("Tweet", "text"), _by_id("label", TWEET_EMOTIONS), ("macro_f1", "acc")),
    "tweet_eval_irony": AffectTask("Is the tweet ironic?", TWEET_IRONY_LABELS,
                                   _line("Tweet", "text"), _by_id("label", TWEET_IRONY_LABELS), ("irony_f1", "acc")),
    "tweet_eval_hate": AffectTask("Is the tweet hateful (hate speech against immigrants or women)?",
                                  ("not hateful", "hateful"), _line("Tweet", "text"),
                                  _by_id("label", ("not hateful", "hateful")), ("macro_f1", "acc")),
    "tweet_eval_offensive": AffectTask("Is the tweet offensive?", ("not offensive", "offensive"),
                                       _line("Tweet", "text"), _by_id("label", ("not offensive", "offensive")),
                                       ("macro_f1", "acc")),
    **{
        f"tweet_eval_stance_{target}": AffectTask(_STANCE, TWEET_STANCE_LABELS, _stance_text(name),
                                                  _by_id("label", TWEET_STANCE_LABELS), ("stance_f1", "acc"))
        for target, name in STANCE_TARGETS.items()
    },
    **{
        key: AffectTask(_ASPECT, SENTIMENT, _lines(("Sentence", "text"), ("Aspect", "aspect")),
                        _by_name("label_text", SENTIMENT), ("acc", "macro_f1"))
        for key in ("absa_laptop14", "absa_rest14", "implicit_sentiment")
    },
    "meld": AffectTask("Which emotion does the speaker express in the utterance?", MELD_EMOTIONS,
                       _dialogue_text, _by_name("Emotion", MELD_EMOTIONS), ("weighted_f1", "acc")),
    "emorynlp": AffectTask("Which emotion does the speaker express in the utterance?",
                           tuple(e.lower() for e in EMORYNLP_EMOTIONS), _dialogue_text,
                           _by_name("Emotion", tuple(e.lower() for e in EMORYNLP_EMOTIONS)), ("weighted_f1", "acc")),
    **{
        key: AffectTask("Read the scenario and choose the best option.", (), _lettered_text,
                        lambda doc: answers.choice_letters(len(doc["options"]))[doc["answer"]], ("acc",),
                        lettered=True)
        for key in ("emobench_eu", "emobench_ea")
    },
    "soul": AffectTask("Given the review, is the statement true, false, or not given?", SOUL_LABELS,
                       _lines(("Review", "review_text"), ("Statement", "statement")),
                       _by_name("label", SOUL_LABELS), ("acc",)),
}  # fmt: skip


# --------------------------------------------------------------------------------------------- data


def load_affect(**kwargs: Any) -> datasets.DatasetDict:
    """The `custom_dataset` hook of every task here: the data key's records (`data.load`; MELD and EmoryNLP
    with their dialogue context, `load_dialogues`; EmoBench as one document per English question,
    `emobench_questions`), each tagged with the data key (`affect_task`)."""
    key = kwargs.get("data_key")
    if key not in TASKS:
        raise BadInput(f"dataset_kwargs.data_key: {key!r} is none of the affective tasks {sorted(TASKS)}")
    if key in ("meld", "emorynlp"):
        loaded = load_dialogues(**kwargs)
    elif key in ("emobench_eu", "emobench_ea"):
        loaded = datasets.DatasetDict(
            {split: datasets.Dataset.from_list(emobench_questions(list(table), key)) for split, table in
             data.load(**kwargs).items()}
        )  # fmt: skip
    else:
        loaded = data.load(**kwargs)
    # An optional split missing offline stays as data.load made it (empty, its info naming the file).
    return datasets.DatasetDict(
        {split: table.add_column(TAG, [key] * len(table)) if len(table) else table for split, table in loaded.items()}
    )


def emobench_questions(records: Sequence[dict], key: str) -> list[dict]:
    """EmoBench records as questions: English records only (each qid has an English and a Chinese
    version); EU gives two questions per record (the emotion, then its cause, the cause question naming the
    gold emotion), EA one (the most effective action or response). Each: qid, question_type, scenario,
    subject, question, options, answer (the gold option's index)."""
    out = []
    for record in records:
        if record.get("language") != "en":
            continue
        subject = record["subject"]
        if key == "emobench_eu":
            asked = [
                ("emotion", f"What emotion(s) would {subject} ultimately feel in this situation?",
                 record["emotion_choices"], record["emotion_label"]),
                ("cause", f"Why would {subject} feel {record['emotion_label']} in this situation?",
                 record["cause_choices"], record["cause_label"]),
            ]  # fmt: skip
        else:
            kind = str(record.get("question type", "action")).lower()
            asked = [(kind, f"In this situation, what is the most effective {kind} for {subject}?",
                      record["choices"], record["label"])]  # fmt: skip
        for question_type, question, options, label in asked:
            if label not in options:
                raise BadInput(f"{key} qid {record['qid']}: gold {label!r} is none of its options")
            out.append({"qid": str(record["qid"]), "question_type": question_type, "scenario": record["scenario"],
                        "subject": subject, "question": question, "options": list(options),
                        "answer": list(options).index(label)})  # fmt: skip
    return out


# ------------------------------------------------------------------------------------------ prompts


def task_of(doc: dict) -> AffectTask:
    return TASKS[doc[TAG]]


def labels(doc: dict) -> list[str]:
    """The document's label words (EmoBench: the letters of its options)."""
    task = task_of(doc)
    return list(answers.choice_letters(len(doc["options"]))) if task.lettered else list(task.labels)


def _instruction(doc: dict) -> str:
    task, words = task_of(doc), labels(doc)
    if task.lettered:
        return f"{task.question} Answer with the letter of the option ({', '.join(words)})."
    return f"{task.question} Answer with one of: {', '.join(words)}."


def gen_prompt(doc: dict) -> str:
    """The generative form's text: instruction, input, and a line break (the answer cue is `gen_prefix`)."""
    return f"{_instruction(doc)}\n\n{task_of(doc).text(doc)}\n"


def choice_prompt(doc: dict) -> str:
    """The log-likelihood form's text: the generative form's, ending with the answer cue."""
    return gen_prompt(doc) + "Answer:"


def gold_label(doc: dict) -> str:
    return task_of(doc).gold(doc)


def gold_index(doc: dict) -> int:
    return labels(doc).index(gold_label(doc))


# ---------------------------------------------------------------------------------------------- scoring


def gen_results(doc: dict, results: Sequence[str]) -> dict[str, Any]:
    """The label read from the generation (`answers.affect_label`; lettered options:
    `answers.affect_choice`), scored as `metrics.label_generation_results` with the task's metrics."""
    task, words = task_of(doc), labels(doc)
    if task.lettered:
        index = answers.affect_choice(results[0], len(words))
        prediction = words[index] if index is not None else None
    else:
        prediction = answers.affect_label(results[0], words)
    return label_generation_results(gold_label(doc), prediction, task.metrics)


def choice_results(doc: dict, results: Sequence[tuple[float, bool]]) -> dict[str, Any]:
    """The most likely label word, scored as `metrics.label_choice_results` with the task's metrics."""
    return label_choice_results(gold_label(doc), labels(doc), results, task_of(doc).metrics)
