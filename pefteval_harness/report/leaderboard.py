"""The leaderboard: read results from a store (or plain lm-eval results JSONs), write tables.

Reading is kept apart from running (the report needs nothing but the files), so a finished store can be
re-reported anywhere, and results of a plain `lm_eval --output_path` run join the same table.
"""

from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from pefteval_harness.errors import BadInput
from pefteval_harness.store import DONE, FAILED, Store, read_json, write_atomic

FORMATS = ("markdown", "csv", "json")
CSV_FIELDS = ["model", "method", "task", "metric", "value", "stderr", "job_id", "error"]


@dataclass
class Report:
    rows: list[dict] = field(default_factory=list)  # one per (model, task): the leaderboard's cells
    costs: list[dict] = field(default_factory=list)  # one per finished train job
    failures: list[dict] = field(default_factory=list)  # one per failed job, any kind


def primary_metric(result: dict, task: str) -> tuple[str, float | None, float | None]:
    """(metric, value, stderr) of a task: its config's first metric under its first filter."""
    config = result.get("configs", {}).get(task, {})
    scores = result["results"][task]
    metric_names = [m["metric"] for m in config.get("metric_list") or [] if isinstance(m.get("metric"), str)]
    filters = [f["name"] for f in config.get("filter_list") or []] or ["none"]
    keys = [f"{m},{f}" for m in metric_names for f in filters]
    keys += [k for k in scores if "," in k and "_stderr" not in k]  # a task without a metric_list
    for key in keys:
        if isinstance(scores.get(key), (int, float)):
            metric, filt = key.split(",", 1)
            stderr = scores.get(f"{metric}_stderr,{filt}")
            return metric, float(scores[key]), stderr if isinstance(stderr, (int, float)) else None
    return "", None, None


def rows_from_result(result: dict, **model: str) -> list[dict]:
    """One row per leaf task of an lm-eval results dict (groups are skipped: they aggregate leaves)."""
    rows = []
    for task in sorted(result.get("configs") or result["results"]):
        if task in result["results"]:
            metric, value, stderr = primary_metric(result, task)
            rows.append({**model, "task": task, "metric": metric, "value": value, "stderr": stderr})
    return rows


def _plain_lm_eval_results(root: Path) -> list[tuple[Path, dict]]:
    """lm-eval results JSONs under `root` that are not a store's own files."""
    paths = []
    for folder, subfolders, files in os.walk(root):
        subfolders[:] = [d for d in subfolders if d != "jobs"]  # a store's job folders: never walked
        paths += [Path(folder) / f for f in files if f.endswith(".json")]
    found = []
    for path in sorted(paths):
        if path.name in ("plan.json", "leaderboard.json"):
            continue
        try:
            data = read_json(path)
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and isinstance(data.get("results"), dict) and "configs" in data:
            found.append((path, data))
    return found


def _cost(job: dict, result: dict) -> dict:
    share = result["trainable_params"] / result["total_params"]
    return {
        "model": job["label"],
        "method": result["method"],
        "trainable params": f"{result['trainable_params']:,} ({share:.1%})",
        "steps": result["steps"],
        "train s": f"{result['train_seconds']:.1f}",
        "peak RSS MB": f"{result['peak_rss_mb']:.0f}",
        "artifact MB": f"{result['artifact_bytes'] / 2**20:.2f}",
    }


def collect(root: str | Path) -> Report:
    """Everything in a store (the jobs of its latest plan, if it has one) and in lm-eval result files."""
    root = Path(root)
    if not root.is_dir():
        raise BadInput(f"{root}: no such results folder")
    store, report = Store(root), Report()
    plan_path = root / "plan.json"
    if plan_path.exists():  # the latest run's jobs, in its order (base, fine-tunes, merges)
        jobs = [(job, store.status(job["id"])) for job in read_json(plan_path)["jobs"]]
    else:
        jobs = list(store.jobs())
    for job, status in jobs:
        if status is None:
            continue
        model = {"model": job["label"], "method": job["config"].get("method", ""), "job_id": job["id"]}
        if status["state"] == FAILED:
            report.failures.append({**model, "kind": job["kind"], "reason": status.get("reason", "")})
        if job["kind"] == "evaluate" and status["state"] == DONE:
            report.rows += rows_from_result(store.result(job["id"]), **model)
        elif job["kind"] == "evaluate":
            error = {"metric": "", "value": None, "stderr": None, "error": status.get("reason", status["state"])}
            report.rows += [{**model, "task": task, **error} for task in job["config"]["tasks"]]
        elif job["kind"] == "train" and status["state"] == DONE:
            report.costs.append(_cost(job, store.result(job["id"])))
    for path, result in _plain_lm_eval_results(root):
        args = result.get("config", {}).get("model_args")
        label = result.get("model_name") or (json.dumps(args) if isinstance(args, dict) else str(args))
        report.rows += rows_from_result(result, model=label, method="lm-eval", job_id=str(path.relative_to(root)))
    return report


def to_markdown(report: Report) -> str:
    """One row per model, one column per task (its primary metric) and the mean; then costs, failures."""
    from tabulate import tabulate

    def table(rows, headers) -> str:
        return tabulate(rows, headers=headers, tablefmt="github", disable_numparse=True) + "\n"

    if not report.rows:
        return "No results yet.\n"
    tasks = sorted({r["task"] for r in report.rows})
    metrics = {r["task"]: r["metric"] for r in report.rows if r["metric"]}
    models: dict[str, dict] = {}
    for r in report.rows:
        entry = models.setdefault(r["model"], {"method": r["method"], "scores": {}})
        entry["scores"][r["task"]] = "FAILED" if r.get("error") else r["value"]
    lines = []
    for name, entry in models.items():
        cells = [entry["scores"].get(t) for t in tasks]
        numbers = [c for c in cells if isinstance(c, float)]
        mean = sum(numbers) / len(numbers) if len(numbers) == len(tasks) else None
        lines.append([name, entry["method"], *(_cell(c) for c in cells), _cell(mean)])
    text = table(lines, ["model", "method", *(f"{t} ({metrics.get(t, '?')})" for t in tasks), "average"])
    if report.costs:
        text += "\nTraining cost (wall time and memory depend on the machine):\n\n" + table(report.costs, "keys")
    if report.failures:
        failures = [[f["kind"], f["model"], f["job_id"], f["reason"]] for f in report.failures]
        text += "\nFailed jobs:\n\n" + table(failures, ["kind", "model", "job id", "reason"])
    return text


def _cell(value) -> str:
    if value is None:
        return "-"
    return value if isinstance(value, str) else f"{value:.3f}"


def render(report: Report, fmt: str) -> str:
    if fmt == "json":
        return json.dumps(report.rows, indent=2) + "\n"
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(report.rows)
        return out.getvalue()
    return to_markdown(report)


def write_reports(root: str | Path) -> str:
    """Write leaderboard.md, .csv and .json into the store; return the markdown."""
    report = collect(root)
    for fmt, suffix in (("csv", "csv"), ("json", "json"), ("markdown", "md")):
        text = render(report, fmt)
        write_atomic(Path(root) / f"leaderboard.{suffix}", text)
    return text
