"""The Scaling section of the report: merges of k experts (a merge's `subsets:` sweep), their scores and
theory quantities per method and k, the fitted saturating curve and k* (`report/scaling.py` computes them),
and its plots. Pure functions of the records, like every other section.

A series is one merge entry of the spec (its `sweep_of`), with any other swept values it has
(`ties[density=0.5]`); its points are that entry's merges, by k and subset. A merge's score is the
report's headline score (`records.headline`: the widest group's aggregate, else the average over tasks).
"""

from __future__ import annotations

import math
from pathlib import Path

from pefteval_harness.report import scaling
from pefteval_harness.report.records import Record, entry_label, headline

SCALING_PLOT = "scaling.png"
THEORY_PLOTS = ("gaussian_width_normalised", "sign_conflict_rate", "coverage_merged", "kurtosis_merged")
# (record metric, column header, format): the theory quantities the tables and plot show (docs/scaling.md)
THEORY_COLUMNS = [
    ("gaussian_width_normalised", "Gaussian width / mean ‖τ‖", "{:.3f}"),
    ("sign_conflict_rate", "sign conflicts", "{:.3f}"),
    ("coverage_merged", "coverage", "{:.3f}"),
    ("kurtosis_experts", "kurtosis τ", "{:.2f}"),
    ("kurtosis_rht", "kurtosis τ̂ (RHT)", "{:.2f}"),
    ("kurtosis_merged", "kurtosis merged", "{:.2f}"),
    ("cosine_mean", "mean cosine", "{:.3f}"),
]


def _series(record: Record) -> str | None:
    """The scaling series a record's model belongs to, or None if it is not a merge of a `subsets:` sweep."""
    if record.sweep_of is None or "k" not in record.sweep or "subset" not in record.sweep:
        return None
    others = [
        f"{path.rsplit('.', 1)[-1]}={value}" for path, value in record.sweep.items() if path not in ("k", "subset")
    ]
    return f"{record.sweep_of}[{','.join(others)}]" if others else record.sweep_of


def _points(records: list[Record]) -> dict[str, tuple[str, int, int]]:
    """model -> (series, k, subset) for every merged model of a scaling sweep."""
    points = {}
    for r in records:
        series = _series(r)
        if series is not None and r.model not in points:
            points[r.model] = (series, int(r.sweep["k"]), int(r.sweep["subset"]))
    return points


def analyse(records: list[Record]) -> tuple[str, dict[str, scaling.MethodScaling]]:
    """What the score is, and per series its table, fit, k* and marginal gains."""
    points = _points(records)
    if not points:
        return "", {}
    what, scores = headline(records)  # keyed by entry: a model, or a model under a prompting strategy
    models = {r.entry: (r.model, r.strategy) for r in records if r.record == "score"}
    rows = []
    for entry, score in scores.items():
        model, strategy = models.get(entry, (entry, None))
        if model in points:
            series, k, subset = points[model]
            rows.append((entry_label(series, strategy), k, subset, score))
    return what, scaling.analyse(rows) if rows else {}


def theory_means(records: list[Record]) -> dict[tuple[str, int], dict[str, float]]:
    """(series, k) -> theory quantity -> its mean over the subsets."""
    points = _points(records)
    values: dict[tuple[str, int], dict[str, list[float]]] = {}
    for r in records:
        if r.record == "theory" and r.model in points and r.value is not None:
            series, k, _ = points[r.model]
            values.setdefault((series, k), {}).setdefault(r.metric, []).append(r.value)
    return {key: {m: sum(v) / len(v) for m, v in by_metric.items()} for key, by_metric in sorted(values.items())}


def _fmt(value: float | None, pattern: str = "{:.3f}") -> str:
    return "-" if value is None or not math.isfinite(value) else pattern.format(value)


def _fit_text(result: scaling.MethodScaling) -> tuple[str, str, str]:
    """The fitted curve, its R² and k*, as table cells (or why there are none)."""
    fit, k_star = result.fit, result.k_star
    if not fit:
        return f"no fit: {fit.reason}", "-", "-"
    curve = f"{fit.a:.3f} − {fit.b:.3f}·exp(−(k−1)/{fit.c:.2f})"
    star = f"{k_star.k}" + (" (beyond the data)" if k_star.beyond_data else "") if k_star else f"- ({k_star.reason})"
    return curve, f"{fit.r2:.3f}", star


