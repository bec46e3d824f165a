"""Training examples rendered by a task's own lm-eval config.

A fine-tuning job trains on `doc_to_text(doc) + target_delimiter + gold target` for every doc of the
task's training split, the exact strings lm-eval scores, so training and scoring can never drift apart.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Example:
    prompt: str
    continuation: str  # target delimiter + gold target (+ the stop sequence of a generative task)


def gold_target(task, doc) -> str:
    target = task.doc_to_target(doc)
    if task.OUTPUT_TYPE == "multiple_choice":
        choices = task.doc_to_choice(doc)
        if isinstance(target, list):
            target = target[0]
        return choices[target] if isinstance(target, int) else str(target)
    if isinstance(target, list):
        target = target[0]
    return str(target)


def training_examples(task, limit: int | None = None) -> list[Example]:
    """Every (or the first `limit`) training doc of `task`, rendered; raises ValueError with no split."""
    if not task.has_training_docs():
        raise ValueError(f"task {task.task_name!r} has no training split")
    # Generative targets end with the task's stop sequence, so the model learns where answers end.
    until = (task.config.generation_kwargs or {}).get("until") or [""]
    end = until[0] if task.OUTPUT_TYPE == "generate_until" else ""
    examples = []
    for i, doc in enumerate(task.training_docs()):
        if limit is not None and i >= limit:
            break
        examples.append(Example(task.doc_to_text(doc), task.config.target_delimiter + gold_target(task, doc) + end))
    return examples
