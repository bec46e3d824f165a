"""lm-eval hooks of the merge benchmarks on code, reading, translation and dialogue (pefteval_merge_mbpp,
_drop, _flores101_<src>_<tgt>, _meld, _emorynlp and their _mc variants): data, prompts and the metrics
(defined in pefteval_harness.metrics, re-exported here so the YAMLs can name them `!function utils_text.<fn>`).

Prompts follow the evaluators of the merging study ("Why Do More Experts Fail?", code in
wzj1718/ModelMergingAnalysis): zero-shot, an instruction that names the form of the final line
(`Answer: ...`, `Translation: ...`), parsed from the generation.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import PurePosixPath
from typing import Any

import datasets

from pefteval_harness.errors import BadInput
from pefteval_harness.metrics import (  # noqa: F401
    EMORYNLP_EMOTIONS,
    MELD_EMOTIONS,
    drop_results,
    emorynlp_choice_results,
    emorynlp_results,
    flores_results,
    mbpp_results,
    meld_choice_results,
    meld_results,
    weighted_f1,
)
from pefteval_harness.tasks.data import DataSpec, load_source, paired_spec
from pefteval_harness.tasks.data import load as load_data  # noqa: F401
# Moved to the package (the affective tasks share them); re-exported for this folder's YAMLs and callers.
from pefteval_harness.tasks.dialogue import dialogue_histories, load_dialogues, speaker_name  # noqa: F401

# ----------------------------------------------------------------------------------------------- MBPP


def mbpp_prompt(doc: dict) -> str:
    """The task and its tests, as the merging study (and the MBPP paper) state them."""
    tests = "\n".join(doc["test_list"])
    return (
        f"You are an expert Python programmer, and here is your task:\n{doc['text']}\n\n"
        f"Your code should pass these tests:\n{tests}"
    )


# ----------------------------------------------------------------------------------------------- DROP


def drop_prompt(doc: dict) -> str:
    return (
        "You will be asked to read a passage and answer a question.\n"
        'Write a line of the form "Answer: $ANSWER" at the end of your response.\n\n'
        f"Passage: {doc['passage']}\nQuestion: {doc['question']}"
    )


def drop_target(doc: dict) -> str:
    # The first gold answer, its spans joined (for display in lm-eval's samples; scoring uses all golds).
    from pefteval_harness.metrics import drop_golds

    golds = drop_golds(doc)
    return ", ".join(golds[0]) if golds else ""


# ------------------------------------------------------------------------------------------ FLORES-101

# gsarti/flores_101 config -> the language's English name (the prompt names both languages).
FLORES_LANGUAGES = {
    "eng": "English",
    "spa": "Spanish",
    "fra": "French",
    "deu": "German",
    "rus": "Russian",
    "zho_simpl": "Chinese",
    "jpn": "Japanese",
    "tha": "Thai",
    "swh": "Swahili",
    "ben": "Bengali",
    "tel": "Telugu",
}


def load_flores_pair(**kwargs: Any) -> datasets.DatasetDict:
    """The `custom_dataset` hook of a FLORES-101 pair: the source language's sentences joined with the
    target language's by `id` (FLORES sentences are aligned across languages).

    dataset_kwargs: the source side as any task's data (`data_key: flores101/<src>`, `hf_path:
    gsarti/flores_101`, `hf_name: <src>`, `splits: [devtest]`) plus `target: <tgt>`, a config of the same
    dataset read from the sibling folder `flores101/<tgt>` offline ($PEFTEVAL_DATA_DIR/flores101/<lang>/
    devtest.jsonl, records in the hub schema: id, URL, domain, topic, has_image, has_hyperlink, sentence).
    Each record: id, source, target (the two sentences), source_config, target_config, source_language,
    target_language (English names), domain, topic.
    """
    source_spec = DataSpec.from_kwargs(kwargs)
    target = kwargs.get("target")
    if not isinstance(target, str) or target not in FLORES_LANGUAGES or target == source_spec.hf_name:
        raise BadInput(
            f"dataset_kwargs.target of data key {source_spec.key!r}: expected another FLORES config of"
            f" {sorted(FLORES_LANGUAGES)}, got {target!r}"
        )
    if source_spec.hf_name not in FLORES_LANGUAGES:
        raise BadInput(
            f"dataset_kwargs.hf_name: expected one of {sorted(FLORES_LANGUAGES)}, got {source_spec.hf_name!r}"
        )
    sources, targets = load_source(source_spec), load_source(paired_spec(source_spec, target))
    return datasets.DatasetDict(
        {
            split: datasets.Dataset.from_list(
                join_flores(list(sources[split]), list(targets[split]), source_spec.hf_name, target)
            )
            for split in source_spec.splits
        }
    )


def join_flores(sources: Sequence[Mapping], targets: Sequence[Mapping], source: str, target: str) -> list[dict]:
    """Source and target records with the same `id`, in the source's order; BadInput naming the first id
    the target lacks."""
    by_id = {record["id"]: record for record in targets}
    joined = []
    for record in sources:
        other = by_id.get(record["id"])
        if other is None:
            raise BadInput(f"FLORES-101: sentence id {record['id']} of {source!r} is missing from {target!r}")
        joined.append(
            {
                "id": record["id"],
                "source": record["sentence"],
                "target": other["sentence"],
                "source_config": source,
                "target_config": target,
                "source_language": FLORES_LANGUAGES[source],
                "target_language": FLORES_LANGUAGES[target],
                "domain": record.get("domain", ""),
                "topic": record.get("topic", ""),
            }
        )
    return joined


def flores_prompt(doc: dict) -> str:
    source, target = doc["source_language"], doc["target_language"]
    return (
        f"Translate the following sentence from {source} to {target}. The last line of your response should"
        f" be of the form 'Translation: $SENTENCE' (without quotes) where $SENTENCE is the sentence in"
        f" {target}.\n\n{doc['source']}"
    )


# ------------------------------------------------------------------------- dialogue (MELD, EmoryNLP)


def _emotion_prompt(doc: dict, labels: Sequence[str]) -> str:
    history = "\n".join(f"- {turn}" for turn in doc["history"]) or "(this utterance opens the conversation)"
    return (
        "Given a conversation history and a current utterance, identify the emotion of the current utterance"
        " from the given options. The emotion should be determined based on both the conversation context"
        " and the current utterance. The last line of your response should be of the following format:"
        " 'Answer: $EMOTION' (without quotes) where EMOTION is one of the options. Let's think step by step."
        f"\n\nHistory:\n{history}\n\nUtterance:\n{doc['speaker']}: {doc['Utterance']}"
        f"\n\nOptions: {', '.join(labels)}"
    )


def meld_prompt(doc: dict) -> str:
    return _emotion_prompt(doc, MELD_EMOTIONS)


def emorynlp_prompt(doc: dict) -> str:
    return _emotion_prompt(doc, EMORYNLP_EMOTIONS)


def emotion_context(doc: dict) -> str:
    """The loglikelihood variants' prompt: the conversation up to the utterance, then a cue the emotion
    word completes."""
    turns = [*doc["history"], f"{doc['speaker']}: {doc['Utterance']}"]
    return "Conversation:\n" + "\n".join(turns) + "\nThe emotion of the last utterance is"


def meld_choices(doc: dict) -> list[str]:
    return list(MELD_EMOTIONS)


def emorynlp_choices(doc: dict) -> list[str]:
    return [label.lower() for label in EMORYNLP_EMOTIONS]


def meld_gold(doc: dict) -> int:
    return [label.lower() for label in MELD_EMOTIONS].index(str(doc["Emotion"]).strip().lower())


def emorynlp_gold(doc: dict) -> int:
    return [label.lower() for label in EMORYNLP_EMOTIONS].index(str(doc["Emotion"]).strip().lower())
