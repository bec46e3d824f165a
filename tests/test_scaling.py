"""Scaling over the number of merged experts (report/scaling.py) and its plots: the table by hand, the fit
recovering known curves, the k* rule against a brute-force search, degenerate inputs, PNGs written."""

from __future__ import annotations

import math
import random

import pytest

from pefteval_harness.errors import BadInput
from pefteval_harness.report.plots import plot_scaling, plot_theory
from pefteval_harness.report.scaling import (
    CellStats,
    KStar,
    NoFit,
    SaturatingFit,
    analyse,
    fit_saturating,
    marginal_gains,
    plot_inputs,
    scaling_table,
    threshold_k,
)

PNG = b"\x89PNG\r\n\x1a\n"


def curve(a: float, b: float, c: float, k: float) -> float:
    return a - b * math.exp(-(k - 1) / c)


def test_table_groups_subsets_per_method_and_k():
    rows = [("ties", 2, ["x", "y"], 0.5), ("ties", 2, ["x", "z"], 0.7), ("ties", 2, ["y", "z"], 0.6),
            ("ties", 1, "x", 0.4), ("rht", 2, ["x", "y"], 0.8)]  # fmt: skip
    table = scaling_table(rows)
    assert list(table) == [("rht", 2), ("ties", 1), ("ties", 2)]
    cell = table[("ties", 2)]
    assert (cell.n, cell.min, cell.max) == (3, 0.5, 0.7)
    assert cell.mean == pytest.approx(0.6)
    assert cell.std == pytest.approx(0.1)  # sample std of 0.5, 0.6, 0.7
    assert table[("ties", 1)] == CellStats(0.4, 0.0, 1, 0.4, 0.4)
    with pytest.raises(BadInput, match="appears twice"):
        scaling_table(rows + [("ties", 2, ("x", "y"), 0.9)])  # the same subset, as a tuple
    with pytest.raises(BadInput, match="k must be an integer"):
        scaling_table([("ties", 0, "x", 0.5)])
    with pytest.raises(BadInput, match="finite"):
        scaling_table([("ties", 1, "x", math.nan)])


@pytest.mark.parametrize("a,b,c", [(0.6, 0.2, 2.0), (55.0, 30.0, 0.7), (0.45, 0.05, 6.0)])
def test_fit_recovers_known_parameters(a, b, c):
    ks = list(range(1, 11))
    fit = fit_saturating(ks, [curve(a, b, c, k) for k in ks])
    assert isinstance(fit, SaturatingFit)
    assert (fit.a, fit.b, fit.c) == pytest.approx((a, b, c), rel=1e-5)
    assert fit.r2 == pytest.approx(1.0) and fit.k_range == (1, 10)


def test_fit_with_noise_and_powers_of_two():
    noise = random.Random(0)
    ks = [1, 2, 4, 8, 16] * 5  # five subsets per k, fitted point by point
    fit = fit_saturating(ks, [curve(0.6, 0.2, 3.0, k) + noise.gauss(0, 0.003) for k in ks])
    assert (fit.a, fit.b, fit.c) == pytest.approx((0.6, 0.2, 3.0), rel=0.1)
    assert 0.95 < fit.r2 < 1 and fit.points == 25


def test_k_star_is_the_first_k_whose_next_expert_adds_less_than_delta():
    fit = fit_saturating(range(1, 11), [curve(0.6, 0.2, 2.0, k) for k in range(1, 11)])
    for delta in (0.01, 0.05, 0.2, 0.5, 0.9):
        k_star = threshold_k(fit, delta)
        brute = next(k for k in range(1, 1000) if fit.predict(k + 1) - fit.predict(k) < delta * fit.b)
        assert k_star.k == brute, delta
    k_star = threshold_k(fit)  # δ = 5%: gain(k) = 0.2·e^{-(k-1)/2}·(1 − e^{-1/2}) < 0.01 first at k = 6
    assert k_star == KStar(k=6, delta=0.05, gain_at_k=pytest.approx(fit.gain(6)), total_gain=fit.b, beyond_data=False)
    slow = fit_saturating([1, 2, 3, 4], [curve(0.6, 0.2, 5.0, k) for k in (1, 2, 3, 4)])
    assert threshold_k(slow).beyond_data
    with pytest.raises(BadInput, match="delta"):
        threshold_k(fit, 1.5)


