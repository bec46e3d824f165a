"""The merge methods: one registry entry per method, applied tensor by tensor.

A method's function is `fn(tensors, weights, params, ctx)`: the K expert tensors of one weight (float32,
same shape), their weights (already normalised to sum to 1 when the method says so), its parameters as an
instance of its own pydantic model (`MergeMethod.params`, validated once before any tensor is read) and a
`MergeContext` (the tensor's name, a random generator seeded from the merge seed and that name, so a
random method gives the same result for a tensor whatever the order of the others, and the per-expert
whole-tensor summaries of an elementwise method). It returns the merged tensor and never modifies its
inputs (the engine may hand the same task vectors to an observer). `needs_base` says what the tensors are:
task vectors τ_i = expert_i − base (the engine adds the base back afterwards), or the experts' own weights.
In LoRA factor space the A and B factors are the inputs either way.

Elementwise methods (`elementwise=True`) may be called on row slices of the tensors: each output entry then
depends only on the same entry of the K inputs (della: on its row) and on `ctx.stats`, one summary per
expert that `MergeMethod.stats` computes from the expert's whole tensor (a trim threshold, say). When
`ctx.stats` is None the function computes the summaries from the tensors it is given, so a direct call on
whole tensors equals the engine's call on slices. docs/merge_methods.md defines every method.

A newcomer adds a method by adding one `MergeMethod` to `MERGE_METHODS` (a function and, if it takes
parameters, a params model). Bump its `version` when a change alters what it outputs: the version is part
of the ids of the jobs that use it. torch is imported inside the functions so that reading the registry
(`pefteval plan`, `pefteval methods merge`) stays quick.
"""

from __future__ import annotations

import hashlib
import math
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

