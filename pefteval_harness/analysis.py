"""Weight updates ΔW of a fine-tune, measured from its own artifacts (see docs/analysis.md).

`weight_updates` yields the ΔW of every parameter a fine-tune changed, one at a time: a full model minus
its base, read tensor by tensor from both models' safetensors; or an adapter merged into the base by
peft's own unload-and-merge code, one module at a time, in float64, minus the base's stored tensor.
`METRICS` is the registry of per-matrix quantities (rank, effective rank, norms): one entry per metric,
each with how it is summarised over modules. `analyze_update` adds the comparison with a reference update
(the full fine-tune on the same tasks): principal angles between top singular subspaces.

Every changed matrix gets one SVD (`torch.linalg.svd`, float32, on the CPU), whose cost grows as
m·n·min(m, n): milliseconds on the tiny model; on one CPU thread about 26 s for a 4096x4096 projection of a
7B model and 35 s for a 4096x11008 one, so hours for a whole 7B FFT (docs/analysis.md: numbers, memory).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from pefteval_harness.errors import BadInput
from pefteval_harness.jobs.types import AnalysisSettings

if TYPE_CHECKING:
    import torch


# --- ΔW ------------------------------------------------------------------------------------------------


class CannotMerge(BadInput):
    """peft cannot merge this adapter into the base weights (e.g. Lily; a bias adapter on a layer without
    bias), so its ΔW cannot be measured this way. `reason` is the message without the folder."""

    def __init__(self, folder: Path, reason: str):
        super().__init__(f"{folder}: {reason}")
        self.reason = reason


class WeightUpdate(NamedTuple):
    module: str  # the parameter's name without `.weight` (a bias keeps its `.bias`)
    delta: torch.Tensor  # ΔW as a 2-D float32 matrix (see `as_matrix`)
    base_norm: float  # ‖W_base‖_F of the same matrix


def module_name(parameter: str) -> str:
    """`model.layers.0.self_attn.q_proj.weight` -> `model.layers.0.self_attn.q_proj`; other parameters keep
    their full name, so that a module's weight and bias stay apart."""
    return parameter.removesuffix(".weight")


def as_matrix(parameter: str, tensor: torch.Tensor) -> torch.Tensor:
    """The linear map a parameter stands for, as a 2-D matrix.

    Matrices stay as stored (nn.Linear: [out, in]; higher-dimensional kernels are flattened to
    [out, rest]). A 1-D `weight` is a per-channel gain (a norm layer's): the layer multiplies by diag(g),
    so its update is diag(Δg). Any other 1-D parameter (a bias) is added, not multiplied: an n×1 column.
    """
    import torch

    if tensor.dim() >= 2:
        return tensor.reshape(tensor.shape[0], -1)
    if tensor.dim() == 1 and parameter.endswith("weight"):
        return torch.diag(tensor)
    return tensor.reshape(-1, 1)


def no_update_reason(adapter: Path) -> str | None:
    """Why an adapter has no ΔW (prompt learning), or None when it changes weights."""
    from peft import PeftConfig

    config = PeftConfig.from_pretrained(str(adapter))
    method = getattr(config.peft_type, "value", str(config.peft_type))
    if config.is_prompt_learning:
        return (
            f"{method} is prompt learning: it trains virtual token embeddings that are fed to the frozen model,"
            " so no weight of the model changes"
        )
    if getattr(config, "is_adaption_prompt", False):
        return f"{method} adds gated prompts to attention layers; no weight of the model changes"
    return None


def _change(name: str, tuned: torch.Tensor, base: torch.Tensor) -> WeightUpdate | None:
    """tuned − base in float64 (exact for float32 inputs), as a float32 matrix; None if nothing changed."""
    import torch

    delta = tuned.detach().to(torch.float64) - base.to(torch.float64)
    if not torch.any(delta != 0):
        return None
    if not bool(torch.isfinite(delta).all()):  # an SVD would fail on it, later and less clearly
        raise BadInput(f"{name}: the fine-tuned weight is not finite (training diverged?)")
    return WeightUpdate(
        module_name(name),
        as_matrix(name, delta.to(torch.float32)).contiguous(),
        float(torch.linalg.vector_norm(base.to(torch.float64))),
    )