def test_marginal_gains_per_added_expert():
    gains = marginal_gains([4, 1, 2, 8], [0.55, 0.4, 0.5, 0.57])
    assert [(g.k_from, g.k_to) for g in gains] == [(1, 2), (2, 4), (4, 8)]
    assert [g.gain for g in gains] == pytest.approx([0.1, 0.05, 0.02])
    assert [g.per_expert for g in gains] == pytest.approx([0.1, 0.025, 0.005])
    with pytest.raises(BadInput, match="repeats"):
        marginal_gains([1, 1, 2], [0.1, 0.2, 0.3])


@pytest.mark.parametrize(
    "ks,means,reason",
    [
        ([1, 2, 2, 1], [0.4, 0.5, 0.5, 0.4], "at least 3 distinct k"),
        ([1, 2, 4], [0.5, 0.5, 0.5], "flat"),
        ([1, 2, 3, 4], [0.7, 0.6, 0.55, 0.52], "do not rise"),
        ([1, 2, 3, 4, 5], [0.1, 0.2, 0.3, 0.4, 0.5], "straight line"),
        ([1, 2, 4, 8], [0.1, 0.2, 0.4, 0.8], "straight line"),  # rising ever faster
        ([2, 4, 8], [0.4, 0.6, 0.6], "without k=1"),
        ([1, 2, 3, 4, 5, 6, 7], [0.50, 0.49, 0.51, 0.50, 0.49, 0.51, 0.50], "flat line"),  # noise
    ],
)
def test_degenerate_inputs_give_no_fit_and_why(ks, means, reason):
    fit = fit_saturating(ks, means)
    assert isinstance(fit, NoFit) and not fit
    assert reason in fit.reason
    k_star = threshold_k(fit)
    assert isinstance(k_star, NoFit) and reason in k_star.reason


def test_a_step_after_one_expert_is_a_fit_with_k_star_2():
    fit = fit_saturating([1, 2, 3, 4], [0.4, 0.6, 0.6, 0.6])
    assert fit.b == pytest.approx(0.2, rel=1e-3)
    assert threshold_k(fit).k == 2


def test_analyse_and_plots_write_pngs(tmp_path):
    noise = random.Random(1)
    rows = [(method, k, s, curve(a, b, 2.0, k) + noise.gauss(0, 0.005))
            for method, a, b in (("ties", 0.6, 0.2), ("rht", 0.65, 0.25), ("flat", 0.5, 0.0))
            for k in (1, 2, 3, 4, 6, 8) for s in range(3)]  # fmt: skip
    analysis = analyse(rows)
    assert analysis["ties"].fit and analysis["rht"].fit
    assert analysis["ties"].k_star.k == threshold_k(analysis["ties"].fit).k
    assert len(analysis["ties"].gains) == 5
    assert not analysis["flat"].fit  # noise around a constant

    path = plot_scaling(tmp_path / "plots" / "scaling.png", *plot_inputs(analysis), title="t")
    assert path.read_bytes().startswith(PNG)
    theory = {"ties": [(2, 1.0, 0.1), (4, 1.4, 0.1), (8, 1.7, 0.2)], "rht": [(2, 1.1), (4, 1.5), (8, math.nan)]}
    path = plot_theory(tmp_path / "width.png", theory, "gaussian_width_normalised")
    assert path.read_bytes().startswith(PNG)
    with pytest.raises(BadInput, match="no series"):
        plot_scaling(tmp_path / "empty.png", {}, {}, {})
