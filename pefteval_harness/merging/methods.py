"""The merge methods: one registry entry per method, applied tensor by tensor.

A method's function is `fn(tensors, weights, params, ctx)`: the K expert tensors of one weight (float32,
same shape), their weights (already normalised to sum to 1 when the method says so), its parameters as an
instance of its own pydantic model (`MergeMethod.params`, validated once before any tensor is read) and a
`MergeContext` (the tensor's name and a random generator seeded from the merge seed and that name, so a
random method gives the same result for a tensor whatever the order of the others). It returns the merged
tensor. `needs_base` says what the tensors are: task vectors τ_i = expert_i − base (the engine adds the base
back afterwards), or the experts' own weights. In LoRA factor space the A and B factors are the inputs
either way.

A newcomer adds a method by adding one `MergeMethod` to `MERGE_METHODS` (a function and, if it takes
parameters, a params model). Bump its `version` when a change alters what it outputs: the version is part
of the ids of the jobs that use it. torch and peft are imported inside the functions so that reading the
registry (`pefteval plan`, `pefteval methods merge`) stays quick.
"""

from __future__ import annotations

import hashlib
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import annotated_types
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pefteval_harness.errors import BadInput

if TYPE_CHECKING:
    import torch


class MethodParams(BaseModel):
    """Base of every method's parameters: unknown names, wrong types and non-finite numbers are refused."""

    # strict: "0.5" or true is not a number here (YAML and JSON give real numbers and booleans).
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)


class NoParams(MethodParams):
    """For methods without parameters."""


@dataclass(frozen=True)
class MergeContext:
    """What a method may know besides the tensors: which weight it merges, and its own random generator."""

    tensor_name: str
    generator: torch.Generator


