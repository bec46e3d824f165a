"""Regenerate the mergekit reference fixtures in tests/mergekit/fixtures/ with mergekit's own python, not ours:

    python3 -m venv ../mergekit-venv && ../mergekit-venv/bin/pip install mergekit==0.1.5
    ../mergekit-venv/bin/python tests/mergekit/make_fixtures.py

(mergekit is not a dependency of pefteval-harness; any venv with it will do; the version in use is recorded).
It builds the experts of `experts.py` in a temporary folder, runs mergekit's own merge (`run_merge`, what
mergekit-yaml calls) once per case below, and writes
- `<case>.safetensors`: mergekit's merged tensors, for the deterministic cases (compared entry by entry);
- `cases.json`: every case: our method and settings, the mergekit config (model paths as the names base,
  expert0..2, and `base+lora0` for a LoRA adapter over the base), the mergekit version, and for random cases
  (density < 1) the statistics of mergekit's merged task vector over `SEEDS` seeds instead of tensors.
The run is deterministic: regenerating with the same mergekit and torch rewrites identical files.
Paths in the configs are symbolic; the test substitutes its own folders. Nothing here imports pefteval-harness.
"""

from __future__ import annotations

import copy
import json
import sys
import tempfile
from importlib.metadata import version
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import experts  # noqa: E402  (this folder's own module, also imported by the tests)

FIXTURES = HERE / "fixtures"
SEEDS = (0, 1, 2, 3, 4, 5, 6, 7)
W3 = [1.0, 0.6, 0.3]  # unequal positive weights
W3_NEG = [1.0, -0.4, 0.7]  # one negative weight: TIES' signed divisor and sign election on w·τ
E3 = ["expert0", "expert1", "expert2"]


def _models(names: list[str], weights: list[float] | None, per_model: dict | None = None) -> list[dict]:
    out = []
    for i, name in enumerate(names):
        params = dict(per_model or {})
        if weights is not None:
            params["weight"] = weights[i]
        out.append({"model": name, "parameters": params} if params else {"model": name})
    return out


def case(name, method, ours_params, mk_method, mk_params, weights=W3, names=E3, base=True, per_model=None, **kw):
    """One comparison: our (method, parameters, weights, experts, base) and the mergekit config that matches."""
    config = {"merge_method": mk_method}
    if base:
        config["base_model"] = "base"
    config["models"] = _models(names, weights, per_model)
    if mk_params:
        config["parameters"] = mk_params
    config["dtype"] = "float32"
    lora = kw.get("lora", False)  # `base+loraN`: ours merges adapter loraN over the base (space delta_w)
    ours_experts = [n.removeprefix("base+") for n in names]
    ours = {
        "method": method,
        "parameters": ours_params,
        "weights": weights,
        "experts": ours_experts,
        "base": base or lora,
    }
    return {"name": name, "ours": ours, "mergekit": config, **kw}


