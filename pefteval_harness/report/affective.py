"""The affective sections of the report: affective understanding (AU) and affective generation (AG), fine-tuning
methods × prompting strategies. Pure functions of the records, like every other section.

A task belongs to a section by its config's metadata.affect (score records' `affect`: understanding or
generation) and to a form by metadata.form (`form`: loglikelihood or generative; the two are never averaged
together). Per section and form, a strategy × method table: a row per model (with its fine-tuning method), a
column per prompting strategy (in plan order), each cell the mean over the tasks of each task's primary score.
The tasks averaged are those evaluated under every strategy of the table, so the columns compare like for like
(a task without a training split has no k-shot run: it is left out of every column, and the text says so); a
model that lacks one of them under a strategy (its evaluation failed or did not run) shows "–" and how many it
has, never a mean over fewer. The generative form adds, per strategy, "% parseable": the mean of the tasks'
`parsed` metric (share of answers a label could be read from) ×100, over the same tasks. Then one table per
task with every metric it reports per (model, strategy), and a heat map per section (`affective_au.png`,
`affective_ag.png`): the table's cells, strategies across, models down.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass, field
from pathlib import Path

from pefteval_harness.report.records import PARSE_RATE, Record, comparable

# affect -> (heading, plot file stem)
SECTIONS = {
    "understanding": ("Affective understanding (AU)", "affective_au"),
    "generation": ("Affective generation (AG)", "affective_ag"),
}
FORMS = ("loglikelihood", "generative")
MISSING = "–"
NO_STRATEGY = "as configured"  # the column of evaluations without a prompting strategy: the task's own prompt


def strategy_name(strategy: str | None) -> str:
    return NO_STRATEGY if strategy is None else strategy


@dataclass(frozen=True)
class Cell:
    value: float | None  # the mean over all the table's tasks; None unless every one of them is scored
    scored: int  # how many of them are


@dataclass
class Grid:
    """One strategy × method table: a section's tasks of one form."""

    affect: str
    form: str
    strategies: list[str | None]  # columns, in plan order
    tasks: list[str]  # averaged: evaluated under every strategy
    metrics: list[str]  # their primary metrics
    left_out: dict[str, str]  # task of this form not averaged -> why
    models: dict[str, str]  # rows: model -> its fine-tuning method, in plan order
    scores: dict[tuple[str, str | None], Cell] = field(default_factory=dict)  # (model, strategy) -> cell
    parsed: dict[tuple[str, str | None], Cell] = field(default_factory=dict)  # generative form only
    parsed_tasks: list[str] = field(default_factory=list)  # the averaged tasks that report `parsed`


def section_tasks(records: list[Record], affect: str) -> dict[str, str]:
    """task -> form, for the tasks whose score records say `affect` (sorted by task)."""
    with_parsed = {r.task for r in records if r.record == "score" and r.metric == PARSE_RATE}
    forms: dict[str, str] = {}
    for r in records:
        if r.record == "score" and r.affect == affect and r.task not in forms:
            # a config without metadata.form: a task reporting `parsed` generates (the contract's rule)
            forms[r.task] = r.form or ("generative" if r.task in with_parsed else "loglikelihood")
    return dict(sorted(forms.items()))


def _mean(values: list[float | None]) -> Cell:
    have = [v for v in values if v is not None]
    complete = bool(values) and len(have) == len(values)
    return Cell(sum(have) / len(have) if complete else None, len(have))


def grids(records: list[Record], affect: str) -> list[Grid]:
    """The section's strategy × method tables, one per form that has tasks (FORMS order)."""
    forms = section_tasks(records, affect)
    out = []
    for form in FORMS:
        tasks = [t for t, f in forms.items() if f == form]
        runs = [r for r in records if r.record in ("score", "failure") and r.task in tasks]
        if not runs:
            continue
        strategies = list(dict.fromkeys(r.strategy for r in runs))
        evaluated = {s: {r.task for r in runs if r.strategy == s} for s in strategies}
        averaged = [t for t in tasks if all(t in evaluated[s] for s in strategies)]
        left_out = {
            t: "not evaluated under " + ", ".join(strategy_name(s) for s in strategies if t not in evaluated[s])
            for t in tasks
            if t not in averaged
        }
        primaries = {(r.model, r.strategy, r.task): r for r in runs if r.record == "score" and r.primary}
        by_task = {t: [r for r in primaries.values() if r.task == t] for t in averaged}
        # one metric averages on its own scale; several only if every one is a 0-1 score (EQ-Bench is 0-100)
        if len({r.metric for rows in by_task.values() for r in rows}) > 1:
            for t in averaged:
                if by_task[t] and not comparable(by_task[t]):
                    left_out[t] = f"its primary metric ({by_task[t][0].metric}) is not a 0-1 score"
            averaged = [t for t in averaged if t not in left_out]
        metrics = list(dict.fromkeys(r.metric for t in averaged for r in by_task[t]))
        models: dict[str, str] = {}
        for r in runs:
            models.setdefault(r.model, r.method)
        parsed = {(r.model, r.strategy, r.task, r.filter): r.value for r in runs
                  if r.record == "score" and r.metric == PARSE_RATE}  # fmt: skip
        parsed_tasks = [t for t in averaged if any(key[2] == t for key in parsed)] if form == "generative" else []
        grid = Grid(affect, form, strategies, averaged, metrics, dict(sorted(left_out.items())), models,
                    parsed_tasks=parsed_tasks)  # fmt: skip
        for model in models:
            for s in strategies:
                mine = [primaries.get((model, s, t)) for t in averaged]
                grid.scores[model, s] = _mean([r.value if r else None for r in mine])
                if parsed_tasks:
                    found = {t: primaries.get((model, s, t)) for t in parsed_tasks}
                    # the parse rate under the primary score's filter (a CoT run's "cot")
                    rates = [parsed.get((model, s, t, r.filter)) if r else None for t, r in found.items()]
                    grid.parsed[model, s] = _mean([None if v is None else 100 * v for v in rates])
        out.append(grid)
    return out


