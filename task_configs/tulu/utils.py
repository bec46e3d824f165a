"""lm-eval hooks of the tulu-v2 expert tasks (pefteval_tulu_*): one training task per subset of the
allenai/tulu-v2-sft-mixture, the experts' training data in the model-merging study.

The mixture is one split whose `dataset` field names each record's subset ("cot", "oasst1",
"science.scifact_json", ...). A task keeps the records of its subset (`tulu_subset` in its dataset_kwargs:
the field's value, or its prefix before a dot), and trains on the first user turn and the assistant's reply
to it. 1% of the mixture, chosen by a hash of the record's id, is held out for evaluation (ROUGE-L of the
reply), the same online and offline.
"""

import datasets

from pefteval_harness.metrics import rouge_l
from pefteval_harness.tasks.data import load


def load_subset(**kwargs) -> datasets.DatasetDict:
    subset = kwargs.pop("tulu_subset")

    def keep(record: dict) -> bool:
        return record["dataset"] == subset or record["dataset"].startswith(subset + ".")

    return datasets.DatasetDict({name: split.filter(keep) for name, split in load(**kwargs).items()})


def _turn(doc: dict, role: str) -> str:
    """The first `role` message (for the assistant: the first one after the first user message)."""
    after_user = False
    for message in doc["messages"]:
        if message["role"] == role and (role == "user" or after_user):
            return message["content"].strip()
        after_user = after_user or message["role"] == "user"
    return ""


def prompt(doc: dict) -> str:
    return f"User: {_turn(doc, 'user')}\nAssistant:"


def reply(doc: dict) -> str:
    return _turn(doc, "assistant")


def tulu_results(doc: dict, results: list[str]) -> dict[str, float]:
    return {"rougeL": rouge_l(results[0].strip(), reply(doc))}
