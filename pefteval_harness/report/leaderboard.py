"""The leaderboard: read a store (or plain lm-eval results JSONs) into tidy records, render them.

Reading is kept apart from running (the report needs nothing but the files), so a finished store can be
re-reported anywhere, and results of a plain `lm_eval --output_path` run join the same table.

    collect(root) -> Report          the records of a results folder
    render(report, fmt) -> str       fmt in FORMATS; a pure function of the records
    write_reports(root) -> str       leaderboard.md / .csv / .json written atomically; returns the markdown

json is a list of every record (all `Record` fields); csv is every record, one column per field in
`records.FIELDS` order (lists joined with ";", None empty); markdown is the pivot a reader wants.
"""

from __future__ import annotations

import csv
import functools
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from pefteval_harness.errors import BadInput
from pefteval_harness.report.records import (
    FIELDS,
    Model,
    Record,
    aggregate_records,
    cost_records,
    failure_record,
    score_records,
)
from pefteval_harness.store import DONE, FAILED, Store, read_json, read_plan, write_atomic

FORMATS = ("markdown", "csv", "json")


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
    failures of other jobs. Jobs without a status (not run yet) give nothing."""
    leaves = {name: list(group.get("tasks") or []) for name, group in groups.items()}
    records: list[Record] = []
    for job in jobs:
        status = store.status(job["id"])
        if status is None or status.get("state") not in (DONE, FAILED):
            continue
        kind, config = _kind(job), job.get("config") or {}
        model = Model.from_lineage(job.get("lineage") or {}, job["label"])
        if kind == "evaluate":
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
    return records


def _plain_lm_eval_results(root: Path) -> list[tuple[Path, dict]]:
    """lm-eval results JSONs under `root` that are not a store's own files."""
    paths = []
    for folder, subfolders, files in os.walk(root):
        subfolders[:] = sorted(d for d in subfolders if d != "jobs")  # a store's job folders: never walked
        paths += [Path(folder) / f for f in files if f.endswith(".json")]
    found = []
    for path in sorted(paths):
        if path.parent == root and path.name in ("plan.json", "leaderboard.json"):
            continue
        try:
            data = read_json(path)
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and isinstance(data.get("results"), dict) and "configs" in data:
            found.append((path, data))
    return found


def collect(root: str | Path) -> Report:
    """The records of a results folder: the jobs of its latest plan (in plan order; every job folder if it
    has no plan.json), the plan's group aggregates, then plain lm-eval results JSONs found outside jobs/."""
    root = Path(root)
    if not root.is_dir():
        raise BadInput(f"{root}: no such results folder")
    store = Store(root)
    plan_path = root / "plan.json"
    if plan_path.exists():
        plan = read_plan(plan_path)
        jobs, groups = plan.get("jobs") or [], plan.get("groups") or {}
    else:
        jobs, groups = [job for job, _ in store.jobs()], {}
    records = store_records(store, jobs, groups)
    records += aggregate_records(records, groups)
    for path, result in _plain_lm_eval_results(root):
        args = (result.get("config") or {}).get("model_args")
        label = result.get("model_name") or (json.dumps(args) if isinstance(args, dict) else str(args))
        records += score_records(result, Model(model=label, method="lm-eval"), str(path.relative_to(root)))
    order = {"score": 0, "aggregate": 1, "failure": 2, "cost": 3}  # scores first; plan order within a kind
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


def _comparable(records: list[Record]) -> bool:
    """Scores an average may mix: higher is better and within [0, 1] (accuracies, exact match, F1...)."""
    values = [r.value for r in records if r.value is not None]
    return bool(values) and all(r.higher_is_better is True for r in records) and all(0 <= v <= 1 for v in values)


