"""Theory quantities (merging/theory.py): chunked equals whole, each quantity against a direct computation on
small tensors, the Gaussian width on cases with a known value, and refusals."""

from __future__ import annotations

import math

import pytest
import torch

from pefteval_harness.errors import BadInput
from pefteval_harness.merging.theory import TheoryAccumulator, trim_threshold


def experts(k: int = 3, seed: int = 0) -> dict[str, list[torch.Tensor]]:
    """K task vectors per tensor: heavy- and light-tailed, with exact zeros, of different scales."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in (("layer.0.weight", (24, 10)), ("layer.0.bias", (24,)), ("layer.1.weight", (7, 13))):
        taus = []
        for i in range(k):
            t = torch.randn(shape, generator=g) * (i + 1)
            if i == 0:
                t = t**3  # heavy tails
            t[torch.rand(shape, generator=g) < 0.2] = 0  # some entries untouched by this expert
            taus.append(t)
        out[name] = taus
    return out


def merged_of(taus: list[torch.Tensor]) -> torch.Tensor:
    """A merge that leaves some entries unchanged: the mean, with small values zeroed."""
    mean = torch.stack(taus).mean(0)
    return torch.where(mean.abs() > 0.3, mean, 0.0)


def observe_whole(acc: TheoryAccumulator, tensors: dict[str, list[torch.Tensor]]) -> dict[str, float]:
    for name, taus in tensors.items():
        acc.observe(name, taus, merged_of(taus))
    return acc.result()


def assert_same(a: dict[str, float], b: dict[str, float], rel: float = 1e-9) -> None:
    assert a.keys() == b.keys()
    for key in a:
        both_nan = math.isnan(a[key]) and math.isnan(b[key])
        assert both_nan or math.isclose(a[key], b[key], rel_tol=rel, abs_tol=1e-12), (key, a[key], b[key])


def test_row_chunks_give_the_whole_tensor_result():
    tensors = experts()
    whole = observe_whole(TheoryAccumulator(seed=3), tensors)
    chunked = TheoryAccumulator(seed=3)
    for name, taus in tensors.items():
        merged = merged_of(taus)
        thresholds = [trim_threshold(t, chunked.density) for t in taus]  # from the whole tensors, as the engine does
        for start in range(0, merged.shape[0], 5):
            chunked(name, [t[start : start + 5] for t in taus], merged[start : start + 5], thresholds=thresholds)
    assert_same(whole, chunked.result())
    assert whole["rht_approximate_tensors"] == 0 and whole["tensors"] == 3


def test_chunks_without_thresholds_are_trimmed_per_chunk_and_counted():
    tensors = experts()
    acc = TheoryAccumulator()
    for name, taus in tensors.items():
        merged = merged_of(taus)
        for start in range(0, merged.shape[0], 5):
            acc.observe(name, [t[start : start + 5] for t in taus], merged[start : start + 5])
    result = acc.result()
    # every tensor has more than 5 rows: all three were chunked without whole-tensor thresholds
    assert result["rht_approximate_tensors"] == 3
    # the other quantities do not depend on the trim
    whole = observe_whole(TheoryAccumulator(), tensors)
    assert_same({k: v for k, v in result.items() if k not in ("kurtosis_rht", "rht_approximate_tensors")},
                {k: v for k, v in whole.items() if k not in ("kurtosis_rht", "rht_approximate_tensors")})  # fmt: skip


def excess_kurtosis(x: torch.Tensor) -> float:
    d = x.double() - x.double().mean()
    return float((d**4).mean() / (d**2).mean() ** 2 - 3)


def test_each_quantity_matches_a_direct_computation():
    tensors = experts(k=4, seed=1)
    result = observe_whole(TheoryAccumulator(density=0.6), tensors)
    # the whole model as K long vectors
    taus = torch.stack([torch.cat([tensors[n][i].reshape(-1) for n in tensors]) for i in range(4)]).double()
    merged = torch.cat([merged_of(t).reshape(-1) for t in tensors.values()]).double()
    entries = taus.shape[1]
    assert result["entries"] == entries and result["experts"] == 4

    conflicts = eligible = 0
    for j in range(entries):
        nonzero = [v for v in taus[:, j].tolist() if v != 0]
        if len(nonzero) >= 2:
            eligible += 1
            conflicts += any(v > 0 for v in nonzero) and any(v < 0 for v in nonzero)
    assert eligible > 0 and 0 < conflicts < eligible
    assert result["sign_conflict_rate"] == pytest.approx(conflicts / eligible)

    assert result["coverage_merged"] == pytest.approx(float((merged != 0).sum()) / entries)
    assert result["coverage_merged"] < 1
    assert result["coverage_experts"] == pytest.approx(float((taus != 0).any(0).sum()) / entries)

    norms = taus.norm(dim=1)
    assert result["norm_experts_mean"] == pytest.approx(float(norms.mean()))
    assert result["norm_merged"] == pytest.approx(float(merged.norm()))
    cosines = [float(taus[i] @ taus[j] / (norms[i] * norms[j])) for i in range(4) for j in range(i + 1, 4)]
    assert result["cosine_mean"] == pytest.approx(sum(cosines) / len(cosines))

    assert result["kurtosis_experts"] == pytest.approx(sum(excess_kurtosis(t) for t in taus) / 4)
    assert result["kurtosis_merged"] == pytest.approx(excess_kurtosis(merged))
    # RHT τ̂: each tensor of each expert trimmed to its own top 60% by magnitude (ties kept), divided by 0.6
    rht = []
    for i in range(4):
        parts = []
        for name in tensors:
            t = tensors[name][i].reshape(-1)
            keep = math.floor(0.6 * t.numel())
            cut = t.abs().sort(descending=True).values[keep - 1]
            parts.append(torch.where(t.abs() >= cut, t / 0.6, 0.0))
        rht.append(torch.cat(parts))
    assert result["kurtosis_rht"] == pytest.approx(sum(excess_kurtosis(t) for t in rht) / 4)
    assert result["kurtosis_experts"] > 1  # expert 0 is heavy-tailed: the check above is not trivially 0 = 0


def test_gaussian_width_matches_sampling_g_over_every_parameter():
    tensors = experts(k=3, seed=2)
    acc = TheoryAccumulator(width_samples=20_000, seed=5)
    result = observe_whole(acc, tensors)
    taus = torch.stack([torch.cat([tensors[n][i].reshape(-1) for n in tensors]) for i in range(3)]).double()
    g = torch.randn(20_000, taus.shape[1], generator=torch.Generator().manual_seed(11), dtype=torch.float64)
    maxima = (g @ taus.T).max(1).values
    direct, direct_se = float(maxima.mean()), float(maxima.std()) / math.sqrt(20_000)
    tolerance = 4 * math.hypot(result["gaussian_width_se"], direct_se)
    assert abs(result["gaussian_width"] - direct) < tolerance
    assert result["gaussian_width_normalised"] == pytest.approx(result["gaussian_width"] / result["norm_experts_mean"])


def test_gaussian_width_of_known_sets():
    tau = torch.randn(50, 8, generator=torch.Generator().manual_seed(0))
    norm = float(tau.double().norm())

    one = TheoryAccumulator(width_samples=20_000)
    one.observe("w", [tau], tau)
    width, se = one.gaussian_width()
    assert abs(width) < 4 * se  # E max over one vector = E <g, τ> = 0

    pair = TheoryAccumulator(width_samples=20_000)
    pair.observe("w", [tau, -tau], torch.zeros_like(tau))
    width, se = pair.gaussian_width()
    assert abs(width - norm * math.sqrt(2 / math.pi)) < 4 * se  # E|<g, τ>| = ||τ||·sqrt(2/π)
    assert pair.result()["gaussian_width_normalised"] == pytest.approx(math.sqrt(2 / math.pi), abs=4 * se / norm)
    assert pair.result()["coverage_merged"] == 0 and pair.result()["sign_conflict_rate"] == 1


def test_width_draws_depend_on_the_seed_only():
    tensors = experts()
    assert_same(observe_whole(TheoryAccumulator(seed=1), tensors), observe_whole(TheoryAccumulator(seed=1), tensors))
    a = observe_whole(TheoryAccumulator(seed=1), tensors)["gaussian_width"]
    b = observe_whole(TheoryAccumulator(seed=2), tensors)["gaussian_width"]
    assert a != b


def test_trim_threshold_keeps_the_top_share_and_ties():
    tau = torch.tensor([0.5, -3.0, 1.0, -1.0, 2.0, 0.0])
    assert trim_threshold(tau, 0.5) == 1.0  # top 3 by magnitude: 3, 2, then 1 (and its tie -1 is kept too)
    assert trim_threshold(tau, 1.0) == 0.0
    assert trim_threshold(tau, 0.1) == math.inf  # ⌊0.6⌋ = 0 entries kept


def test_bad_input_is_refused():
    with pytest.raises(BadInput, match="density"):
        TheoryAccumulator(density=0)
    with pytest.raises(BadInput, match="width_samples"):
        TheoryAccumulator(width_samples=1)
    acc = TheoryAccumulator()
    with pytest.raises(BadInput, match="before any tensor"):
        acc.result()
    with pytest.raises(BadInput, match="shape"):
        acc.observe("a", [torch.ones(3), torch.ones(4)], torch.ones(3))
    acc = TheoryAccumulator()
    acc.observe("a", [torch.ones(3), torch.ones(3)], torch.ones(3))
    with pytest.raises(BadInput, match="3 task vectors"):
        acc.observe("b", [torch.ones(3)] * 3, torch.ones(3))
    with pytest.raises(BadInput, match="thresholds"):
        acc.observe("b", [torch.ones(3)] * 2, torch.ones(3), thresholds=[1.0])
    acc.observe("b", [torch.ones(3)] * 2, torch.ones(3))
    with pytest.raises(BadInput, match="observed again"):
        acc.observe("a", [torch.ones(3)] * 2, torch.ones(3))