def _score(cell: Cell, total: int, pattern: str = "{:.3f}") -> str:
    if cell.value is not None and math.isfinite(cell.value):
        return pattern.format(cell.value)
    return f"{MISSING} ({cell.scored}/{total})" if cell.scored else MISSING


def grid_table(grid: Grid, table) -> str:
    """The markdown of one strategy × method table and the lines that say what it averages."""
    if not grid.tasks:
        text = "No task of this form was evaluated under every strategy: each one's scores are in the tables below.\n"
        return text + _left_out(grid)
    headers = ["model", "method"]
    for s in grid.strategies:
        headers += [strategy_name(s)] + ([f"{strategy_name(s)} % parseable"] if grid.parsed_tasks else [])
    rows = []
    for model, method in grid.models.items():
        cells = [model, method]
        for s in grid.strategies:
            cells.append(_score(grid.scores[model, s], len(grid.tasks)))
            if grid.parsed_tasks:
                cells.append(_score(grid.parsed[model, s], len(grid.parsed_tasks), "{:.1f}"))
        rows.append(cells)
    count = len(grid.tasks)
    text = table(rows, headers) + (
        f"\nCell: the mean over {count} task{'s' * (count > 1)} of each one's primary metric"
        f" ({', '.join(grid.metrics)}): {', '.join(grid.tasks)}.\n"
    )
    if any(c.value is None for c in grid.scores.values()):
        text += f'"{MISSING} (n/N)": only n of the N tasks scored (an evaluation failed or did not run): no mean.\n'
    if grid.parsed_tasks:
        text += (
            f"% parseable: the share of the answers the task could read (its metric `{PARSE_RATE}`), mean over the same"
            " tasks, ×100.\n"
        )
    return text + _left_out(grid)


def _left_out(grid: Grid) -> str:
    if not grid.left_out:
        return ""
    reasons = "; ".join(f"{task} ({why})" for task, why in grid.left_out.items())
    return f"Not in the means (see its own table below): {reasons}.\n"


def task_table(records: list[Record], task: str, table) -> str:
    """Every metric the task reports, per (model, strategy): `parsed` as "% parseable"; failures said."""
    runs = [r for r in records if r.record in ("score", "failure") and r.task == task]
    scores = [r for r in runs if r.record == "score"]
    primary = next((r.metric for r in scores if r.primary), None)
    metrics = list(dict.fromkeys(r.metric for r in scores if r.metric != PARSE_RATE))
    has_parsed = any(r.metric == PARSE_RATE for r in scores)
    entries: dict[tuple[str, str | None], list[Record]] = {}
    for r in runs:
        entries.setdefault((r.model, r.strategy), []).append(r)
    lines = []
    for (model, strategy), mine in entries.items():
        values = [r for r in mine if r.record == "score"]
        main = next((r for r in values if r.primary), values[0] if values else None)
        filt = main.filter if main else None
        value = {r.metric: r.value for r in values if r.filter == filt}
        failed = not values
        cells = [MISSING if failed or value.get(m) is None else f"{value[m]:.3f}" for m in metrics]
        if failed and metrics:
            cells[metrics.index(primary) if primary in metrics else 0] = "FAILED"
        if has_parsed:
            rate = value.get(PARSE_RATE)
            cells.append(MISSING if rate is None else f"{100 * rate:.1f}")
        lines.append([model, mine[0].method, strategy_name(strategy), filt or MISSING, *cells])
    headers = ["model", "method", "strategy", "filter", *metrics] + (["% parseable"] if has_parsed else [])
    if all(line[3] in ("none", MISSING) for line in lines):  # one filter everywhere: no column
        headers.pop(3)
        for line in lines:
            line.pop(3)
    heading = f"\n#### {task}\n\n" + (f"Primary metric: {primary}.\n\n" if primary else "")
    return heading + table(lines, headers)


