"""Every merge method of the registry on small tensors: worked examples from the definitions (docs/merge_methods.md),
mergekit's edge semantics (negative weights in TIES, at least one entry kept, ties at a trim bound), DARE and DELLA
statistics, seeding, row slices with whole-tensor stats, and parameter errors. No mocks; pure torch, quick."""

from __future__ import annotations

import math

import pytest
import torch

from pefteval_harness.errors import BadInput
from pefteval_harness.merging.methods import (
    MERGE_METHODS,
    MergeContext,
    breadcrumbs_trim,
    della_keep_probabilities,
    describe_methods,
    tensor_generator,
    top_magnitude_trim,
)

NAMES = [
    "linear",
    "task_arithmetic",
    "ties",
    "dare_linear",
    "dare_ties",
    "magnitude_prune",
    "breadcrumbs",
    "breadcrumbs_ties",
    "della",
    "della_linear",
    "sce",
    "model_stock",
    "slerp",
    "nuslerp",
    "karcher",
    "rht",
]
RANDOM = ["dare_linear", "dare_ties", "della", "della_linear"]
DENSITY_METHODS = [n for n in NAMES if "density" in MERGE_METHODS[n].params.model_fields]


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def close(a: torch.Tensor, b: torch.Tensor, atol: float = 1e-6) -> bool:
    return a.shape == b.shape and torch.allclose(a, b, atol=atol)


# --- the registry ----------------------------------------------------------------------------------------


def test_describe_methods_lists_the_sixteen_methods():
    described = describe_methods()
    assert [d["name"] for d in described] == NAMES == list(MERGE_METHODS)
    flags = {d["name"]: (d["elementwise"], d["n_experts"], d["needs_base"]) for d in described}
    assert flags["slerp"] == flags["nuslerp"] == (False, 2, False)
    assert flags["karcher"] == (False, None, False) and flags["linear"] == (True, None, False)
    elementwise = {n for n, (e, _, _) in flags.items() if e}
    assert elementwise == {
        "linear", "task_arithmetic", "ties", "dare_linear", "dare_ties", "magnitude_prune", "breadcrumbs",
        "breadcrumbs_ties", "della", "della_linear", "rht",
    }  # fmt: skip
    for d in described:
        assert all(p["description"] and p["default"] is not None for p in d["parameters"]), d["name"]
    # ties and rht changed outputs in this version (mergekit's weighted election, keep-one, tie rule)
    assert MERGE_METHODS["ties"].version == 2 and MERGE_METHODS["rht"].version == 2


def test_defaults_follow_mergekit_or_the_documented_project_choice():
    defaults = {n: MERGE_METHODS[n].validate_params({}).model_dump() for n in NAMES}
    assert defaults["ties"] == {"density": 0.7, "scaling": 1.0}  # mergekit: density 1.0 (project choice 0.7)
    assert defaults["dare_ties"] == defaults["dare_linear"] == {
        "density": 0.7, "scaling": 1.0, "normalize": False, "rescale": "l1"
    }  # fmt: skip
    assert defaults["della"]["normalize"] is True and defaults["della_linear"]["normalize"] is False
    assert defaults["della"]["epsilon"] == 0.15 and defaults["della"]["rescale"] == "l1"
    assert defaults["breadcrumbs"]["gamma"] == 0.01 and defaults["breadcrumbs"]["rescale"] is False
    assert defaults["sce"] == {"select_topk": 1.0} and defaults["model_stock"] == {"filter_wise": False}
    assert defaults["nuslerp"] == {"flatten": True, "row_wise": False}
    assert defaults["karcher"] == {"max_iter": 10, "tol": 1e-5} and defaults["rht"] == {"density": 0.7}


# --- task arithmetic family: worked examples --------------------------------------------------------------


def test_linear_and_task_arithmetic():
    a, b = t(1, -2), t(3, 6)
    assert close(MERGE_METHODS["linear"]([a, b], [1, 3]), t(2.5, 4.0))
    assert close(MERGE_METHODS["task_arithmetic"]([a, b], [1, 3], scaling=0.5), t(5.0, 8.0))


