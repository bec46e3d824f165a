"""Our merge engine against mergekit's own outputs, one case per method and setting (tests/mergekit/).

The fixtures hold what mergekit (version in cases.json) produced from the experts of tests/mergekit/experts.py;
`make_fixtures.py` documents how they were made. Here the same experts are rebuilt and merged with
`merge_models` under the equivalent settings.
- Deterministic cases: every tensor must match mergekit's within atol 2e-6 + rtol 1e-5 (float32: the two sum
  in different orders; values are O(0.1–1)). The failure names the tensor and the max abs difference.
- Random cases (DARE, DELLA at density < 1): mergekit's draws cannot be reproduced, so the statistics of the
  merged task vector Δ = merged − base (fraction of exact zeros, mean, mean |Δ|, and how much more often
  large entries are kept than small ones) over our seeds must agree
  with mergekit's over its seeds within 4 standard errors; with one expert, mergekit's L1 rescale fixes each
  tensor's ‖Δ‖₁ exactly, and that is compared per tensor.
- Our recipes in mergekit (slow; needs PEFTEVAL_MERGEKIT_PYTHON, a python with mergekit): a merge's
  `to_mergekit` config, run by mergekit, gives our merge within the same tolerance.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pefteval_harness.merging import get_method, merge_models
from pefteval_harness.merging.recipes import MERGEKIT_METHODS, to_mergekit

HERE = Path(__file__).resolve().parent / "mergekit"
sys.path.insert(0, str(HERE))
import experts  # noqa: E402  (tests/mergekit/experts.py, shared with make_fixtures.py)
from make_fixtures import merged_stats  # noqa: E402  (the statistics the fixtures hold, computed the same way)

FIXTURES = HERE / "fixtures"
CASES = json.loads((FIXTURES / "cases.json").read_text())
ATOL, RTOL = 2e-6, 1e-5
OUR_SEEDS = (0, 1, 2, 3)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    return experts.build_models(tmp_path_factory.mktemp("mergekit-experts"))


def _merge(case: dict, models: dict[str, Path], out: Path, seed: int = 0) -> dict[str, torch.Tensor]:
    ours = case["ours"]
    merge_models(
        method=ours["method"],
        experts=[models[name] for name in ours["experts"]],
        base=models["base"] if ours["base"] else None,
        weights=ours["weights"],
        params=ours["parameters"],
        out_dir=out,
        seed=seed,
    )
    return load_file(str(out / "model.safetensors"))


def _cases(random: bool) -> list:
    return [pytest.param(c, id=c["name"]) for c in CASES["cases"] if bool(c.get("random")) == random]


def test_every_shared_method_has_an_exact_case():
    """Each method both tools have (and magnitude_prune, built from mergekit's parts) is compared exactly."""
    exact = {c["ours"]["method"] for c in CASES["cases"] if not c.get("random")}
    assert set(MERGEKIT_METHODS) | {"magnitude_prune"} <= exact


@pytest.mark.parametrize("case", _cases(random=False))
def test_equals_mergekit(case, models, tmp_path):
    expected = load_file(str(FIXTURES / case["fixture"]))
    merged = _merge(case, models, tmp_path / "out")
    assert set(merged) == set(expected)
    worst = max(((merged[k].float() - expected[k]).abs().max().item(), k) for k in expected)
    bad = [
        k for k in expected if not torch.allclose(merged[k].float(), expected[k], atol=ATOL, rtol=RTOL, equal_nan=False)
    ]
    assert not bad, (
        f"{case['name']}: {len(bad)} tensors differ from mergekit, max abs diff {worst[0]:.3g} in {worst[1]}"
    )


@pytest.mark.parametrize("case", _cases(random=True))
def test_matches_mergekit_in_distribution(case, models, tmp_path):
    base = load_file(str(models["base"] / "model.safetensors"))
    ours = [merged_stats(_merge(case, models, tmp_path / f"out{s}", seed=s), base) for s in OUR_SEEDS]
    theirs = case["stats"]
    problems = []
    for key in ("zero_fraction", "mean", "mean_abs", "kept_large_minus_small"):
        a, b = [r[key] for r in ours], [r[key] for r in theirs]
        spread = max(statistics.stdev(a), statistics.stdev(b), 1e-4 * abs(statistics.mean(b)))
        tolerance = 4 * spread * math.sqrt(1 / len(a) + 1 / len(b))
        if abs(statistics.mean(a) - statistics.mean(b)) > tolerance:
            problems.append(f"{key} {statistics.mean(a):.5g} vs mergekit {statistics.mean(b):.5g} (±{tolerance:.2g})")
    if len(case["ours"]["experts"]) == 1:  # mergekit's L1 rescale: ‖Δ‖₁ per tensor is w·‖τ‖₁ in every draw
        for name, l1 in theirs[0]["l1_per_tensor"].items():
            got = ours[0]["l1_per_tensor"][name]
            if not math.isclose(got, l1, rel_tol=1e-4):
                problems.append(f"L1 of {name} {got:.6g} vs mergekit {l1:.6g}")
                break
    assert not problems, f"{case['name']}: " + "; ".join(problems)


# --- our recipes run by mergekit itself (needs a mergekit install: slow, and skipped without one) -----------

MERGEKIT_PYTHON = os.environ.get("PEFTEVAL_MERGEKIT_PYTHON")  # a python with mergekit installed
E3, L2 = ("expert0", "expert1", "expert2"), ("lora0", "lora1")
RECIPE_CASES = {  # name: method, parameters, weights, experts; a base whenever the engine uses one
    "ties": ("ties", {"density": 0.4, "scaling": 1.1}, [1.0, -0.5, 0.8], E3),
    "task_arithmetic": ("task_arithmetic", {"scaling": 0.7}, [1.0, 0.5, 0.2], E3),
    "linear": ("linear", {}, [1.0, 0.5, 0.2], E3),
    "breadcrumbs_ties": ("breadcrumbs_ties", {"density": 0.5, "gamma": 0.1}, [1.0, 0.5, 0.8], E3),
    "dare_ties": ("dare_ties", {"density": 1.0}, [1.0, -0.5, 0.8], E3),
    "della": ("della", {"density": 1.0}, [1.0, 0.5, 0.8], E3),
    "sce": ("sce", {"select_topk": 0.3}, None, E3),
    "model_stock": ("model_stock", {"filter_wise": True}, None, E3),
    "slerp": ("slerp", {"t": 0.7}, None, E3[:2]),
    "nuslerp": ("nuslerp", {"flatten": False}, [0.2, 0.6], E3[:2]),
    "karcher": ("karcher", {"max_iter": 5}, None, E3),
    "lora_ties": ("ties", {"density": 0.5}, [1.0, 0.7], L2),
    "lora_slerp": ("slerp", {"t": 0.4}, None, L2),
}
_RUN_MERGEKIT = """
import json, sys
from mergekit.config import MergeConfiguration
from mergekit.merge import run_merge
from mergekit.options import MergeOptions
for config, out in json.load(open(sys.argv[1])):
    options = MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True, lora_merge_cache=out + ".cache")
    run_merge(MergeConfiguration.model_validate(config), out, options=options)
"""


@pytest.fixture(scope="module")
def recipe_merges(models, tmp_path_factory) -> Path:
    """Each RECIPE_CASES merge by our engine (ours_<name>) and by mergekit from its to_mergekit config (mk_<name>)."""
    if not MERGEKIT_PYTHON:
        pytest.skip("set PEFTEVAL_MERGEKIT_PYTHON to a python with mergekit installed to run our recipes in mergekit")
    root = tmp_path_factory.mktemp("recipes-in-mergekit")
    jobs = []
    for name, (method, params, weights, names) in RECIPE_CASES.items():
        needs_base = get_method(method).needs_base or names == L2
        out = merge_models(
            method=method,
            experts=[models[n] for n in names],
            base=models["base"] if needs_base else None,
            weights=weights,
            params=params,
            out_dir=root / f"ours_{name}",
        )
        config = to_mergekit(json.loads((out / "merge_config.json").read_text()))
        assert config is not None, f"{name}: to_mergekit gave no mergekit config"
        jobs.append([config, str(root / f"mk_{name}")])
    (root / "jobs.json").write_text(json.dumps(jobs))
    run = subprocess.run(
        [MERGEKIT_PYTHON, "-c", _RUN_MERGEKIT, str(root / "jobs.json")], capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr[-2000:]
    return root


@pytest.mark.slow
@pytest.mark.parametrize("name", list(RECIPE_CASES))
def test_to_mergekit_recipe_gives_our_merge_in_mergekit(name, recipe_merges):
    ours = load_file(str(recipe_merges / f"ours_{name}" / "model.safetensors"))
    theirs = {}
    for path in (recipe_merges / f"mk_{name}").glob("*.safetensors"):
        theirs.update(load_file(str(path)))
    assert set(theirs) == set(ours)
    worst = max(((ours[k].float() - theirs[k].float()).abs().max().item(), k) for k in ours)
    assert all(torch.allclose(ours[k].float(), theirs[k].float(), atol=ATOL, rtol=RTOL) for k in ours), (
        f"{name}: mergekit's merge from our recipe differs, max abs diff {worst[0]:.3g} in {worst[1]}"
    )
