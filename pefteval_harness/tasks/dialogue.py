"""Dialogue context for emotion recognition in conversation (MELD, EmoryNLP): each utterance's preceding
turns, from the whole split. Shared by the merge benchmarks (task_configs/merge12) and the affective tasks
(task_configs/affective), whose hook modules re-export `load_dialogues` as their `custom_dataset`."""

from __future__ import annotations

import ast
from collections.abc import Mapping, Sequence
from typing import Any

import datasets

from pefteval_harness.errors import BadInput
from pefteval_harness.tasks.data import DataSpec, load_source


def speaker_name(raw: Any) -> str:
    """A speaker as written in the CSVs: MELD's plain name, or EmoryNLP's list literal ("['Monica Geller']",
    several speakers joined with "and")."""
    text = str(raw).strip()
    if text.startswith("["):
        try:
            names = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            return text
        if isinstance(names, list | tuple) and all(isinstance(n, str) for n in names) and names:
            return " and ".join(n.strip() for n in names)
    return text


def dialogue_histories(records: Sequence[Mapping], dialogue_fields: Sequence[str], turn_field: str) -> list[list[str]]:
    """For each record, the turns of its dialogue that come before it ("Speaker: utterance", in turn order).

    A dialogue is the records sharing the values of `dialogue_fields` (MELD: Dialogue_ID; EmoryNLP: Season,
    Episode, Scene_ID); turns are ordered by `turn_field` (Utterance_ID), whatever the order of the file.
    """
    dialogues: dict[tuple, list[int]] = {}
    for index, record in enumerate(records):
        try:
            key = tuple(record[f] for f in dialogue_fields)
            int(record[turn_field])
        except (KeyError, TypeError, ValueError):
            raise BadInput(
                f"dialogue record {index}: expected fields {list(dialogue_fields)} and an integer {turn_field!r}"
            ) from None
        dialogues.setdefault(key, []).append(index)
    histories: list[list[str]] = [[] for _ in records]
    for members in dialogues.values():
        ordered = sorted(members, key=lambda i: int(records[i][turn_field]))
        turns = [f"{speaker_name(records[i]['Speaker'])}: {records[i]['Utterance']}" for i in ordered]
        for position, index in enumerate(ordered):
            histories[index] = turns[:position]
    return histories


def load_dialogues(**kwargs: Any) -> datasets.DatasetDict:
    """The `custom_dataset` hook of the emotion tasks: the task's data (dataset_kwargs as for any task)
    with two fields added to every record: `history` (the preceding turns of its dialogue, from the whole
    split, so a `limit` does not cut them) and `speaker` (its speaker's name). dataset_kwargs also name
    `dialogue_fields` and `turn_field` (see `dialogue_histories`)."""
    spec = DataSpec.from_kwargs(kwargs)
    fields, turn = kwargs.get("dialogue_fields"), kwargs.get("turn_field")
    if not isinstance(fields, list) or not fields or not isinstance(turn, str):
        raise BadInput(f"dataset_kwargs of data key {spec.key!r}: expected dialogue_fields (a list) and turn_field")
    out = {}
    for split, table in load_source(spec).items():
        records = list(table)
        for record, history in zip(records, dialogue_histories(records, fields, turn), strict=True):
            record["history"] = history
            record["speaker"] = speaker_name(record["Speaker"])
        out[split] = datasets.Dataset.from_list(records)
    return datasets.DatasetDict(out)
