"""Plots of the report: like the tables, pure functions of the records, drawn as PNGs into `plots/`.

    plots(records) -> list[Plot]          what there is data for, in a fixed order (no drawing)
    draw(plot) -> bytes                   one PNG (matplotlib's Agg canvas: no display, no pyplot state)
    write_plots(records, folder)          every plot with data, as <folder>/<name>.png; a plot whose data are
                                          gone has its old file removed, so the folder matches the records

The plots, each written only when its data exist:
  score_vs_trainable_params    per model, the headline score (`records.headline`) against its trainable
                               parameters (log x); one line per method, or per sweep (`sweep_of`). Sweep
                               points trained on a share of the data are left out: the next plot has them
  score_vs_data_fraction       sweep points over train.data_fraction: headline score against the fraction;
                               one line per sweep (and per value of its other swept fields)
  robustness_gap               each model's mean robustness gap (clean minus adversarial), as bars
  subspace_overlap_per_layer   per analysed model, the mean subspace overlap with full fine-tuning of each
                               layer's modules

A model evaluated under several prompting strategies is a point (bar, line) per strategy: "<method> · <strategy>".
The affective sections' heat maps are drawn by `affective.py`.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass, field
from pathlib import Path

from pefteval_harness.report.records import MEAN_GAP, Record, entry_label, headline, number
from pefteval_harness.store import write_atomic_bytes

PLOTS_FOLDER = "plots"
DATA_FRACTION = "train.data_fraction"  # the sweep field of the data-fraction plot
PLOT_NAMES = ("score_vs_trainable_params", "score_vs_data_fraction", "robustness_gap", "subspace_overlap_per_layer")


@dataclass
class Plot:
    name: str  # file stem, one of PLOT_NAMES
    title: str
    xlabel: str
    ylabel: str
    series: dict[str, list[tuple[float, float]]] = field(default_factory=dict)  # line label -> points by x
    bars: list[tuple[str, float]] = field(default_factory=list)  # (label, height), in this order
    logx: bool = False
    ylim: tuple[float, float] | None = None
    integer_x: bool = False  # layers

    @property
    def file(self) -> str:
        return f"{self.name}.png"


def _models(records: list[Record]) -> dict[str, Record]:
    """The first record of each model (and strategy: `Record.entry`), for its lineage (method, sweep)."""
    first: dict[str, Record] = {}
    for r in records:
        first.setdefault(r.entry, r)
    return first


def _lines(points: dict[str, list[tuple[float, float]]]) -> dict[str, list[tuple[float, float]]]:
    return {label: sorted(xy) for label, xy in sorted(points.items())}


def _score_vs_params(records: list[Record]) -> Plot | None:
    what, scores = headline(records)
    params: dict[str, float] = {}
    for r in records:
        if r.record == "cost" and r.metric == "trainable_params" and r.value and r.value > 0:
            params.setdefault(r.model, r.value)
    points: dict[str, list[tuple[float, float]]] = {}
    for model, lineage in _models(records).items():  # training costs are the model's, whatever the strategy
        if lineage.model not in params or model not in scores:
            continue
        fraction = number(lineage.sweep.get(DATA_FRACTION, 1.0))
        if fraction is not None and fraction < 1:
            continue
        series = entry_label(lineage.sweep_of or lineage.method, lineage.strategy)
        points.setdefault(series, []).append((params[lineage.model], scores[model]))
    if not points:
        return None
    return Plot("score_vs_trainable_params", "Score vs trainable parameters", "trainable parameters", what,
                series=_lines(points), logx=True)  # fmt: skip


def _sweep_label(lineage: Record) -> str:
    """The sweep's name, and its other swept fields' values: lora, lora[r=4]."""
    others = [f"{key.rsplit('.', 1)[-1]}={value}" for key, value in lineage.sweep.items() if key != DATA_FRACTION]
    label = f"{lineage.sweep_of}[{','.join(others)}]" if others else str(lineage.sweep_of)
    return entry_label(label, lineage.strategy)


def _score_vs_fraction(records: list[Record]) -> Plot | None:
    what, scores = headline(records)
    points: dict[str, list[tuple[float, float]]] = {}
    for model, lineage in _models(records).items():
        fraction = number(lineage.sweep.get(DATA_FRACTION))
        if fraction is not None and model in scores:
            points.setdefault(_sweep_label(lineage), []).append((fraction, scores[model]))
    if not points:
        return None
    return Plot("score_vs_data_fraction", "Score vs share of the training data", "training data fraction", what,
                series=_lines(points))  # fmt: skip


def _robustness_gap(records: list[Record]) -> Plot | None:
    bars = [
        (r.entry, r.value)
        for r in records
        if r.record == "gap" and r.task is None and r.metric == MEAN_GAP and r.value is not None
    ]
    if not bars:
        return None
    tasks = len({r.task for r in records if r.record == "gap" and r.task is not None})
    return Plot("robustness_gap", f"Robustness gap (mean over {tasks} adversarial task{'s' * (tasks > 1)})",
                "model", "clean minus adversarial score", bars=bars)  # fmt: skip


def _overlap_per_layer(records: list[Record]) -> Plot | None:
    values: dict[str, dict[int, list[float]]] = {}
    for r in records:
        if r.record == "analysis" and r.metric == "subspace_overlap" and r.module is not None and r.layer is not None:
            values.setdefault(r.model, {}).setdefault(r.layer, []).append(r.value)
    if not values:
        return None
    points = {model: [(layer, sum(v) / len(v)) for layer, v in layers.items()] for model, layers in values.items()}
    return Plot("subspace_overlap_per_layer", "Subspace overlap of ΔW with full fine-tuning's, per layer", "layer",
                "subspace overlap (mean over the layer's modules)", series=_lines(points), ylim=(0, 1.05),
                integer_x=True)  # fmt: skip


def plots(records: list[Record]) -> list[Plot]:
    """The plots the records have data for, in PLOT_NAMES order."""
    found = (_score_vs_params(records), _score_vs_fraction(records), _robustness_gap(records),
             _overlap_per_layer(records))  # fmt: skip
    return [p for p in found if p is not None]


def draw(plot: Plot) -> bytes:
    """The plot as PNG bytes; the same records give the same bytes (no timestamp, no version in the file)."""
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    # A study has dozens of methods: the legend goes beside the axes, in columns of at most 20 entries,
    # and series are told apart by colour (20 of them) and then by marker.
    columns = math.ceil(len(plot.series) / 20)
    figure = Figure(figsize=(max(6.4, 0.45 * len(plot.bars)) + 2.4 * columns, 4.4), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    if plot.bars:
        labels, heights = zip(*plot.bars, strict=True)
        axes.bar(range(len(heights)), heights, color=["tab:red" if h > 0 else "tab:blue" for h in heights])
        axes.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize="small")
        axes.axhline(0, color="black", linewidth=0.8)
    palette = colormaps["tab20"]
    for i, (label, points) in enumerate(plot.series.items()):
        xs, ys = zip(*points, strict=True)
        # models at one x (per-task experts of one method) are not a curve: markers only
        style = {"color": palette(i % 20), "marker": "os^Dv"[i // 20 % 5]}
        axes.plot(xs, ys, linestyle="-" if len(set(xs)) > 1 else "none", label=label, **style)
    if plot.logx:
        axes.set_xscale("log")
    if plot.ylim is not None:
        axes.set_ylim(*plot.ylim)
    if plot.integer_x:
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    if plot.series:
        axes.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1), ncol=columns, frameon=False)
    axes.set_title(plot.title)
    axes.set_xlabel(plot.xlabel)
    axes.set_ylabel(plot.ylabel)
    axes.grid(alpha=0.3)
    figure.tight_layout()
    out = io.BytesIO()
    figure.savefig(out, format="png", metadata={"Software": None})
    return out.getvalue()


def _write_bytes(path: Path, data: bytes) -> None:
    """Readers see the old file or the new one, never a torn one; its mode follows the user's umask."""
    write_atomic_bytes(path, data)