import annotated_types
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

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
    """What a method may know besides the tensors: which weight it merges, its own random generator, and
    for an elementwise method one whole-tensor summary per expert (None: compute them from the tensors)."""

    tensor_name: str
    generator: torch.Generator
    stats: tuple[Any, ...] | None = None


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
    # True: fn may be called on row slices, given ctx.stats computed by `stats` on each whole expert tensor.
    elementwise: bool = False
    stats: Callable[[torch.Tensor, Any], Any] | None = None  # (one expert's whole tensor, params) -> summary
    n_experts: int | None = None  # the exact number of experts the method takes (slerp: 2)
    min_experts: int = 1  # the fewest experts it takes (model_stock: 2)

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
            where = f"parameter {name!r}: " if name else ""  # a rule across parameters has no single name
            raise BadInput(f"merge method {self.name!r}: {where}{msg}") from None

    def resolve_weights(self, weights: Sequence[float] | None, n_experts: int) -> list[float]:
        """One weight per expert (default 1.0 each), normalised if the method says so; the expert count checked."""
        if self.n_experts is not None and n_experts != self.n_experts:
            raise BadInput(f"merge method {self.name!r} takes exactly {self.n_experts} experts, got {n_experts}")
        if n_experts < self.min_experts:
            raise BadInput(f"merge method {self.name!r} takes at least {self.min_experts} experts, got {n_experts}")
        weights = [1.0] * n_experts if weights is None else [float(w) for w in weights]
        if len(weights) != n_experts:
            raise BadInput(f"merge method {self.name!r}: {len(weights)} weights for {n_experts} experts")
        if self.normalise_weights:
            total = sum(weights)
            if abs(total) < 1e-12:
                raise BadInput(f"merge method {self.name!r}: the weights sum to 0 and cannot be normalised")
            weights = [w / total for w in weights]
        return weights

    def expert_stats(self, tensors: Sequence[torch.Tensor], params: Any) -> tuple[Any, ...] | None:
        """`stats` of each whole expert tensor (None for a method without them): what ctx.stats holds."""
        return None if self.stats is None else tuple(self.stats(t, params) for t in tensors)

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
        tensors = list(tensors)
        typed = self.validate_params(params)
        weights = self.resolve_weights(weights, len(tensors))
        ctx = MergeContext(tensor_name, tensor_generator(seed, tensor_name), self.expert_stats(tensors, typed))
        return self.fn(tensors, weights, typed, ctx)

    def describe(self) -> dict[str, Any]:
        """Name, description, version, how it treats the base, weights and experts, and its parameters."""
        return {
            "name": self.name,
            "description": self.description,
            "version": self.version,
            "needs_base": self.needs_base,
            "normalise_weights": self.normalise_weights,
            "elementwise": self.elementwise,
            "n_experts": self.n_experts,
            "min_experts": self.min_experts,
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

_SCALING = "λ (mergekit's lambda): the merged task vector is multiplied by it before it is added to the base"
_DENSITY = "fraction of each task vector's entries kept"
_NORMALIZE = "divide the (agreeing) weighted sum by the sum of the (agreeing) weights"
_RESCALE_BOOL = "rescale the kept entries so the task vector keeps its L1 norm (mergekit's rescale)"
_RESCALE_RANDOM = (
    "l1: scale the kept entries so the task vector keeps its L1 norm (mergekit's rescale: true);"
    " inverse_probability: divide each kept entry by its keep probability (the papers' rescale); none"
)
_Density = Field(0.7, gt=0, le=1, description=_DENSITY + ", the largest by magnitude")
RandomRescale = Literal["l1", "inverse_probability", "none"]


class TaskArithmeticParams(MethodParams):
    scaling: float = Field(1.0, description=_SCALING)


class TiesParams(MethodParams):
    # density 0.7 is this project's choice for every density method (the same as rht, so they compare at
    # equal density); mergekit's own default is 1.0, no trimming. scaling 1.0 is mergekit's lambda default.
    density: float = _Density
    scaling: float = Field(1.0, description=_SCALING)


class MagnitudePruneParams(TiesParams):
    normalize: bool = Field(False, description=_NORMALIZE)
    rescale: bool = Field(False, description=_RESCALE_BOOL)


class DareParams(MethodParams):
    density: float = Field(0.7, gt=0, le=1, description=_DENSITY + ", each with this probability")
    scaling: float = Field(1.0, description=_SCALING)
    normalize: bool = Field(False, description=_NORMALIZE)
    rescale: RandomRescale = Field("l1", description=_RESCALE_RANDOM)


class BreadcrumbsParams(MagnitudePruneParams):
    density: float = Field(0.7, gt=0, le=1, description=_DENSITY + ", mid-range magnitudes")
    gamma: float = Field(0.01, ge=0, lt=1, description="fraction of entries cut as the largest outliers")


class DellaParams(MethodParams):
    density: float = Field(0.7, gt=0, le=1, description=_DENSITY + " on average (keep probabilities by rank)")
    epsilon: float = Field(0.15, ge=0, lt=1, description="keep probabilities span density ± epsilon within a row")
    scaling: float = Field(1.0, description=_SCALING)
    normalize: bool = Field(True, description=_NORMALIZE)
    rescale: RandomRescale = Field("l1", description=_RESCALE_RANDOM)

    @model_validator(mode="after")
    def _probabilities_in_range(self) -> DellaParams:
        if self.density < 1 and not (self.density - self.epsilon > 0 and self.density + self.epsilon < 1):
            raise ValueError(
                f"density ± epsilon must lie inside (0, 1), got density {self.density} and epsilon {self.epsilon}"
            )
        return self


class DellaLinearParams(DellaParams):
    normalize: bool = Field(False, description=_NORMALIZE)


class SceParams(MethodParams):
    select_topk: float = Field(
        1.0, gt=0, le=1, description="fraction of entries kept, those whose values vary most across the experts"
    )


class ModelStockParams(MethodParams):
    filter_wise: bool = Field(False, description="one interpolation ratio per row instead of per tensor")


class SlerpParams(MethodParams):
    t: float = Field(0.5, ge=0, le=1, description="0 gives the first expert, 1 the second")


class NuSlerpParams(MethodParams):
    flatten: bool = Field(True, description="interpolate the tensor as one vector (mergekit's nuslerp_flatten)")
    row_wise: bool = Field(
        False, description="without flatten: interpolate the vectors along dim 0, else rows (nuslerp_row_wise)"
    )


class KarcherParams(MethodParams):
    max_iter: int = Field(10, ge=1, description="most iterations of the Riemannian mean")
    tol: float = Field(1e-5, gt=0, description="stop when the tangent step's norm is below it")


class RhtParams(MethodParams):
    density: float = Field(0.7, gt=0, le=1, description=_DENSITY + ", the largest; the kept ones are divided by it")


# --- trimming by magnitude -------------------------------------------------------------------------------

_NORM_EPS = 1e-7  # mergekit's: no L1 rescale when either norm is below it


class Trim(NamedTuple):
    """One expert's magnitude trim, from its whole tensor: keep lower ≤ |τ| ≤ upper (None: no bound), × scale.

    Tie rule: every entry whose magnitude equals that of the last entry kept is kept too, so a trim may keep
    more than its count when magnitudes tie at a bound (the only rule a row slice can apply on its own).
    """

    lower: float | None
    upper: float | None
    scale: float = 1.0


_KEEP_ALL = Trim(None, None)


def _keep_count(numel: int, density: float, keep_one: bool) -> int:
    """⌊density·numel⌋ entries (as mergekit and peft count), at least one when `keep_one`."""
    k = int(density * numel)
    return max(k, 1) if keep_one else k


def _kth_smallest(magnitudes: torch.Tensor, k: int) -> float:
    """The k-th smallest value (1-based) of a flat tensor: a selection, no full sort (faster here than topk)."""
    import torch

    return torch.kthvalue(magnitudes, k).values.item()


def _apply_trim(tau: torch.Tensor, trim: Trim) -> torch.Tensor:
    """τ with the entries outside the trim zeroed and the kept ones scaled: a new tensor unless nothing changes."""
    if trim.lower is None and trim.upper is None:
        return tau if trim.scale == 1.0 else tau * trim.scale
    magnitude = tau.abs()
    keep = magnitude >= trim.lower if trim.lower is not None else None
    if trim.upper is not None:
        keep = magnitude <= trim.upper if keep is None else keep.logical_and_(magnitude <= trim.upper)
    del magnitude
    out = tau * keep
    return out.mul_(trim.scale) if trim.scale != 1.0 else out


def _with_l1_scale(tau: torch.Tensor, trim: Trim) -> Trim:
    """The trim with the scale that gives the kept entries τ's L1 norm (mergekit's l1 rescale)."""
    import torch

    before = torch.linalg.vector_norm(tau, 1).item()
    after = torch.linalg.vector_norm(_apply_trim(tau, trim), 1).item()
    if before < _NORM_EPS or after < _NORM_EPS:
        return trim
    return trim._replace(scale=before / after)


def top_magnitude_trim(tau: torch.Tensor, density: float, *, keep_one: bool = True) -> Trim:
    """Keep the ⌊density·numel⌋ largest |τ| (at least one with `keep_one`; ties at the bound kept)."""
    n = tau.numel()
    k = _keep_count(n, density, keep_one)
    if density >= 1 or k >= n:
        return _KEEP_ALL
    if k == 0:
        return Trim(math.inf, None)  # nothing kept (rht on a tensor smaller than 1/density)
    return Trim(_kth_smallest(tau.detach().abs().flatten(), n - k + 1), None)


def breadcrumbs_trim(tau: torch.Tensor, density: float, gamma: float) -> Trim:
    """Cut the ⌊gamma·numel⌋ largest |τ| (outliers), then the smallest, keeping ⌊density·numel⌋ in all.

    As mergekit: when density + gamma > 1 fewer outliers are cut so the count still holds, and a count of 0
    keeps nothing (mergekit keeps one only in its plain magnitude trim). Both bounds keep the entries tied
    with the last kept one.
    """
    n = tau.numel()
    if density >= 1:
        return _KEEP_ALL
    target = _keep_count(n, density, keep_one=False)
    if target == 0:
        return Trim(math.inf, None)
    n_top = int(gamma * n)
    n_bottom = n - target - n_top
    if n_bottom < 0:
        n_top, n_bottom = n_top + n_bottom, 0
    if n_top == 0 and n_bottom == 0:
        return _KEEP_ALL
    magnitudes = tau.detach().abs().flatten()
    lower = _kth_smallest(magnitudes, n_bottom + 1) if n_bottom > 0 else None
    upper = _kth_smallest(magnitudes, n - n_top) if n_top > 0 else None  # the largest entry kept
    return Trim(lower, upper)


def _ties_stats(tau: torch.Tensor, params: TiesParams) -> Trim:
    return top_magnitude_trim(tau, params.density)


def _magnitude_prune_stats(tau: torch.Tensor, params: MagnitudePruneParams) -> Trim:
    trim = top_magnitude_trim(tau, params.density)
    return _with_l1_scale(tau, trim) if params.rescale else trim


def _breadcrumbs_stats(tau: torch.Tensor, params: BreadcrumbsParams) -> Trim:
    trim = breadcrumbs_trim(tau, params.density, params.gamma)
    return _with_l1_scale(tau, trim) if params.rescale else trim


def _rht_stats(tau: torch.Tensor, params: RhtParams) -> Trim:
    return top_magnitude_trim(tau, params.density, keep_one=False)  # the authors' count, kept as it was


def _stats(
    tensors: Sequence[torch.Tensor], params: Any, ctx: MergeContext, compute: Callable[[torch.Tensor, Any], Any]
) -> tuple[Any, ...]:
    """ctx.stats when the engine gave them (row slices), else computed from the (whole) tensors."""
    return ctx.stats if ctx.stats is not None else tuple(compute(t, params) for t in tensors)


# --- random sparsification (DARE, DELLA) -----------------------------------------------------------------


def _match_l1(kept: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    """`kept` (a new tensor) scaled in place to τ's L1 norm, unless either norm is negligible (mergekit's rule)."""
    import torch

    before = torch.linalg.vector_norm(tau, 1).item()
    after = torch.linalg.vector_norm(kept, 1).item()
    if before >= _NORM_EPS and after >= _NORM_EPS:
        kept.mul_(before / after)
    return kept


def dare_sparsify(tau: torch.Tensor, density: float, rescale: str, generator: torch.Generator) -> torch.Tensor:
    """Keep each entry with probability `density` (one draw per entry from `generator`), then rescale.

    density 1 draws nothing and returns τ itself (as mergekit does).
    """
    import torch

    if density >= 1:
        return tau
    kept = torch.empty_like(tau).bernoulli_(density, generator=generator).mul_(tau)  # one buffer: mask, then τ·mask
    if rescale == "inverse_probability":
        return kept.div_(density)
    return _match_l1(kept, tau) if rescale == "l1" else kept


def _della_stats(tau: torch.Tensor, params: DellaParams) -> torch.Tensor | None:
    """A 1-D tensor is one row: its sorted magnitudes, so a slice of it can still be ranked within the row."""
    return tau.detach().abs().flatten().sort().values if tau.dim() <= 1 and params.density < 1 else None


def _twice_average_rank(magnitudes: torch.Tensor) -> torch.Tensor:
    """2 × the 0-based rank of each entry within its row, tied entries sharing their average rank.

    One sort per row; a tie group spanning sorted positions [first, last] gets first + last.
    """
    import torch

    ordered, order = magnitudes.sort(dim=1)
    n = ordered.shape[1]
    position = torch.arange(n).expand_as(ordered)
    starts = torch.ones_like(ordered, dtype=torch.bool)
    starts[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
    del ordered
    ends = torch.ones_like(starts)
    ends[:, :-1] = starts[:, 1:]
    first = torch.where(starts, position, 0).cummax(dim=1).values
    last = torch.where(ends, position, n).flip(1).cummin(dim=1).values.flip(1)
    del starts, ends
    return torch.empty_like(magnitudes).scatter_(1, order, first.add_(last).to(magnitudes.dtype))


def della_keep_probabilities(
    tau: torch.Tensor, density: float, epsilon: float, sorted_row: torch.Tensor | None = None
) -> torch.Tensor:
    """DELLA's keep probabilities, shaped (rows, row length): density − ε + 2ε·rank/(n − 1) within each row.

    rank 0 is the smallest |τ| of the row, n − 1 the largest. Rows are the last dimension of a 2-D tensor (a
    tensor of more dimensions is viewed as (shape[0], -1)); a 1-D tensor is one row, ranked against
    `sorted_row` (its whole sorted magnitudes) when given, so a slice of it is ranked as the whole. Tie rule:
    equal magnitudes share their average rank, so the mean probability of a row stays density. A row of one
    entry gets probability density.
    """
    import torch

    rows = tau.reshape(1, -1) if tau.dim() <= 1 else tau.reshape(tau.shape[0], -1)
    magnitudes = rows.abs()
    if sorted_row is not None and tau.dim() <= 1:
        # a slice of a 1-D tensor: #smaller + #smaller-or-equal in the whole row, by binary search
        boundaries = sorted_row.reshape(1, -1)
        n = boundaries.shape[1]
        twice_rank = torch.searchsorted(boundaries, magnitudes).add_(
            torch.searchsorted(boundaries, magnitudes, right=True)
        )
        twice_rank = twice_rank.sub_(1).to(tau.dtype)
    else:
        n = rows.shape[1]
        twice_rank = _twice_average_rank(magnitudes)
    if n == 1:
        return torch.full_like(magnitudes, density)
    return twice_rank.mul_(epsilon / (n - 1)).add_(density - epsilon)  # (2·rank / 2)·2ε/(n − 1)


def della_sparsify(
    tau: torch.Tensor,
    density: float,
    epsilon: float,
    rescale: str,
    generator: torch.Generator,
    sorted_row: torch.Tensor | None = None,
) -> torch.Tensor:
    """DELLA's MagPrune: keep each entry with its `della_keep_probabilities` (one draw per entry), then rescale.

    density 1 draws nothing and returns τ itself (as mergekit does).
    """
    import torch

    if density >= 1:
        return tau
    probabilities = della_keep_probabilities(tau, density, epsilon, sorted_row)
    kept = torch.bernoulli(probabilities, generator=generator).mul_(tau.reshape(probabilities.shape))
    if rescale == "inverse_probability":
        kept.div_(probabilities)
    del probabilities
    kept = kept.reshape(tau.shape)
    return _match_l1(kept, tau) if rescale == "l1" else kept


# --- the task-arithmetic family --------------------------------------------------------------------------


def _weighted_sum(
    tensors: Sequence[torch.Tensor], weights: Sequence[float], transform: Callable[[int, torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    """Σ_i w_i·transform(i, τ_i) as a running sum: one transformed expert alive at a time, not a K-stack."""
    out = None
    for i, (t, w) in enumerate(zip(tensors, weights, strict=True)):
        x = transform(i, t)
        out = x * w if out is None else out.add_(x, alpha=w)
    return out


def _task_arithmetic_merge(
    tensors: Sequence[torch.Tensor],
    weights: Sequence[float],
    sparsify: Callable[[int, torch.Tensor], torch.Tensor],
    *,
    consensus: bool,
    normalize: bool,
    scaling: float,
) -> torch.Tensor:
    """mergekit's generalized task arithmetic: sparsify each τ_i, optionally elect signs, mix, scale.

    Without consensus: Σ_i w_i·τ̂_i, divided by Σ_i w_i when `normalize` (a sum of |w| < 1e-8 counts as 1).
    With consensus (TIES): s = sign(Σ_i w_i·τ̂_i), 0 counted as +; expert i agrees at an entry when
    sign(w_i·τ̂_i) = s (a zero never agrees); Σ_i [agree]·w_i·τ̂_i, divided by Σ_i [agree]·w_i when
    `normalize` (a divisor of 0 counts as 1). A negative weight thus flips the sign an expert votes with.
    The consensus keeps the K weighted τ̂_i between its two passes (sparsifying once: random draws are made
    once, and DELLA's ranking is not redone); the engine hands elementwise methods row chunks, so that is K
    chunks, not K whole tensors.
    """
    import torch

    if not consensus:
        out = _weighted_sum(tensors, weights, sparsify)
        if normalize:
            total = sum(weights)
            out.div_(total if abs(total) >= 1e-8 else 1.0)
        return out.mul_(scaling) if scaling != 1 else out
    weighted, elect = [], None
    for i, (t, w) in enumerate(zip(tensors, weights, strict=True)):
        x = sparsify(i, t) * w  # a new tensor, ours to change
        elect = x.clone() if elect is None else elect.add_(x)
        weighted.append(x)
    positive = elect >= 0
    del elect
    out = divisor = None
    for w in weights:
        x = weighted.pop(0)
        agree = torch.where(positive, x > 0, x < 0)
        out = x.mul_(agree) if out is None else out.add_(x.mul_(agree))
        del x
        if normalize:
            divisor = agree * w if divisor is None else divisor.add_(agree, alpha=w)
    if normalize:
        out.div_(divisor.masked_fill_(divisor == 0, 1.0))
    return out.mul_(scaling) if scaling != 1 else out


def linear(
    tensors: Sequence[torch.Tensor], weights: Sequence[float], params: NoParams, ctx: MergeContext
) -> torch.Tensor:
    """Weighted mean of the experts' own tensors: Σ w̃_i·θ_i with w̃_i = w_i / Σ_j w_j."""
    return _weighted_sum(tensors, weights, lambda i, t: t)


def task_arithmetic(
    tensors: Sequence[torch.Tensor], weights: Sequence[float], params: TaskArithmeticParams, ctx: MergeContext
) -> torch.Tensor:
    """Task arithmetic (Ilharco et al. 2023): λ·Σ w_i·τ_i, weights as given, λ = `scaling` (default 1)."""
    out = _weighted_sum(tensors, weights, lambda i, t: t)
    return out.mul_(params.scaling) if params.scaling != 1 else out


def ties(
    tensors: Sequence[torch.Tensor], weights: Sequence[float], params: TiesParams, ctx: MergeContext
) -> torch.Tensor:
    """TIES (Yadav et al. 2023) as mergekit computes it; weights as given.

    1. Trim: keep the top ⌊density·numel⌋ (≥ 1) entries of each τ_i by magnitude (ties at the bound kept).
    2. Elect: s = sign(Σ_i w_i·τ̂_i), 0 counted as +.
    3. Disjoint weighted mean: Σ_i [sign(w_i·τ̂_i) = s]·w_i·τ̂_i / Σ_i [sign(w_i·τ̂_i) = s]·w_i (0 counts as 1).
    4. Scale by λ = `scaling`.
    With equal positive weights this is the TIES paper's mean over the experts that agree with the elected sign.
    """
    trims = _stats(tensors, params, ctx, _ties_stats)
    return _task_arithmetic_merge(
        tensors, weights, lambda i, t: _apply_trim(t, trims[i]), consensus=True, normalize=True, scaling=params.scaling
    )


def magnitude_prune(
    tensors: Sequence[torch.Tensor], weights: Sequence[float], params: MagnitudePruneParams, ctx: MergeContext
) -> torch.Tensor:
    """TIES's trim without its sign election: λ·Σ_i w_i·trim(τ_i) (÷ Σ_i w_i with `normalize`)."""
    trims = _stats(tensors, params, ctx, _magnitude_prune_stats)
    return _task_arithmetic_merge(
        tensors,
        weights,
        lambda i, t: _apply_trim(t, trims[i]),
        consensus=False,
        normalize=params.normalize,
        scaling=params.scaling,
    )


def _breadcrumbs(consensus: bool) -> Callable[..., torch.Tensor]:
    def breadcrumbs(
        tensors: Sequence[torch.Tensor], weights: Sequence[float], params: BreadcrumbsParams, ctx: MergeContext
    ) -> torch.Tensor:
        """Model Breadcrumbs: cut each τ_i's outliers and its smallest entries, then mix (with TIES's election)."""
        trims = _stats(tensors, params, ctx, _breadcrumbs_stats)
        return _task_arithmetic_merge(
            tensors,
            weights,
            lambda i, t: _apply_trim(t, trims[i]),
            consensus=consensus,
            normalize=params.normalize,
            scaling=params.scaling,
        )

    return breadcrumbs


def _dare(consensus: bool) -> Callable[..., torch.Tensor]:
    def dare(
        tensors: Sequence[torch.Tensor], weights: Sequence[float], params: DareParams, ctx: MergeContext
    ) -> torch.Tensor:
        """DARE: drop each entry of τ_i at random (keep with probability density), rescale, then mix."""
        return _task_arithmetic_merge(
            tensors,
            weights,
            lambda i, t: dare_sparsify(t, params.density, params.rescale, ctx.generator),
            consensus=consensus,
            normalize=params.normalize,
            scaling=params.scaling,
        )

    return dare


def _della(consensus: bool) -> Callable[..., torch.Tensor]:
    def della(
        tensors: Sequence[torch.Tensor], weights: Sequence[float], params: DellaParams, ctx: MergeContext
    ) -> torch.Tensor:
        """DELLA: drop entries at random, the small ones of each row more often, rescale, then mix."""
        rows = _stats(tensors, params, ctx, _della_stats)
        return _task_arithmetic_merge(
            tensors,
            weights,
            lambda i, t: della_sparsify(t, params.density, params.epsilon, params.rescale, ctx.generator, rows[i]),
            consensus=consensus,
            normalize=params.normalize,
            scaling=params.scaling,
        )

    return della


def sce(
    tensors: Sequence[torch.Tensor], weights: Sequence[float], params: SceParams, ctx: MergeContext
) -> torch.Tensor:
    """SCE as mergekit computes it (the given weights are not used: SCE computes its own).

    1. Select: with select_topk < 1, keep the ⌊select_topk·m⌋ entries whose variance across the experts
       (population variance) is largest, m the number of entries of nonzero variance; zero the rest in every
       τ_i (ties at the bound kept; a count of 0 selects nothing, as mergekit).
    2. Calculate: w_i = mean(τ_i²) / Σ_j mean(τ_j²) on the selected τ_i (1/K each when that sum < 1e-6).
    3. Erase: s = sign(Σ_i τ_i), 0 counted as +; expert i agrees where sign τ_i = s;
       merged = Σ_i [agree]·w_i·τ_i / max(1e-6, Σ_i [agree]·w_i).
    """
    import torch

    k_experts = len(tensors)
    select = None
    if params.select_topk < 1:
        mean = _weighted_sum(tensors, [1.0 / k_experts] * k_experts, lambda i, t: t)
        variance = _weighted_sum(tensors, [1.0 / k_experts] * k_experts, lambda i, t: (t - mean).square_())
        del mean
        nonzero = int(torch.count_nonzero(variance))
        k = int(nonzero * params.select_topk)
        if k == 0:
            select = torch.zeros_like(variance, dtype=torch.bool)
        else:
            select = variance >= _kth_smallest(variance.flatten(), variance.numel() - k + 1)
        del variance

    def selected(t: torch.Tensor) -> torch.Tensor:
        return t if select is None else t * select

    mean_squares = [selected(t).square().mean().item() for t in tensors]
    total = sum(mean_squares)
    sce_weights = [m / total for m in mean_squares] if abs(total) >= 1e-6 else [1.0 / k_experts] * k_experts
    positive = _weighted_sum(tensors, [1.0] * k_experts, lambda i, t: selected(t)) >= 0
    out = divisor = None
    for t, w in zip(tensors, sce_weights, strict=True):
        x = selected(t)
        agree = torch.where(positive, x > 0, x < 0)
        x = x * agree
        out = x.mul_(w) if out is None else out.add_(x, alpha=w)
        divisor = agree * w if divisor is None else divisor.add_(agree, alpha=w)
    return out.div_(divisor.clamp_(min=1e-6))


def model_stock(
    tensors: Sequence[torch.Tensor], weights: Sequence[float], params: ModelStockParams, ctx: MergeContext
) -> torch.Tensor:
    """Model Stock as mergekit computes it, on task vectors (the given weights are not used).

    c = the mean over expert pairs of cos(τ_i, τ_j) (whole tensor, or per row with `filter_wise`; norms'
    product clamped at 1e-6, cosine to [-1, 1]); t = K·c / (1 + (K − 1)·c), 0 when |1 + (K − 1)·c| < 1e-6;
    merged = t·mean_i τ_i, so the model is base + t·(mean of the experts − base) = t·mean expert + (1 − t)·base.
    """
    import torch

    k_experts = len(tensors)
    if k_experts < 2:
        raise BadInput(f"merge method 'model_stock' takes at least 2 experts, got {k_experts}")
    shape = tensors[0].shape
    if params.filter_wise:
        vectors = [t.reshape(1, -1) if t.dim() <= 1 else t.reshape(-1, shape[-1]) for t in tensors]
    else:
        vectors = [t.reshape(1, -1) for t in tensors]
    norms = [torch.linalg.vector_norm(v, dim=-1) for v in vectors]
    cosines = None
    for i in range(k_experts):
        for j in range(i + 1, k_experts):
            dot = torch.linalg.vecdot(vectors[i], vectors[j])
            cos = (dot / (norms[i] * norms[j]).clamp(min=1e-6)).clamp_(-1, 1)
            cosines = cos if cosines is None else cosines.add_(cos)
    cos = cosines / (k_experts * (k_experts - 1) / 2)
    denominator = 1 + (k_experts - 1) * cos
    singular = denominator.abs() < 1e-6  # mergekit's guard: the base there
    ratio = torch.where(singular, 0.0, k_experts * cos / torch.where(singular, 1.0, denominator))
    mean = _weighted_sum(tensors, [1.0 / k_experts] * k_experts, lambda i, t: t)
    return mean.reshape(len(ratio), -1).mul_(ratio.unsqueeze(-1)).reshape(shape)


def slerp(
    tensors: Sequence[torch.Tensor], weights: Sequence[float], params: SlerpParams, ctx: MergeContext
) -> torch.Tensor:
    """Spherical interpolation from the first expert (t = 0) to the second (t = 1), as mergekit computes it.

    The tensors are taken as whole vectors; their directions v̂0, v̂1 (unit norm when the norm exceeds 1e-8)
    make the angle θ = arccos(v̂0·v̂1); merged = sin((1 − t)θ)/sin θ·v0 + sin(tθ)/sin θ·v1, or the linear
    (1 − t)·v0 + t·v1 when |v̂0·v̂1| > 0.9995. The given weights are not used.
    """
    import torch

    v0, v1, t = tensors[0], tensors[1], params.t
    n0, n1 = (torch.linalg.vector_norm(v).item() for v in (v0, v1))
    dot = torch.linalg.vecdot(v0.reshape(-1), v1.reshape(-1)).item()
    dot /= (n0 if n0 > 1e-8 else 1.0) * (n1 if n1 > 1e-8 else 1.0)
    if abs(dot) > 0.9995:
        return (v0 * (1 - t)).add_(v1, alpha=t)
    theta = math.acos(dot)
    s0, s1 = math.sin((1 - t) * theta) / math.sin(theta), math.sin(t * theta) / math.sin(theta)
    return (v0 * s0).add_(v1, alpha=s1)


def nuslerp(
    tensors: Sequence[torch.Tensor], weights: Sequence[float], params: NuSlerpParams, ctx: MergeContext
) -> torch.Tensor:
    """mergekit's NuSLERP between two experts' weights, t = w_2 / (w_1 + w_2) (0.5 when |w_1 + w_2| < 1e-6).

    Vectors: the whole tensor (`flatten`, default), else its rows, or with `row_wise` the vectors along
    dim 0. Per vector: θ = arccos(û0·û1) (norms clamped at 1e-7); merged = (sin((1 − t)θ)·v0 + sin(tθ)·v1) / sin θ,
    linear interpolation where |sin θ| < 1e-8.
    """
    import torch

    total = weights[0] + weights[1]
    t = weights[1] / total if abs(total) >= 1e-6 else 0.5
    v0, v1 = tensors
    shape = v0.shape
    if params.flatten:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif params.row_wise:
        v0, v1 = v0.transpose(0, -1), v1.transpose(0, -1)
    dot = torch.linalg.vecdot(v0, v1).unsqueeze(-1)
    n0 = torch.linalg.vector_norm(v0, dim=-1, keepdim=True).clamp_(min=1e-7)
    n1 = torch.linalg.vector_norm(v1, dim=-1, keepdim=True).clamp_(min=1e-7)
    norms = n0.mul_(n1)
    theta = (dot / norms).clamp_(-1, 1).acos_()
    sin_theta = theta.sin()
    colinear = sin_theta.abs() < 1e-8
    safe_sin = torch.where(colinear, 1.0, sin_theta)
    c0 = torch.where(colinear, 1 - t, ((1 - t) * theta).sin_() / safe_sin)
    c1 = torch.where(colinear, t, (t * theta).sin_() / safe_sin)
    merged = (v0 * c0).add_(v1 * c1)
    if not params.flatten and params.row_wise:
        merged = merged.transpose(0, -1)
    return merged.reshape(shape)


def karcher(
    tensors: Sequence[torch.Tensor], weights: Sequence[float], params: KarcherParams, ctx: MergeContext
) -> torch.Tensor:
    """The Karcher (Riemannian) mean of the experts' directions, times the weighted mean of their norms.

    As mergekit, with weights w̃ (normalised; mergekit weighs the experts equally): directions u_i = θ_i/‖θ_i‖
    of the experts with ‖θ_i‖ > tol; start from the normalised weighted mean of the u_i; repeat up to
    max_iter times: T = Σ_i w̃_i·(φ_i / sin φ_i)·(u_i − cos φ_i·u) over experts with φ_i = arccos(u·u_i) ≥ tol,
    stop when ‖T‖ < tol, else u ← normalise(cos‖T‖·u + sin‖T‖·T/‖T‖). merged = (Σ_i w̃_i·‖θ_i‖)·u.
    """
    import torch

    if len(tensors) == 1:
        return tensors[0].clone()
    norms = [torch.linalg.vector_norm(t).item() for t in tensors]
    scale = sum(w * n for w, n in zip(weights, norms, strict=True))
    valid = [i for i, n in enumerate(norms) if n > params.tol]
    if not valid:
        return torch.zeros_like(tensors[0])
    total = sum(weights[i] for i in valid)
    alphas = {i: weights[i] / total for i in valid}

    def unit(i: int) -> torch.Tensor:  # computed when needed: no K copies of the directions
        return tensors[i] / norms[i]

    u = _weighted_sum([tensors[i] for i in valid], [alphas[i] / norms[i] for i in valid], lambda i, t: t)
    norm_u = torch.linalg.vector_norm(u).item()
    u = unit(valid[0]) if norm_u < params.tol else u.div_(norm_u)
    for _ in range(params.max_iter):
        tangent = torch.zeros_like(u)
        for i in valid:
            u_i = unit(i)
            cos = min(1.0, max(-1.0, torch.linalg.vecdot(u.reshape(-1), u_i.reshape(-1)).item()))
            angle = math.acos(cos)
            if angle < params.tol:
                continue
            tangent.add_(u_i.sub_(u, alpha=cos), alpha=alphas[i] * angle / math.sin(angle))
        norm_t = torch.linalg.vector_norm(tangent).item()
        if norm_t < params.tol:
            break
        u = u.mul_(math.cos(norm_t)).add_(tangent, alpha=math.sin(norm_t) / norm_t)
        norm_u = torch.linalg.vector_norm(u).item()
        if norm_u > params.tol:
            u.div_(norm_u)
    return u.mul_(scale)


def rht(
    tensors: Sequence[torch.Tensor], weights: Sequence[float], params: RhtParams, ctx: MergeContext
) -> torch.Tensor:
    """RHT (Reparameterized Heavy-Tailed merging); weights normalised to sum to 1.

    1. τ̂_i: keep the top ⌊ρ·numel⌋ entries of τ_i by magnitude (none when that is 0; ties at the bound
       kept), zero the rest, divide the kept ones by ρ.
    2. Elect s = sign(Σ_i τ̂_i) per entry (unweighted, 0 counted as +).
    3. Disjoint weighted mean: Σ_i [sign τ̂_i = s]·w̃_i·τ̂_i / max(1, Σ_i [sign τ̂_i = s]).
    ρ = `density`, default 0.7 (the paper's setting). This is the authors' `dare_ties_magnitude_with_rescaler`
    (peft's trim, majority-sign and disjoint-merge helpers), computed as a running sum over the experts.
    """
    import torch

    density = params.density
    trims = _stats(tensors, params, ctx, _rht_stats)

    rescaled, elect = [], None  # the K τ̂_i kept between the passes (row chunks under the engine)
    for t, trim in zip(tensors, trims, strict=True):
        x = _apply_trim(t, trim)
        x = x / density if x is t else x.div_(density)  # never divide the caller's tensor in place
        elect = x.clone() if elect is None else elect.add_(x)
        rescaled.append(x)
    positive = elect >= 0
    del elect
    out = count = None
    for w in weights:
        x = rescaled.pop(0)
        agree = torch.where(positive, x > 0, x < 0)
        x.mul_(w).mul_(agree)
        out = x if out is None else out.add_(x)
        count = agree.float() if count is None else count.add_(agree)
    return out.div_(count.clamp_(min=1.0))


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
            elementwise=True,
        ),
        MergeMethod(
            "task_arithmetic", task_arithmetic, TaskArithmeticParams, "base + scaling·Σ w_i·τ_i", elementwise=True
        ),
        MergeMethod(
            "ties",
            ties,
            TiesParams,
            "trim to top density, elect sign on w·τ, disjoint weighted mean, ×scaling",
            version=2,  # 2: mergekit's election on w_i·τ_i, at least one entry kept, ties at the bound kept
            elementwise=True,
            stats=_ties_stats,
        ),
        MergeMethod(
            "dare_linear",
            _dare(consensus=False),
            DareParams,
            "drop entries at random (keep prob. density), rescale, weighted sum, ×scaling",
            elementwise=True,
        ),
        MergeMethod(
            "dare_ties",
            _dare(consensus=True),
            DareParams,
            "drop entries at random (keep prob. density), rescale, elect sign, weighted sum, ×scaling",
            elementwise=True,
        ),
        MergeMethod(
            "magnitude_prune",
            magnitude_prune,
            MagnitudePruneParams,
            "trim to top density, weighted sum (no sign election), ×scaling",
            elementwise=True,
            stats=_magnitude_prune_stats,
        ),
        MergeMethod(
            "breadcrumbs",
            _breadcrumbs(consensus=False),
            BreadcrumbsParams,
            "cut the top gamma and the smallest entries to keep density, weighted sum, ×scaling",
            elementwise=True,
            stats=_breadcrumbs_stats,
        ),
        MergeMethod(
            "breadcrumbs_ties",
            _breadcrumbs(consensus=True),
            BreadcrumbsParams,
            "cut the top gamma and the smallest entries to keep density, elect sign, weighted sum, ×scaling",
            elementwise=True,
            stats=_breadcrumbs_stats,
        ),
        MergeMethod(
            "della",
            _della(consensus=True),
            DellaParams,
            "drop entries at random by magnitude rank in the row, rescale, elect sign, weighted mean, ×scaling",
            elementwise=True,  # rows are ranked on their own; a 1-D tensor through its sorted magnitudes
            stats=_della_stats,
        ),
        MergeMethod(
            "della_linear",
            _della(consensus=False),
            DellaLinearParams,
            "drop entries at random by magnitude rank in the row, rescale, weighted sum, ×scaling",
            elementwise=True,
            stats=_della_stats,
        ),
        MergeMethod(
            "sce",
            sce,
            SceParams,
            "keep the entries that vary most across experts, weigh experts by mean square, elect sign, mean",
        ),
        MergeMethod(
            "model_stock",
            model_stock,
            ModelStockParams,
            "base + t·mean τ, t from the mean cosine between the task vectors",
            min_experts=2,
        ),
        MergeMethod(
            "slerp",
            slerp,
            SlerpParams,
            "spherical interpolation between two experts' weights at t",
            needs_base=False,
            n_experts=2,
        ),
        MergeMethod(
            "nuslerp",
            nuslerp,
            NuSlerpParams,
            "spherical interpolation between two experts' weights, t from their weights",
            needs_base=False,
            n_experts=2,
        ),
        MergeMethod(
            "karcher",
            karcher,
            KarcherParams,
            "Riemannian mean of the experts' directions times the weighted mean norm (weights normalised)",
            needs_base=False,
            normalise_weights=True,
        ),
        MergeMethod(
            "rht",
            rht,
            RhtParams,
            "trim to top density and rescale by 1/density, elect sign, disjoint mean (weights normalised)",
            normalise_weights=True,
            version=2,  # 2: magnitudes tied at the trim bound are all kept (topk picked among them before)
            elementwise=True,
            stats=_rht_stats,
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
