"""What a merge is, validated in one place, and the rules an adapter must follow to be merged.

`MergeSettings` is the part every entry point shares: method, its parameters (checked by the method's own
params model and stored resolved, defaults included), weights, space and seed. The experiment spec embeds
it (adding the fine-tunes to merge); `MergeRecipe` adds a base model and expert folders for
`pefteval merge CONFIG`, which also reads mergekit's YAML format (translated by `recipes.from_mergekit`).
`check_adapters` holds the engine's adapter rules; the engine applies it to the
experts' adapter_config.json and the planner to the peft configs of the fine-tunes before anything runs.
pydantic only: no torch or peft import here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from pefteval_harness.config_io import at, load_mapping, resolve_path, validate
from pefteval_harness.errors import BadInput
from pefteval_harness.merging.methods import get_method
from pefteval_harness.merging.recipes import from_mergekit, is_mergekit

SPACES = ("delta_w", "factor")
# Adapter families (as the fine-tuning registry names them) whose adapters the engine merges.
ADAPTER_FAMILIES = ("lora",)
# peft features whose saved tensors are not plain lora_A / lora_B pairs, or whose forward is not W + s·B·A.
_UNSUPPORTED = (
    "use_dora",
    "modules_to_save",
    "lora_bias",
    "trainable_token_indices",
    "target_parameters",
    "layer_replication",
    "alora_invocation_tokens",
)
# Adapter fields that must agree for factors to be merged entry by entry.
_FACTOR_FIELDS = ("r", "lora_alpha", "target_modules", "use_rslora", "rank_pattern", "alpha_pattern", "fan_in_fan_out")

# A number given as a number (not "1.5", not true), and finite.
Number = Annotated[float, Field(strict=True, allow_inf_nan=False)]


def _plain(value: Any) -> Any:
    """peft's enums (PeftType.LORA) as their plain value."""
    return getattr(value, "value", value)


def _canonical(key: str, value: Any) -> Any:
    """A factor field in one form whether it comes from adapter_config.json or peft's `to_dict()`."""
    if key == "target_modules":  # a set in peft, a list in no fixed order once saved, or a str ("all-linear")
        return sorted(value) if isinstance(value, list | tuple | set | frozenset) else value
    if key in ("rank_pattern", "alpha_pattern"):
        return dict(sorted((value or {}).items()))
    if key in ("use_rslora", "fan_in_fan_out"):
        return bool(value)
    return value


def check_adapters(configs: Sequence[Mapping[str, Any]], space: str, names: Sequence[str]) -> None:
    """The engine's rules for adapters to merge; BadInput naming the offending expert (`names[i]`).

    `configs` are adapter_config.json contents or peft's `PeftConfig.to_dict()`. Every adapter must be plain
    LoRA (no feature in `_UNSUPPORTED`); in space "factor" their shapes (`_FACTOR_FIELDS`) must agree.
    """
    if len(configs) != len(names):
        raise ValueError(f"check_adapters: {len(configs)} configs for {len(names)} names")
    if space not in SPACES:
        raise BadInput(f"merge: unknown space {space!r} (known: {', '.join(SPACES)})")
    for name, config in zip(names, configs, strict=True):
        peft_type = _plain(config.get("peft_type"))
        if peft_type != "LORA":
            raise BadInput(f"{name}: peft_type {peft_type!r} cannot be merged (LoRA adapters only)")
        for key in _UNSUPPORTED:
            if config.get(key):
                raise BadInput(f"{name}: {key}={config[key]!r} adapters are not supported by the merge engine yet")
    if space != "factor" or not configs:
        return
    first = {key: _canonical(key, configs[0].get(key)) for key in _FACTOR_FIELDS}
    for name, config in zip(names[1:], configs[1:], strict=True):
        for key in _FACTOR_FIELDS:
            value = _canonical(key, config.get(key))
            if value != first[key]:
                raise BadInput(
                    f"{name}: {key}={value!r} differs from {names[0]} ({first[key]!r});"
                    " factor-space merging needs identical adapter shapes (use space delta_w)"
                )


