"""Prompting strategies: how an evaluation asks a task's question (zero-shot, k-shot, chain-of-thought).

A strategy is an axis of the spec (`evaluate.strategies`), crossed with every model: each (model, task,
strategy) is one evaluation job. A strategy changes only how lm-eval builds the task's prompts, through
lm-eval's own task-config fields, applied by the evaluation worker when it builds the task
(`TaskManager.load([{"task": name, **overrides}])`): the task's YAML, data and metrics stay the same, so
strategies compare like for like.

- `zero_shot`: the task as its YAML states it, no examples.
- `k_shot`: k solved examples before each question, drawn (lm-eval's default sampler, seeded) from a fixed
  pool of `pool` records of the task's few-shot split (its training split), itself chosen once from a
  seed: every model sees the same pool.
- `cot`: chain-of-thought on a generative task: an instruction to reason step by step and end with a line
  `Answer: <label>`, a step-by-step cue where the answer cue was, room to reason, and an lm-eval filter
  (named `cot`) that keeps the text after the last `Answer:` marker; the task's own parser reads the label
  there (nothing after the reasoning: no label, scored wrong and counted as unparsed).

A task says which strategies it supports in `metadata.strategies` (the affective tasks do); without it,
zero-shot and k-shot (when it has a few-shot split) apply. A newcomer adds a strategy by writing one
class (its parameters, `applies_to`, `overrides`) and adding it to `STRATEGIES`.
"""

from __future__ import annotations

import fnmatch
import random
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from pefteval_harness.errors import BadInput

COT_INSTRUCTION = (
    "Think step by step: first explain your reasoning, then give your final answer on its own last line,"
    " in the form 'Answer: <answer>'."
)
COT_CUE = "Let's think step by step."
# The value of the last `Answer:` line (the same rule as answers.answer_line, as an lm-eval regex filter).
COT_ANSWER_PATTERN = r"(?i)\banswer\s*:\s*([^\n]*)"


class Strategy(BaseModel):
    """Common to every strategy: its kind and the name the leaderboard shows."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: str
    name: str = ""
    # A planning filter, not part of what an evaluation does: left out of the job's config (and id).
    tasks: list[str] | None = Field(None, exclude=True, description="only the evaluated tasks matching these globs")

    @model_validator(mode="after")
    def _named(self) -> Strategy:
        object.__setattr__(self, "name", self.name or self.default_name())  # frozen: set once, here
        return self

    def default_name(self) -> str:
        return self.kind

    def shots(self) -> int:
        """The examples before each question (lm-eval's num_fewshot)."""
        return 0

    def applies_to(self, name: str, config: dict) -> bool:
        """Whether this strategy is used on a task (its name and resolved YAML config)."""
        if self.tasks is not None and not any(fnmatch.fnmatchcase(name, pattern) for pattern in self.tasks):
            return False
        declared = (config.get("metadata") or {}).get("strategies")
        return self.supports(config) and (declared is None or self.kind in declared)

    def supports(self, config: dict) -> bool:
        """Whether the task can take this strategy at all, when its metadata does not say."""
        return self.kind == "zero_shot"

    def overrides(self, task: Any, seed: int) -> dict[str, Any]:
        """lm-eval task-config fields to set on `task` (a built lm-eval Task) for this strategy."""
        return {}


class ZeroShot(Strategy):
    kind: Literal["zero_shot"] = "zero_shot"

    def default_name(self) -> str:
        return "zero-shot"


def few_shot_split(config: dict) -> str | None:
    """The split a task draws examples from (lm-eval: `fewshot_split`, else its training split)."""
    return config.get("fewshot_split") or config.get("training_split")


class KShot(Strategy):
    kind: Literal["k_shot"] = "k_shot"
    k: int = Field(ge=1, description="examples before each question")
    pool: int | None = Field(None, ge=1, description="records of the few-shot split to draw them from (default: k)")

    @model_validator(mode="after")
    def _pool_holds_k(self) -> KShot:
        if self.pool is not None and self.k > self.pool:
            raise ValueError(f"k = {self.k} is larger than the pool of {self.pool} examples")
        return self

    def default_name(self) -> str:
        return f"{self.k}-shot"

    @property
    def pool_size(self) -> int:
        return self.pool or self.k

    def shots(self) -> int:
        return self.k

    def supports(self, config: dict) -> bool:
        return few_shot_split(config) is not None

    def overrides(self, task: Any, seed: int) -> dict[str, Any]:
        docs = list(task.fewshot_docs() or [])
        if len(docs) < self.pool_size:
            raise BadInput(
                f"{self.name}: a pool of {self.pool_size} examples is larger than the {len(docs)} records of"
                f" {task.config.task}'s few-shot split"
            )
        chosen = sorted(random.Random(f"{seed}:{task.config.task}").sample(range(len(docs)), self.pool_size))
        return {"fewshot_split": None, "fewshot_config": {"sampler": "default", "samples": [docs[i] for i in chosen]}}


class ChainOfThought(Strategy):
    kind: Literal["cot"] = "cot"
    instruction: str = Field(COT_INSTRUCTION, description="put before the task's prompt")
    cue: str = Field(COT_CUE, description="the start of the model's reply, in place of the answer cue")
    max_gen_toks: int = Field(256, ge=1, description="room for the reasoning and the answer line")

    def supports(self, config: dict) -> bool:
        return config.get("output_type") == "generate_until" and "cot" in (config.get("metadata") or {}).get(
            "strategies", ()
        )

    def overrides(self, task: Any, seed: int) -> dict[str, Any]:
        config = task.config
        if config.output_type != "generate_until":
            raise BadInput(f"{self.name}: {config.task} is not generative: chain-of-thought needs a generated answer")
        description = "\n\n".join(part for part in (self.instruction, config.description) if part)
        generation = {**(config.generation_kwargs or {}), "max_gen_toks": self.max_gen_toks, "until": ["\n\n\n"]}
        answer_only = [
            {"function": "regex", "regex_pattern": COT_ANSWER_PATTERN, "group_select": -1, "fallback": ""},
            {"function": "take_first"},
        ]
        return {
            "description": description + "\n\n",
            "gen_prefix": self.cue,
            "generation_kwargs": generation,
            "filter_list": [{"name": "cot", "filter": answer_only}],
        }


STRATEGIES: dict[str, type[Strategy]] = {"zero_shot": ZeroShot, "k_shot": KShot, "cot": ChainOfThought}
StrategyConfig = Annotated[ZeroShot | KShot | ChainOfThought, Field(discriminator="kind")]


def parse_strategy(entry: Any) -> dict[str, Any]:
    """A spec entry (a kind's name, or a mapping with `kind`) as the mapping pydantic validates; an
    unknown kind is refused by name."""
    entry = {"kind": entry} if isinstance(entry, str) else entry
    if not isinstance(entry, dict):
        raise ValueError(f"expected a strategy name or a mapping with 'kind', got {entry!r}")
    kind = entry.get("kind")
    if kind not in STRATEGIES:
        raise ValueError(f"unknown prompting strategy {kind!r} (known: {', '.join(STRATEGIES)})")
    return entry