def tensor_generator(seed: int, tensor_name: str) -> torch.Generator:
    """A generator seeded from (seed, tensor name) with a stable hash: the same in every process and run."""
    import torch

    digest = hashlib.sha256(f"{int(seed)}\0{tensor_name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "big") >> 1)  # 63 bits: a valid seed


@dataclass(frozen=True)
class MergeMethod:
    name: str
    # fn(tensors, weights, params, ctx) -> merged tensor; params is an instance of `params`.
    fn: Callable[[list[torch.Tensor], list[float], Any, MergeContext], torch.Tensor]
    params: type[BaseModel] = NoParams
    description: str = ""
    needs_base: bool = True  # inputs are deltas from the base (True) or the experts' raw tensors (False)
    normalise_weights: bool = False  # weights divided by their sum before fn sees them
    version: int = 1  # bump when a change alters outputs: it is part of job ids

    def validate_params(self, params: Mapping[str, Any] | None) -> BaseModel:
        """The method's parameters with defaults filled in; BadInput naming the parameter otherwise."""
        params = {} if params is None else params
        if not isinstance(params, Mapping):
            raise BadInput(f"merge method {self.name!r}: parameters must be a mapping, got {params!r}")
        try:
            return self.params.model_validate(dict(params))
        except ValidationError as e:
            err = e.errors()[0]
            name = ".".join(str(p) for p in err["loc"])
            if err["type"] == "extra_forbidden":
                known = ", ".join(self.params.model_fields) or "none"
                raise BadInput(f"merge method {self.name!r}: unknown parameter {name!r} (known: {known})") from None
            msg = err["msg"].removeprefix("Value error, ")
            raise BadInput(f"merge method {self.name!r}: parameter {name!r}: {msg}" if name else msg) from None

    def resolve_weights(self, weights: Sequence[float] | None, n_experts: int) -> list[float]:
        """One weight per expert (default 1.0 each), normalised if the method says so."""
        weights = [1.0] * n_experts if weights is None else [float(w) for w in weights]
        if len(weights) != n_experts:
            raise BadInput(f"merge method {self.name!r}: {len(weights)} weights for {n_experts} experts")
        if self.normalise_weights:
            total = sum(weights)
            if abs(total) < 1e-12:
                raise BadInput(f"merge method {self.name!r}: the weights sum to 0 and cannot be normalised")
            weights = [w / total for w in weights]
        return weights

    def __call__(
        self,
        tensors: Sequence[torch.Tensor],
        weights: Sequence[float] | None = None,
        *,
        tensor_name: str = "",
        seed: int = 0,
        **params: Any,
    ) -> torch.Tensor:
        """Merge one tensor, checking and completing weights and parameters (handy in tests and notebooks)."""
        ctx = MergeContext(tensor_name, tensor_generator(seed, tensor_name))
        return self.fn(list(tensors), self.resolve_weights(weights, len(tensors)), self.validate_params(params), ctx)

    def describe(self) -> dict[str, Any]:
        """Name, description, version, how it treats the base and weights, and its parameters."""
        return {
            "name": self.name,
            "description": self.description,
            "version": self.version,
            "needs_base": self.needs_base,
            "normalise_weights": self.normalise_weights,
            "parameters": [
                {
                    "name": name,
                    "type": _type_text(f.annotation, f.metadata),
                    "default": f.get_default(call_default_factory=True),
                    "description": f.description or "",
                }
                for name, f in self.params.model_fields.items()
            ],
        }


def _type_text(annotation: Any, metadata: Sequence[Any]) -> str:
    """A parameter's type for people: "float in (0, 1]", "int >= 1", "bool", "one of a|b"."""
    if typing.get_origin(annotation) is Literal:
        return "one of " + "|".join(str(a) for a in typing.get_args(annotation))
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return " or ".join(_type_text(a, ()) for a in typing.get_args(annotation))
    name = "None" if annotation is type(None) else getattr(annotation, "__name__", str(annotation))
    low = high = None
    for m in metadata:
        if isinstance(m, annotated_types.Gt):
            low = f"({m.gt}"
        elif isinstance(m, annotated_types.Ge):
            low = f"[{m.ge}"
        elif isinstance(m, annotated_types.Lt):
            high = f"{m.lt})"
        elif isinstance(m, annotated_types.Le):
            high = f"{m.le}]"
    if low and high:
        return f"{name} in {low}, {high}"
    if low:
        return f"{name} {'>' if low[0] == '(' else '>='} {low[1:]}"
    if high:
        return f"{name} {'<' if high[-1] == ')' else '<='} {high[:-1]}"
    return name


# --- parameters ------------------------------------------------------------------------------------------

_SCALING = "λ: the merged task vector is multiplied by it before it is added to the base"
_DENSITY = "fraction of each task vector's entries kept, the largest by magnitude"


class TaskArithmeticParams(MethodParams):
    scaling: float = Field(1.0, description=_SCALING)


class TiesParams(MethodParams):
    # density 0.7 is this project's choice (the same as rht, so the two compare at equal density);
    # mergekit's own default is 1.0, no trimming. scaling 1.0 is mergekit's lambda default.
    density: float = Field(0.7, gt=0, le=1, description=_DENSITY)
    scaling: float = Field(1.0, description=_SCALING)


class RhtParams(MethodParams):
    density: float = Field(0.7, gt=0, le=1, description=_DENSITY + "; the kept ones are divided by it")


# --- methods ---------------------------------------------------------------------------------------------


def _stack(tensors: Sequence[torch.Tensor], weights: Sequence[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """Experts stacked on dim 0, and the weights shaped to broadcast against that stack."""
    import torch

    stacked = torch.stack(list(tensors)).float()
    w = torch.tensor(list(weights), dtype=stacked.dtype).view(-1, *[1] * (stacked.dim() - 1))
    return stacked, w


def _trim(tau: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the top ⌊density·numel⌋ entries by magnitude, zero the rest (peft's own pruning helper)."""
    from peft.utils.merge_utils import magnitude_based_pruning

    return tau if density >= 1 else magnitude_based_pruning(tau, density)


def linear(
    tensors: Sequence[torch.Tensor], weights: Sequence[float], params: NoParams, ctx: MergeContext
) -> torch.Tensor:
    """Weighted mean of the experts' own tensors: Σ w̃_i·θ_i with w̃_i = w_i / Σ_j w_j."""
    stacked, w = _stack(tensors, weights)
    return (stacked * w).sum(0)


def task_arithmetic(
    tensors: Sequence[torch.Tensor], weights: Sequence[float], params: TaskArithmeticParams, ctx: MergeContext
) -> torch.Tensor:
    """Task arithmetic (Ilharco et al. 2023): λ·Σ w_i·τ_i, weights as given, λ = `scaling` (default 1)."""
    stacked, w = _stack(tensors, weights)
    return params.scaling * (stacked * w).sum(0)


def ties(
    tensors: Sequence[torch.Tensor], weights: Sequence[float], params: TiesParams, ctx: MergeContext
) -> torch.Tensor:
    """TIES (Yadav et al. 2023), with mergekit's weighting; weights as given.

    1. Trim: keep the top ⌊density·numel⌋ entries of each τ_i by magnitude (no rescaling).
    2. Elect: s = sign(Σ_i w_i·τ̂_i), 0 counted as +.
    3. Disjoint weighted mean: Σ_i [sign τ̂_i = s]·w_i·τ̂_i / Σ_i [sign τ̂_i = s]·w_i (a divisor of 0 counts as 1).
    4. Scale by λ = `scaling`.
    With equal weights this is the TIES paper's mean over the experts that agree with the elected sign.
    """
    import torch

    stacked, w = _stack([_trim(t.float(), params.density) for t in tensors], weights)
    weighted = stacked * w
    sign = torch.where(weighted.sum(0) >= 0, 1.0, -1.0)
    agree = stacked.sign() == sign
    divisor = (w * agree).sum(0)
    divisor[divisor == 0] = 1.0
    return params.scaling * (weighted * agree).sum(0) / divisor


def rht(
    tensors: Sequence[torch.Tensor], weights: Sequence[float], params: RhtParams, ctx: MergeContext
) -> torch.Tensor:
    """RHT (Reparameterized Heavy-Tailed merging); weights normalised to sum to 1.

    1. τ̂_i: keep the top ⌊ρ·numel⌋ entries of τ_i by magnitude, zero the rest, divide the kept ones by ρ.
    2. Elect s = sign(Σ_i τ̂_i) per entry (unweighted, 0 counted as +).
    3. Disjoint weighted mean: Σ_i [sign τ̂_i = s]·w̃_i·τ̂_i / max(1, Σ_i [sign τ̂_i = s]).
    ρ = `density`, default 0.7 (the paper's setting). This is the authors' `dare_ties_magnitude_with_rescaler`,
    built from peft's own merge helpers as theirs is.
    """
    from peft.utils.merge_utils import calculate_majority_sign_mask, disjoint_merge

    density = params.density
    stacked, w = _stack([_trim(t.float(), density) / density for t in tensors], weights)
    agree = calculate_majority_sign_mask(stacked, method="total")
    return disjoint_merge(stacked * w, agree)


MERGE_METHODS: dict[str, MergeMethod] = {
    m.name: m
    for m in [
        MergeMethod(
            "linear",
            linear,
            NoParams,
            "weighted mean of the experts' weights (weights normalised)",
            needs_base=False,
            normalise_weights=True,
        ),
        MergeMethod("task_arithmetic", task_arithmetic, TaskArithmeticParams, "base + scaling·Σ w_i·τ_i"),
        MergeMethod("ties", ties, TiesParams, "trim to top density, elect sign, disjoint weighted mean, ×scaling"),
        MergeMethod(
            "rht",
            rht,
            RhtParams,
            "trim to top density and rescale by 1/density, elect sign, disjoint mean (weights normalised)",
            normalise_weights=True,
        ),
    ]
}


def get_method(name: str) -> MergeMethod:
    """The registered method called `name`; BadInput listing the known ones otherwise."""
    if name not in MERGE_METHODS:
        raise BadInput(f"unknown merge method {name!r} (known: {', '.join(MERGE_METHODS)})")
    return MERGE_METHODS[name]


def describe_methods() -> list[dict[str, Any]]:
    """Every registered method as `MergeMethod.describe` gives it (for `pefteval methods merge`)."""
    return [m.describe() for m in MERGE_METHODS.values()]