def weight_updates(
    base: Path,
    model: Path | None = None,
    adapter: Path | None = None,
    *,
    modules: Iterable[str] | None = None,
    trust_remote_code: bool = False,
) -> Iterator[WeightUpdate]:
    """The ΔW of every parameter that a fine-tune changed, one at a time (memory never holds them all).

    `base`: the base model's folder (safetensors). Exactly one of `model` (a fine-tuned full model's folder)
    and `adapter` (a peft adapter folder trained on `base`) names the fine-tune. `modules`: yield only
    these (module names as `WeightUpdate.module`). Floating-point parameters only; unchanged ones are left
    out. A prompt-learning adapter has no ΔW: BadInput (check `no_update_reason` first).
    """
    if (model is None) == (adapter is None):
        raise BadInput("weight_updates: give exactly one of a fine-tuned model and an adapter")
    wanted = None if modules is None else set(modules)
    if model is not None:
        yield from _model_updates(Path(base), Path(model), wanted)
    else:
        yield from _adapter_updates(Path(base), Path(adapter), wanted, trust_remote_code)


def _model_updates(base: Path, model: Path, wanted: set[str] | None) -> Iterator[WeightUpdate]:
    from pefteval_harness.merging.tensors import MODEL, SafetensorsReader

    with ExitStack() as stack:
        base_t, tuned_t = SafetensorsReader(base, MODEL, stack), SafetensorsReader(model, MODEL, stack)
        tuned_names = set(tuned_t.names())
        shared = [name for name in base_t.names() if name in tuned_names]  # tied weights may be saved once
        if not shared:
            raise BadInput(f"{model}: no tensor name in common with the base {base}")
        for name in shared:
            if base_t.shape(name) != tuned_t.shape(name):
                raise BadInput(
                    f"{model}: tensor {name} has shape {list(tuned_t.shape(name))}, the base {base} has"
                    f" {list(base_t.shape(name))}"
                )
        for name in shared:
            if wanted is not None and module_name(name) not in wanted:
                continue
            b = base_t.get(name)
            if not b.is_floating_point():  # integer buffers are not weights
                continue
            update = _change(name, tuned_t.get(name), b)
            if update is not None:
                yield update


def _adapter_updates(base: Path, adapter: Path, wanted: set[str] | None, trust: bool) -> Iterator[WeightUpdate]:
    """base + adapter merged by peft, one module at a time, minus the base's stored tensors.

    This walks the modules as peft's `merge_and_unload` does (tuner layers and wrappers such as
    modules_to_save, each merged by its own code), so it is right for every method peft can merge:
    LoRA, DoRA, AdaLoRA, IA3 (a scaling), LoHa, LoKr, OFT, BOFT and HRA (ΔW = W·R − W), VeRA, FourierFT,
    LN tuning (a swapped norm layer), ... Each module is merged in float64: in float32, merging adds
    rounding noise of ~1e-7·|W| to ΔW, which a small update's spectrum would show as extra rank.
    """
    import torch
    from peft import PeftModel
    from peft.tuners.tuners_utils import BaseTunerLayer
    from transformers import AutoModelForCausalLM

    from pefteval_harness.jobs import prefer_safetensors
    from pefteval_harness.merging.tensors import MODEL, SafetensorsReader

    if reason := no_update_reason(adapter):
        raise BadInput(f"{adapter}: no weight update: {reason}")
    with ExitStack() as stack:
        base_t = SafetensorsReader(base, MODEL, stack)  # checked before the model is loaded
        stored = set(base_t.names())
        loaded = AutoModelForCausalLM.from_pretrained(
            str(base), dtype=torch.float32, trust_remote_code=trust, **prefer_safetensors(str(base))
        )
        tuner = PeftModel.from_pretrained(loaded, str(adapter), is_trainable=False).base_model
        try:
            tuner._check_merge_allowed()
        except ValueError as e:
            raise CannotMerge(adapter, f"peft cannot merge this adapter: {e}") from None
        inner = tuner.model
        tuner_layers = [key for key, m in inner.named_modules() if isinstance(m, BaseTunerLayer)]
        keys = [  # as peft unloads: every module that is not inside a tuner layer
            key for key, _ in inner.named_modules() if key and not any(key.startswith(t + ".") for t in tuner_layers)
        ]
        for key in keys:
            try:
                target = inner.get_submodule(key)
            except AttributeError:  # inside a wrapper that an earlier key already unloaded
                continue
            if not (hasattr(target, "unload_and_optionally_merge_module") or hasattr(target, "base_layer")):
                continue
            target.to(torch.float64)
            try:
                if hasattr(target, "unload_and_optionally_merge_module"):
                    merged = target.unload_and_optionally_merge_module(merge=True, safe_merge=False, adapter_names=None)
                else:
                    target.merge(safe_merge=False, adapter_names=None)
                    merged = target.get_base_layer()
            except (NotImplementedError, ValueError) as e:
                raise CannotMerge(adapter, f"peft cannot merge module {key}: {e}") from None
            parent, _, child = key.rpartition(".")
            setattr(inner.get_submodule(parent), child, merged)  # as merge_and_unload leaves it
            for pname, param in merged.named_parameters():
                name = f"{key}.{pname}"
                if wanted is not None and module_name(name) not in wanted:
                    continue
                if name not in stored:
                    raise BadInput(f"{adapter}: changes {name}, which the base's files {base} do not hold")
                update = _change(name, param, base_t.get(name))
                if update is not None:
                    yield update
            merged.to(torch.float32)  # only one module is in float64 at a time