def test_ties_worked_example():
    # density 0.5 keeps 2 of 4: τ̂1 = [4,0,0,-3], τ̂2 = [0,3,0,2]; Σ = [4,3,0,-1] -> s = [+,+,+,-]
    # agreeing: e0 {1}, e1 {2}, e2 none (divisor 0 -> 1), e3 {1}
    taus = [t(4, -1, 2, -3), t(-1, 3, 0.5, 2)]
    assert close(MERGE_METHODS["ties"](taus, [1, 1], density=0.5), t(4, 3, 0, -3))
    assert close(MERGE_METHODS["ties"](taus, [1, 1], density=0.5, scaling=2), t(8, 6, 0, -6))


def test_ties_negative_weights_elect_and_divide_as_mergekit():
    # w·τ: [2,-1,3] and [-2,-4,2]; Σ = [0,-5,5] -> s = [+,-,+] (0 counts as +)
    # agree on sign(w·τ): expert 1 everywhere, expert 2 on e1, e2
    # Σ agreeing w·τ = [2,-5,5]; Σ agreeing w (signed) = [1,-1,-1] -> [2,5,-5]
    taus = [t(2, -1, 3), t(1, 2, -1)]
    assert close(MERGE_METHODS["ties"](taus, [1, -2], density=1.0), t(2, 5, -5))
    # (the sign of τ alone, this project's rule before, gave [0,-1,3])


def test_magnitude_prune_worked_example():
    taus = [t(4, -1, 2, -3), t(-1, 3, 0.5, 2)]
    assert close(MERGE_METHODS["magnitude_prune"](taus, [1, 2], density=0.5), t(4, 6, 0, 1))
    assert close(MERGE_METHODS["magnitude_prune"](taus, [1, 2], density=0.5, normalize=True), t(4, 6, 0, 1) / 3)
    # rescale: the kept entries of τ1 scaled by L1 ratio 10/7, of τ2 by 6.5/5
    got = MERGE_METHODS["magnitude_prune"](taus, [1, 1], density=0.5, rescale=True)
    assert close(got, t(4, 0, 0, -3) * 10 / 7 + t(0, 3, 0, 2) * 6.5 / 5)


def test_breadcrumbs_worked_example():
    # magnitudes 1..10, density 0.5, gamma 0.1: the largest (10) cut as an outlier, the 4 smallest cut
    tau = t(1, -2, 3, -4, 5, -6, 7, -8, 9, -10)
    want = t(0, 0, 0, 0, 5, -6, 7, -8, 9, 0)
    assert close(MERGE_METHODS["breadcrumbs"]([tau], density=0.5, gamma=0.1), want)
    # gamma 0: no outlier cut, the top half kept (mergekit zeroes the whole tensor when gamma·numel < 1)
    assert close(MERGE_METHODS["breadcrumbs"]([tau], density=0.5, gamma=0.0), t(0, 0, 0, 0, 0, -6, 7, -8, 9, -10))
    # density + gamma > 1: fewer outliers cut so that density still holds (9 kept of 10)
    assert close(MERGE_METHODS["breadcrumbs"]([tau], density=0.9, gamma=0.3), t(1, -2, 3, -4, 5, -6, 7, -8, 9, 0))
    # breadcrumbs_ties: the same trim, then TIES's election; normalize off by default (mergekit): a sum.
    # τ2 = -τ/2 with weight 3: Σ w·τ̂ = -τ̂1/2 elects the signs of τ2, so only expert 2 counts
    bt = MERGE_METHODS["breadcrumbs_ties"]
    assert close(bt([tau, -0.5 * tau], [1, 3], density=0.5, gamma=0.1), -1.5 * want)
    assert close(bt([tau, -0.5 * tau], [1, 3], density=0.5, gamma=0.1, normalize=True), -0.5 * want)


def test_dare_at_density_one_is_its_deterministic_counterpart():
    gen = torch.Generator().manual_seed(0)
    taus = [torch.randn(6, 5, generator=gen) for _ in range(3)]
    w = [0.5, -1.0, 2.0]
    ta = MERGE_METHODS["task_arithmetic"](taus, w, scaling=0.7)
    assert close(MERGE_METHODS["dare_linear"](taus, w, density=1.0, scaling=0.7), ta)
    ties = MERGE_METHODS["ties"](taus, w, density=1.0, scaling=0.7)
    assert close(MERGE_METHODS["dare_ties"](taus, w, density=1.0, scaling=0.7, normalize=True), ties)
    assert close(MERGE_METHODS["della"](taus, w, density=1.0, scaling=0.7), ties)
    assert close(MERGE_METHODS["della_linear"](taus, w, density=1.0, scaling=0.7), ta)


