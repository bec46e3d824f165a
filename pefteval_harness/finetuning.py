"""The fine-tuning methods: one registry entry per method, described by what it can do.

Nothing outside this file tests a method's name. A method says what it produces (a full model or an
adapter), which adapter family its adapters belong to (the merge engine merges the families in
`merging.ADAPTER_FAMILIES`), whether its adapter is virtual tokens (`prompt_learning`, read from peft's
config class) and whether peft can merge it into the base weights (`mergeable`), how it builds its peft
config from its parameters and the training run (AdaLoRA needs the total step count), which trainer
callbacks it needs (AdaLoRA reallocates ranks after every optimiser step), and whether its initialisation
rewrites the base weights (PiSSA, OLoRA: the adapter is then saved converted to a plain LoRA of the
original base).

A newcomer adds a method with one `FinetuneMethod` entry in `FINETUNE_METHODS`: usually a peft config
class name and the defaults this project uses. Its parameters are that config's own fields, so peft
validates them, once, when the spec is loaded. docs/methods.md lists every method, its defaults and why,
and the peft tuners left out.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from pefteval_harness.errors import BadInput

# Used to validate step-dependent configs before the step count is known (at spec load).
_PLACEHOLDER_STEPS = 1000


def _no_callbacks(model) -> list:
    return []


def _never(params: dict[str, Any]) -> bool:
    return False


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
    # Whether peft's `merge_and_unload` folds the trained adapter into the base weights (a plain model then
    # serves it, and the weight update W' - W exists). Virtual tokens and extra modules cannot be folded.
    mergeable: bool = True
    # Bump when a change of this method's code changes what it trains: it is part of every job id.
    version: int = 1
    # Extra peft config fields that depend on the training run: (params, total optimiser steps) -> fields.
    run_fields: Callable[[dict[str, Any], int], dict[str, Any]] | None = None
    # Trainer callbacks the method needs, given the peft model.
    callbacks: Callable[[Any], list] = _no_callbacks
    # Checks of single fields that peft leaves open (a rank of 0), after the declared-type check; a value
    # the declared type refuses but the check accepts is valid (peft's `pissa_niter_<n>` is no Literal).
    field_checks: Mapping[str, Callable[[Any], str | None]] = field(default_factory=dict)
    # Whether these parameters make the adapter's initialisation rewrite the base weights (PiSSA, OLoRA):
    # the adapter is then saved converted to a plain LoRA of the untouched base (peft's documented way).
    rewrites_base: Callable[[dict[str, Any]], bool] = _never

    @property
    def prompt_learning(self) -> bool:
        """Virtual tokens (soft prompt, prefix) in front of the input; no weight changes. From peft itself."""
        if self.peft_config_class is None:
            return False
        return bool(self.peft_config(self.defaults, _PLACEHOLDER_STEPS).is_prompt_learning)

    @property
    def merges_into_base(self) -> bool:
        """Whether the trained model can be written as plain base weights (full models always can)."""
        return self.produces == "model" or (self.mergeable and not self.prompt_learning)

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
        _check_field_types(cls, params, self.field_checks)
        for name, check in self.field_checks.items():
            if name in params and (problem := check(params[name])):
                raise BadInput(f"{cls.__name__}: {name}: {problem}, got {params[name]!r}")
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
            "prompt_learning": self.prompt_learning,
            "mergeable": self.merges_into_base,
            "version": self.version,
            "peft_config": self.peft_config_class,
            "defaults": self.defaults,
        }


def _check_field_types(cls: type, params: dict[str, Any], checks: Mapping[str, Callable] | None = None) -> None:
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
            if checks and name in checks and checks[name](value) is None:
                continue  # the method's own check knows this field better than its annotation
            raise BadInput(f"{cls.__name__}: {name}: {e.errors()[0]['msg']}, got {value!r}") from None


def _positive_int(value: Any) -> str | None:
    """Sizes (ranks, token counts): peft accepts 0 for most of them and fails later, or trains nothing."""
    return None if isinstance(value, int) and not isinstance(value, bool) and value > 0 else "expected an integer >= 1"


# LoRA initialisations pefteval runs: peft's default (B = 0), random, Gaussian, orthogonal and MiCA leave
# the base weights alone; PiSSA (full SVD, or `pissa_niter_<n>` fast SVD) and OLoRA (QR) move the top
# components out of the base into the adapter. EVA, CorDA and LoftQ need a data or quantisation pass
# before training that pefteval does not run.
_LORA_INITS_KEEPING_BASE = (True, False, "gaussian", "orthogonal", "mica")
_LORA_INITS_REWRITING_BASE = re.compile(r"pissa|pissa_niter_\d+|olora")


def _lora_init(value: Any) -> str | None:
    if any(value is ok for ok in _LORA_INITS_KEEPING_BASE if isinstance(ok, bool)) or (
        isinstance(value, str) and (value in _LORA_INITS_KEEPING_BASE or _LORA_INITS_REWRITING_BASE.fullmatch(value))
    ):
        return None
    return (
        "expected true, false, gaussian, orthogonal, mica, pissa, pissa_niter_<n> or olora"
        " (eva, corda and loftq need a pass before training that pefteval does not run)"
    )


def _lora_rewrites_base(params: dict[str, Any]) -> bool:
    value = params.get("init_lora_weights", True)
    return isinstance(value, str) and bool(_LORA_INITS_REWRITING_BASE.fullmatch(value))


_LORA_CHECKS = {"r": _positive_int, "init_lora_weights": _lora_init}


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


def _adapter(
    name: str, description: str, config_class: str, defaults: dict[str, Any], *, sizes: tuple[str, ...] = ("r",), **kw
) -> FinetuneMethod:
    """A peft method; `sizes` are its fields that must be >= 1 (peft lets 0 through for most)."""
    checks = {size: _positive_int for size in sizes} | kw.pop("field_checks", {})
    return FinetuneMethod(
        name,
        description,
        produces="adapter",
        peft_config_class=config_class,
        defaults=defaults,
        adapter_family=kw.pop("adapter_family", name),
        field_checks=checks,
        **kw,
    )


# Defaults: peft's own where they suit both the tiny model (hidden 64, MLP 128) and a real one; otherwise
# values that divide every common hidden and MLP size (64 divides 2048-8192 and 11008/14336 alike).
# Why each value is what it is: docs/methods.md.
_ALL = {"target_modules": "all-linear"}
_LORA = {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0, **_ALL}
_VIRTUAL = {"num_virtual_tokens": 20}

FINETUNE_METHODS: dict[str, FinetuneMethod] = {
    m.name: m
    for m in [
        FinetuneMethod("full", "full fine-tuning of every weight with DeepSpeed ZeRO", produces="model"),
        # --- low-rank additive updates: W + BA and relatives ---
        _adapter(
            "lora",
            "low-rank adapters; rsLoRA (use_rslora), PiSSA/OLoRA/orthogonal/Gaussian/MiCA init (init_lora_weights)",
            "LoraConfig",
            _LORA,
            adapter_family="lora",
            field_checks=_LORA_CHECKS,
            rewrites_base=_lora_rewrites_base,
        ),
        _adapter(
            "dora",
            "weight-decomposed low-rank adapters: magnitude + LoRA direction (peft LoraConfig, use_dora)",
            "LoraConfig",
            {**_LORA, "use_dora": True},
            field_checks=_LORA_CHECKS,
            rewrites_base=_lora_rewrites_base,
        ),
        _adapter(
            "adalora",
            "adaptive-rank LoRA: ranks reallocated during training (peft AdaLoraConfig)",
            "AdaLoraConfig",
            {"init_r": 12, "target_r": 8, "lora_alpha": 16, **_ALL},
            sizes=("init_r", "target_r"),
            run_fields=_adalora_schedule,
            callbacks=_adalora_callbacks,
        ),
        _adapter("loha", "low-rank Hadamard product (LyCORIS LoHa)", "LoHaConfig", {"r": 8, "alpha": 16, **_ALL}),
        _adapter("lokr", "low-rank Kronecker product (LyCORIS LoKr)", "LoKrConfig", {"r": 8, "alpha": 16, **_ALL}),
        _adapter(
            "vera",
            "shared frozen random low-rank pair, trained scaling vectors (VeRA)",
            "VeraConfig",
            {"r": 256, **_ALL},
        ),
        _adapter("pvera", "probabilistic VeRA: sampled scaling vectors (PVeRA)", "PveraConfig", {"r": 256, **_ALL}),
        _adapter(
            "randlora",
            "full-rank update from frozen random bases, trained diagonal scalings",
            "RandLoraConfig",
            {"r": 32, **_ALL},
        ),
        _adapter(
            "vblora",
            "LoRA factors composed from a shared vector bank (VB-LoRA)",
            "VBLoRAConfig",
            {"r": 4, "num_vectors": 256, "vector_length": 64, **_ALL},
            sizes=("r", "num_vectors", "vector_length"),
        ),
        _adapter("delora", "LoRA with a bounded, normalised update (DeLoRA)", "DeloraConfig", {"r": 8, **_ALL}),
        _adapter(
            "gralora",
            "granular LoRA: block-wise low-rank updates (GraLoRA)",
            "GraloraConfig",
            {"r": 32, "alpha": 64, "gralora_k": 2, **_ALL},
            sizes=("r", "gralora_k"),
        ),
        _adapter(
            "hira", "high-rank update: Hadamard product of W and a low-rank BA (HiRA)", "HiraConfig", {"r": 32, **_ALL}
        ),
        _adapter("deft", "residual projection: low-rank knowledge injection (DEFT)", "DeftConfig", {"r": 8, **_ALL}),
        _adapter(
            "glora",
            "generalised LoRA: low-rank scale and shift of weights and biases (GLoRA)",
            "GloraConfig",
            {"r": 8, **_ALL},
        ),
        _adapter(
            "peanut", "non-linear low-rank adapter network on the weights (PEANuT)", "PeanutConfig", {"r": 32, **_ALL}
        ),
        _adapter(
            "tinylora",
            "a tiny trained vector projected through frozen SVD factors (TinyLoRA)",
            "TinyLoraConfig",
            {"r": 2, "u": 64, **_ALL},
            sizes=("r", "u"),
        ),
        _adapter(
            "unilora",
            "all layers' LoRA factors indexed from one trained vector (Uni-LoRA)",
            "UniLoraConfig",
            {"r": 4, "theta_d_length": 256, **_ALL},
            sizes=("r", "theta_d_length"),
        ),
        _adapter("miss", "matrix shard sharing (MiSS, formerly Bone)", "MissConfig", {"r": 64, **_ALL}),
        # --- SVD / subspace methods ---
        _adapter(
            "adamss",
            "trained low-rank updates in clustered SVD subspaces (AdaMSS)",
            "AdamssConfig",
            {"r": 32, "num_subspaces": 4, **_ALL},
            sizes=("r", "num_subspaces", "subspace_rank"),
        ),
        _adapter(
            "osf",
            "orthogonal subspace fine-tuning: top singular directions frozen (OSF)",
            "OSFConfig",
            {**_ALL},
            sizes=(),
        ),
        _adapter(
            "psoft", "trained r x r orthogonal map between frozen SVD factors (PSOFT)", "PsoftConfig", {"r": 32, **_ALL}
        ),
        # --- multiplicative / orthogonal updates ---
        _adapter(
            "oft",
            "block-diagonal orthogonal rotation of each weight (OFT)",
            "OFTConfig",
            {"oft_block_size": 32, "r": 0, **_ALL},
            sizes=(),
        ),  # peft: exactly one of r / block size
        _adapter(
            "boft",
            "butterfly-factorised orthogonal rotation (BOFT)",
            "BOFTConfig",
            {"boft_block_size": 8, "boft_n_butterfly_factor": 2, **_ALL},
            sizes=(),
        ),
        _adapter("hra", "product of Householder reflections (HRA)", "HRAConfig", {"r": 8, **_ALL}),
        _adapter(
            "road",
            "2D rotations of pairs of output features (RoAd)",
            "RoadConfig",
            {"variant": "road_1", "group_size": 64, **_ALL},
            sizes=("group_size",),
        ),
        _adapter(
            "ia3", "learned rescaling of keys, values and feed-forward activations (IA3)", "IA3Config", {}, sizes=()
        ),
        # --- sparse and transform-domain updates ---
        _adapter(
            "fourierft",
            "sparse trained spectrum of the weight update (FourierFT)",
            "FourierFTConfig",
            {"n_frequency": 1000, "scaling": 150.0, **_ALL},
            sizes=("n_frequency",),
        ),
        _adapter(
            "waveft",
            "sparse trained wavelet coefficients of the weight update (WaveFT)",
            "WaveFTConfig",
            {"n_frequency": 2592, "scaling": 25.0, **_ALL},
            sizes=("n_frequency",),
        ),
        _adapter(
            "c3a",
            "block-circulant convolution update (C3A)",
            "C3AConfig",
            {"block_size": 64, **_ALL},
            sizes=("block_size",),
        ),
        _adapter("shira", "sparse high-rank adapter on a fixed random mask (SHiRA)", "ShiraConfig", {"r": 32, **_ALL}),
        _adapter(
            "frod",
            "sparse trained update on a fixed random pattern (FRoD)",
            "FrodConfig",
            {"sparse_rate": 0.01, "progressbar": False, **_ALL},
            sizes=(),
        ),
        _adapter(
            "supertuning",
            "trains the largest-magnitude entries of each weight (Super-Tuning)",
            "SupertuningConfig",
            {"sparsity": 0.99, **_ALL},
            sizes=(),
        ),
        # --- norms and biases ---
        _adapter("ln_tuning", "trains the layer norms only (LN tuning)", "LNTuningConfig", {}, sizes=()),
        _adapter(
            "beft",
            "trains biases of the linear layers, adding them where missing (BEFT)",
            "BeftConfig",
            {**_ALL},
            sizes=(),
            mergeable=False,
        ),  # peft folds a bias only into layers that have one
        # --- virtual tokens and attention prompts ---
        _adapter(
            "prompt_tuning",
            "trained soft prompt embeddings in front of the input (prompt tuning)",
            "PromptTuningConfig",
            {**_VIRTUAL, "prompt_tuning_init": "SAMPLE_VOCAB"},
            sizes=("num_virtual_tokens",),
        ),
        _adapter(
            "p_tuning",
            "soft prompt produced by a small trained MLP encoder (P-tuning)",
            "PromptEncoderConfig",
            {**_VIRTUAL, "encoder_reparameterization_type": "MLP"},
            sizes=("num_virtual_tokens",),
        ),
        _adapter(
            "prefix_tuning",
            "trained key/value prefixes in every attention layer (prefix tuning)",
            "PrefixTuningConfig",
            {**_VIRTUAL},
            sizes=("num_virtual_tokens",),
        ),
        _adapter(
            "cartridge",
            "a trained KV cache served as a prefix (Cartridges)",
            "CartridgeConfig",
            {**_VIRTUAL},
            sizes=("num_virtual_tokens",),
        ),
        _adapter(
            "adaption_prompt",
            "gated adaption prompts in the top attention layers (LLaMA-Adapter)",
            "AdaptionPromptConfig",
            {"adapter_len": 10, "adapter_layers": 2},
            sizes=("adapter_len", "adapter_layers"),
            mergeable=False,
        ),  # extra attention modules, no weight to fold them into
    ]
}


def get_method(name: str) -> FinetuneMethod:
    if name not in FINETUNE_METHODS:
        raise BadInput(f"unknown fine-tuning method {name!r} (known: {', '.join(FINETUNE_METHODS)})")
    return FINETUNE_METHODS[name]
