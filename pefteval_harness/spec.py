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
import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, Field, ValidationError, ValidationInfo, field_validator, model_validator

from pefteval_harness.config_io import at, error_message, load_mapping, resolve_path, validate
from pefteval_harness.errors import BadInput
from pefteval_harness.jobs.types import (
    AnalysisSettings,
    DeepSpeedSettings,
    EvaluateSettings,
    Resources,
    TheorySettings,
    TrainSettings,
    _Frozen,
)
from pefteval_harness.merging.config import MergeSettings
from pefteval_harness.prompting import StrategyConfig, parse_strategy

TINY = "tiny"
BASE_LABEL = "base"

# --- sweeps --------------------------------------------------------------------------------------------

SweepGrid = dict[str, list[Any]]
SWEEP_DESCRIPTION = "dotted field path (config.r, train.learning_rate, parameters.density) -> values; one point each"


@dataclass(frozen=True)
class SweepPoint:
    """One point of a fine-tune's or merge's sweep (or the item itself when it has no sweep)."""

    label: str  # the model's name: `lora[r=4]`, or the item's own name
    item: Any  # the FinetuneSpec / MergeSpec with this point's values set
    sweep_of: str | None = None
    values: dict[str, Any] = field(default_factory=dict)


def _check_grid(grid: SweepGrid, owner: type[BaseModel], nested: dict[str, type[BaseModel]]) -> SweepGrid:
    """Each path names a field of `owner` (and of the `nested` models; keys of dict fields are checked by
    the points' own validation) and lists at least one value, each once."""
    sweepable = [name for name in owner.model_fields if name != "sweep"]
    for path, values in grid.items():
        head, _, rest = path.partition(".")
        if head not in sweepable:
            raise at(path, f"{head!r} is not a field that can be swept (fields: {', '.join(sweepable)})")
        if not isinstance(values, list) or not values:
            raise at(path, "a sweep needs a non-empty list of values")
        if len({json.dumps(v, sort_keys=True) for v in values}) != len(values):
            raise at(path, "a value is listed twice")
        if head in nested and rest.partition(".")[0] not in nested[head].model_fields:
            known = ", ".join(nested[head].model_fields)
            raise at(path, f"{nested[head].__name__} has no field {rest.partition('.')[0]!r} (fields: {known})")
    return grid


