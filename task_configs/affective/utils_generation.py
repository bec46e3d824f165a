"""lm-eval hooks of the affective generative tasks: EQ-Bench (pefteval_affect_eq_bench) and the AG tasks
(pefteval_affect_esconv, pefteval_affect_empathetic): their data as one document per reply to generate,
the prompt text, and the metrics (pefteval_harness.generation_metrics, re-exported so the YAMLs can name
them `!function utils_generation.<fn>`).

An AG document is one reply of the supporter (ESConv) or listener (EmpatheticDialogues) that follows at
least one turn: {conversation, turn, context, reply, ...}, `context` the preceding turns as speaker-tagged
lines ("Seeker: ...", "Supporter: ..."; "Speaker: ...", "Listener: ..."), `reply` the gold reply.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

import datasets

from pefteval_harness.errors import BadInput
from pefteval_harness.generation_metrics import (  # noqa: F401
    ag_results,
    bleu2,
    distinct1,
    distinct2,
    eq_bench_results,
)
from pefteval_harness.tasks.data import DataSpec, load_source
from pefteval_harness.tasks.data import load as load_data  # noqa: F401


def conversation(doc: dict) -> str:
    """The prompt's input: the preceding turns, one a line (the YAML's gen_prefix names who replies)."""
    return "\n".join(doc["context"])


def _context_turns(kwargs: Mapping[str, Any], key: str) -> int | None:
    value = kwargs.get("context_turns")
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
        raise BadInput(f"dataset_kwargs of data key {key!r}: context_turns: expected a positive integer, got {value!r}")
    return value


def _window(turns: Sequence[str], size: int | None) -> list[str]:
    return list(turns[-size:] if size else turns)


def _docs_by_split(kwargs: Mapping[str, Any], to_docs) -> datasets.DatasetDict:
    spec = DataSpec.from_kwargs(kwargs)
    size = _context_turns(kwargs, spec.key)
    out = {}
    for split, table in load_source(spec).items():
        # An empty (optional, missing) split stays as loaded: it carries the missing file's message.
        out[split] = table if len(table) == 0 else datasets.Dataset.from_list(to_docs(list(table), size, split))
    return datasets.DatasetDict(out)


def _norm(text: str) -> str:
    return " ".join(str(text).split())


# ------------------------------------------------------------------------------------------------ ESConv

ESCONV_ROLES = {"usr": "Seeker", "seeker": "Seeker", "sys": "Supporter", "supporter": "Supporter"}
_STRATEGY = re.compile(r"^\[(?P<strategy>[^\]]*)\]\s*")
# One turn of a Blenderbot training line: "<weight> <speaker: 0 seeker, 1 supporter> <turn index> <text>".
_TSV_TURN = re.compile(r"^(?P<weight>\d+(?:\.\d+)?) (?P<speaker>[01]) (?P<turn>\d+) (?P<text>.*)$", re.S)


def load_esconv(**kwargs: Any) -> datasets.DatasetDict:
    """The `custom_dataset` hook of pefteval_affect_esconv: the task's data (dataset_kwargs as for any task,
    plus `context_turns`, the number of preceding turns kept) as one document per supporter turn. Reads
    both record forms (see `esconv_docs`)."""
    return _docs_by_split(kwargs, esconv_docs)


def esconv_docs(records: Sequence[Mapping], context_turns: int | None = None, split: str = "?") -> list[dict]:
    """The documents of ESConv records in either form, with the same fields {conversation, turn, context,
    reply, strategy}:

    - the HF thu-coai/esconv form: `text` is one conversation as JSON, its `dialog` a list of turns
      {text (or content), speaker usr|sys (or seeker|supporter), strategy}; a document per supporter turn
      after the first turn;
    - the Blenderbot line form of the ESConv repository's TSV files: `text` is "<w> <speaker> <turn> <text>"
      turns joined by " EOS ", the last one the supporter turn to predict (a document per line; a new
      conversation starts where the target's turn index does not increase).

    A supporter turn's leading "[Strategy]" tag (line form) is taken off its text into `strategy`; texts
    are whitespace-normalised, as the HF form's are."""
    docs: list[dict] = []
    previous_target = None
    conversation_index = -1
    for index, record in enumerate(records):
        where = f"esconv split {split!r}, record {index}"
        dialog = record.get("dialog")
        text = record.get("text")
        if dialog is None and isinstance(text, str) and text.lstrip().startswith("{"):
            try:
                dialog = json.loads(text).get("dialog")
            except (json.JSONDecodeError, AttributeError):
                raise BadInput(f"{where}: `text` is not a JSON conversation with a `dialog` list") from None
        if dialog is not None:
            docs += _dialog_docs(dialog, index, context_turns, where)
            continue
        if not isinstance(text, str):
            raise BadInput(f"{where}: expected a `text` field (an HF conversation or a Blenderbot line)")
        turns = [_tsv_turn(segment, where) for segment in text.split(" EOS ")]
        target = turns[-1]
        if target["role"] != "Supporter" or len(turns) < 2:
            raise BadInput(f"{where}: a Blenderbot line must end with a supporter turn after at least one turn")
        if previous_target is None or target["turn"] <= previous_target:
            conversation_index += 1
        previous_target = target["turn"]
        docs.append(_esconv_doc(conversation_index, target, turns[:-1], context_turns))
    return docs


def _tsv_turn(segment: str, where: str) -> dict:
    match = _TSV_TURN.match(segment.strip())
    if match is None:
        raise BadInput(f"{where}: {segment[:60]!r} is not a '<weight> <speaker> <turn> <text>' turn")
    role = "Supporter" if match["speaker"] == "1" else "Seeker"
    text, strategy = _norm(match["text"]), ""
    tagged = _STRATEGY.match(text) if role == "Supporter" else None
    if tagged:
        text, strategy = text[tagged.end() :], tagged["strategy"]
    return {"role": role, "turn": int(match["turn"]), "text": text, "strategy": strategy}


def _dialog_docs(dialog: Any, index: int, context_turns: int | None, where: str) -> list[dict]:
    if not isinstance(dialog, list):
        raise BadInput(f"{where}: `dialog` is not a list of turns")
    turns = []
    for number, turn in enumerate(dialog):
        role = ESCONV_ROLES.get(str(turn.get("speaker", "")).lower()) if isinstance(turn, Mapping) else None
        text = turn.get("text", turn.get("content")) if role else None
        if role is None or not isinstance(text, str):
            raise BadInput(f"{where}: dialog turn {number}: expected a speaker (usr/sys) and a text")
        annotation = turn.get("annotation")
        strategy = turn.get("strategy") or (annotation.get("strategy") if isinstance(annotation, Mapping) else None)
        turns.append({"role": role, "turn": number, "text": _norm(text), "strategy": str(strategy or "")})
    return [
        _esconv_doc(index, turn, turns[:number], context_turns)
        for number, turn in enumerate(turns)
        if number > 0 and turn["role"] == "Supporter"
    ]


def _esconv_doc(conversation_index: int, target: dict, before: Sequence[dict], context_turns: int | None) -> dict:
    lines = [f"{t['role']}: {t['text']}" for t in before]
    return {
        "conversation": conversation_index,
        "turn": target["turn"],
        "context": _window(lines, context_turns),
        "reply": target["text"],
        "strategy": target["strategy"],
    }


# --------------------------------------------------------------------------------- EmpatheticDialogues

EMPATHETIC_ROLES = ("Speaker", "Listener")  # who writes utterance 1, 3, ... and 2, 4, ...


def load_empathetic(**kwargs: Any) -> datasets.DatasetDict:
    """The `custom_dataset` hook of pefteval_affect_empathetic: one document per listener turn (see
    `empathetic_docs`); dataset_kwargs as for any task, plus the optional `context_turns`."""
    return _docs_by_split(kwargs, empathetic_docs)


def empathetic_docs(records: Sequence[Mapping], context_turns: int | None = None, split: str = "?") -> list[dict]:
    """The documents of facebook/empathetic_dialogues records (one per utterance: conv_id, utterance_idx
    from 1, context = the emotion, prompt = the situation, utterance with "_comma_" for commas): the
    utterances of a conversation in utterance_idx order alternate speaker (who describes the situation)
    and listener; a document per listener utterance, {conversation, turn, context, reply, emotion,
    situation}."""
    conversations: dict[str, list[tuple[int, Mapping]]] = {}
    for index, record in enumerate(records):
        try:
            key, number, _ = str(record["conv_id"]), int(record["utterance_idx"]), record["utterance"]
        except (KeyError, TypeError, ValueError):
            raise BadInput(
                f"empathetic split {split!r}, record {index}: expected conv_id, an integer utterance_idx and utterance"
            ) from None
        conversations.setdefault(key, []).append((number, record))
    docs = []
    for conv_id, turns in conversations.items():
        turns.sort(key=lambda item: item[0])
        lines = []
        for position, (_, record) in enumerate(turns):
            text = _norm(str(record["utterance"]).replace("_comma_", ","))
            role = EMPATHETIC_ROLES[position % 2]
            if role == "Listener":
                docs.append(
                    {
                        "conversation": conv_id,
                        "turn": position,
                        "context": _window(lines, context_turns),
                        "reply": text,
                        "emotion": str(record.get("context", "")),
                        "situation": _norm(str(record.get("prompt", "")).replace("_comma_", ",")),
                    }
                )
            lines.append(f"{role}: {text}")
    return docs