def scaling_section(records: list[Record], table) -> str:
    """Markdown: per series and k the score over subsets and the gain per added expert; per series the fit
    and k*; per series and k the theory quantities. `table` renders rows (leaderboard's `_table`)."""
    what, analysis = analyse(records)
    if not analysis:
        return ""
    text = (
        f"\n## Scaling with the number of merged experts\n\nScore: {what}, per merge of k experts; mean, spread"
        " and range over the seeded subsets of each k (every method merges the same subsets); gain: the change"
        " of the mean per added expert since the previous k. The fit is s(k) = a − b·exp(−(k−1)/c) on the means;"
        f" k* is the smallest k at which one more expert adds less than {scaling.DEFAULT_DELTA:.0%} of the total"
        " fitted gain b (docs/scaling.md).\n\n"
    )
    rows = []
    for series, result in analysis.items():
        gains = {g.k_to: g.per_expert for g in result.gains}
        fit = result.fit
        for k, cell in result.cells.items():
            rows.append([series, str(k), str(cell.n), _fmt(cell.mean), _fmt(cell.std), _fmt(cell.min), _fmt(cell.max),
                         _fmt(gains.get(k), "{:+.3f}"), _fmt(fit.predict(k) if fit else None)])  # fmt: skip
    text += table(rows, ["merge", "k", "subsets", "mean", "std", "min", "max", "gain per expert", "fitted"])
    fits = [[series, *_fit_text(result)] for series, result in analysis.items()]
    text += "\n" + table(fits, ["merge", "fitted curve", "R²", "k*"])
    theory = theory_means(records)
    if theory:
        shown = [c for c in THEORY_COLUMNS if any(c[0] in q for q in theory.values())]
        lines = [[series, str(k), *(_fmt(q.get(metric), fmt) for metric, _, fmt in shown)]
                 for (series, k), q in theory.items()]  # fmt: skip
        text += (
            "\nTheory quantities, computed by each merge job from the task vectors τ_i = expert − base and the merged"
            " tensors (means over the subsets of each k; docs/scaling.md defines them):\n\n"
        )
        text += table(lines, ["merge", "k", *(header for _, header, _ in shown)])
    return text


def write_scaling_plots(records: list[Record], folder: str | Path) -> list[Path]:
    """The scaling curves with their fits and k*, and each plotted theory quantity over k; stale ones removed."""
    from pefteval_harness.report.plots import plot_scaling, plot_theory

    folder = Path(folder)
    what, analysis = analyse(records)
    written = []
    if analysis:
        series, fits, k_stars = scaling.plot_inputs(analysis)
        written.append(plot_scaling(folder / SCALING_PLOT, series, fits, k_stars, ylabel=what))
    theory = theory_means(records)
    headers = {metric: header for metric, header, _ in THEORY_COLUMNS}
    for metric in THEORY_PLOTS:
        values: dict[str, list[tuple[int, float]]] = {}
        for (series, k), q in theory.items():
            if q.get(metric) is not None and math.isfinite(q[metric]):
                values.setdefault(series, []).append((k, q[metric]))
        if values:
            written.append(plot_theory(folder / f"scaling_{metric}.png", values, headers[metric]))
    every = {SCALING_PLOT, *(f"scaling_{metric}.png" for metric in THEORY_PLOTS)}
    for stale in every - {p.name for p in written}:
        (folder / stale).unlink(missing_ok=True)
    return written


def plot_files(records: list[Record]) -> list[tuple[str, str]]:
    """(title, file name) of the plots `write_scaling_plots` draws from these records, for the links."""
    what, analysis = analyse(records)
    files = [("Score vs number of merged experts", SCALING_PLOT)] if analysis else []
    theory = theory_means(records)
    headers = {metric: header for metric, header, _ in THEORY_COLUMNS}
    for metric in THEORY_PLOTS:
        if any(q.get(metric) is not None and math.isfinite(q[metric]) for q in theory.values()):
            files.append((f"{headers[metric]} vs number of merged experts", f"scaling_{metric}.png"))
    return files