def test_dare_statistics():
    gen = torch.Generator().manual_seed(1)
    tau = torch.rand(400, 500, generator=gen) + 0.5  # positive: means and L1 norms are easy to read
    n = tau.numel()
    none = MERGE_METHODS["dare_linear"]([tau], density=0.3, rescale="none", seed=2)
    kept = none != 0
    assert abs(kept.sum().item() / n - 0.3) < 0.005  # std 0.001
    assert torch.equal(none[kept], tau[kept])
    inverse = MERGE_METHODS["dare_linear"]([tau], density=0.3, rescale="inverse_probability", seed=2)
    assert torch.equal(inverse != 0, kept) and close(inverse[kept], tau[kept] / 0.3)
    assert abs(inverse.mean().item() / tau.mean().item() - 1) < 0.01  # E[mask/p] = 1
    l1 = MERGE_METHODS["dare_linear"]([tau], density=0.3, seed=2)  # default rescale: l1
    assert torch.equal(l1 != 0, kept)
    assert math.isclose(l1.abs().sum().item(), tau.abs().sum().item(), rel_tol=1e-5)
    # dare_ties with one expert: the election and the mix must see the same draws
    one = MERGE_METHODS["dare_ties"]([tau - 1.0], density=0.3, seed=2, normalize=True)
    assert torch.equal(one, MERGE_METHODS["dare_linear"]([tau - 1.0], density=0.3, seed=2))


def test_della_keep_probabilities_rank_rows_and_share_ties():
    rows = t(1, -4, 3, 2, 0.5, -5, 6, 7).view(2, 4)
    p = della_keep_probabilities(rows, 0.5, 0.3)
    # within each row: ranks 0..3 -> 0.2, 0.4, 0.6, 0.8
    assert close(p, t(0.2, 0.8, 0.6, 0.4, 0.2, 0.4, 0.6, 0.8).view(2, 4))
    # ties share their average rank; the mean stays density
    tied = della_keep_probabilities(t(2, -2, 1, 3), 0.5, 0.3)
    assert close(tied, t(0.5, 0.5, 0.2, 0.8).view(1, 4)) and math.isclose(tied.mean().item(), 0.5, rel_tol=1e-6)
    # a slice of a 1-D tensor is ranked against the whole tensor's sorted magnitudes
    whole = torch.randn(20, generator=torch.Generator().manual_seed(3))
    sorted_row = whole.abs().sort().values
    assert close(
        della_keep_probabilities(whole[5:12], 0.5, 0.3, sorted_row), della_keep_probabilities(whole, 0.5, 0.3)[:, 5:12]
    )


def test_della_statistics():
    gen = torch.Generator().manual_seed(4)
    tau = torch.randn(200, 1000, generator=gen)
    out = MERGE_METHODS["della_linear"]([tau], density=0.5, epsilon=0.2, rescale="none", seed=5)
    kept = out != 0
    assert abs(kept.float().mean().item() - 0.5) < 0.01
    rank = tau.abs().argsort(dim=1).argsort(dim=1)  # no ties in randn
    top, bottom = kept[rank >= 900].float().mean().item(), kept[rank < 100].float().mean().item()
    assert 0.66 < top < 0.71 and 0.29 < bottom < 0.34  # probabilities 0.682..0.7 and 0.3..0.318
    inverse = MERGE_METHODS["della_linear"]([tau.abs()], density=0.5, epsilon=0.2, rescale="inverse_probability")
    assert abs(inverse.mean().item() / tau.abs().mean().item() - 1) < 0.02
    l1 = MERGE_METHODS["della"]([tau], density=0.5, epsilon=0.2)
    assert math.isclose(l1.abs().sum().item(), tau.abs().sum().item(), rel_tol=1e-5)


# --- the other methods: worked examples -------------------------------------------------------------------


def test_sce_worked_example():
    taus = [t(1, -2, 3, 0), t(3, 2, -1, 0)]
    # mean squares 3.5 and 3.5 -> weights 1/2; Σ = [4,0,2,0] -> s = + everywhere; no agreeing expert on e3
    assert close(MERGE_METHODS["sce"](taus, [5, 1]), t(2, 2, 3, 0))  # the given weights are not used
    # select_topk 0.5: variances [1,4,4,0], 3 nonzero -> keep 1, and e1, e2 tie at the bound: both kept
    assert close(MERGE_METHODS["sce"](taus, select_topk=0.5), t(0, 2, 3, 0))
    # mean squares summing below 1e-6: equal weights (mergekit's rule)
    small = [t(1e-4, 0), t(3e-4, 0)]
    assert close(MERGE_METHODS["sce"](small), t(2e-4, 0), atol=1e-12)


