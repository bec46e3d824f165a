"""Training examples rendered by a task's own lm-eval config.

A fine-tuning job trains on `prompt + target_delimiter + gold target` for every doc of the task's
training split, where the prompt is the zero-shot context lm-eval builds for the doc (doc_to_text, with
the task's description if it has one). These are the exact strings lm-eval scores, so training and
scoring can never drift apart.

Multiple-choice tasks with partial scoring (Winogrande: doc_to_text returns the gold option's index and
the choices are contexts) train on the gold context followed by the shared continuation.
"""

from __future__ import annotations

from dataclasses import dataclass

from pefteval_harness.errors import BadInput
from pefteval_harness.tasks.data import missing_file


@dataclass(frozen=True)
class Example:
    prompt: str
    continuation: str  # target delimiter + gold target (+ the stop sequence of a generative task)


def gold_target(task, doc) -> str:
    """The text a model should produce after the prompt: the gold choice of a multiple-choice task (its
    index, or its label string), the continuation of a partial-scoring task, the first target otherwise."""
    target = task.doc_to_target(doc)
    if isinstance(target, list):  # several acceptable targets: train on the first
        target = target[0]
    if task.OUTPUT_TYPE != "multiple_choice" or getattr(task, "multiple_input", 0):
        return str(target)
    choices = task.doc_to_choice(doc)
    if isinstance(target, int):
        return choices[target]
    if str(target) not in choices:  # lm-eval would score no choice as gold: nothing to train on
        raise ValueError(f"task {task.task_name!r}: target {target!r} is not one of the choices {choices!r}")
    return str(target)


def _prompt(task, doc) -> str:
    context = task.fewshot_context(doc=doc, num_fewshot=0, gen_prefix=task.doc_to_prefix(doc))
    if isinstance(context, list):  # partial scoring: one context per choice, the gold one's index from doc_to_text
        return context[task.doc_to_text(doc)]
    return context


def training_examples(task, limit: int | None = None) -> list[Example]:
    """Every (or the first `limit`) training doc of `task`, rendered; raises ValueError with no split."""
    if not task.has_training_docs():
        raise ValueError(f"task {task.task_name!r} has no training split")
    # Generative targets end with the task's stop sequence, so the model learns where answers end.
    until = (task.config.generation_kwargs or {}).get("until") or [""]
    until = [until] if isinstance(until, str) else until
    end = until[0] if task.OUTPUT_TYPE == "generate_until" else ""
    docs = task.training_docs()
    missing = missing_file(task.dataset[task.config.training_split]) if task.dataset is not None else None
    if missing:  # an optional split absent from PEFTEVAL_DATA_DIR: training needs it
        raise BadInput(missing)
    examples = []
    for i, doc in enumerate(docs):
        if limit is not None and i >= limit:
            break
        examples.append(Example(_prompt(task, doc), task.config.target_delimiter + gold_target(task, doc) + end))
    return examples
