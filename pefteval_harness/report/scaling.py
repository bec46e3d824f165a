"""Scaling curves over the number of merged experts k: pure functions, numbers in and numbers out.

    scaling_table(rows) -> {(method, k): CellStats}     mean, std, n, min, max over the subsets of k experts
    fit_saturating(ks, means) -> SaturatingFit | NoFit  s(k) = a − b·exp(−(k − 1)/c) by least squares
    marginal_gains(ks, means) -> [MarginalGain]         observed gain per added expert between measured ks
    threshold_k(fit, delta=0.05) -> KStar | NoFit       k*: one more expert adds < delta of the total gain
    analyse(rows, delta=0.05) -> {method: MethodScaling} all of the above per method
    plot_inputs(analysis) -> (series, fits, k_stars)     what report.plots.plot_scaling draws

Why this curve: the paper behind the merge12 study argues that the benefit of each extra expert diminishes
along a strictly concave curve that saturates, with a threshold beyond which more experts add nothing
significant. The exponential approach to a ceiling is the simplest three-parameter curve of that shape, with
readable parameters: a the ceiling, b the total gain from k = 1 to infinity, c the scale (in experts) on which
the gain is used up. It is this project's choice, not a form the paper states. docs/scaling.md has the rules.

A `NoFit` stands where a fit or k* cannot be had; it is falsy and says why in `reason`.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass, field
from itertools import pairwise

from pefteval_harness.errors import BadInput

DEFAULT_DELTA = 0.05  # k* threshold: a share of the total fitted gain
C_GRID_POINTS = 400  # log-spaced values of c tried before the golden-section refinement
C_MIN_PER_GAP = 0.1  # c below 0.1 × the smallest step between measured ks: the curve is a step there anyway
C_MAX_PER_SPAN = 1e3  # c above 1000 × (k_max − k_min) is a straight line over the data: no saturation seen


@dataclass(frozen=True)
class NoFit:
    """No fit (or no k*), and why; falsy so that `if fit:` reads naturally."""

    reason: str

    def __bool__(self) -> bool:
        return False


@dataclass(frozen=True)
class CellStats:
    """The scores of one (method, k) over its subsets of experts. std is the sample std (n − 1), 0 for n = 1."""

    mean: float
    std: float
    n: int
    min: float
    max: float


@dataclass(frozen=True)
class SaturatingFit:
    """s(k) = a − b·exp(−(k − 1)/c): s(1) = a − b, s(∞) = a, total gain b > 0, c > 0 in experts."""

    a: float
    b: float
    c: float
    r2: float  # 1 − SS_res/SS_tot on the points fitted
    r2_adjusted: float  # 1 − (1 − R²)(n − 1)/(n − 3): nan for 3 points (an exact fit)
    points: int
    k_range: tuple[int, int]  # the smallest and largest k fitted

    def predict(self, k: float) -> float:
        return self.a - self.b * math.exp(-(k - 1) / self.c)

    def gain(self, k: float) -> float:
        """Fitted gain of going from k to k + 1 experts."""
        return self.predict(k + 1) - self.predict(k)


@dataclass(frozen=True)
class KStar:
    """k*: the smallest k ≥ 1 at which the fitted gain of one more expert, s(k + 1) − s(k), falls below
    delta·b (b = the total fitted gain from k = 1 to infinity)."""

    k: int
    delta: float
    gain_at_k: float  # s(k* + 1) − s(k*)
    total_gain: float  # b
    beyond_data: bool  # k* is past the largest k measured: an extrapolation


@dataclass(frozen=True)
class MarginalGain:
    """Observed change of the mean score from k_from to k_to experts, in total and per added expert."""

    k_from: int
    k_to: int
    gain: float
    per_expert: float


@dataclass(frozen=True)
class MethodScaling:
    method: str
    cells: dict[int, CellStats]  # by k, ascending
    fit: SaturatingFit | NoFit
    k_star: KStar | NoFit
    gains: list[MarginalGain] = field(default_factory=list)


def _number(value: object, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise BadInput(f"{what} must be a finite number, got {value!r}")
    return float(value)


def _count(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise BadInput(f"{what} must be an integer >= 1 (a number of experts), got {value!r}")
    return value


def _subset_key(subset: object) -> Hashable:
    """Lists (JSON has no tuples) become tuples so that a subset can be compared."""
    if isinstance(subset, list | tuple):
        return tuple(_subset_key(s) for s in subset)
    if isinstance(subset, Hashable):
        return subset
    raise BadInput(f"scaling rows: subset {subset!r} is neither a name nor a list of names")


def scaling_table(rows: Iterable[Sequence[object]]) -> dict[tuple[str, int], CellStats]:
    """Rows (method, k, subset, score), one per merged subset of k experts, grouped per (method, k), sorted.

    The same (method, k, subset) twice is refused: it would count one merge twice in the mean."""
    scores: dict[tuple[str, int], list[float]] = {}
    seen: set[tuple[str, int, Hashable]] = set()
    for i, row in enumerate(rows):
        if not isinstance(row, list | tuple) or len(row) != 4:
            raise BadInput(f"scaling rows: row {i} must be (method, k, subset, score), got {row!r}")
        method, k, subset, score = row
        if not isinstance(method, str) or not method:
            raise BadInput(f"scaling rows: row {i}: method must be a non-empty string, got {method!r}")
        k = _count(k, f"scaling rows: row {i}: k")
        score = _number(score, f"scaling rows: row {i}: score")
        key = (method, k, _subset_key(subset))
        if key in seen:
            raise BadInput(f"scaling rows: row {i}: method {method!r}, k={k}, subset {subset!r} appears twice")
        seen.add(key)
        scores.setdefault((method, k), []).append(score)
    table = {}
    for key in sorted(scores):
        values = scores[key]
        n = len(values)
        mean = sum(values) / n
        std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
        table[key] = CellStats(mean, std, n, min(values), max(values))
    return table


def _points(ks: Sequence[object], means: Sequence[object]) -> tuple[list[int], list[float]]:
    if len(ks) != len(means):
        raise BadInput(f"scaling: {len(ks)} values of k but {len(means)} scores")
    return [_count(k, "scaling: k") for k in ks], [_number(m, "scaling: score") for m in means]


def marginal_gains(ks: Sequence[int], means: Sequence[float]) -> list[MarginalGain]:
    """Between each measured k and the next larger one: the change of the mean score, and that change
    divided by the number of experts added (so k = 4 → 8 is comparable with 1 → 2)."""
    ks, means = _points(ks, means)
    if len(set(ks)) != len(ks):
        raise BadInput(f"marginal_gains: one score per k expected, k repeats in {sorted(ks)}")
    ordered = sorted(zip(ks, means, strict=True))
    return [MarginalGain(k0, k1, m1 - m0, (m1 - m0) / (k1 - k0))
            for (k0, m0), (k1, m1) in pairwise(ordered)]  # fmt: skip


def _solve_ab(ks: Sequence[int], ys: Sequence[float], c: float) -> tuple[float, float, float] | None:
    """For a fixed c the curve is linear in (a, b): the least-squares (a, b) and the residual sum of squares;
    None when the design is singular (every exp(−(k − 1)/c) equal, or all ~0)."""
    e = [math.exp(-(k - 1) / c) for k in ks]
    n = len(ks)
    se, see = sum(e), sum(v * v for v in e)
    sy, sey = sum(ys), sum(v * y for v, y in zip(e, ys, strict=True))
    det = n * see - se * se
    if det <= 1e-12 * max(n * see, 1e-300):
        return None
    # y = a − b·e: normal equations for (a, −b)
    a = (see * sy - se * sey) / det
    minus_b = (n * sey - se * sy) / det
    ssr = sum((y - a - minus_b * v) ** 2 for v, y in zip(e, ys, strict=True))
    return a, -minus_b, ssr


def _refine(ssr, left: float, right: float, best_value: float, best_x: float) -> float:
    """Golden-section search for the smallest ssr(x) on [left, right] (smooth in log c around a grid minimum);
    the grid point itself if the search does no better."""
    ratio = (math.sqrt(5) - 1) / 2
    x1, x2 = right - ratio * (right - left), left + ratio * (right - left)
    f1, f2 = ssr(x1), ssr(x2)
    for _ in range(100):
        if f1 <= f2:
            right, x2, f2 = x2, x1, f1
            x1 = right - ratio * (right - left)
            f1 = ssr(x1)
        else:
            left, x1, f1 = x1, x2, f2
            x2 = left + ratio * (right - left)
            f2 = ssr(x2)
    x, value = (x1, f1) if f1 <= f2 else (x2, f2)
    return x if value <= best_value else best_x


def fit_saturating(ks: Sequence[int], means: Sequence[float]) -> SaturatingFit | NoFit:
    """Least-squares fit of s(k) = a − b·exp(−(k − 1)/c) with b > 0, c > 0 (concave, rising to a ceiling).

    For each c, (a, b) has a closed form (the curve is linear in them), so only c is searched: a log-spaced
    grid, then golden-section refinement around the best grid point. A repeated k is allowed (e.g. one point
    per subset). NoFit when: fewer than 3 distinct k; the scores are flat; the best curve falls (b ≤ 0);
    the best c is at the top of its range (a straight line fits better than any saturating curve); or the
    adjusted R² is ≤ 0 (no better than a flat line once 3 parameters are counted: noise). A step
    (all the gain from k = 1 to 2, c at its lower bound) is a fit when k = 1 was measured, NoFit otherwise.
    """
    ks, ys = _points(ks, means)
    distinct = sorted(set(ks))
    if len(distinct) < 3:
        return NoFit(f"needs at least 3 distinct k to fit 3 parameters, got {len(distinct)} ({distinct})")
    mean_y = sum(ys) / len(ys)
    ss_tot = sum((y - mean_y) ** 2 for y in ys)
    scale = max(abs(y) for y in ys) or 1.0
    if ss_tot <= (1e-12 * scale) ** 2 * len(ys):
        return NoFit(f"the scores are flat (all {mean_y:g}): there is no gain to fit")
    span = distinct[-1] - distinct[0]
    gap = min(k1 - k0 for k0, k1 in pairwise(distinct))
    lo, hi = math.log(C_MIN_PER_GAP * gap), math.log(C_MAX_PER_SPAN * span)

    def ssr(log_c: float) -> float:
        solved = _solve_ab(ks, ys, math.exp(log_c))
        return math.inf if solved is None else solved[2]

    grid = [lo + (hi - lo) * i / (C_GRID_POINTS - 1) for i in range(C_GRID_POINTS)]
    values = [ssr(x) for x in grid]
    best = min(range(C_GRID_POINTS), key=lambda i: values[i])
    if math.isinf(values[best]):
        return NoFit("no value of c gives a solvable fit")
    at_top = best == C_GRID_POINTS - 1
    log_c = grid[best] if at_top else _refine(ssr, grid[max(best - 1, 0)], grid[best + 1], values[best], grid[best])
    a, b, residual = _solve_ab(ks, ys, math.exp(log_c))
    if b <= 0:
        return NoFit(f"the scores do not rise with k (best fit falls: b = {b:.4g})")
    r2 = 1 - residual / ss_tot
    n = len(ks)
    r2_adjusted = 1 - (1 - r2) * (n - 1) / (n - 3) if n > 3 else math.nan  # 3 points, 3 parameters: exact
    if r2_adjusted <= 0:
        return NoFit(f"the curve explains no more than a flat line once its 3 parameters are counted "
                     f"(R² = {r2:.3f}, adjusted {r2_adjusted:.3f})")  # fmt: skip
    if at_top:
        return NoFit("no saturation within the measured k: a straight line fits better than any saturating curve")
    if best == 0 and distinct[0] != 1:
        # c at its lower bound without a k = 1 point: b (the gain from k = 1) grows without bound
        return NoFit(f"the scores jump after k={distinct[0]} and are flat after: without k=1 the total gain "
                     "cannot be placed")  # fmt: skip
    return SaturatingFit(a=a, b=b, c=math.exp(log_c), r2=r2, r2_adjusted=r2_adjusted, points=n,
                         k_range=(distinct[0], distinct[-1]))  # fmt: skip


def threshold_k(fit: SaturatingFit | NoFit, delta: float = DEFAULT_DELTA) -> KStar | NoFit:
    """k* = the smallest integer k ≥ 1 with s(k + 1) − s(k) < delta·b.

    With the fitted curve that gain is b·exp(−(k − 1)/c)·(1 − exp(−1/c)), so k* is the smallest k with
    k − 1 > c·ln((1 − exp(−1/c))/delta): closed form, no search."""
    if not (isinstance(delta, int | float) and not isinstance(delta, bool) and 0 < delta < 1):
        raise BadInput(f"threshold_k: delta must be in (0, 1), got {delta!r}")
    if not fit:
        return NoFit(f"no fit: {fit.reason}")
    step = 1 - math.exp(-1 / fit.c)  # share of the remaining gain that one expert adds
    bound = fit.c * math.log(step / delta)
    k = 1 if bound < 0 else math.floor(bound) + 2
    return KStar(k=k, delta=float(delta), gain_at_k=fit.gain(k), total_gain=fit.b, beyond_data=k > fit.k_range[1])


def analyse(rows: Iterable[Sequence[object]], delta: float = DEFAULT_DELTA) -> dict[str, MethodScaling]:
    """Per method: the table, the fit on the per-k means, k* and the observed marginal gains."""
    table = scaling_table(rows)
    out: dict[str, MethodScaling] = {}
    for method in dict.fromkeys(m for m, _ in table):
        cells = {k: stats for (m, k), stats in table.items() if m == method}
        ks, means = list(cells), [c.mean for c in cells.values()]
        fit = fit_saturating(ks, means)
        out[method] = MethodScaling(method, cells, fit, threshold_k(fit, delta), marginal_gains(ks, means))
    return out


def plot_inputs(analysis: dict[str, MethodScaling]):
    """`analyse`'s output as `report.plots.plot_scaling(path, series, fits, k_stars)` takes it."""
    series = {m: [(k, c.mean, c.std) for k, c in s.cells.items()] for m, s in analysis.items()}
    return series, {m: s.fit for m, s in analysis.items()}, {m: s.k_star for m, s in analysis.items()}
