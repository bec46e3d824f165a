"""The experiment spec: one YAML file, validated once, up front, into typed objects.

Everything that can be checked without looking at tasks or models is checked here: the schema, every
method's parameters (peft validates fine-tuning configs, each merge method its typed parameters), names
and references, whether experts can be merged, and relative paths (resolved against the spec's folder).
The plan then only expands the spec. Any problem is one line naming the file, the key path and what was
expected.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError, ValidationInfo, field_validator, model_validator

from pefteval_harness.config_io import at, error_message, load_mapping, resolve_path, validate
from pefteval_harness.errors import BadInput
from pefteval_harness.jobs.types import DeepSpeedSettings, EvaluateSettings, Resources, TrainSettings, _Frozen
from pefteval_harness.merging.config import MergeSettings

TINY = "tiny"
BASE_LABEL = "base"


class FinetuneSpec(_Frozen):
    method: str
    config: dict[str, Any] = Field(default_factory=dict, description="the method's parameters (peft config fields)")
    deepspeed: DeepSpeedSettings | None = None
    train: dict[str, Any] = Field(default_factory=dict, description="overrides of the top-level train:")
    per_task: bool = Field(False, description="one fine-tune per training task (experts to merge)")
    evaluate: bool = True

    @model_validator(mode="after")
    def _method_and_params(self) -> FinetuneSpec:
        from pefteval_harness.finetuning import get_method

        try:
            method = get_method(self.method)
        except BadInput as e:
            raise at("method", str(e)) from None
        try:
            object.__setattr__(self, "config", method.resolve_params(self.config))  # frozen: set once, here
        except BadInput as e:
            raise at("config", str(e)) from None
        return self


class MergeSpec(MergeSettings):
    experts: list[str] = Field(min_length=1, description="fine-tune names; a per_task name means all of them")
    evaluate: bool = True

    @field_validator("experts", mode="before")
    @classmethod
    def _one_name_is_a_list(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v


class EvaluateSpec(EvaluateSettings):
    """Evaluation settings for every task, and overrides for tasks matching a name or glob."""

    tasks: list[str] = Field(min_length=1, description="task names, globs or groups")
    include_base: bool = True
    per_task: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="task name or glob -> settings that differ for those tasks"
    )

    @model_validator(mode="after")
    def _overrides_are_settings(self) -> EvaluateSpec:
        for pattern in self.per_task:
            self.settings_for(pattern)
        return self

    def settings_for(self, task: str) -> EvaluateSettings:
        """This task's settings: the defaults, then every matching per_task entry in order."""
        settings = self.model_dump(include=set(EvaluateSettings.model_fields))
        for pattern, overrides in self.per_task.items():
            if fnmatch.fnmatchcase(task, pattern):
                unknown = sorted(set(overrides) - set(EvaluateSettings.model_fields))
                if unknown:
                    raise at(f"per_task.{pattern}.{unknown[0]}", "unknown setting")
                settings.update(overrides)
        try:
            return EvaluateSettings.model_validate(settings)
        except ValidationError as e:
            where, msg = error_message(e)
            raise at(f"per_task.{where}", f"{msg} (for task {task})") from None


class ResourcesSpec(_Frozen):
    train: Resources = Resources()
    merge: Resources = Resources()
    evaluate: Resources = Resources()
    max_retries: int = Field(1, ge=0, description="retries of a failed job before it is recorded as failed")


class Spec(_Frozen):
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

    @field_validator("include_paths")
    @classmethod
    def _task_folders_exist(cls, paths: list[str], info: ValidationInfo) -> list[str]:
        resolved = []
        for i, path in enumerate(paths):
            folder = resolve_path(path, info)
            if not folder.is_dir():
                raise at(f"[{i}]", f"no such task folder {path!r} ({folder})")
            resolved.append(str(folder))
        return resolved

    @field_validator("base_model")
    @classmethod
    def _local_base_is_absolute(cls, name: str, info: ValidationInfo) -> str:
        path = resolve_path(name, info)
        return str(path) if name != TINY and path.exists() else name

    @field_validator("output")
    @classmethod
    def _output_is_absolute(cls, output: str | None, info: ValidationInfo) -> str | None:
        return None if output is None else str(resolve_path(output, info))

    @model_validator(mode="after")
    def _names_and_references(self) -> Spec:
        for name, finetune in self.finetunes.items():
            if name == BASE_LABEL:
                raise at(f"finetunes.{name}", f"the name {BASE_LABEL!r} is taken by the base model's row")
            try:
                self.train_settings(finetune)
            except ValidationError as e:
                where, msg = error_message(e)
                raise at(f"finetunes.{name}.train.{where}", msg) from None
        for name, merge in self.merges.items():
            if name in self.finetunes or name == BASE_LABEL:
                raise at(f"merges.{name}", "the name is already used by a fine-tune or the base")
            for i, expert in enumerate(merge.experts):
                if expert not in self.finetunes:
                    known = ", ".join(self.finetunes) or "none"
                    raise at(f"merges.{name}.experts[{i}]", f"unknown fine-tune {expert!r} (known: {known})")
            self._check_mergeable(name, merge)
        return self

    def _check_mergeable(self, name: str, merge: MergeSpec) -> None:
        """The merge engine's own rules, asked of what the experts' methods will produce."""
        from pefteval_harness.finetuning import get_method
        from pefteval_harness.merging import ADAPTER_FAMILIES, check_adapters

        methods = {expert: get_method(self.finetunes[expert].method) for expert in merge.experts}
        produced = sorted({m.produces for m in methods.values()})
        if len(produced) > 1:
            raise at(f"merges.{name}.experts", "experts must all be full models or all adapters")
        if produced == ["model"]:
            if merge.space == "factor":
                raise at(f"merges.{name}.space", "factor space needs adapter experts, these are full models")
            return
        for expert, method in methods.items():
            if method.adapter_family not in ADAPTER_FAMILIES:
                raise at(
                    f"merges.{name}.experts",
                    f"{expert} ({method.name}) adapters cannot be merged"
                    f" (mergeable adapter families: {', '.join(ADAPTER_FAMILIES)})",
                )
        configs = [methods[e].adapter_config(self.finetunes[e].config) for e in merge.experts]
        try:
            check_adapters(configs, merge.space, list(merge.experts))
        except BadInput as e:
            raise at(f"merges.{name}.experts", str(e)) from None

    def train_settings(self, finetune: FinetuneSpec) -> TrainSettings:
        return TrainSettings.model_validate({**self.train.model_dump(), **finetune.train})

    def fingerprint(self) -> str:
        """Hash of the validated spec (recorded with every result as provenance)."""
        canonical = json.dumps(self.model_dump(mode="json"), sort_keys=True)
        return hashlib.sha256(canonical.encode()).hexdigest()


def load_spec(path: str | Path) -> tuple[Spec, Path]:
    """Read and validate a spec file; any problem is a one-line BadInput naming the file and key path."""
    path = Path(path)
    raw = load_mapping(path, "spec")
    spec = validate(Spec, raw, path, context={"root": path.resolve().parent})
    return (spec if spec.name else spec.model_copy(update={"name": path.stem})), path