# --- per-matrix metrics --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Spectrum:
    """What a metric sees of one ΔW: its singular values (descending) and its base matrix's norm."""

    singular_values: torch.Tensor
    base_norm: float
    rank_tolerance: float


@dataclass(frozen=True)
class ModuleStats:
    """One module's metric values and its base norm, for summaries over modules."""

    values: dict[str, Any]
    base_norm: float


@dataclass(frozen=True)
class Metric:
    fn: Callable[[Spectrum], float | int | None]
    summarize: Callable[[str, list[ModuleStats]], float | None]  # (metric name, modules) -> summary value
    description: str


def numerical_rank(s: torch.Tensor, tolerance: float) -> int:
    """Singular values above `tolerance` × the largest one."""
    if s.numel() == 0 or float(s[0]) == 0.0:
        return 0
    return int((s > tolerance * s[0]).sum())


def effective_rank(s: torch.Tensor) -> float:
    """Roy & Vetterli (2007): exp of the Shannon entropy of the singular values normalised to sum 1."""
    import torch

    total = s.double().sum()
    if total == 0:
        return 0.0
    p = s.double() / total
    p = p[p > 0]  # 0·log 0 = 0
    return float(torch.exp(-(p * p.log()).sum()))


def _frobenius(spec: Spectrum) -> float:
    return float(spec.singular_values.double().square().sum().sqrt())


def _relative_frobenius(spec: Spectrum) -> float | None:
    return _frobenius(spec) / spec.base_norm if spec.base_norm > 0 else None  # a zero base: undefined


def _mean(name: str, stats: list[ModuleStats]) -> float | None:
    values = [s.values[name] for s in stats if s.values[name] is not None]
    return sum(values) / len(values) if values else None


def _root_sum_square(name: str, stats: list[ModuleStats]) -> float | None:
    return math.sqrt(sum(s.values[name] ** 2 for s in stats)) if stats else None


def _relative_root_sum_square(name: str, stats: list[ModuleStats]) -> float | None:
    """‖ΔW‖ over ‖W_base‖ of all changed modules together: the model's relative change there."""
    base = math.sqrt(sum(s.base_norm**2 for s in stats))
    return _root_sum_square("frobenius", stats) / base if stats and base > 0 else None


