"""The fine-tuning methods: one registry entry per method, full fine-tuning plus `peft` tuners.

A newcomer adds a method by adding one entry: the peft config class and the defaults this project uses
(spec `config:` keys override them; they are the peft config's own field names, so peft validates them).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pefteval_harness.errors import BadInput


@dataclass(frozen=True)
class FinetuneMethod:
    name: str
    description: str
    # Returns the peft config class; None means full fine-tuning (every weight, through DeepSpeed).
    peft_config_class: Callable[[], type] | None
    defaults: dict[str, Any] = field(default_factory=dict)

    @property
    def is_full(self) -> bool:
        return self.peft_config_class is None

    def peft_config(self, overrides: dict[str, Any]):
        """The peft config for these overrides; unknown or invalid fields raise BadInput."""
        cls = self.peft_config_class()
        try:
            return cls(task_type="CAUSAL_LM", **{**self.defaults, **overrides})
        except TypeError as e:  # unknown field
            raise BadInput(f"{cls.__name__}: {str(e).replace(f'{cls.__name__}.__init__() ', '')}") from None
        except ValueError as e:  # peft's own checks in __post_init__
            raise BadInput(f"{cls.__name__}: {e}") from None


def _peft(name: str) -> Callable[[], type]:
    def config_class() -> type:  # imported lazily: `pefteval plan` and the CLI stay fast
        import peft

        return getattr(peft, name)

    return config_class


FINETUNE_METHODS: dict[str, FinetuneMethod] = {
    m.name: m
    for m in [
        FinetuneMethod("full", "full fine-tuning of every weight with DeepSpeed ZeRO", None),
        FinetuneMethod(
            "lora",
            "low-rank adapters (peft LoraConfig)",
            _peft("LoraConfig"),
            {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "target_modules": "all-linear"},
        ),
        FinetuneMethod(
            "dora",
            "weight-decomposed low-rank adapters (peft LoraConfig, use_dora)",
            _peft("LoraConfig"),
            {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "target_modules": "all-linear", "use_dora": True},
        ),
    ]
}


def get_method(name: str) -> FinetuneMethod:
    if name not in FINETUNE_METHODS:
        raise BadInput(f"unknown fine-tuning method {name!r} (known: {', '.join(FINETUNE_METHODS)})")
    return FINETUNE_METHODS[name]
