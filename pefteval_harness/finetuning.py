"""The fine-tuning methods: one registry entry per method, described by what it can do.

Nothing outside this file tests a method's name. A method says what it produces (a full model or an
adapter), which adapter family its adapters belong to (the merge engine merges the families in
`merging.ADAPTER_FAMILIES`), how it builds its peft config from its parameters and the training run
(AdaLoRA needs the total step count), and which trainer callbacks it needs (AdaLoRA reallocates ranks
after every optimiser step).

A newcomer adds a method with one `FinetuneMethod` entry in `FINETUNE_METHODS`: usually a peft config
class name and the defaults this project uses. Its parameters are that config's own fields, so peft
validates them, once, when the spec is loaded.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from pefteval_harness.errors import BadInput

# Used to validate step-dependent configs before the step count is known (at spec load).
_PLACEHOLDER_STEPS = 1000


def _no_callbacks(model) -> list:
    return []


@dataclass(frozen=True)
class FinetuneMethod:
    name: str
    description: str
    produces: Literal["model", "adapter"]
    # The peft config class name (peft.<name>); None: every weight is trained (full fine-tuning).
    peft_config_class: str | None = None
    defaults: dict[str, Any] = field(default_factory=dict)
    # Which adapters these are, for the merge engine ("lora": plain lora_A/lora_B pairs); None: not mergeable.
    adapter_family: str | None = None
    # Bump when a change of this method's code changes what it trains: it is part of every job id.
    version: int = 1
    # Extra peft config fields that depend on the training run: (params, total optimiser steps) -> fields.
    run_fields: Callable[[dict[str, Any], int], dict[str, Any]] | None = None
    # Trainer callbacks the method needs, given the peft model.
    callbacks: Callable[[Any], list] = _no_callbacks

    def resolve_params(self, params: dict[str, Any]) -> dict[str, Any]:
        """The method's parameters with defaults filled in; BadInput if peft refuses them."""
        if self.peft_config_class is None:
            if params:
                raise BadInput(f"{self.name} fine-tuning takes no peft config (use deepspeed: for its settings)")
            return {}
        resolved = {**self.defaults, **params}
        self.peft_config(resolved, _PLACEHOLDER_STEPS)  # peft's own checks
        return resolved

    def peft_config(self, params: dict[str, Any], total_steps: int):
        """The peft config for a training run of `total_steps` optimiser steps."""
        import peft

        cls = getattr(peft, self.peft_config_class)
        _check_field_types(cls, params)
        fields = {**params, **(self.run_fields(params, total_steps) if self.run_fields else {})}
        try:
            return cls(task_type="CAUSAL_LM", **fields)
        except TypeError as e:  # unknown field
            raise BadInput(f"{cls.__name__}: {str(e).replace(f'{cls.__name__}.__init__() ', '')}") from None
        except ValueError as e:  # peft's own checks in __post_init__
            raise BadInput(f"{cls.__name__}: {e}") from None

    def adapter_config(self, params: dict[str, Any]) -> dict[str, Any]:
        """The adapter_config.json this method will save (as far as it is known before training)."""
        return self.peft_config(params, _PLACEHOLDER_STEPS).to_dict()

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description,
            "produces": self.produces,
            "adapter_family": self.adapter_family,
            "version": self.version,
            "peft_config": self.peft_config_class,
            "defaults": self.defaults,
        }


def _check_field_types(cls: type, params: dict[str, Any]) -> None:
    """Each parameter against the type its peft config field declares (peft's dataclasses do not check:
    `r: 4.5` or `use_rslora: "yes"` would reach training). Strict: YAML gives real numbers and booleans."""
    import typing

    from pydantic import ConfigDict, TypeAdapter, ValidationError
    from pydantic.errors import PydanticSchemaGenerationError

    hints = typing.get_type_hints(cls)
    for name, value in params.items():
        if name not in hints:  # an unknown field: peft's own TypeError names it
            continue
        try:
            adapter = TypeAdapter(hints[name], config=ConfigDict(strict=True, arbitrary_types_allowed=True))
        except (PydanticSchemaGenerationError, TypeError):  # a field type pydantic cannot describe
            continue
        try:
            adapter.validate_python(value)
        except ValidationError as e:
            raise BadInput(f"{cls.__name__}: {name}: {e.errors()[0]['msg']}, got {value!r}") from None


def _adalora_schedule(params: dict[str, Any], total_steps: int) -> dict[str, Any]:
    """AdaLoRA's rank budget schedule needs the run's length; keep its phases inside it."""
    return {"total_step": max(total_steps, params.get("tinit", 0) + params.get("tfinal", 0) + 1)}


def _adalora_callbacks(model) -> list:
    from transformers import TrainerCallback

    class ReallocateRanks(TrainerCallback):
        """peft's AdaLoRA contract: update_and_allocate after each optimiser step, before zero_grad."""

        def on_optimizer_step(self, args, state, control, **kwargs):
            model.base_model.update_and_allocate(state.global_step)

    return [ReallocateRanks()]


_LORA = {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "target_modules": "all-linear"}

FINETUNE_METHODS: dict[str, FinetuneMethod] = {
    m.name: m
    for m in [
        FinetuneMethod("full", "full fine-tuning of every weight with DeepSpeed ZeRO", produces="model"),
        FinetuneMethod(
            "lora",
            "low-rank adapters (peft LoraConfig)",
            produces="adapter",
            peft_config_class="LoraConfig",
            defaults=_LORA,
            adapter_family="lora",
        ),
        FinetuneMethod(
            "dora",
            "weight-decomposed low-rank adapters (peft LoraConfig, use_dora)",
            produces="adapter",
            peft_config_class="LoraConfig",
            defaults={**_LORA, "use_dora": True},
            adapter_family="dora",
        ),
        FinetuneMethod(
            "adalora",
            "adaptive-rank LoRA: ranks reallocated during training (peft AdaLoraConfig)",
            produces="adapter",
            peft_config_class="AdaLoraConfig",
            defaults={"init_r": 12, "target_r": 8, "lora_alpha": 16, "target_modules": "all-linear"},
            adapter_family="adalora",
            run_fields=_adalora_schedule,
            callbacks=_adalora_callbacks,
        ),
    ]
}


def get_method(name: str) -> FinetuneMethod:
    if name not in FINETUNE_METHODS:
        raise BadInput(f"unknown fine-tuning method {name!r} (known: {', '.join(FINETUNE_METHODS)})")
    return FINETUNE_METHODS[name]