METRICS: dict[str, Metric] = {
    "rank": Metric(
        lambda spec: numerical_rank(spec.singular_values, spec.rank_tolerance),
        _mean,
        "singular values above rank_tolerance × the largest (summary: mean)",
    ),
    "effective_rank": Metric(
        lambda spec: effective_rank(spec.singular_values),
        _mean,
        "exp of the entropy of the normalised singular values (Roy & Vetterli 2007; summary: mean)",
    ),
    "frobenius": Metric(_frobenius, _root_sum_square, "‖ΔW‖_F (summary: root-sum-square over modules)"),
    "relative_frobenius": Metric(
        _relative_frobenius,
        _relative_root_sum_square,
        "‖ΔW‖_F / ‖W_base‖_F (summary: the same over all changed modules together)",
    ),
}


# --- subspaces -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TopSubspaces:
    """The top singular vectors of one ΔW (as columns) and its numerical rank."""

    left: torch.Tensor  # m × k: the top of ΔW's column space
    right: torch.Tensor  # n × k: the top of ΔW's row space
    rank: int


def singular_decomposition(delta: torch.Tensor, keep: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Singular values (descending) and the top `keep` left and right singular vectors (as columns).

    A diagonal matrix (a norm layer's diag(Δg)) is decomposed directly: |Δg| sorted, unit vectors.
    """
    import torch

    m, n = delta.shape
    if m == n and m > 1 and torch.count_nonzero(delta) == torch.count_nonzero(torch.diagonal(delta)):
        d = torch.diagonal(delta)
        order = torch.argsort(d.abs(), descending=True, stable=True)
        top = order[:keep]
        cols = torch.arange(len(top))
        left = torch.zeros(m, len(top))
        left[top, cols] = 1.0
        right = torch.zeros(n, len(top))
        right[top, cols] = torch.where(d[top] < 0, -1.0, 1.0)
        return d.abs()[order], left, right
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    return s, u[:, :keep].contiguous(), vh[:keep].T.contiguous()


def principal_angles(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Principal angles (radians, ascending) between the spans of two orthonormal m×k column bases.

    Björck & Golub: the cosines are the singular values of aᵀb; angles whose cosine is near 1 are taken
    from the sines (singular values of b − a·aᵀb) instead, since arccos loses small angles to rounding.
    """
    import torch

    a, b = a.to(torch.float64), b.to(torch.float64)
    cosines = torch.linalg.svdvals(a.T @ b).clamp(0.0, 1.0)  # descending: angles ascending
    sines = torch.linalg.svdvals(b - a @ (a.T @ b)).clamp(0.0, 1.0).flip(0)  # ascending, paired with them
    return torch.where(cosines**2 > 0.5, torch.arcsin(sines), torch.arccos(cosines))


def subspace_overlap(angles: torch.Tensor) -> float:
    """Mean cos² of the principal angles: 1 for the same subspace, about k/d for random k-dim ones in R^d."""
    return float(angles.cos().square().mean())


def compare(mine: TopSubspaces, ref: TopSubspaces, top_k: int) -> dict[str, Any]:
    """Principal angles and overlaps of the top-k singular subspaces, k = min(top_k, both ranks)."""
    k = min(top_k, mine.rank, ref.rank)
    if k == 0:
        return {"subspace_overlap": None, "principal_angles_deg": None, "right_subspace_overlap": None}
    left = principal_angles(mine.left[:, :k], ref.left[:, :k])
    right = principal_angles(mine.right[:, :k], ref.right[:, :k])
    return {
        "subspace_overlap": subspace_overlap(left),
        "principal_angles_deg": [math.degrees(float(x)) for x in left],
        "right_subspace_overlap": subspace_overlap(right),
    }


# --- the analysis of one fine-tune ------------------------------------------------------------------------

_LAYER = re.compile(r"(?:^|\.)(\d+)(?:\.|$)")


def _layer(module: str) -> int | None:
    """The first numeric component of a module's name (`model.layers.3.mlp.down_proj` -> 3)."""
    match = _LAYER.search(module)
    return int(match[1]) if match else None


def _kind(module: str) -> str:
    """The last name component (`q_proj`); a bias keeps its module's (`q_proj.bias`)."""
    parts = module.split(".")
    return ".".join(parts[-2:]) if parts[-1] == "bias" and len(parts) > 1 else parts[-1]


def _natural(name: str) -> list:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def _summary(records: list[dict[str, Any]], stats: list[ModuleStats], compared: bool) -> dict[str, Any]:
    summary: dict[str, Any] = {"modules": len(records)}
    for name, metric in METRICS.items():
        summary[name] = metric.summarize(name, stats)
    for key in ("subspace_overlap", "right_subspace_overlap"):
        values = [r[key] for r in records if r[key] is not None]
        summary[key] = sum(values) / len(values) if compared and values else None
    return summary


def analyze_update(
    base: Path,
    model: Path | None = None,
    adapter: Path | None = None,
    *,
    reference: Path | None = None,
    reference_adapter: Path | None = None,
    settings: AnalysisSettings | None = None,
    method: str = "",
    trust_remote_code: bool = False,
) -> dict[str, Any]:
    """Per changed module: shape, `METRICS`, and the overlap with a reference update; with a summary.

    The fine-tune is `model` (a full model) or `adapter` (on `base`); the reference, if any, is `reference`
    (a full model, usually FFT on the same tasks) or `reference_adapter` (on `base`). The format is in
    docs/analysis.md. A prompt-learning adapter gives `weight_update: False` and the reason.
    """
    settings = settings or AnalysisSettings()
    if reference is not None and reference_adapter is not None:
        raise BadInput("analysis: give at most one of a reference model and a reference adapter")
    compared = reference is not None or reference_adapter is not None
    result: dict[str, Any] = {
        "weight_update": True,
        "reason": None,
        "method": method,
        "reference": compared,
        "settings": {"rank_tolerance": settings.rank_tolerance, "top_k": settings.top_k},
        "modules": [],
        "summary": _summary([], [], compared),
    }
    if adapter is not None and (reason := no_update_reason(Path(adapter))):
        return {**result, "weight_update": False, "reason": reason}
    if reference_adapter is not None and (reason := no_update_reason(Path(reference_adapter))):
        raise BadInput(f"{reference_adapter}: a reference needs a weight update, but {reason}")

    records: dict[str, dict[str, Any]] = {}
    stats: dict[str, ModuleStats] = {}
    tops: dict[str, TopSubspaces] = {}  # k columns per module: small, kept until the reference pass
    try:
        for update in weight_updates(base, model, adapter, trust_remote_code=trust_remote_code):
            s, left, right = singular_decomposition(update.delta, settings.top_k)
            spec = Spectrum(s, update.base_norm, settings.rank_tolerance)
            values = {name: metric.fn(spec) for name, metric in METRICS.items()}
            records[update.module] = {
                "module": update.module,
                "layer": _layer(update.module),
                "kind": _kind(update.module),
                "shape": list(update.delta.shape),
                **values,
                "subspace_overlap": None,
                "principal_angles_deg": None,
                "right_subspace_overlap": None,
            }
            stats[update.module] = ModuleStats(values, update.base_norm)
            tops[update.module] = TopSubspaces(left, right, numerical_rank(s, settings.rank_tolerance))
    except CannotMerge as e:  # the method has a ΔW, but peft cannot produce it: say so, do not fail the run
        return {**result, "weight_update": False, "reason": f"ΔW not measured: {e.reason}"}

    if compared and records:
        ref_updates = weight_updates(
            base, reference, reference_adapter, modules=records, trust_remote_code=trust_remote_code
        )
        for update in ref_updates:  # a module the reference leaves unchanged keeps None
            if list(update.delta.shape) != records[update.module]["shape"]:
                raise BadInput(f"reference: {update.module} has shape {list(update.delta.shape)}")
            s, left, right = singular_decomposition(update.delta, settings.top_k)
            ref_top = TopSubspaces(left, right, numerical_rank(s, settings.rank_tolerance))
            records[update.module].update(compare(tops[update.module], ref_top, settings.top_k))

    order = sorted(records, key=_natural)
    result["modules"] = [records[m] for m in order]
    result["summary"] = _summary(result["modules"], [stats[m] for m in order], compared)
    if not records:
        result["reason"] = "no weight differs from the base's"
    return result
