"""The leaderboard: read a store (or plain lm-eval results JSONs) into tidy records, render them.

Reading is kept apart from running (the report needs nothing but the files), so a finished store can be
re-reported anywhere, and results of a plain `lm_eval --output_path` run join the same table.

    collect(root) -> Report          the records of a results folder (a path or a store URL: `store.Store`)
    render(report, fmt) -> str       fmt in FORMATS; a pure function of the records
    write_reports(root) -> str       plots/*.png, then leaderboard.md / .csv / .json written atomically into
                                     the store; returns the markdown

json is a list of every record (all `Record` fields); csv is every record, one column per field in
`records.FIELDS` order (lists joined with ";", `sweep` as a JSON object, None empty); markdown is the pivot a
reader wants, in sections that appear only when their records exist: the scores (condensed to group
aggregates when there are many tasks), one table per task family, the affective sections (`affective.py`),
robustness gaps, training costs, weight updates, failures, and links to the plots (`plots.py`). A model
evaluated under several prompting strategies has a row per strategy, "<model> · <strategy>" (`Record.entry`).
"""

from __future__ import annotations

import csv
import functools
import io
import json
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path

from pefteval_harness.errors import BadInput, failure_classes_legend
from pefteval_harness.report import affective, merge_scaling
from pefteval_harness.report.plots import PLOTS_FOLDER, plots, write_plots
from pefteval_harness.report.records import (
    FIELDS,
    MEAN_GAP,
    Model,
    Record,
    aggregate_records,
    analysis_records,
    average_scores,
    cost_records,
    failure_record,
    gap_records,
    group_leaves,
    score_records,
    theory_records,
)
from pefteval_harness.store import DONE, FAILED, PLAN, RUNS, Store

FORMATS = ("markdown", "csv", "json")
# Above this many tasks the first table shows group aggregates, and each family's tasks get their own table.
MAX_TASK_COLUMNS = 10
NO_WEIGHT_UPDATE = "no ΔW (prompt learning)"


@dataclass
class Report:
    records: list[Record] = field(default_factory=list)

    def of(self, kind: str) -> list[Record]:
        return [r for r in self.records if r.record == kind]


# --- reading -------------------------------------------------------------------------------------------


def _kind(job: dict) -> str:
    return (job.get("config") or {}).get("kind", "")


def store_records(store: Store, jobs: list[dict], groups: dict[str, dict]) -> list[Record]:
    """Records of the store's jobs, in the given order: scores and evaluation failures, training costs,
    failures of other jobs. Jobs without a status (not run yet) give nothing. An evaluation's records carry
    its prompting strategy (part of the model's identity in the report)."""
    leaves = {name: list(group.get("tasks") or []) for name, group in groups.items()}
    records: list[Record] = []
    for job in jobs:
        status = store.status(job["id"])
        if status is None or status.get("state") not in (DONE, FAILED):
            continue
        kind, config = _kind(job), job.get("config") or {}
        model = Model.from_lineage(job.get("lineage") or {}, job["label"])
        if kind == "evaluate":
            model = replace(model, strategy=(config.get("strategy") or {}).get("name"))  # named at spec load
            task = config.get("task")
            member_of = [g for g, tasks in leaves.items() if task in tasks]
            result = store.result(job["id"]) if status["state"] == DONE else None
            if status["state"] == FAILED:
                records.append(failure_record(model, job["id"], status, task, member_of))
            elif result is None or not isinstance(result.get("results"), dict):
                missing = {"reason": "done, but its result.json has no lm-eval results", "error_class": "error"}
                records.append(failure_record(model, job["id"], missing, task, member_of))
            else:
                scores = score_records(result, model, job["id"], groups=leaves)
                records += [r for r in scores if r.record == "score"]  # groups: recomputed from the plan
        elif status["state"] == FAILED:
            records.append(failure_record(model, job["id"], status))
        elif kind == "train":
            records += cost_records(model, job["id"], store.result(job["id"]) or {})
        elif kind == "analyze":
            records += analysis_records(model, job["id"], store.result(job["id"]) or {})
        elif kind == "merge":
            records += theory_records(model, job["id"], store.result(job["id"]) or {})
    return records


