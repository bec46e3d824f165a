"""lm-eval hooks of the adversarial tasks (pefteval_adv_*). Each task includes its clean partner's YAML
(../peft15), so prompt, label words and metrics are the partner's; these hooks only fit a dataset's
records to that prompt."""

from pefteval_harness.tasks.data import load as load_data  # noqa: F401


def hans_gold(doc: dict) -> list[int]:
    # HANS has two labels (0 entailment, 1 non-entailment); the model answers with MNLI's three words.
    # A "maybe" (neutral) or "no" (contradiction) answer both mean non-entailment, so either is correct.
    return [0] if doc["label"] == 0 else [1, 2]


def paws_as_qqp(dataset):
    # PAWS pairs are sentence1/sentence2; the QQP prompt reads question1/question2 (label 1 = paraphrase
    # = duplicate, so labels carry over unchanged).
    return dataset.rename_columns({"sentence1": "question1", "sentence2": "question2"})