def test_model_stock_worked_example():
    ms = MERGE_METHODS["model_stock"]
    assert close(ms([t(1, 0), t(0, 1)]), t(0, 0))  # orthogonal: t = 0, the base
    assert close(ms([t(1, 0), t(-1, 1e-4)]), t(0, 0))  # opposite: 1 + (K − 1)·c ≈ 0 -> t = 0 (mergekit's guard)
    c = 1 / math.sqrt(2)
    ratio = 2 * c / (1 + c)
    assert close(ms([t(1, 1), t(1, 0)]), ratio * t(1, 0.5))
    a, b, d = t(1, 2, 0), t(2, 0, 1), t(0, 1, 1)  # three experts: the mean of the three pairwise cosines
    cos = lambda x, y: (x @ y / (x.norm() * y.norm())).item()  # noqa: E731
    mean_cos = (cos(a, b) + cos(a, d) + cos(b, d)) / 3
    assert close(ms([a, b, d], [9, 1, 1]), 3 * mean_cos / (1 + 2 * mean_cos) * (a + b + d) / 3)
    rows = ms([t(1, 0, 1, 1).view(2, 2), t(0, 1, 1, 0).view(2, 2)], filter_wise=True)
    assert close(rows, torch.stack([t(0, 0), ratio * t(1, 0.5)]))


def test_slerp_and_nuslerp_worked_examples():
    slerp, nuslerp = MERGE_METHODS["slerp"], MERGE_METHODS["nuslerp"]
    e0, e1 = t(1, 0), t(0, 1)
    assert close(slerp([e0, e1], t=0.5), t(c := 1 / math.sqrt(2), c))
    assert close(slerp([e0, e1], t=1 / 3), t(math.cos(math.pi / 6), 0.5))
    assert close(slerp([2 * e0, e1], t=0.5), t(2 * c, c))  # sin(θ/2)/sin θ on the raw tensors
    assert close(slerp([t(1, 2), t(2, 4)], t=0.25), t(1.25, 2.5))  # colinear: linear
    assert close(slerp([e0, e1], [7, 1], t=0.0), e0)  # weights unused; t = 0 is the first expert
    s, c8 = math.sin(math.pi / 8), math.cos(math.pi / 8)
    assert close(nuslerp([e0, e1], [1, 3]), t(s, c8))  # t = 3/4
    assert close(nuslerp([e0, e1], [1, -1]), t(c, c))  # weights summing to 0: t = 1/2
    v0, v1 = t(1, 0, 0, 1).view(2, 2), t(0, 1, 0, 1).view(2, 2)
    assert close(nuslerp([v0, v1], [1, 3], flatten=False), torch.stack([t(s, c8), t(0, 1)]))  # per row
    # row_wise: the vectors along dim 0 (columns): [1,0] vs [0,0] (zero norm: θ = π/2), [0,1] vs [1,1] (θ = π/4)
    q = math.pi / 4
    k0, k1 = math.sin(0.25 * q) / math.sin(q), math.sin(0.75 * q) / math.sin(q)
    want = torch.stack([t(s, k1), t(0, k0 + k1)])
    assert close(nuslerp([v0, v1], [1, 3], flatten=False, row_wise=True), want)


def test_karcher_worked_example():
    karcher = MERGE_METHODS["karcher"]
    e0, e1 = t(1, 0), t(0, 1)
    c = 1 / math.sqrt(2)
    assert close(karcher([e0, e1]), t(c, c))
    assert close(karcher([2 * e0, 4 * e1]), 3 * t(c, c))  # the mean norm times the mean direction
    # weights 1:3 put the mean 3/4 of the way along the arc (normalised weights; mergekit weighs equally)
    assert close(karcher([e0, e1], [1, 3]), t(math.cos(3 * math.pi / 8), math.sin(3 * math.pi / 8)), atol=1e-5)
    assert close(karcher([t(3, 4)]), t(3, 4)) and close(karcher([t(0, 0), t(0, 0)]), t(0, 0))