def _with_value(data: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    """`data` with the value at a dotted path set (dicts on the way created), leaving `data` unchanged."""
    head, _, rest = path.partition(".")
    if not rest:
        return {**data, head: value}
    inner = data.get(head)
    return {**data, head: _with_value(inner if isinstance(inner, dict) else {}, rest, value)}


def _short(value: Any) -> str:
    """A swept value as a label shows it: 0.001, 4, lora, [1, 2]."""
    if isinstance(value, float):
        return f"{value:g}"
    return value if isinstance(value, str) else json.dumps(value)


def sweep_points(name: str, item: Any) -> list[SweepPoint]:
    """The item itself, or one validated copy per combination of its sweep's values (grid order: the
    last path varies fastest). A point the item's own rules refuse is an error naming the point."""
    if not item.sweep:
        return [SweepPoint(name, item)]
    points = []
    data = item.model_dump(exclude={"sweep"}, exclude_unset=True)
    for combination in itertools.product(*item.sweep.values()):
        values = dict(zip(item.sweep, combination, strict=True))
        point = data
        for path, value in values.items():
            point = _with_value(point, path, value)
        shown = ",".join(f"{path.rsplit('.', 1)[-1]}={_short(value)}" for path, value in values.items())
        try:
            points.append(SweepPoint(f"{name}[{shown}]", type(item).model_validate(point), name, values))
        except ValidationError as e:
            where, msg = error_message(e)
            raise at("sweep", f"point {shown}: {where}: {msg}") from None
    return points


class FinetuneSpec(_Frozen):
    method: str
    config: dict[str, Any] = Field(default_factory=dict, description="the method's parameters (peft config fields)")
    deepspeed: DeepSpeedSettings | None = None
    train: dict[str, Any] = Field(default_factory=dict, description="overrides of the top-level train:")
    per_task: bool = Field(False, description="one fine-tune per training task (experts to merge)")
    resources: dict[str, Any] = Field(default_factory=dict, description="overrides of resources.train (workers, ...)")
    evaluate: bool = True
    sweep: SweepGrid = Field(default_factory=dict, description=SWEEP_DESCRIPTION)

    @field_validator("sweep")
    @classmethod
    def _sweep_paths(cls, grid: SweepGrid) -> SweepGrid:
        return _check_grid(grid, cls, {"train": TrainSettings, "deepspeed": DeepSpeedSettings})

    @field_validator("resources")
    @classmethod
    def _resources_fields(cls, overrides: dict[str, Any]) -> dict[str, Any]:
        try:
            Resources.model_validate(overrides)
        except ValidationError as e:
            raise at(*error_message(e)) from None
        return overrides

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
        sweep_points("", self)  # every point valid, with the method's own checks
        return self


class SubsetsSpec(_Frozen):
    """The scaling sweep: merge k of the pool's experts, for each k, over several seeded random subsets."""

    k: list[Annotated[int, Field(strict=True, ge=1)]] = Field(
        min_length=1, description="numbers of experts to merge, each at most the pool's size"
    )
    per_k: int = Field(1, ge=1, description="random subsets per k (all of them when there are fewer)")
    seed: int | None = Field(None, description="seeds the choice of subsets (default: the spec's seed)")

    @field_validator("k")
    @classmethod
    def _distinct(cls, ks: list[int]) -> list[int]:
        if len(set(ks)) != len(ks):
            raise ValueError("a k is listed twice")
        return sorted(ks)


class MergeSpec(MergeSettings):
    experts: list[str] = Field(min_length=1, description="fine-tune names; a per_task name means all of them")
    evaluate: bool = True
    sweep: SweepGrid = Field(default_factory=dict, description=SWEEP_DESCRIPTION)
    subsets: SubsetsSpec | None = Field(
        None, description="merge subsets of k of the experts (the pool) instead of all of them: the scaling sweep"
    )
    theory: TheorySettings | None = Field(
        None, description="record the theory quantities of each merge (task vectors and merged tensors); off if absent"
    )
    normalize_weights: bool = Field(
        False, description="divide the experts' weights (1.0 each if not given) by their sum: they sum to 1"
    )
    keep_model: bool = Field(True, description="false: delete the merged model once all its evaluations are scored")

    @field_validator("theory", mode="before")
    @classmethod
    def _theory_switch(cls, v: Any) -> Any:
        return ({} if v else None) if isinstance(v, bool) else v  # `theory: true` takes the defaults

    @model_validator(mode="after")
    def _subsets_weigh_alike(self) -> MergeSpec:
        if self.subsets is not None and self.weights is not None:
            raise at("weights", "not with subsets: each subset's experts weigh alike (1.0 each)")
        if self.theory is not None and self.space == "factor":
            raise at("theory", "not in factor space: the quantities are of task vectors in weight space (delta_w)")
        if self.normalize_weights and self.weights is not None and abs(sum(self.weights)) < 1e-12:
            raise at("weights", "they sum to 0 and cannot be normalised (normalize_weights)")
        return self

    @field_validator("sweep")
    @classmethod
    def _sweep_paths(cls, grid: SweepGrid) -> SweepGrid:
        return _check_grid(grid, cls, {})

    @model_validator(mode="after")
    def _points(self) -> MergeSpec:
        sweep_points("", self)
        return self

    @field_validator("experts", mode="before")
    @classmethod
    def _one_name_is_a_list(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v


def local_model_name(name: str, info: ValidationInfo) -> str:
    """A model the spec names: an existing folder as an absolute path (relative to the spec's folder),
    anything else (tiny, a hub id, a missing folder: the plan says which) as written."""
    path = resolve_path(name, info)
    return str(path) if name != TINY and path.exists() else name


class JudgeSpec(_Frozen):
    """An LLM-as-judge for generated replies: a local model scores each on a rubric (off if absent)."""

    model: str = Field(description="a model folder, a hub id, or tiny (the embedded model: for tests)")
    tasks: list[str] | None = Field(
        None, description="task names or globs to judge (default: the evaluated tasks of metadata.affect generation)"
    )
    rubric: str | None = Field(None, description="the rubric the judge is given (default: judge.DEFAULT_RUBRIC)")
    max_new_tokens: int = Field(32, ge=1)
    batch_size: int = Field(4, ge=1)

    @field_validator("model")
    @classmethod
    def _local_model_is_absolute(cls, name: str, info: ValidationInfo) -> str:
        return local_model_name(name, info)


class EvaluateSpec(EvaluateSettings):
    """Evaluation settings for every task, and overrides for tasks matching a name or glob."""

    tasks: list[str] = Field(min_length=1, description="task names, globs or groups")
    strategies: list[StrategyConfig] = Field(
        default_factory=list,
        description="prompting strategies (zero_shot, k_shot, cot), each crossed with every model and task;"
        " none: each task as its YAML states it",
    )
    judge: JudgeSpec | None = None
    include_base: bool = True
    trained_tasks_only: bool = Field(
        False,
        description="score each fine-tuned or merged model only on the tasks it was trained for, with their"
        " adversarial and held-out variants (metadata.clean_partner / trained_by); the base on all",
    )
    per_task: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="task name or glob -> settings that differ for those tasks"
    )

    @field_validator("strategies", mode="before")
    @classmethod
    def _strategy_kinds(cls, entries: Any) -> Any:
        if not isinstance(entries, list):
            return entries
        parsed = []
        for i, entry in enumerate(entries):
            try:
                parsed.append(parse_strategy(entry))
            except ValueError as e:
                raise at(f"[{i}]", str(e)) from None
        return parsed

    @model_validator(mode="after")
    def _overrides_are_settings(self) -> EvaluateSpec:
        for pattern in self.per_task:
            settings = self.settings_for(pattern)
            if self.strategies and settings.num_fewshot is not None:
                raise at(f"per_task.{pattern}.num_fewshot", "not with strategies: each strategy sets the shots")
        names = [strategy.name for strategy in self.strategies]
        for i, name in enumerate(names):
            if name in names[:i]:
                raise at(f"strategies[{i}].name", f"{name!r} is used twice (give one a name:)")
        if self.strategies and self.num_fewshot is not None:
            raise at("num_fewshot", "not with strategies: each strategy sets the shots (k_shot's k)")
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


class AnalysisSpec(AnalysisSettings):
    """Analyse every fine-tune's weight update; compare it with the reference full fine-tune's."""

    reference: str | None = Field(None, description="a full fine-tune (trained on the same tasks) to compare with")


class ResourcesSpec(_Frozen):
    train: Resources = Resources()
    merge: Resources = Resources()
    evaluate: Resources = Resources()
    analyze: Resources = Resources()
    max_retries: int = Field(1, ge=0, description="retries of a failed job before it is recorded as failed")
    tasks_per_worker: int = Field(
        24, ge=1, description="a model's evaluations one worker runs on one model load (fewer: more spread)"
    )
    gpu_memory_gb: float | None = Field(
        None, gt=0, description="memory of one GPU of the cluster: turns accelerator_memory_gb into a GPU share"
    )

    @model_validator(mode="after")
    def _kinds_can_do_it(self) -> ResourcesSpec:
        for kind in ("merge", "evaluate", "analyze"):
            if getattr(self, kind).workers > 1:
                raise at(f"{kind}.workers", "only fine-tunes run as a gang of workers (resources.train.workers)")
        if self.merge.num_gpus or self.merge.accelerator_memory_gb:
            raise at("merge.num_gpus", "merges run on CPU (they stream tensors from disk): ask for none")
        return self


class Spec(_Frozen):
    name: str = ""
    base_model: str = TINY
    trust_remote_code: bool = False
    seed: int = Field(1234, ge=0, le=2**32 - 1, description="numpy's seed range, which training and lm-eval use")
    output: str | None = None
    include_paths: list[str] = Field(default_factory=list, description="extra lm-eval task folders")
    train: TrainSettings = TrainSettings()
    finetunes: dict[str, FinetuneSpec] = Field(default_factory=dict)
    merges: dict[str, MergeSpec] = Field(default_factory=dict)
    evaluate: EvaluateSpec
    analysis: AnalysisSpec | None = Field(None, description="weight-update analysis of the fine-tunes; off if absent")
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
        return local_model_name(name, info)

    @field_validator("output")
    @classmethod
    def _output_is_absolute(cls, output: str | None, info: ValidationInfo) -> str | None:
        from pefteval_harness.store import is_url

        if output is None or is_url(output):  # a store URL (s3://, file://...) is taken as written
            return output
        return str(resolve_path(output, info))

    @model_validator(mode="after")
    def _names_and_references(self) -> Spec:
        points = self.finetune_points()
        for name, finetune_points in points.items():
            if name == BASE_LABEL:
                raise at(f"finetunes.{name}", f"the name {BASE_LABEL!r} is taken by the base model's row")
            for point in finetune_points:
                try:
                    self.train_settings(point.item)
                except ValidationError as e:
                    where, msg = error_message(e)
                    shown = f" (sweep point {point.label})" if point.sweep_of else ""
                    raise at(f"finetunes.{name}.train.{where}", msg + shown) from None
        known = {p.label: p.item for named in points.values() for p in named}  # what merges may name
        for name, merge in self.merges.items():
            if name in known or name in self.finetunes or name == BASE_LABEL:
                raise at(f"merges.{name}", "the name is already used by a fine-tune or the base")
            for i, expert in enumerate(merge.experts):
                if expert not in known:
                    if expert in points:
                        hint = f"{expert} is swept: name one of its points, e.g. {points[expert][0].label}"
                    else:
                        hint = f"known: {', '.join(known) or 'none'}"
                    raise at(f"merges.{name}.experts[{i}]", f"unknown fine-tune {expert!r} ({hint})")
            self._check_mergeable(name, merge, known)
        if self.analysis and self.analysis.reference is not None:
            from pefteval_harness.finetuning import get_method

            reference = self.analysis.reference
            if reference not in known:
                raise at("analysis.reference", f"unknown fine-tune {reference!r} (known: {', '.join(known)})")
            if get_method(known[reference].method).produces != "model":
                raise at("analysis.reference", f"{reference} ({known[reference].method}) is not a full fine-tune")
        return self

    def finetune_points(self) -> dict[str, list[SweepPoint]]:
        """Every fine-tune's sweep points (the fine-tune itself when it has no sweep)."""
        return {name: sweep_points(name, finetune) for name, finetune in self.finetunes.items()}

    def merge_points(self) -> dict[str, list[SweepPoint]]:
        return {name: sweep_points(name, merge) for name, merge in self.merges.items()}

    def _check_mergeable(self, name: str, merge: MergeSpec, finetunes: dict[str, FinetuneSpec]) -> None:
        """The merge engine's own rules, asked of what the experts' methods will produce (`finetunes`: the
        fine-tunes and sweep points merges may name, by label)."""
        from pefteval_harness.finetuning import get_method
        from pefteval_harness.merging import ADAPTER_FAMILIES, check_adapters

        methods = {expert: get_method(finetunes[expert].method) for expert in merge.experts}
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
        configs = [methods[e].adapter_config(finetunes[e].config) for e in merge.experts]
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


def load_spec(path: str | Path, text: str | None = None) -> tuple[Spec, Path]:
    """Read (unless its `text` is given) and validate a spec file; any problem is a one-line BadInput naming
    the file and key path."""
    path = Path(path)
    raw = load_mapping(path, "spec", text)
    spec = validate(Spec, raw, path, context={"root": path.resolve().parent})
    return (spec if spec.name else spec.model_copy(update={"name": path.stem})), path