CASES = [
    case("linear", "linear", {}, "linear", {}, base=False),
    case("task_arithmetic", "task_arithmetic", {"scaling": 0.8}, "task_arithmetic", {"lambda": 0.8}),
    case("ties", "ties", {"density": 0.5, "scaling": 1.2}, "ties", {"lambda": 1.2}, W3_NEG, per_model={"density": 0.5}),
    case("ties_equal_weights", "ties", {"density": 0.3}, "ties", {}, [1.0, 1.0, 1.0], per_model={"density": 0.3}),
    case("ties_density1", "ties", {"density": 1.0}, "ties", {}, W3, per_model={"density": 1.0}),
    # magnitude_prune: mergekit registers no such method; its building blocks (magnitude sparsification, no
    # sign consensus, no normalisation) are registered below under this name, so mergekit's own code computes it
    case("magnitude_prune", "magnitude_prune", {"density": 0.4}, "magnitude_prune", {}, per_model={"density": 0.4}),
    case("dare_linear_density1", "dare_linear", {"density": 1.0}, "dare_linear", {}, per_model={"density": 1.0}),
    case("dare_ties_density1", "dare_ties", {"density": 1.0}, "dare_ties", {}, W3_NEG, per_model={"density": 1.0}),
    case(
        "breadcrumbs",
        "breadcrumbs",
        {"density": 0.6, "gamma": 0.05},
        "breadcrumbs",
        {},
        per_model={"density": 0.6, "gamma": 0.05},
    ),
    case(
        "breadcrumbs_ties",
        "breadcrumbs_ties",
        {"density": 0.6, "gamma": 0.05},
        "breadcrumbs_ties",
        {},
        W3_NEG,
        per_model={"density": 0.6, "gamma": 0.05},
    ),
    case("della_density1", "della", {"density": 1.0}, "della", {}, per_model={"density": 1.0}),
    case("della_linear_density1", "della_linear", {"density": 1.0}, "della_linear", {}, per_model={"density": 1.0}),
    case("sce", "sce", {"select_topk": 0.5}, "sce", {"select_topk": 0.5}, weights=None),
    case("sce_topk1", "sce", {}, "sce", {}, weights=None),
    case("model_stock", "model_stock", {}, "model_stock", {}, weights=None),
    case(
        "model_stock_filter_wise",
        "model_stock",
        {"filter_wise": True},
        "model_stock",
        {"filter_wise": True},
        weights=None,
    ),
    case("karcher", "karcher", {}, "karcher", {}, weights=None, base=False),
    case("karcher_iter3", "karcher", {"max_iter": 3}, "karcher", {"max_iter": 3}, weights=None, base=False),
    case("nuslerp", "nuslerp", {}, "nuslerp", {}, [0.7, 0.3], ["expert0", "expert1"], base=False),
    case(
        "nuslerp_row_wise",
        "nuslerp",
        {"row_wise": True, "flatten": False},
        "nuslerp",
        {"nuslerp_row_wise": True, "nuslerp_flatten": False},
        [0.4, 0.6],
        ["expert0", "expert1"],
        base=False,
    ),
    # random methods at density < 1: statistics over seeds (kept fraction, mean, L1), not tensors
    case(
        "dare_linear_density0.5",
        "dare_linear",
        {"density": 0.5},
        "dare_linear",
        {},
        per_model={"density": 0.5},
        random=True,
    ),
    case(
        "dare_ties_density0.5",
        "dare_ties",
        {"density": 0.5},
        "dare_ties",
        {},
        W3_NEG,
        per_model={"density": 0.5},
        random=True,
    ),
    case(
        "della_density0.5",
        "della",
        {"density": 0.5, "epsilon": 0.1},
        "della",
        {},
        per_model={"density": 0.5, "epsilon": 0.1},
        random=True,
    ),
    case(
        "della_linear_density0.5",
        "della_linear",
        {"density": 0.5, "epsilon": 0.1},
        "della_linear",
        {},
        per_model={"density": 0.5, "epsilon": 0.1},
        random=True,
    ),
    # one expert: mergekit's l1 rescale makes each tensor's merged L1 norm exactly w·‖τ‖₁ whatever the draw
    case(
        "dare_linear_one_expert_l1",
        "dare_linear",
        {"density": 0.3},
        "dare_linear",
        {},
        [0.9],
        ["expert1"],
        per_model={"density": 0.3},
        random=True,
    ),
]
# one expert, DELLA: keep probabilities grow with |τ| (by ε), and the L1 rescale fixes each tensor's ‖Δ‖₁
CASES.append(
    case(
        "della_linear_one_expert",
        "della_linear",
        {"density": 0.5, "epsilon": 0.3},
        "della_linear",
        {},
        [0.8],
        ["expert1"],
        per_model={"density": 0.5, "epsilon": 0.3},
        random=True,
    )
)
# tiny density: ⌊density·numel⌋ = 0 on the 16-entry norms (magnitude trimming keeps one entry there, the
# breadcrumbs band keeps none), 10 entries of the 512-entry matrices
CASES += [
    case("ties_keep_one", "ties", {"density": 0.02}, "ties", {}, per_model={"density": 0.02}),
    case(
        "breadcrumbs_tiny_density",
        "breadcrumbs",
        {"density": 0.02, "gamma": 0.01},
        "breadcrumbs",
        {},
        per_model={"density": 0.02, "gamma": 0.01},
    ),
]
# LoRA experts in space delta_w: mergekit reads `base+adapter` references (peft applies each adapter)
L2 = ["base+lora0", "base+lora1"]
CASES += [
    case("lora_ties", "ties", {"density": 0.5}, "ties", {}, [1.0, 0.7], L2, per_model={"density": 0.5}, lora=True),
    case("lora_linear", "linear", {}, "linear", {}, [1.0, 0.5], L2, base=False, lora=True),
]
# slerp: mergekit's base_model is the t = 0 end and one of the two models; ours takes them as experts[0], [1]
_slerp = case("slerp", "slerp", {"t": 0.3}, "slerp", {"t": 0.3}, None, ["expert0", "expert1"], base=False)
_slerp["mergekit"]["base_model"] = "expert0"
CASES.insert(CASES.index(next(c for c in CASES if c["name"] == "nuslerp")), _slerp)