def test_rht_worked_example_unchanged():
    # ρ = 0.5: τ̂1 = [8,0,0,-6], τ̂2 = [6,0,-10,0], τ̂3 = [0,0,-8,-4]; Σ = [14,0,-18,-10]; w̃ = [.25,.25,.5]
    taus = [t(4, -1, 2, -3), t(3, 1, -5, 0.5), t(1, 0.5, -4, -2)]
    assert close(MERGE_METHODS["rht"](taus, [1, 1, 2], density=0.5), t(1.75, 0, -3.25, -1.75))


# --- edge rules ------------------------------------------------------------------------------------------


def test_keep_one_rule():
    tau = t(0.5, -3.0, 1.0)  # density 0.2: ⌊0.6⌋ = 0 entries
    for name in ["ties", "magnitude_prune"]:  # mergekit's magnitude trim keeps one
        assert close(MERGE_METHODS[name]([tau], density=0.2), t(0, -3, 0)), name
    for name in ["rht", "breadcrumbs", "breadcrumbs_ties"]:  # the authors' count, mergekit's breadcrumbs: none
        assert close(MERGE_METHODS[name]([tau], density=0.2), t(0, 0, 0)), name
    # sce's selection keeps none either (as mergekit): ⌊0.4·2⌋ = 0 of the 2 entries of nonzero variance
    assert close(MERGE_METHODS["sce"]([t(1, 2, 0), t(3, -1, 0)], select_topk=0.4), t(0, 0, 0))
    assert top_magnitude_trim(tau, 0.2).lower == 3.0 and top_magnitude_trim(tau, 0.2, keep_one=False).lower == math.inf


def test_tie_rule_keeps_every_entry_tied_with_the_last_kept():
    # density 0.5 keeps 2 of 4, but |-2| = |2| tie at the bound: both kept
    tau = t(3, -2, 2, 1)
    assert close(MERGE_METHODS["ties"]([tau], density=0.5), t(3, -2, 2, 0))
    assert close(MERGE_METHODS["magnitude_prune"]([tau], density=0.5), t(3, -2, 2, 0))
    assert close(MERGE_METHODS["rht"]([tau], density=0.5), t(6, -4, 4, 0))
    # breadcrumbs (density 0.5, gamma 0.1 of 10): a tie at the lower bound keeps both 4s ...
    low = t(1, 2, 3, 4, -4, 5, 6, 7, 8, 10)
    assert breadcrumbs_trim(low, 0.5, 0.1)[:2] == (4.0, 8.0)
    assert close(MERGE_METHODS["breadcrumbs"]([low], density=0.5, gamma=0.1), t(0, 0, 0, 4, -4, 5, 6, 7, 8, 0))
    # ... and the outlier tied with the largest kept entry stays
    high = t(1, 2, 3, 4, 5, 6, 7, 8, 9, -9)
    assert close(MERGE_METHODS["breadcrumbs"]([high], density=0.5, gamma=0.1), t(0, 0, 0, 0, 5, 6, 7, 8, 9, -9))


def test_random_methods_reproduce_from_seed_and_tensor_name():
    gen = torch.Generator().manual_seed(6)
    taus = [torch.randn(8, 9, generator=gen) for _ in range(3)]
    for name in RANDOM:
        m = MERGE_METHODS[name]
        first = m(taus, density=0.5, seed=3, tensor_name="a.weight")
        assert torch.equal(first, m(taus, density=0.5, seed=3, tensor_name="a.weight")), name
        assert not torch.equal(first, m(taus, density=0.5, seed=3, tensor_name="b.weight")), name
        assert not torch.equal(first, m(taus, density=0.5, seed=4, tensor_name="a.weight")), name
        # what the engine does: fn with the generator of (seed, name)
        ctx = MergeContext("a.weight", tensor_generator(3, "a.weight"), m.expert_stats(taus, m.validate_params({})))
        direct = m.fn(taus, m.resolve_weights(None, 3), m.validate_params({"density": 0.5}), ctx)
        assert torch.equal(first, direct), name


DETERMINISTIC_ELEMENTWISE = [
    "linear",
    "task_arithmetic",
    "ties",
    "magnitude_prune",
    "breadcrumbs",
    "breadcrumbs_ties",
    "rht",
]