def scores_table(records: list[Record]) -> str:
    """One row per model: its method, each task's primary metric, each group's aggregate, the average."""
    primaries = [r for r in records if r.record == "score" and r.primary]
    aggregates = [r for r in records if r.record == "aggregate" and r.primary]
    failed = {(r.model, r.task) for r in records if r.record == "failure" and r.task is not None}
    rows = [r for r in records if r.record in ("score", "aggregate") or (r.record == "failure" and r.task)]
    if not rows:
        return ""
    methods: dict[str, str] = {}
    for r in rows:
        methods.setdefault(r.model, r.method)
    tasks = sorted({r.task for r in primaries} | {task for _, task in failed})
    groups = sorted({r.group for r in aggregates})
    by_task = {t: [r for r in primaries if r.task == t] for t in tasks}
    by_group = {g: [r for r in aggregates if r.group == g] for g in groups}
    value = {(r.model, "task", r.task): r.value for r in primaries}
    value |= {(r.model, "group", r.group): r.value for r in aggregates}
    averaged = [t for t in tasks if _comparable(by_task[t])]
    lines = []
    for model, method in methods.items():
        cells = []
        for t in tasks:
            v = value.get((model, "task", t))
            cells.append(_cell("FAILED" if v is None and (model, t) in failed else v))
        cells += [_cell(value.get((model, "group", g))) for g in groups]
        if averaged:
            scores = [value.get((model, "task", t)) for t in averaged]
            cells.append(_cell(sum(scores) / len(scores) if None not in scores else None))
        lines.append([model, method, *cells])
    headers = ["model", "method"]
    every = [r for r in records if r.record in ("score", "aggregate")]
    headers += [f"{t} ({_metric_label(by_task[t], [r for r in every if r.task == t])})" for t in tasks]
    headers += [f"{g} ({_metric_label(by_group[g], [r for r in every if r.group == g])})" for g in groups]
    if averaged:
        metrics = dict.fromkeys(r.metric for t in averaged for r in by_task[t])
        headers.append(f"average ({', '.join(metrics)})")
    text = _table(lines, headers)
    left_out = [t for t in tasks if t not in averaged and by_task[t]]
    if left_out:
        note = "The average leaves out tasks whose primary metric is not a score in [0, 1] where higher is better"
        text += f"\n{note}: {', '.join(left_out)}.\n"
    return text


def _quantity(quantities: dict[str, Record], name: str, fmt) -> str:
    return fmt(quantities[name].value) if name in quantities else "-"


def costs_table(records: list[Record]) -> str:
    costs = [r for r in records if r.record == "cost"]
    if not costs:
        return ""
    jobs: dict[str, dict[str, Record]] = {}
    for r in costs:
        jobs.setdefault(r.job_id, {})[r.metric] = r
    rows = []
    for quantities in jobs.values():
        first = next(iter(quantities.values()))
        get = functools.partial(_quantity, quantities)
        params = get("trainable_params", lambda v: f"{int(v):,}")
        if "trainable_share" in quantities:
            params += f" ({quantities['trainable_share'].value:.1%})"
        rows.append([
            first.model, first.method, params, get("steps", lambda v: f"{v:.0f}"),
            get("train_seconds", lambda v: f"{v:.1f}"), get("peak_rss_mb", lambda v: f"{v:.0f}"),
            get("artifact_mb", lambda v: f"{v:.2f}"), get("examples_without_answer", lambda v: f"{v:.0f}"),
        ])  # fmt: skip
    headers = ["model", "method", "trainable params", "steps", "train s", "peak RSS MB", "artifact MB",
               "examples without answer"]  # fmt: skip
    return "\nTraining cost (wall time and memory depend on the machine):\n\n" + _table(rows, headers)


def failures_table(records: list[Record]) -> str:
    failures = [r for r in records if r.record == "failure"]
    if not failures:
        return ""
    rows = [[r.model, r.task or "-", r.job_id, r.error_class or "-", r.error] for r in failures]
    return "\nFailed jobs:\n\n" + _table(rows, ["model", "task", "job id", "class", "reason"])


def to_markdown(records: list[Record]) -> str:
    text = scores_table(records) + costs_table(records) + failures_table(records)
    return text.lstrip("\n") if text else "No results yet.\n"


def to_csv(records: list[Record]) -> str:
    def cell(value):
        if isinstance(value, list):
            return ";".join(value)
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


def write_reports(root: str | Path) -> str:
    """Write leaderboard.md, .csv and .json into the folder; return the markdown."""
    report = collect(root)
    for fmt, suffix in (("csv", "csv"), ("json", "json"), ("markdown", "md")):
        text = render(report, fmt)
        write_atomic(Path(root) / f"leaderboard.{suffix}", text)
    return text  # the markdown, rendered last