def affective_sections(records: list[Record], table) -> str:
    """Markdown: for AU then AG (each only when its tasks have score records), the strategy × method table of
    each form, then a table per task. `table` renders rows (leaderboard's `_table`)."""
    text = ""
    for affect, (heading, _) in SECTIONS.items():
        tasks = section_tasks(records, affect)
        if not tasks:
            continue
        text += (
            f"\n## {heading}\n\nTasks whose config's metadata says `affect: {affect}`; a row per model with its"
            " fine-tuning method, a column per prompting strategy."
        )
        tables = grids(records, affect)
        if len(tables) > 1:
            text += " Loglikelihood (multiple-choice) and generative forms are tabled apart: strategies compare like"
            text += " for like within a form."
        text += "\n"
        for grid in tables:
            text += f"\n### Strategy × method: {grid.form} form\n\n" + grid_table(grid, table)
        text += "\n### Per task\n"
        text += "".join(task_table(records, task, table) for task in tasks)
    return text


# --- heat maps ---------------------------------------------------------------------------------------------


def heat_map(records: list[Record], affect: str) -> tuple[list[str], list[str], list[list[float | None]]] | None:
    """(column labels, row labels, values by row) of the section's strategy × method tables side by side;
    None when the section has no averaged task."""
    shown = [g for g in grids(records, affect) if g.tasks]
    if not shown:
        return None
    columns = [(g, s) for g in shown for s in g.strategies]
    several = len(shown) > 1
    xs = [strategy_name(s) + (f"\n({g.form})" if several else "") for g, s in columns]
    models: dict[str, str] = {}
    for g in shown:
        for model, method in g.models.items():
            models.setdefault(model, method)
    ys = [f"{model} ({method})" for model, method in models.items()]
    empty = Cell(None, 0)
    values = [[g.scores.get((model, s), empty).value for g, s in columns] for model in models]
    return xs, ys, values


def draw_heat_map(title: str, xs: list[str], ys: list[str], values: list[list[float | None]]) -> bytes:
    """A PNG: one cell per (row, column), coloured by its value and with the value written in it ("–" if none).
    Same values, same bytes (Agg canvas, no timestamp)."""
    import numpy as np
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    grid = np.array([[math.nan if v is None else v for v in row] for row in values], dtype=float)
    finite = grid[np.isfinite(grid)]
    low, high = (0.0, 1.0) if finite.size == 0 or (finite.min() >= 0 and finite.max() <= 1) else (
        float(finite.min()), float(finite.max()))  # fmt: skip
    if high <= low:
        high = low + 1
    width = 3.0 + max(len(y) for y in ys) * 0.07 + 1.1 * len(xs)
    figure = Figure(figsize=(max(5.0, width), 1.6 + 0.45 * len(ys)), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    palette = colormaps["viridis"].with_extremes(bad="#dddddd")
    image = axes.imshow(np.ma.masked_invalid(grid), cmap=palette, vmin=low, vmax=high, aspect="auto")
    for i, row in enumerate(values):
        for j, value in enumerate(row):
            dark = value is not None and (value - low) / (high - low) < 0.6
            text = MISSING if value is None else f"{value:.3f}"
            axes.text(j, i, text, ha="center", va="center", fontsize="small", color="white" if dark else "black")
    axes.set_xticks(range(len(xs)), xs, fontsize="small")
    axes.set_yticks(range(len(ys)), ys, fontsize="small")
    axes.set_xlabel("prompting strategy")
    axes.set_ylabel("model (method)")
    axes.set_title(title)
    figure.colorbar(image, ax=axes, label="mean of the tasks' primary scores")
    figure.tight_layout()
    out = io.BytesIO()
    figure.savefig(out, format="png", metadata={"Software": None})
    return out.getvalue()


def plot_files(records: list[Record]) -> list[tuple[str, str]]:
    """(title, file name) of the heat maps `write_affective_plots` draws from these records, for the links."""
    return [
        (f"{heading}: mean primary score by strategy and model", f"{stem}.png")
        for affect, (heading, stem) in SECTIONS.items()
        if heat_map(records, affect) is not None
    ]


def write_affective_plots(records: list[Record], folder: str | Path) -> list[Path]:
    """Each section's heat map as <folder>/affective_{au,ag}.png; the file of a section without data removed."""
    from pefteval_harness.report.plots import _write_bytes

    folder = Path(folder)
    written = []
    for affect, (heading, stem) in SECTIONS.items():
        path = folder / f"{stem}.png"
        data = heat_map(records, affect)
        if data is None:
            path.unlink(missing_ok=True)
            continue
        folder.mkdir(parents=True, exist_ok=True)
        _write_bytes(path, draw_heat_map(f"{heading}: mean primary score", *data))
        written.append(path)
    return written
