"""The merge methods: one registry entry per method, applied tensor by tensor.

A method's function takes the K expert tensors of one weight (float32, same shape), their weights (already
normalised to sum to 1 when the method says so) and its parameters, and returns the merged tensor.
`needs_base` says what the tensors are: task vectors τ_i = expert_i − base (the engine adds the base back
afterwards), or the experts' own weights. In LoRA factor space the A and B factors are the inputs either way.

A newcomer adds a method by adding one `MergeMethod` to `MERGE_METHODS`.
torch and peft are imported inside the functions so that `pefteval plan` can read the registry quickly.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pefteval_harness.errors import BadInput

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class MergeMethod:
    name: str
    # fn(tensors, weights, **params) -> merged tensor
    fn: Callable[..., torch.Tensor]
    defaults: Mapping[str, float] = field(default_factory=dict)
    description: str = ""
    needs_base: bool = True  # inputs are deltas from the base (True) or the experts' raw tensors (False)
    normalise_weights: bool = False  # weights divided by their sum before fn sees them
    # Raises BadInput for out-of-range parameters; run once, before any tensor is read.
    check: Callable[[Mapping[str, float]], None] | None = None

    def resolve_params(self, params: Mapping[str, Any] | None) -> dict[str, float]:
        """Defaults overridden by `params`; unknown names and non-numbers raise BadInput."""
        params = dict(params or {})
        known = ", ".join(self.defaults) or "none"
        for key, value in params.items():
            if key not in self.defaults:
                raise BadInput(f"merge method {self.name!r}: unknown parameter {key!r} (known: {known})")
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise BadInput(f"merge method {self.name!r}: parameter {key!r} must be a number, got {value!r}")
        resolved = {**self.defaults, **{k: float(v) for k, v in params.items()}}
        if self.check:
            self.check(resolved)
        return resolved

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
        self, tensors: Sequence[torch.Tensor], weights: Sequence[float] | None = None, **params: Any
    ) -> torch.Tensor:
        """Merge one tensor, checking and completing weights and parameters (handy in tests and notebooks)."""
        return self.fn(list(tensors), self.resolve_weights(weights, len(tensors)), **self.resolve_params(params))


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


def _check_density(params: Mapping[str, float]) -> None:
    if not 0 < params["density"] <= 1:
        raise BadInput(f"merge parameter 'density' must be in (0, 1], got {params['density']}")


def linear(tensors: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """Weighted mean of the experts' own tensors: Σ w̃_i·θ_i with w̃_i = w_i / Σ_j w_j."""
    stacked, w = _stack(tensors, weights)
    return (stacked * w).sum(0)


def task_arithmetic(tensors: Sequence[torch.Tensor], weights: Sequence[float], *, scaling: float) -> torch.Tensor:
    """Task arithmetic (Ilharco et al. 2023): λ·Σ w_i·τ_i, weights as given, λ = `scaling` (default 1)."""
    stacked, w = _stack(tensors, weights)
    return scaling * (stacked * w).sum(0)


def ties(tensors: Sequence[torch.Tensor], weights: Sequence[float], *, density: float, scaling: float) -> torch.Tensor:
    """TIES (Yadav et al. 2023), with mergekit's weighting; weights as given.

    1. Trim: keep the top ⌊density·numel⌋ entries of each τ_i by magnitude (no rescaling).
    2. Elect: s = sign(Σ_i w_i·τ̂_i), 0 counted as +.
    3. Disjoint weighted mean: Σ_i [sign τ̂_i = s]·w_i·τ̂_i / Σ_i [sign τ̂_i = s]·w_i (a divisor of 0 counts as 1).
    4. Scale by λ = `scaling`.
    Defaults: density 0.7 (this project's choice: the same as rht, so the two compare at equal density;
    mergekit's own default is 1.0, no trimming) and scaling 1.0 (mergekit's lambda default). With equal
    weights this is the TIES paper's mean over the experts that agree with the elected sign.
    """
    import torch

    stacked, w = _stack([_trim(t.float(), density) for t in tensors], weights)
    weighted = stacked * w
    sign = torch.where(weighted.sum(0) >= 0, 1.0, -1.0)
    agree = stacked.sign() == sign
    divisor = (w * agree).sum(0)
    divisor[divisor == 0] = 1.0
    return scaling * (weighted * agree).sum(0) / divisor


def rht(tensors: Sequence[torch.Tensor], weights: Sequence[float], *, density: float) -> torch.Tensor:
    """RHT (Reparameterized Heavy-Tailed), as CATALOGUE.md §3 defines it; weights normalised to sum to 1.

    1. τ̂_i: keep the top ⌊ρ·numel⌋ entries of τ_i by magnitude, zero the rest, divide the kept ones by ρ.
    2. Elect s = sign(Σ_i τ̂_i) per entry (unweighted, 0 counted as +).
    3. Disjoint weighted mean: Σ_i [sign τ̂_i = s]·w̃_i·τ̂_i / max(1, Σ_i [sign τ̂_i = s]).
    ρ = `density`, default 0.7 (the paper's setting). The authors' `dare_ties_magnitude_with_rescaler`,
    built from peft's own merge helpers as theirs is.
    """
    from peft.utils.merge_utils import calculate_majority_sign_mask, disjoint_merge

    stacked, w = _stack([_trim(t.float(), density) / density for t in tensors], weights)
    agree = calculate_majority_sign_mask(stacked, method="total")
    return disjoint_merge(stacked * w, agree)


MERGE_METHODS: dict[str, MergeMethod] = {
    m.name: m
    for m in [
        MergeMethod(
            "linear",
            linear,
            {},
            "weighted mean of the experts' weights (weights normalised)",
            needs_base=False,
            normalise_weights=True,
        ),
        MergeMethod("task_arithmetic", task_arithmetic, {"scaling": 1.0}, "base + scaling·Σ w_i·τ_i"),
        MergeMethod(
            "ties",
            ties,
            {"density": 0.7, "scaling": 1.0},
            "trim to top density, elect sign, disjoint weighted mean, ×scaling",
            check=_check_density,
        ),
        MergeMethod(
            "rht",
            rht,
            {"density": 0.7},
            "trim to top density and rescale by 1/density, elect sign, disjoint mean (weights normalised)",
            normalise_weights=True,
            check=_check_density,
        ),
    ]
}


def get_method(name: str) -> MergeMethod:
    """The registered method called `name`; BadInput listing the known ones otherwise."""
    if name not in MERGE_METHODS:
        raise BadInput(f"unknown merge method {name!r} (known: {', '.join(MERGE_METHODS)})")
    return MERGE_METHODS[name]
