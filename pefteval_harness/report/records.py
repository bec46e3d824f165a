"""The tidy results table: one `Record` per (model, task or group, metric, filter), plus costs and failures.

Every rendering (markdown, csv, json) is a pure function of a list of records, and records are built from
the store's files alone: the plan (jobs, their lineage, task groups), each job's status and result.

Kinds of record (`record` field):
  score      one (metric, filter) of one task for one model, read from lm-eval's results dict
  aggregate  one (metric, filter) of a task group for one model: `group` is the group, `task` is None.
             Store models: recomputed from the leaves' score records as the plan's groups say (the mean of
             the leaves, weighted by their sample counts when weight_by_size), and only when every leaf has
             that metric (else value None, error "missing <task>, ..."). Plain lm-eval results files: the
             group rows lm-eval wrote (it had the group's aggregate_metric_list; we do not).
  cost       one training quantity of a finished train job (`metric` names it), task None
  failure    one failed job: task set for an evaluation, None for train / merge / base jobs

`group` is only set on aggregate records; `groups` lists, on score and failure records of a task, the
groups whose leaves include the task (sorted). Lists (trained_on, experts, groups) are lists in JSON.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

RecordKind = Literal["score", "aggregate", "cost", "failure"]
COST_METRICS = (
    "trainable_params",
    "trainable_share",
    "steps",
    "train_seconds",
    "peak_rss_mb",
    "artifact_mb",
    "examples_without_answer",
)


@dataclass
class Record:
    # The first eight fields are the columns leaderboard.csv had before, in that order (kept for its readers).
    model: str
    method: str
    task: str | None
    metric: str | None
    value: float | None
    stderr: float | None = None
    job_id: str | None = None
    error: str | None = None
    record: RecordKind = "score"
    filter: str | None = None
    primary: bool = False  # the task's primary metric (aggregates: the group's first aggregate metric)
    higher_is_better: bool | None = None
    n: int | None = None  # effective samples (lm-eval's n-samples "effective"; summed over an aggregate's leaves)
    group: str | None = None
    groups: list[str] = field(default_factory=list)
    base: str | None = None
    trained_on: list[str] = field(default_factory=list)
    merge_method: str | None = None
    experts: list[str] = field(default_factory=list)
    k: int | None = None
    seed: int | None = None  # the merge's seed (None unless a merge)
    error_class: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


FIELDS = [f.name for f in fields(Record)]


@dataclass(frozen=True)
class Model:
    """A model as the leaderboard names it, with its lineage (from the job's `lineage`)."""

    model: str
    method: str
    base: str | None = None
    trained_on: tuple[str, ...] = ()
    merge_method: str | None = None
    experts: tuple[str, ...] = ()
    k: int | None = None
    seed: int | None = None

    @classmethod
    def from_lineage(cls, lineage: dict, label: str | None = None) -> Model:
        merge = lineage.get("merge") or {}
        return cls(
            model=lineage.get("model") or label or "",
            method=lineage.get("method", ""),
            base=lineage.get("base"),
            trained_on=tuple(lineage.get("trained_on") or ()),
            merge_method=merge.get("method"),
            experts=tuple(merge.get("experts") or ()),
            k=merge.get("k"),
            seed=merge.get("seed"),
        )

    @classmethod
    def of(cls, record: Record) -> Model:
        names = [f.name for f in fields(cls)]
        return cls(**{name: tuple(v) if isinstance(v := getattr(record, name), list) else v for name in names})

    def fields(self) -> dict[str, Any]:
        """Keyword arguments of a Record."""
        out = asdict(self)
        out["trained_on"], out["experts"] = list(self.trained_on), list(self.experts)
        return out


def number(value: Any) -> float | None:
    """A finite number as a float; None for anything else (lm-eval writes "N/A" for a missing stderr)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def _metric_keys(scores: dict) -> list[tuple[str, str]]:
    """(metric, filter) pairs of an lm-eval results entry, in its order: "metric,filter" keys, not stderrs."""
    pairs = []
    for key in scores:
        if "," not in key:  # alias, name, sample_len, sample_count, samples
            continue
        metric, filt = key.split(",", 1)
        if not metric.endswith("_stderr"):
            pairs.append((metric, filt))
    return pairs


def primary_key(result: dict, task: str) -> tuple[str, str] | None:
    """The task's primary (metric, filter): its metadata's primary_metric / primary_filter if set, else the
    first metric_list metric under the first filter_list name ("none" without one); if that pair is not in
    the results, the first pair that is."""
    from pefteval_harness.tasks import primary_metric

    pairs = _metric_keys(result["results"].get(task) or {})
    config = (result.get("configs") or {}).get(task) or {}
    try:
        wanted = primary_metric(config)
    except (KeyError, TypeError, IndexError):  # a config in a shape lm-eval did not write
        wanted = None
    if wanted in pairs:
        return wanted
    return pairs[0] if pairs else None


def _leaves(group_subtasks: dict[str, list[str]], name: str, seen: frozenset = frozenset()) -> list[str]:
    if name not in group_subtasks or name in seen:
        return [name]
    return [leaf for child in group_subtasks[name] for leaf in _leaves(group_subtasks, child, seen | {name})]


def score_records(result: dict, model: Model, job_id: str, groups: dict[str, list[str]] | None = None) -> list[Record]:
    """Records of an lm-eval results dict: a score record per (metric, filter) of each task (a task is a
    `results` entry with a `configs` entry), an aggregate record per (metric, filter) of each group row
    lm-eval wrote. `groups` (group -> leaf tasks) fills `groups`; by default lm-eval's group_subtasks."""
    results, configs = result.get("results") or {}, result.get("configs") or {}
    if groups is None:
        subtasks = result.get("group_subtasks") or {}
        groups = {g: _leaves(subtasks, g) for g in subtasks if g not in configs}
    higher = result.get("higher_is_better") or {}
    samples = result.get("n-samples") or {}
    records = []
    for name, scores in results.items():
        is_task = name in configs
        pairs = _metric_keys(scores)
        # a group row's first metric stands for the group, as its aggregate_metric_list's first entry would
        primary = primary_key(result, name) if is_task else (pairs[0] if pairs else None)
        for metric, filt in pairs:
            value = number(scores[f"{metric},{filt}"])
            if is_task:
                n = (samples.get(name) or {}).get("effective")
            else:  # a group row: lm-eval counts the samples behind each of its metrics
                n = (scores.get("sample_count") or {}).get(f"{metric},{filt}", scores.get("sample_len"))
            records.append(
                Record(
                    **model.fields(),
                    record="score" if is_task else "aggregate",
                    task=name if is_task else None,
                    group=None if is_task else name,
                    groups=sorted(g for g, leaves in groups.items() if name in leaves) if is_task else [],
                    metric=metric,
                    filter=filt,
                    value=value,
                    stderr=number(scores.get(f"{metric}_stderr,{filt}")),
                    higher_is_better=(higher.get(name) or {}).get(metric),
                    n=n if isinstance(n, int) and not isinstance(n, bool) else None,
                    primary=(metric, filt) == primary,
                    job_id=job_id,
                    error=None if value is not None else f"not a finite number: {scores[f'{metric},{filt}']!r}",
                )
            )
    return records


def failure_record(model: Model, job_id: str, status: dict, task: str | None = None, groups=()) -> Record:
    return Record(
        **model.fields(),
        record="failure",
        task=task,
        groups=sorted(groups),
        metric=None,
        value=None,
        job_id=job_id,
        error=status.get("reason") or f"state {status.get('state')}",
        error_class=status.get("error_class", "error"),
    )


def cost_records(model: Model, job_id: str, result: dict) -> list[Record]:
    """One record per training quantity the train job's result has (task None)."""
    params, total = result.get("trainable_params"), result.get("total_params")
    artifact = number(result.get("artifact_bytes"))
    quantities = {
        "trainable_params": params,
        "trainable_share": params / total if number(params) is not None and number(total) else None,
        "steps": result.get("steps"),
        "train_seconds": result.get("train_seconds"),
        "peak_rss_mb": result.get("peak_rss_mb"),
        "artifact_mb": artifact / 2**20 if artifact is not None else None,
        "examples_without_answer": result.get("examples_without_answer"),
    }
    return [
        Record(**model.fields(), record="cost", task=None, metric=name, value=number(quantities[name]), job_id=job_id)
        for name in COST_METRICS
        if number(quantities[name]) is not None
    ]


def aggregate_records(records: list[Record], groups: dict[str, dict]) -> list[Record]:
    """For each model with score (or evaluation failure) records and each group with an aggregate metric
    list (plan.json "groups"), one aggregate record per (metric, filter) the group aggregates."""
    models: dict[str, Model] = {}
    scores: dict[tuple[str, str, str, str], Record] = {}  # (model, task, metric, filter) -> score record
    for r in records:
        if r.record in ("score", "failure") and r.task is not None:
            models.setdefault(r.model, Model.of(r))
        if r.record == "score":
            scores[r.model, r.task, r.metric, r.filter] = r
    out = []
    for label, model in models.items():
        for name, group in groups.items():
            leaves = list(group.get("tasks") or [])
            for position, spec in enumerate(group.get("aggregate") or []):
                metric = spec["metric"]
                filters = spec.get("filter_list")
                if filters is None:  # as lm-eval: every filter the leaves have this metric under
                    seen = [f for (m, t, mt, f) in scores if m == label and t in leaves and mt == metric]
                    filters = list(dict.fromkeys(seen)) or ["none"]
                for i, filt in enumerate(filters):
                    found = [scores.get((label, t, metric, filt)) for t in leaves]
                    out.append(
                        _aggregate(
                            model,
                            name,
                            leaves,
                            found,
                            metric,
                            filt,
                            spec,
                            primary=position == 0 and i == 0,
                        )
                    )
    return out


def _aggregate(model, group, leaves, found, metric, filt, spec, primary) -> Record:
    record = Record(
        **model.fields(),
        record="aggregate",
        task=None,
        group=group,
        metric=metric,
        filter=filt,
        value=None,
        primary=primary,
    )
    missing = [t for t, r in zip(leaves, found, strict=True) if r is None or r.value is None]
    if spec.get("aggregation", "mean") != "mean":
        record.error = f"aggregation {spec['aggregation']!r} is not supported (mean only)"
        return record
    if missing or not leaves:
        record.error = "missing " + (", ".join(missing) or "leaf tasks")
        return record
    values = [r.value for r in found]
    sizes = [r.n for r in found]
    weighted = spec.get("weight_by_size", True)
    if weighted and any(n is None or n <= 0 for n in sizes):
        record.error = "no sample count for " + ", ".join(t for t, n in zip(leaves, sizes, strict=True) if not n)
        return record
    from lm_eval.api.metrics import aggregate_subtask_metrics, pooled_sample_stderr, unweighted_mean_stderr

    record.value = float(aggregate_subtask_metrics(values, sizes, weight_by_size=weighted))
    stderrs = [r.stderr for r in found]
    if all(s is not None for s in stderrs):  # lm-eval's own: pooled when size-weighted, else of the plain mean
        if not weighted:
            record.stderr = float(unweighted_mean_stderr(stderrs))
        elif sum(sizes) > len(sizes):  # pooled variance needs more samples than tasks
            record.stderr = float(pooled_sample_stderr(stderrs, sizes))
    directions = {r.higher_is_better for r in found}
    record.higher_is_better = directions.pop() if len(directions) == 1 else None
    record.n = sum(sizes) if all(n is not None for n in sizes) else None
    return record