class MergeSettings(BaseModel):
    """A merge's method and how to apply it; `parameters` holds the resolved parameters after validation."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    method: str = Field(description="a registered merge method (`pefteval methods merge` lists them)")
    parameters: dict[str, Any] = Field(default_factory=dict, description="the method's parameters")
    weights: list[Number] | None = Field(None, description="one weight per expert; 1.0 each when left out")
    space: Literal["delta_w", "factor"] = Field(
        "delta_w", description="LoRA experts: merge B·A into the base (delta_w) or the A and B factors (factor)"
    )
    seed: Annotated[int, Field(strict=True)] | None = Field(None, description="seeds random merge methods")

    @field_validator("method")
    @classmethod
    def _registered(cls, method: str) -> str:
        try:
            get_method(method)
        except BadInput as e:
            raise ValueError(str(e)) from None
        return method

    @model_validator(mode="after")
    def _resolve_parameters(self) -> MergeSettings:
        method = get_method(self.method)
        try:
            resolved = method.validate_params(self.parameters)
        except BadInput as e:
            raise at("parameters", str(e)) from None
        object.__setattr__(self, "parameters", resolved.model_dump())  # frozen: set once, here
        if self.weights is not None:
            _check_sum(self.method, self.weights, "weights")
        return self


def _check_sum(method: str, weights: Sequence[float], where: str) -> None:
    if get_method(method).normalise_weights and abs(sum(weights)) < 1e-12:
        raise at(where, f"merge method {method!r} normalises the weights, and these sum to 0")


def _safetensors_folder(path: str, info: ValidationInfo) -> str:
    """A folder the engine reads, resolved; one with only pickle weights is refused now, naming it."""
    from pefteval_harness.trust import refuse_pickles

    folder = resolve_path(path, info)
    try:
        refuse_pickles(folder)
    except BadInput as e:
        raise ValueError(str(e)) from None
    return str(folder)


class ExpertEntry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    path: str = Field(min_length=1, description="a HF model folder or a peft LoRA adapter folder")
    weight: Number = Field(1.0, description="the expert's weight")

    @field_validator("path")
    @classmethod
    def _path(cls, path: str, info: ValidationInfo) -> str:
        return _safetensors_folder(path, info)


class MergeRecipe(MergeSettings):
    """A `pefteval merge` YAML file: the settings, a base model and the expert folders.

    Weights go either with each expert (`experts[i].weight`) or in one top-level `weights` list, not both.
    """

    base_model: str | None = Field(None, min_length=1, description="the base model folder")
    experts: list[ExpertEntry] = Field(min_length=1, description="the models or adapters to merge")

    @field_validator("base_model")
    @classmethod
    def _base(cls, path: str | None, info: ValidationInfo) -> str | None:
        return None if path is None else _safetensors_folder(path, info)

    @model_validator(mode="after")
    def _weights(self) -> MergeRecipe:
        if self.weights is not None:
            if any("weight" in e.model_fields_set for e in self.experts):
                raise at("weights", "give the weights either here or with each expert, not both")
            if len(self.weights) != len(self.experts):
                raise at("weights", f"{len(self.weights)} weights for {len(self.experts)} experts")
        else:
            _check_sum(self.method, self.expert_weights, "experts")
        return self

    @property
    def expert_paths(self) -> list[Path]:
        return [Path(e.path) for e in self.experts]

    @property
    def expert_weights(self) -> list[float]:
        return list(self.weights) if self.weights is not None else [e.weight for e in self.experts]


def load_recipe(path: Path) -> MergeRecipe:
    """Read and validate a merge YAML file; any problem is one BadInput line `file: key.path: message`.

    The file is either our format (`MergeRecipe`) or mergekit's (told apart by its `merge_method` key), which
    `recipes.from_mergekit` translates first; relative paths resolve against the file's folder either way.
    """
    path = Path(path)
    raw = load_mapping(path, "merge config")
    if is_mergekit(raw):
        raw = from_mergekit(raw, str(path))
    return validate(MergeRecipe, raw, path, context={"root": path.resolve().parent})