def write_plots(records: list[Record], folder: str | Path) -> list[Path]:
    """Draw every plot the records have data for into `folder`; remove the files of those they have not."""
    folder = Path(folder)
    found = plots(records)
    written = []
    if found:
        folder.mkdir(parents=True, exist_ok=True)
    for plot in found:
        _write_bytes(folder / plot.file, draw(plot))
        written.append(folder / plot.file)
    for name in set(PLOT_NAMES) - {p.name for p in found}:
        (folder / f"{name}.png").unlink(missing_ok=True)
    return written


# Scaling over the number of merged experts (report/scaling.py computes what these draw). Called directly with
# numbers, not from the records: the merge sweep's rows are not store records.


def _scaling_figure(series_count: int):
    """A figure and axes in `draw`'s style: legend beside the axes, columns of at most 20 entries."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    columns = max(1, math.ceil(series_count / 20))
    figure = Figure(figsize=(6.4 + 2.4 * columns, 4.4), dpi=100)
    FigureCanvasAgg(figure)
    return figure, figure.add_subplot(), columns


def _finish(figure, axes, columns: int, title: str, xlabel: str, ylabel: str, path: str | Path) -> Path:
    from matplotlib.ticker import MaxNLocator

    axes.xaxis.set_major_locator(MaxNLocator(integer=True))  # k counts experts
    axes.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1), ncol=columns, frameon=False)
    axes.set_title(title)
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    axes.grid(alpha=0.3)
    figure.tight_layout()
    out = io.BytesIO()
    figure.savefig(out, format="png", metadata={"Software": None})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_bytes(path, out.getvalue())
    return path


def _points_by_k(label: str, points) -> tuple[list[float], list[float], list[float]]:
    """(k, y) or (k, y, std) tuples, sorted by k, non-finite y left out; std 0 when not given."""
    from pefteval_harness.errors import BadInput

    rows = []
    for p in points:
        if len(p) not in (2, 3):
            raise BadInput(f"plot: series {label!r}: a point is (k, value) or (k, mean, std), got {p!r}")
        if p[1] is not None and math.isfinite(p[1]):
            rows.append((float(p[0]), float(p[1]), float(p[2]) if len(p) == 3 and p[2] is not None else 0.0))
    rows.sort()
    return [r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows]


def plot_scaling(path: str | Path, series, fits=None, k_stars=None,
                 title: str = "Score vs number of merged experts", ylabel: str = "score") -> Path:  # fmt: skip
    """Per method, mean ± std of the score over k (points with error bars), its fitted saturating curve
    (dashed, same colour; extended to k* when k* lies within twice the largest k measured) and k* (a star on
    the curve and a dotted vertical line). Written atomically to `path` as PNG; returns the path.

    series: {method: [(k, mean, std), ...]}; fits: {method: SaturatingFit | NoFit | None};
    k_stars: {method: KStar | NoFit | None} (report/scaling.py). A method without a fit is drawn without a curve
    and says "no fit" in the legend."""
    from matplotlib import colormaps

    from pefteval_harness.errors import BadInput

    if not series:
        raise BadInput(f"plot_scaling: no series to draw into {path}")
    fits, k_stars = fits or {}, k_stars or {}
    figure, axes, columns = _scaling_figure(len(series))
    palette = colormaps["tab20"]
    for i, (method, points) in enumerate(series.items()):
        ks, means, stds = _points_by_k(method, points)
        colour = palette(i % 20)
        fit, k_star = fits.get(method), k_stars.get(method)
        label = method if fit else f"{method} (no fit)"
        if fit and k_star:
            label += f", k*={k_star.k}"
        axes.errorbar(ks, means, yerr=stds, color=colour, marker="os^Dv"[i // 20 % 5], linestyle="none",
                      capsize=3, label=label)  # fmt: skip
        if not fit or not ks:
            continue
        end = max(ks)
        if k_star and k_star.k <= 2 * max(ks):
            end = max(end, k_star.k)
        steps = 200
        xs = [min(ks) + (end - min(ks)) * j / steps for j in range(steps + 1)]
        axes.plot(xs, [fit.predict(x) for x in xs], color=colour, linestyle="--", linewidth=1)
        if k_star and k_star.k <= end:
            axes.axvline(k_star.k, color=colour, linestyle=":", linewidth=1)
            axes.plot([k_star.k], [fit.predict(k_star.k)], color=colour, marker="*", markersize=12, linestyle="none")
    return _finish(figure, axes, columns, title, "number of merged experts k", ylabel, path)


def plot_theory(path: str | Path, values, quantity: str, title: str | None = None) -> Path:
    """One theory quantity (merging/theory.py's result keys, e.g. gaussian_width_normalised) against k, a
    line per method: values {method: [(k, value) or (k, mean, std), ...]}. PNG at `path`; returns the path."""
    from matplotlib import colormaps

    from pefteval_harness.errors import BadInput

    if not values:
        raise BadInput(f"plot_theory: no series to draw into {path}")
    figure, axes, columns = _scaling_figure(len(values))
    palette = colormaps["tab20"]
    for i, (method, points) in enumerate(values.items()):
        ks, ys, stds = _points_by_k(method, points)
        axes.errorbar(ks, ys, yerr=stds if any(stds) else None, color=palette(i % 20),
                      marker="os^Dv"[i // 20 % 5], capsize=3, label=method)  # fmt: skip
    return _finish(figure, axes, columns, title or f"{quantity} vs number of merged experts",
                   "number of merged experts k", quantity, path)  # fmt: skip
