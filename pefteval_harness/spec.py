"""The experiment spec: one YAML file, validated up front into typed objects.

Everything that can be checked without running anything is checked here (schema, method names and their
hyperparameters, merge methods, task names, expert references), so that a bad spec fails before any job
starts, with one line naming the file, the key path and what was expected.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pefteval_harness.errors import BadInput

TINY = "tiny"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TrainSettings(_Strict):
    """How a fine-tune is trained. Set once under `train:` and overridden per fine-tune."""

    tasks: list[str] = Field(default_factory=list, description="task names or globs; their training splits")
    epochs: float = Field(3.0, gt=0)
    max_steps: int = Field(-1, description="stop after this many optimiser steps (-1: run all epochs)")
    learning_rate: float = Field(1e-3, gt=0)
    batch_size: int = Field(16, ge=1)
    gradient_accumulation_steps: int = Field(1, ge=1)
    max_length: int = Field(128, ge=8, description="longest training sequence, in tokens")
    limit: int | None = Field(None, ge=1, description="at most this many training docs per task")
    warmup: float = Field(0.0, ge=0, description="warm-up steps, or a fraction of all steps if below 1")
    weight_decay: float = Field(0.0, ge=0)
    lr_scheduler: Literal[  # transformers' SchedulerType names
        "linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup", "inverse_sqrt"
    ] = "linear"


class DeepSpeedSettings(_Strict):
    zero_stage: Literal[0, 1, 2, 3] = 2
    offload_optimizer: bool = False
    # Extra keys merged into the generated DeepSpeed config (as DeepSpeed names them).
    config: dict[str, Any] = Field(default_factory=dict)


class FinetuneSpec(_Strict):
    method: str
    config: dict[str, Any] = Field(default_factory=dict, description="the peft config's own fields")
    deepspeed: DeepSpeedSettings | None = None
    train: dict[str, Any] = Field(default_factory=dict, description="overrides of the top-level train:")
    per_task: bool = Field(False, description="one fine-tune per training task (experts to merge)")
    evaluate: bool = True


class MergeSpec(_Strict):
    method: str
    experts: list[str] = Field(min_length=1, description="fine-tune names; a per_task name means all of them")
    weights: list[float] | None = None
    space: Literal["delta_w", "factor"] = "delta_w"
    parameters: dict[str, Any] = Field(default_factory=dict)
    evaluate: bool = True

    @field_validator("experts", mode="before")
    @classmethod
    def _one_name_is_a_list(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v


class EvaluateSpec(_Strict):
    tasks: list[str] = Field(min_length=1, description="task names or globs")
    limit: int | float | None = Field(None, gt=0)
    num_fewshot: int | None = Field(None, ge=0)
    batch_size: int | str = 8
    bootstrap_iters: int = Field(100000, ge=0)
    include_base: bool = True


class JobResources(_Strict):
    num_cpus: float = Field(1, ge=0)
    num_gpus: float = Field(0, ge=0)
    memory_gb: float | None = Field(None, gt=0)


class ResourcesSpec(_Strict):
    train: JobResources = JobResources()
    merge: JobResources = JobResources()
    evaluate: JobResources = JobResources()
    max_retries: int = Field(1, ge=0, description="retries of a failed job before it is recorded as failed")


class Spec(_Strict):
    name: str = ""
    base_model: str = TINY
    trust_remote_code: bool = False
    seed: int = 1234
    output: str | None = None
    include_paths: list[str] = Field(default_factory=list, description="extra lm-eval task folders")
    train: TrainSettings = TrainSettings()
    finetunes: dict[str, FinetuneSpec] = Field(default_factory=dict)
    merges: dict[str, MergeSpec] = Field(default_factory=dict)
    evaluate: EvaluateSpec
    resources: ResourcesSpec = ResourcesSpec()

    @model_validator(mode="after")
    def _references_resolve(self) -> Spec:
        for name, finetune in self.finetunes.items():
            try:
                self.train_settings(finetune)
            except ValidationError as e:
                err = e.errors()[0]
                raise ValueError(f"finetunes.{name}.train.{_loc(err['loc'])}: {err['msg']}") from None
        for name in self.merges:
            if name in self.finetunes or name == "base":
                raise ValueError(f"merges.{name}: the name is already used by a fine-tune or the base")
        for name, merge in self.merges.items():
            for i, expert in enumerate(merge.experts):
                if expert not in self.finetunes:
                    raise ValueError(
                        f"merges.{name}.experts[{i}]: unknown fine-tune {expert!r}"
                        f" (known: {', '.join(self.finetunes) or 'none'})"
                    )
        return self

    def train_settings(self, finetune: FinetuneSpec) -> TrainSettings:
        return TrainSettings.model_validate({**self.train.model_dump(), **finetune.train})

    def fingerprint(self) -> str:
        """Hash of the validated spec (recorded with every result as provenance)."""
        canonical = json.dumps(self.model_dump(mode="json"), sort_keys=True)
        return hashlib.sha256(canonical.encode()).hexdigest()


def _loc(loc: tuple) -> str:
    path = ""
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path or "(top level)"


def load_spec(path: str | Path) -> tuple[Spec, Path]:
    """Read and validate a spec file; any problem is a one-line BadInput naming the file and key path."""
    path = Path(path)
    if not path.is_file():
        raise BadInput(f"{path}: no such spec file")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}" if mark else ""
        raise BadInput(f"{path}{where}: not valid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(raw, dict):
        raise BadInput(f"{path}: expected a mapping of keys at the top level, got {type(raw).__name__}")
    try:
        spec = Spec.model_validate(raw)
    except ValidationError as e:
        err = e.errors()[0]
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        if not err["loc"]:  # a whole-spec check: its message names the key path itself
            raise BadInput(f"{path}: {msg}") from None
        raise BadInput(f"{path}: {_loc(err['loc'])}: {msg}") from None
    return (spec if spec.name else spec.model_copy(update={"name": path.stem})), path