def _plain_lm_eval_results(store: Store) -> list[tuple[str, dict]]:
    """lm-eval results JSONs in the folder that are not a store's own files (a store's job folders: never
    looked into), by their path below the root."""
    found = []
    for rel in store.find(".json", skip="jobs"):
        if rel in (PLAN, "leaderboard.json") or (rel.startswith(f"{RUNS}/") and rel.endswith(f"/{PLAN}")):
            continue
        try:
            data = store.read_json(rel)
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and isinstance(data.get("results"), dict) and "configs" in data:
            found.append((rel, data))
    return found


def collect(root: str | Path | Store) -> Report:
    """The records of a results folder (a path, a store URL, or a Store): the jobs of its latest plan (in plan
    order; every job folder if it has no plan.json), the plan's group aggregates, then plain lm-eval results
    JSONs found outside jobs/."""
    store = root if isinstance(root, Store) else Store(root)
    if not store.is_folder():
        raise BadInput(f"{store.location()}: no such results folder")
    plan = store.plan()
    if plan is not None:
        jobs, groups = plan.get("jobs") or [], plan.get("groups") or {}
    else:
        jobs, groups = [job for job, _ in store.jobs()], {}
    records = store_records(store, jobs, groups)
    records += aggregate_records(records, groups)
    for rel, result in _plain_lm_eval_results(store):
        args = (result.get("config") or {}).get("model_args")
        label = result.get("model_name") or (json.dumps(args) if isinstance(args, dict) else str(args))
        records += score_records(result, Model(model=label, method="lm-eval"), rel)
    records += gap_records(records)
    # scores first; plan order within a kind
    order = {"score": 0, "aggregate": 1, "gap": 2, "failure": 3, "cost": 4, "analysis": 5, "theory": 6}
    return Report(sorted(records, key=lambda r: order.get(r.record, len(order))))


# --- rendering: pure functions of the records -------------------------------------------------------------


def _cell(value) -> str:
    if value is None:
        return "-"
    return value if isinstance(value, str) else f"{value:.3f}"


def _table(rows: list[list], headers: list[str]) -> str:
    from tabulate import tabulate

    return tabulate(rows, headers=headers, tablefmt="github", disable_numparse=True) + "\n"


def _metric_label(shown: list[Record], every: list[Record]) -> str:
    """The metric of the `shown` records, for a header; with its filter when the task (or group) has that
    metric under several filters (`every`: all its rows); " / " between them if models differ."""
    filters = {(r.metric, r.filter) for r in every}
    pairs = dict.fromkeys((r.metric, r.filter) for r in shown)

    def label(metric, filt):
        several = sum(m == metric for m, _ in filters) > 1
        return f"{metric}, {filt}" if several else metric

    return " / ".join(label(metric, filt) for metric, filt in pairs) or "?"


def scores_table(
    records: list[Record], tasks: list[str] | None = None, groups: list[str] | None = None, average: bool = True
) -> str:
    """One row per model (and strategy): its method, each task's primary metric, each group's aggregate, the average.
    `tasks` / `groups` choose the columns (default: all); the average is over every comparable task."""
    primaries = [r for r in records if r.record == "score" and r.primary]
    aggregates = [r for r in records if r.record == "aggregate" and r.primary]
    failed = {(r.entry, r.task) for r in records if r.record == "failure" and r.task is not None}
    rows = [r for r in records if r.record in ("score", "aggregate") or (r.record == "failure" and r.task)]
    if not rows:
        return ""
    methods: dict[str, str] = {}
    for r in rows:
        methods.setdefault(r.entry, r.method)
    every_task = sorted({r.task for r in primaries} | {task for _, task in failed})
    tasks = every_task if tasks is None else [t for t in every_task if t in tasks]
    groups = sorted({r.group for r in aggregates} if groups is None else groups)
    by_task = {t: [r for r in primaries if r.task == t] for t in every_task}
    by_group = {g: [r for r in aggregates if r.group == g] for g in groups}
    value = {(r.entry, "task", r.task): r.value for r in primaries}
    value |= {(r.entry, "group", r.group): r.value for r in aggregates}
    averaged, means = average_scores(records) if average else ([], {})
    lines = []
    for model, method in methods.items():
        cells = []
        for t in tasks:
            v = value.get((model, "task", t))
            cells.append(_cell("FAILED" if v is None and (model, t) in failed else v))
        cells += [_cell(value.get((model, "group", g))) for g in groups]
        if averaged:
            cells.append(_cell(means.get(model)))
        lines.append([model, method, *cells])
    headers = ["model", "method"]
    every = [r for r in records if r.record in ("score", "aggregate")]
    headers += [f"{t} ({_metric_label(by_task[t], [r for r in every if r.task == t])})" for t in tasks]
    headers += [f"{g} ({_metric_label(by_group[g], [r for r in every if r.group == g])})" for g in groups]
    if averaged:
        metrics = dict.fromkeys(r.metric for t in averaged for r in by_task[t])
        headers.append(f"average ({', '.join(metrics)})")
    text = _table(lines, headers)
    left_out = [t for t in every_task if t not in averaged and by_task[t]]
    if average and left_out:
        note = "The average leaves out tasks whose primary metric is not a score in [0, 1] where higher is better"
        text += f"\n{note}: {', '.join(left_out)}.\n"
    return text


