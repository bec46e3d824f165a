"""The leaderboard: read evaluation results from a store (or plain lm-eval results JSONs), write tables.

Reading is kept apart from running (the report needs nothing but the files), so a finished store can be
re-reported anywhere, and results of a plain `lm_eval --output_path` run join the same table.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from pefteval_harness.store import DONE, Store, read_json, write_atomic

FORMATS = ("markdown", "csv", "json")


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
        if task not in result["results"]:
            continue
        metric, value, stderr = primary_metric(result, task)
        rows.append({**model, "task": task, "metric": metric, "value": value, "stderr": stderr})
    return rows


def _plain_lm_eval_results(root: Path) -> list[tuple[Path, dict]]:
    """lm-eval results JSONs under `root` that are not a store's own files."""
    found = []
    for path in sorted(root.rglob("*.json")):
        if "jobs" in path.relative_to(root).parts or path.name in ("plan.json", "leaderboard.json"):
            continue
        try:
            data = read_json(path)
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and isinstance(data.get("results"), dict) and "configs" in data:
            found.append((path, data))
    return found


def collect_rows(root: str | Path) -> list[dict]:
    """Every score in a store (the jobs of its latest plan, if it has one) or in lm-eval result files."""
    root = Path(root)
    if not root.is_dir():
        from pefteval_harness.errors import BadInput

        raise BadInput(f"{root}: no such results folder")
    store = Store(root)
    plan_path = root / "plan.json"
    if plan_path.exists():  # the latest run's jobs, in its order (base, fine-tunes, merges)
        jobs = [(job, store.status(job["id"])) for job in read_json(plan_path)["jobs"]]
    else:
        jobs = list(store.jobs())
    rows: list[dict] = []
    for job, status in jobs:
        if job["kind"] != "evaluate" or status is None:
            continue
        model = {"model": job["label"], "method": job["config"].get("method", ""), "job_id": job["id"]}
        if status["state"] == DONE:
            rows += rows_from_result(store.result(job["id"]), **model)
        else:
            for task in job["config"]["tasks"]:
                rows.append(
                    {
                        **model,
                        "task": task,
                        "metric": "",
                        "value": None,
                        "stderr": None,
                        "error": status.get("reason", status["state"]),
                    }
                )
    for path, result in _plain_lm_eval_results(root):
        args = result.get("config", {}).get("model_args")
        label = result.get("model_name") or (json.dumps(args) if isinstance(args, dict) else str(args))
        rows += rows_from_result(result, model=label, method="lm-eval", job_id=str(path.relative_to(root)))
    return rows


def to_markdown(rows: list[dict]) -> str:
    """One row per model, one column per task (its primary metric), plus the mean over tasks."""
    from tabulate import tabulate

    if not rows:
        return "No results yet.\n"
    tasks = sorted({r["task"] for r in rows})
    metrics = {r["task"]: r["metric"] for r in rows if r["metric"]}
    models: dict[str, dict] = {}
    for r in rows:
        entry = models.setdefault(r["model"], {"method": r["method"], "scores": {}})
        entry["scores"][r["task"]] = "FAILED" if r.get("error") else r["value"]
    table = []
    for name, entry in models.items():
        cells = [entry["scores"].get(t) for t in tasks]
        numbers = [c for c in cells if isinstance(c, float)]
        mean = sum(numbers) / len(numbers) if len(numbers) == len(tasks) else None
        table.append([name, entry["method"], *(_cell(c) for c in cells), _cell(mean)])
    headers = ["model", "method", *(f"{t} ({metrics.get(t, '?')})" for t in tasks), "average"]
    text = tabulate(table, headers=headers, tablefmt="github", disable_numparse=True) + "\n"
    failures = sorted({(r["model"], r["error"]) for r in rows if r.get("error")})
    if failures:
        text += "\nFailed:\n" + "".join(f"- {model}: {error}\n" for model, error in failures)
    return text


def training_costs(root: str | Path) -> list[dict]:
    """What each fine-tune cost (from the latest plan's train jobs): the PEFT-vs-FFT trade-off."""
    root = Path(root)
    if not (root / "plan.json").exists():
        return []
    store, rows = Store(root), []
    for job in read_json(root / "plan.json")["jobs"]:
        if job["kind"] == "train" and store.is_done(job["id"]):
            r = store.result(job["id"])
            rows.append(
                {
                    "model": job["label"],
                    "method": r["method"],
                    "trainable params": f"{r['trainable_params']:,} ({r['trainable_params'] / r['total_params']:.1%})",
                    "steps": r["steps"],
                    "train s": f"{r['train_seconds']:.1f}",
                    "peak RSS MB": f"{r['peak_rss_mb']:.0f}",
                    "artifact MB": f"{r['artifact_bytes'] / 2**20:.2f}",
                }
            )
    return rows


def _cell(value) -> str:
    if value is None:
        return "-"
    return value if isinstance(value, str) else f"{value:.3f}"


def render(rows: list[dict], fmt: str, costs: list[dict] = ()) -> str:
    if fmt == "json":
        return json.dumps(rows, indent=2) + "\n"
    if fmt == "csv":
        out = io.StringIO()
        fields = ["model", "method", "task", "metric", "value", "stderr", "job_id", "error"]
        writer = csv.DictWriter(out, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
        return out.getvalue()
    text = to_markdown(rows)
    if costs:
        from tabulate import tabulate

        text += "\nTraining cost (wall time and memory depend on the machine):\n\n"
        text += tabulate(costs, headers="keys", tablefmt="github", disable_numparse=True) + "\n"
    return text


def report(root: str | Path, fmt: str) -> str:
    return render(collect_rows(root), fmt, training_costs(root))


def write_reports(root: str | Path) -> str:
    """Write leaderboard.md (scores, then training costs), .csv and .json; return the markdown."""
    rows, costs = collect_rows(root), training_costs(root)
    for fmt, suffix in (("csv", "csv"), ("json", "json"), ("markdown", "md")):
        text = render(rows, fmt, costs)
        write_atomic(Path(root) / f"leaderboard.{suffix}", text)
    return text
