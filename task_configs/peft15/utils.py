"""lm-eval hooks of the PEFT-vs-FFT tasks (pefteval_peft_*): data, targets, Winogrande's partial
scoring and the generative tasks' metrics (defined in pefteval_harness.metrics, re-exported here so the
YAMLs can name them as `!function utils.<name>`)."""

from pefteval_harness.metrics import (  # noqa: F401
    alpaca_results,
    e2e_results,
    gsm8k_results,
    ifeval_inst_level_acc,
    ifeval_results,
    squad_results,
)
from pefteval_harness.tasks.data import load as load_data  # noqa: F401


def squad_target(doc: dict) -> str:
    # The first reference answer; a function, because a rendered string that looks like a list would be
    # parsed into one by lm-eval.
    return doc["answers"]["text"][0]


# Winogrande, scored by partial evaluation: each option fills the blank, and the model scores the rest
# of the sentence after each filled-in beginning. The gold "answer" is "1" or "2".
def winogrande_gold(doc: dict) -> int:
    return int(doc["answer"]) - 1


def winogrande_contexts(doc: dict) -> list[str]:
    blank = doc["sentence"].index("_")
    return [doc["sentence"][:blank] + option for option in (doc["option1"], doc["option2"])]


def winogrande_continuation(doc: dict) -> str:
    blank = doc["sentence"].index("_")
    return doc["sentence"][blank + 1 :].strip()