def _families(records: list[Record]) -> dict[str, list[str]]:
    """Groups with scored leaves, less umbrellas (a group each of whose leaves is in a smaller group)."""
    leaves = group_leaves(records)

    def covered(task: str, group: str) -> bool:
        return any(task in other and set(other) < set(leaves[group]) for other in leaves.values())

    return {g: tasks for g, tasks in leaves.items() if not all(covered(t, g) for t in tasks)}


def _condensed(records: list[Record]) -> bool:
    """Too many tasks for one table: the first table shows aggregates and tasks in no family."""
    tasks = {r.task for r in records if r.record in ("score", "failure") and r.task is not None}
    return len(tasks) > MAX_TASK_COLUMNS and bool(_families(records))


def overview(records: list[Record]) -> str:
    if not _condensed(records):
        return scores_table(records)
    in_family = {t for tasks in _families(records).values() for t in tasks}
    everything = {r.task for r in records if r.record in ("score", "failure") and r.task is not None}
    text = scores_table(records, tasks=sorted(everything - in_family))
    note = "Each task family's tasks have their own table below; the average is over all tasks, not only those shown"
    return text + f"\n{note}.\n"


def family_tables(records: list[Record]) -> str:
    """One table per task family (its leaves' primary scores and its aggregate), when the first table
    does not already show them all: many tasks, or families over different tasks."""
    families = _families(records)
    if not (_condensed(records) or len({tuple(tasks) for tasks in families.values()}) > 1):
        return ""
    text = ""
    for group, tasks in families.items():
        mine = [
            r
            for r in records
            if (r.record in ("score", "failure") and r.task in tasks) or (r.record == "aggregate" and r.group == group)
        ]
        aggregated = any(r.record == "aggregate" and r.primary for r in mine)
        text += f"\n## {group}\n\n{len(tasks)} tasks: each one's primary metric"
        text += ", and the group's aggregate.\n\n" if aggregated else ".\n\n"
        text += scores_table(mine, groups=[group] if aggregated else [], average=not aggregated)
    return text


def _signed(value: float | None) -> str:
    return "-" if value is None else f"{value:+.3f}"


def robustness_tables(records: list[Record]) -> str:
    """Clean score, adversarial score and gap per model: a summary per model when there are several
    adversarial tasks, then one row per (adversarial task, model)."""
    gaps = [r for r in records if r.record == "gap"]
    if not gaps:
        return ""
    score = {(r.entry, r.task): r.value for r in records if r.record == "score" and r.primary}
    pairs = [r for r in gaps if r.task is not None]
    text = "\n## Robustness\n\nGap: the clean task's primary score minus the adversarial task's (positive: the"
    text += " perturbation costs the model that much).\n\n"
    if len({r.task for r in pairs}) > 1:
        rows = []
        for mean in (r for r in gaps if r.task is None and r.metric == MEAN_GAP):
            mine = [r for r in pairs if r.entry == mean.entry and r.higher_is_better is not True]
            clean = [score.get((mean.entry, r.clean_partner)) for r in mine]
            adversarial = [score.get((mean.entry, r.task)) for r in mine]
            complete = mean.value is not None
            rows.append([
                mean.entry, mean.method, str(len(mine)),
                _cell(sum(clean) / len(clean) if complete else None),
                _cell(sum(adversarial) / len(adversarial) if complete else None), _signed(mean.value),
            ])  # fmt: skip
        headers = ["model", "method", "adversarial tasks", "clean (mean)", "adversarial (mean)", "gap (mean)"]
        text += _table(rows, headers) + "\n"
    rows = [
        [r.task, r.clean_partner, r.metric or "-", r.entry, r.method, _cell(score.get((r.entry, r.clean_partner))),
         _cell(score.get((r.entry, r.task))), _signed(r.value)]
        for r in sorted(pairs, key=lambda r: r.task)
    ]  # fmt: skip
    text += _table(rows, ["adversarial task", "clean task", "metric", "model", "method", "clean", "adversarial",
                          "gap"])  # fmt: skip
    # a gap missing for want of a score shows as "-" beside it; any other reason is said
    unexplained = [r for r in pairs if r.value is None and None not in (score.get((r.entry, r.clean_partner)),
                                                                        score.get((r.entry, r.task)))]  # fmt: skip
    notes = "".join(f"- no gap for {r.entry} on {r.task}: {r.error}\n" for r in unexplained)
    return text + ("\n" + notes if notes else "")