@pytest.mark.parametrize("name", DETERMINISTIC_ELEMENTWISE)
@pytest.mark.parametrize("shape", [(13, 7), (40,)], ids=["2d", "1d"])
def test_row_slices_with_whole_tensor_stats_equal_the_whole_merge(name, shape):
    m = MERGE_METHODS[name]
    assert m.elementwise
    gen = torch.Generator().manual_seed(7)
    taus = [torch.randn(*shape, generator=gen) * (i + 1) for i in range(3)]
    raw = {"density": 0.4} if "density" in m.params.model_fields else {}
    if name in ("magnitude_prune", "breadcrumbs"):
        raw["rescale"] = True
    if name == "breadcrumbs" or name == "breadcrumbs_ties":
        raw["gamma"] = 0.1
    params, weights = m.validate_params(raw), m.resolve_weights([1.0, -0.5, 2.0], 3)
    whole = m(taus, [1.0, -0.5, 2.0], **raw)
    stats = m.expert_stats(taus, params)
    pieces = []
    for start in range(0, shape[0], 4):
        ctx = MergeContext("w", tensor_generator(0, "w"), stats)
        pieces.append(m.fn([x[start : start + 4] for x in taus], weights, params, ctx))
    assert torch.equal(torch.cat(pieces), whole)
    if m.stats is not None:  # the slice alone would trim differently: fn must use ctx.stats
        alone = m.fn([x[:4] for x in taus], weights, params, MergeContext("w", tensor_generator(0, "w")))
        assert not torch.equal(alone, whole[:4])


def test_della_rows_are_ranked_alone():
    # della on row slices draws in a different order, but each row's keep probabilities are the whole's
    tau = torch.randn(6, 10, generator=torch.Generator().manual_seed(8))
    whole = della_keep_probabilities(tau, 0.5, 0.2)
    assert torch.equal(torch.cat([della_keep_probabilities(tau[i : i + 2], 0.5, 0.2) for i in (0, 2, 4)]), whole)


def test_inputs_are_never_modified():
    gen = torch.Generator().manual_seed(9)
    for name in NAMES:
        m = MERGE_METHODS[name]
        k = m.n_experts or 3
        taus = [torch.randn(5, 4, generator=gen) for _ in range(k)]
        copies = [x.clone() for x in taus]
        raw = {"density": 0.5} if "density" in m.params.model_fields else {}
        out = m(taus, [1.0 + i for i in range(k)], **raw)
        assert out.shape == (5, 4) and torch.isfinite(out).all(), name
        assert all(torch.equal(a, b) for a, b in zip(taus, copies, strict=True)), name


# --- bad inputs ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["slerp", "nuslerp"])
def test_two_expert_methods_refuse_another_count(name):
    with pytest.raises(BadInput, match=f"^merge method '{name}' takes exactly 2 experts, got 3$"):
        MERGE_METHODS[name]([torch.ones(2)] * 3)
    with pytest.raises(BadInput, match=f"^merge method '{name}' takes exactly 2 experts, got 3$"):
        MERGE_METHODS[name].resolve_weights([1, 1, 1], 3)
    with pytest.raises(BadInput, match="^merge method 'model_stock' takes at least 2 experts, got 1$"):
        MERGE_METHODS["model_stock"]([torch.ones(2)])


@pytest.mark.parametrize("name", DENSITY_METHODS)
@pytest.mark.parametrize("density", [0, 1.5, -0.1])
def test_density_outside_zero_one(name, density):
    with pytest.raises(BadInput, match=f"^merge method '{name}': parameter 'density': Input should be"):
        MERGE_METHODS[name].validate_params({"density": density})


def test_parameter_errors():
    assert len(DENSITY_METHODS) == 9
    with pytest.raises(BadInput, match=r"^merge method 'dare_ties': unknown parameter 'lambda' \(known: density,"):
        MERGE_METHODS["dare_ties"].validate_params({"lambda": 1.0})
    with pytest.raises(BadInput, match=r"^merge method 'della': density ± epsilon must lie inside \(0, 1\)"):
        MERGE_METHODS["della"].validate_params({"density": 0.9, "epsilon": 0.15})
    MERGE_METHODS["della"].validate_params({"density": 1.0, "epsilon": 0.15})  # no pruning: no constraint
    with pytest.raises(BadInput, match="^merge method 'dare_linear': parameter 'rescale': Input should be 'l1'"):
        MERGE_METHODS["dare_linear"].validate_params({"rescale": True})
    with pytest.raises(BadInput, match="^merge method 'slerp': parameter 't': Input should be less than or equal to 1"):
        MERGE_METHODS["slerp"].validate_params({"t": 1.5})
    with pytest.raises(
        BadInput, match="^merge method 'karcher': parameter 'max_iter': Input should be a valid integer"
    ):
        MERGE_METHODS["karcher"].validate_params({"max_iter": 2.5})