def merged_stats(merged: dict[str, torch.Tensor], base: dict[str, torch.Tensor]) -> dict:
    """Of the merged task vector Δ = merged − base: fraction of exact zeros, mean, mean |Δ|, per-tensor L1, and
    how much more often large entries are kept than small ones (`kept_large_minus_small`).

    kept_large_minus_small (what tells DELLA's rank-dependent keep probabilities from uniform ones): over the
    matrices, the kept (Δ ≠ 0) fraction among entries whose |τ| of expert1 is above its tensor's median, minus
    the same below it. Meaningful for one-expert merges of expert1; computed always (cheap).
    Also used by tests/test_mergekit_equality.py, so both sides compute the same numbers.
    """
    deltas = {k: (merged[k].float() - base[k].float()).flatten() for k in sorted(base)}
    flat = torch.cat(list(deltas.values()))
    large, small = [], []
    for name, d in deltas.items():
        if len(base[name].shape) < 2:
            continue
        tau = experts.task_vector(1, name, tuple(base[name].shape)).abs().flatten()
        above = tau > tau.median()
        large.append((d[above] != 0).float())
        small.append((d[~above] != 0).float())
    return {
        "zero_fraction": float((flat == 0).float().mean()),
        "mean": float(flat.mean()),
        "mean_abs": float(flat.abs().mean()),
        "kept_large_minus_small": float(torch.cat(large).mean() - torch.cat(small).mean()),
        "l1_per_tensor": {k: float(d.abs().sum()) for k, d in deltas.items()},
    }


def _register_magnitude_prune() -> None:
    from mergekit.merge_methods import GeneralizedTaskArithmeticMerge, register
    from mergekit.sparsify import SparsificationMethod

    register(
        GeneralizedTaskArithmeticMerge(
            consensus_method=None,
            sparsification_method=SparsificationMethod.magnitude,
            default_normalize=False,
            default_rescale=False,
            method_name="magnitude_prune",
            method_pretty_name="magnitude pruning, no sign consensus (fixture only)",
            method_reference_url=None,
        )
    )


def _run_mergekit(config: dict, folders: dict[str, Path], out: Path, seed: int | None) -> dict[str, torch.Tensor]:
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    def path(ref: str) -> str:  # symbolic names, `base+lora0` for an adapter over the base
        return "+".join(str(folders[part]) for part in ref.split("+"))

    config = copy.deepcopy(config)
    if "base_model" in config:
        config["base_model"] = path(config["base_model"])
    for m in config["models"]:
        m["model"] = path(m["model"])
    options = MergeOptions(
        random_seed=seed,
        copy_tokenizer=False,
        write_model_card=False,
        quiet=True,
        lora_merge_cache=str(out.parent / "lora-cache"),
    )
    run_merge(MergeConfiguration.model_validate(config), str(out), options=options)
    tensors = {}
    for path in sorted(out.glob("*.safetensors")):
        tensors.update(load_file(str(path)))
    return tensors


def _check_shapes() -> None:
    """experts.py writes Llama's tensors by hand (no transformers there); make sure they are Llama's."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = {k: v for k, v in experts.CONFIG.items() if k not in ("architectures", "model_type", "dtype")}
    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**config))
    theirs = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if theirs != experts.tensor_shapes():
        raise RuntimeError(f"experts.tensor_shapes() differs from transformers' Llama: {theirs}")


def main() -> None:
    _check_shapes()
    _register_magnitude_prune()
    FIXTURES.mkdir(exist_ok=True)
    for old in FIXTURES.glob("*.safetensors"):
        old.unlink()
    mk_version = version("mergekit")
    with tempfile.TemporaryDirectory() as tmp:
        folders = experts.build_models(Path(tmp) / "models")
        base = load_file(str(folders["base"] / "model.safetensors"))
        for i, c in enumerate(CASES):
            if c.get("random"):
                runs = [
                    merged_stats(_run_mergekit(c["mergekit"], folders, Path(tmp) / f"out{i}-{s}", s), base)
                    for s in SEEDS
                ]
                c["stats"] = runs
            else:
                merged = _run_mergekit(c["mergekit"], folders, Path(tmp) / f"out{i}", None)
                missing = set(base) - set(merged)
                if missing:
                    raise RuntimeError(f"{c['name']}: mergekit output lacks {sorted(missing)[:3]}")
                save_file(
                    {k: merged[k].float().contiguous() for k in sorted(base)},
                    str(FIXTURES / f"{c['name']}.safetensors"),
                )
                c["fixture"] = f"{c['name']}.safetensors"
            print(f"{c['name']}: done", flush=True)
    record = {
        "mergekit_version": mk_version,
        "torch_version": torch.__version__,
        "experts": {"perturbations": experts.EXPERT_PERTURBATIONS, "config": experts.CONFIG},
        "seeds": list(SEEDS),
        "cases": CASES,
    }
    (FIXTURES / "cases.json").write_text(json.dumps(record, indent=1) + "\n")
    total = sum(p.stat().st_size for p in FIXTURES.iterdir())
    print(f"{len(CASES)} cases, fixtures {total / 1024:.0f} KiB, mergekit {mk_version}")


if __name__ == "__main__":
    main()