def _quantity(quantities: dict[str, Record], name: str, fmt) -> str:
    return fmt(quantities[name].value) if name in quantities else "-"


COST_COLUMNS = [  # (header, quantity, format); a column no job has is left out
    ("steps", "steps", lambda v: f"{v:.0f}"),
    ("tokens", "trained_tokens", lambda v: f"{int(v):,}"),
    ("train s", "train_seconds", lambda v: f"{v:.1f}"),
    ("tokens/s", "tokens_per_second", lambda v: f"{v:,.0f}"),
    ("peak RSS MB", "peak_rss_mb", lambda v: f"{v:.0f}"),
    ("peak accelerator MB", "peak_accelerator_mb", lambda v: f"{v:.0f}"),
    ("artifact MB", "artifact_mb", lambda v: f"{v:.2f}"),
    ("examples without answer", "examples_without_answer", lambda v: f"{v:.0f}"),
]


def costs_table(records: list[Record]) -> str:
    costs = [r for r in records if r.record == "cost"]
    if not costs:
        return ""
    jobs: dict[str, dict[str, Record]] = {}
    for r in costs:
        jobs.setdefault(r.job_id, {})[r.metric] = r
    columns = [c for c in COST_COLUMNS if any(c[1] in quantities for quantities in jobs.values())]
    rows = []
    for quantities in jobs.values():
        first = next(iter(quantities.values()))
        get = functools.partial(_quantity, quantities)
        params = get("trainable_params", lambda v: f"{int(v):,}")
        if "trainable_share" in quantities:
            params += f" ({quantities['trainable_share'].value:.1%})"
        rows.append([first.model, first.method, params, *(get(name, fmt) for _, name, fmt in columns)])
    headers = ["model", "method", "trainable params", *(header for header, _, _ in columns)]
    return "\n## Training cost\n\nWall time, throughput and memory depend on the machine.\n\n" + _table(rows, headers)


def analysis_tables(records: list[Record]) -> str:
    """Per model, its weight update's summary over modules; then subspace overlap with the reference
    (full fine-tuning) per layer: the mean over the layer's modules, one column per model."""
    rows = [r for r in records if r.record == "analysis"]
    if not rows:
        return ""
    models: dict[str, dict[str, Record]] = {}
    for r in rows:
        if r.module is None:
            models.setdefault(r.model, {})[r.metric] = r
    lines, notes = [], []
    for model, summary in models.items():
        first = next(iter(summary.values()))
        update = summary.get("weight_update")
        if update is not None and update.note:
            notes.append(f"{model}: {update.note}")
        if update is not None and update.value == 0:
            lines.append([model, first.method, NO_WEIGHT_UPDATE, "-", "-", "-", "-", "-"])
            continue
        counts = [r.n for r in summary.values() if r.n is not None]
        get = functools.partial(_quantity, summary)
        lines.append([
            model, first.method, str(counts[0]) if counts else "-", get("rank", lambda v: f"{v:.1f}"),
            get("effective_rank", lambda v: f"{v:.1f}"), get("frobenius", lambda v: f"{v:.4g}"),
            get("relative_frobenius", lambda v: f"{v:.4g}"), get("subspace_overlap", lambda v: f"{v:.3f}"),
        ])  # fmt: skip
    headers = ["model", "method", "modules", "rank", "effective rank", "Frobenius norm", "relative norm",
               "subspace overlap with FFT"]  # fmt: skip
    text = (
        "\n## Weight updates\n\nΔW = fine-tuned minus base weights, over the modules it changes: rank (singular"
        " values above the analysis' tolerance) and effective rank, means over modules; Frobenius norm of all of"
        " them together, and relative to the base weights' norm; overlap of the top singular subspaces with full"
        " fine-tuning's ΔW, mean over modules (1: the same subspace, 0: orthogonal).\n\n" + _table(lines, headers)
    )
    if notes:
        text += "\n" + "".join(f"- {note}\n" for note in notes)
    overlaps: dict[tuple[int, str], list[float]] = {}
    for r in rows:
        if r.metric == "subspace_overlap" and r.module is not None and r.layer is not None:
            overlaps.setdefault((r.layer, r.model), []).append(r.value)
    if overlaps:
        columns = list(dict.fromkeys(model for _, model in overlaps))
        table = []
        for layer in sorted({layer for layer, _ in overlaps}):
            values = [overlaps.get((layer, model)) for model in columns]
            table.append([str(layer), *(_cell(sum(v) / len(v) if v else None) for v in values)])
        text += "\nSubspace overlap with full fine-tuning per layer (mean over the layer's modules):\n\n"
        text += _table(table, ["layer", *columns])
    return text


def failures_table(records: list[Record]) -> str:
    failures = [r for r in records if r.record == "failure"]
    if not failures:
        return ""
    # The log's path is relative to the store's root, where leaderboard.md is: a link that works there.
    rows = [[r.entry, r.task or "-", r.job_id, r.error_class or "-", r.error, f"[log]({r.log})" if r.log else "-"]
            for r in failures]  # fmt: skip
    heading = f"\n## Failures\n\nFailed jobs: {len(failures)}.\n\n"
    legend = failure_classes_legend(r.error_class for r in failures)  # empty for classes older stores wrote
    table = _table(rows, ["model", "task", "job id", "class", "reason", "log"])
    return heading + table + (f"\n{legend}\n" if legend else "")


def plot_links(records: list[Record]) -> str:
    """Relative links to the plots `write_reports` draws from these same records."""
    found = [(p.title, p.file) for p in plots(records)] + merge_scaling.plot_files(records)
    found += affective.plot_files(records)
    if not found:
        return ""
    return "\n## Plots\n\n" + "\n".join(f"![{title}]({PLOTS_FOLDER}/{file})\n" for title, file in found)


def scaling_tables(records: list[Record]) -> str:
    return merge_scaling.scaling_section(records, _table)


def affective_tables(records: list[Record]) -> str:
    return affective.affective_sections(records, _table)


def to_markdown(records: list[Record]) -> str:
    sections = (overview, family_tables, affective_tables, robustness_tables, scaling_tables, costs_table,
                analysis_tables, failures_table, plot_links)  # fmt: skip
    text = "".join(section(records) for section in sections)
    return text.lstrip("\n") if text else "No results yet.\n"


def to_csv(records: list[Record]) -> str:
    def cell(value):
        if isinstance(value, list):
            return ";".join(value)
        if isinstance(value, dict):  # a sweep point's values: keep their types
            return json.dumps(value) if value else ""
        if isinstance(value, bool):
            return "true" if value else "false"
        return "" if value is None else value

    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=FIELDS, lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: cell(v) for k, v in r.to_dict().items()} for r in records)
    return out.getvalue()


def to_json(records: list[Record]) -> str:
    return json.dumps([r.to_dict() for r in records], indent=2) + "\n"


def render(report: Report, fmt: str) -> str:
    renderers = {"markdown": to_markdown, "csv": to_csv, "json": to_json}
    if fmt not in renderers:
        raise BadInput(f"--format {fmt}: not one of {', '.join(FORMATS)}")
    return renderers[fmt](report.records)


def write_reports(root: str | Path | Store) -> str:
    """Write the plots (plots/*.png), then leaderboard.md, .csv and .json into the store; return the markdown.

    A remote store's plots are drawn into a local folder first, then uploaded (the folder mirrored)."""
    store = root if isinstance(root, Store) else Store(root)
    report = collect(store)
    if store.local:
        _write_plots(report, store.root / PLOTS_FOLDER)
    else:
        with tempfile.TemporaryDirectory(prefix="pefteval-plots-") as tmp:
            _write_plots(report, Path(tmp))
            store.put_folder(Path(tmp), PLOTS_FOLDER)
    for fmt, suffix in (("csv", "csv"), ("json", "json"), ("markdown", "md")):  # after the plots the markdown links
        text = render(report, fmt)
        store.write_text(f"leaderboard.{suffix}", text)
    return text  # the markdown, rendered last


def _write_plots(report: Report, folder: Path) -> None:
    write_plots(report.records, folder)
    merge_scaling.write_scaling_plots(report.records, folder)
    affective.write_affective_plots(report.records, folder)
