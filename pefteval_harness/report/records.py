"""The tidy results table: one `Record` per (model, task or group, metric, filter), plus costs, robustness
gaps, weight-update analyses and failures.

Every rendering (markdown, csv, json, plots) is a pure function of a list of records, and records are built
from the store's files alone: the plan (jobs, their lineage, task groups), each job's status and result.

Kinds of record (`record` field):
  score      one (metric, filter) of one task for one model, read from lm-eval's results dict. An adversarial
             task's records name the task it perturbs in `clean_partner` (its config's metadata.clean_partner)
  aggregate  one (metric, filter) of a task group for one model: `group` is the group, `task` is None.
             Store models: recomputed from the leaves' score records as the plan's groups say (the mean of
             the leaves, weighted by their sample counts when weight_by_size). As in lm-eval, a leaf that
             does not report the metric is left out; unlike lm-eval, a leaf without scores (its evaluation
             failed) makes the value None, error "missing <task>, ...". Plain lm-eval results files: the
             group rows lm-eval wrote (it had the group's aggregate_metric_list; we do not).
  gap        robustness: per model and adversarial task (`task`; `clean_partner` its clean task), the clean
             task's primary score minus the adversarial task's (`metric` is that shared primary metric);
             value None with `error` when a score is missing or the two primary metrics differ. Plus, per
             model, `task` None and `metric` "mean": the mean of its gaps (`n` of them; higher-is-better
             metrics only), None when one of them is missing
  cost       one training quantity of a finished train job (`metric` names it, COST_METRICS), task None
  analysis   the weight update ΔW of a fine-tune (analyze jobs): `metric` in ANALYSIS_METRICS, per module
             (`module`, `layer`) and, `module` None, the job's summary over its modules (`n` modules). Every
             analysed model also has a "weight_update" record: 1, or 0 for a method that changes no weight
             (prompt learning), whose `note` says why and which has no other analysis record; the job's
             reason, if any, is its `note` (also "no weight differs from the base's" with no module)
  theory     one theory quantity of a merge (merge jobs with `theory:`): `metric` names it (gaussian_width,
             sign_conflict_rate, coverage, kurtosis_*, ...: docs/scaling.md), computed by the merge job from
             the task vectors and the merged tensors; task None
  failure    one failed job: task set for an evaluation, None for train / merge / analyze / base jobs

A model evaluated under a prompting strategy (the evaluation job's config `strategy`, its `name`) carries it in
`strategy` on each of its records, and the report treats each (model, strategy) as an entry of its own
(`Record.entry`: "lora · 3-shot"; the model's label alone without a strategy), so aggregates, gaps, tables and
plots never mix strategies. Score records of a task whose config's metadata says `affect` ("understanding" or
"generation") and `form` ("loglikelihood" or "generative") carry them: the affective sections read them.

`group` is only set on aggregate records; `groups` lists, on score and failure records of a task, the
groups whose leaves include the task (sorted). Every record of a model carries its lineage: method, base,
trained_on, merge fields, and for a sweep point `sweep_of` (the fine-tune or merge it was expanded from)
and `sweep` ({"config.r": 4}: dotted spec field -> the point's value; {} otherwise). Lists (trained_on,
experts, groups) are lists in JSON, `sweep` an object.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

RecordKind = Literal["score", "aggregate", "gap", "cost", "analysis", "theory", "failure"]
COST_METRICS = (
    "trainable_params",
    "trainable_share",
    "steps",
    "trained_tokens",
    "train_seconds",
    "tokens_per_second",
    "peak_rss_mb",
    "peak_accelerator_mb",  # None (no record) without an accelerator
    "artifact_mb",
    "examples_without_answer",
)
# subspace_overlap: of ΔW's top left singular subspace (its output space) with the reference's; right_: input space
ANALYSIS_METRICS = (
    "rank",
    "effective_rank",
    "frobenius",
    "relative_frobenius",
    "subspace_overlap",
    "right_subspace_overlap",
)
MEAN_GAP = "mean"  # the metric of a model's mean robustness gap record
PARSE_RATE = "parsed"  # a generative task's share of answers it could read (0-1): not a score


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
    # Appended after the columns above, so readers of older CSVs find theirs where they were.
    clean_partner: str | None = None  # score and gap records of an adversarial task: its clean task
    sweep_of: str | None = None
    sweep: dict[str, Any] = field(default_factory=dict)
    module: str | None = None  # analysis records: the weight's module (None: the summary over modules)
    layer: int | None = None
    note: str | None = None  # why a value is absent when that is not an error (no weight update)
    strategy: str | None = None  # the prompting strategy's name (None: the task's own prompt, no strategy axis)
    affect: str | None = None  # score records: the task's metadata.affect (understanding / generation)
    form: str | None = None  # score records: the task's metadata.form (loglikelihood / generative)
    log: str | None = None  # failure records: the job's full log, relative to the store (jobs/<id>/log.txt)

    @property
    def entry(self) -> str:
        return entry_label(self.model, self.strategy)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


FIELDS = [f.name for f in fields(Record)]
STRATEGY_SEPARATOR = " · "


def entry_label(model: str, strategy: str | None) -> str:
    """What the report keys and shows a model's results by: its label, and its prompting strategy if any."""
    return model if strategy is None else f"{model}{STRATEGY_SEPARATOR}{strategy}"


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
    sweep_of: str | None = None
    sweep: tuple[tuple[str, Any], ...] = ()  # (field, value) pairs: the dataclass stays immutable
    strategy: str | None = None  # the prompting strategy it was evaluated under (job config, not lineage)

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
            sweep_of=lineage.get("sweep_of"),
            sweep=tuple((lineage.get("sweep") or {}).items()),
        )

    @classmethod
    def of(cls, record: Record) -> Model:
        def frozen(value):
            if isinstance(value, dict):
                return tuple(value.items())
            return tuple(value) if isinstance(value, list) else value

        return cls(**{f.name: frozen(getattr(record, f.name)) for f in fields(cls)})

    def fields(self) -> dict[str, Any]:
        """Keyword arguments of a Record."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["trained_on"], out["experts"], out["sweep"] = list(self.trained_on), list(self.experts), dict(self.sweep)
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


def _metadata_text(config: dict, key: str) -> str | None:
    metadata = config.get("metadata") if isinstance(config, dict) else None
    value = metadata.get(key) if isinstance(metadata, dict) else None
    return value if isinstance(value, str) and value else None


def clean_partner(config: dict) -> str | None:
    """The clean task an adversarial task perturbs: its metadata's clean_partner."""
    metadata = config.get("metadata") if isinstance(config, dict) else None
    if not isinstance(metadata, dict):
        return None
    partner = metadata.get("clean_partner")
    return partner if isinstance(partner, str) and partner else None


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
                    clean_partner=clean_partner(configs[name]) if is_task else None,
                    affect=_metadata_text(configs[name], "affect") if is_task else None,
                    form=_metadata_text(configs[name], "form") if is_task else None,
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
        log=status.get("log"),
    )


def analysis_records(model: Model, job_id: str, result: dict) -> list[Record]:
    """Records of an analyze job's result: whether the method changed any weight, then its summary over
    modules (module None) and each module's quantities. A method without a weight update (prompt learning)
    gets the "weight_update" record alone, with the job's reason as its note, so no table shows zeros."""
    update = result.get("weight_update") is not False
    common = {**model.fields(), "record": "analysis", "task": None, "job_id": job_id}
    out = [Record(**common, metric="weight_update", value=float(update), note=result.get("reason"))]
    if not update:
        return out
    summary = result.get("summary") or {}
    count = summary.get("modules")
    count = count if isinstance(count, int) and not isinstance(count, bool) else None
    out += [
        Record(**common, metric=name, value=number(summary.get(name)), n=count)
        for name in ANALYSIS_METRICS
        if number(summary.get(name)) is not None  # no overlap without a reference fine-tune
    ]
    for entry in result.get("modules") or []:
        layer = entry.get("layer")
        layer = layer if isinstance(layer, int) and not isinstance(layer, bool) else None
        out += [
            Record(**common, metric=name, value=number(entry.get(name)), module=entry.get("module"), layer=layer)
            for name in ANALYSIS_METRICS
            if number(entry.get(name)) is not None
        ]
    return out


def theory_records(model: Model, job_id: str, result: dict) -> list[Record]:
    """A merge's theory quantities, one record each (in the order the merge job wrote them)."""
    quantities = result.get("theory") or {}
    return [
        Record(record="theory", task=None, metric=name, value=number(value), job_id=job_id, **model.fields())
        for name, value in quantities.items()
        if number(value) is not None or value is None
    ]


def gap_records(records: list[Record]) -> list[Record]:
    """Robustness gaps from the primary score records: for each model scored (or failed) on an adversarial
    task (a task whose score records name a `clean_partner`), clean minus adversarial; then per model the
    mean of its gaps. Models in record order, adversarial tasks sorted."""
    primaries = {(r.entry, r.task): r for r in records if r.record == "score" and r.primary}
    partners = dict(sorted({r.task: r.clean_partner for r in primaries.values() if r.clean_partner}.items()))
    models: dict[str, Model] = {}
    for r in records:
        if r.record in ("score", "failure") and r.task in partners:
            models.setdefault(r.entry, Model.of(r))
    scored = {(r.entry, r.task) for r in records if r.record in ("score", "failure")}
    out = []
    for label, model in models.items():
        gaps = []
        for adversarial, clean in partners.items():
            if (label, adversarial) not in scored:
                continue
            adv, ref = primaries.get((label, adversarial)), primaries.get((label, clean))
            gap = Record(**model.fields(), record="gap", task=adversarial, clean_partner=clean, value=None,
                         metric=adv.metric if adv else None, filter=adv.filter if adv else None,
                         job_id=adv.job_id if adv else None)  # fmt: skip
            if adv is None or adv.value is None:
                gap.error = f"no score for {adversarial}"
            elif ref is None or ref.value is None:
                gap.error = f"no score for {clean}"
            elif ref.metric != adv.metric:
                gap.error = f"primary metrics differ: {clean} {ref.metric}, {adversarial} {adv.metric}"
            else:
                gap.value = ref.value - adv.value
                # a drop is a positive gap for a higher-is-better metric: there, smaller gaps are better
                gap.higher_is_better = None if adv.higher_is_better is None else not adv.higher_is_better
                gap.n = adv.n
            gaps.append(gap)
        # lower-is-better metrics (perplexities) gap the other way round and on another scale: not averaged
        averaged = [g for g in gaps if g.higher_is_better is not True]
        mean = Record(**model.fields(), record="gap", task=None, metric=MEAN_GAP, value=None, n=len(averaged),
                      higher_is_better=False)  # fmt: skip
        missing = [g.task for g in averaged if g.value is None]
        if missing or not averaged:
            mean.error = "missing " + (", ".join(missing) or "gaps")
        else:
            mean.value = sum(g.value for g in averaged) / len(averaged)
        out += [*gaps, mean]
    return out


def cost_records(model: Model, job_id: str, result: dict) -> list[Record]:
    """One record per training quantity the train job's result has (task None)."""
    params, total = result.get("trainable_params"), result.get("total_params")
    artifact = number(result.get("artifact_bytes"))
    quantities = {
        "trainable_params": params,
        "trainable_share": params / total if number(params) is not None and number(total) else None,
        "steps": result.get("steps"),
        "trained_tokens": result.get("trained_tokens"),
        "train_seconds": result.get("train_seconds"),
        "tokens_per_second": result.get("tokens_per_second"),
        "peak_rss_mb": result.get("peak_rss_mb"),
        "peak_accelerator_mb": result.get("peak_accelerator_mb"),
        "artifact_mb": artifact / 2**20 if artifact is not None else None,
        "examples_without_answer": result.get("examples_without_answer"),
    }
    return [
        Record(**model.fields(), record="cost", task=None, metric=name, value=number(quantities[name]), job_id=job_id)
        for name in COST_METRICS
        if number(quantities[name]) is not None
    ]


def aggregate_records(records: list[Record], groups: dict[str, dict]) -> list[Record]:
    """For each model (and strategy) with score (or evaluation failure) records and each group with an aggregate
    metric list (plan.json "groups"), one aggregate record per (metric, filter) the group aggregates. Under a
    prompting strategy, the group's leaves are those some model was evaluated on under it (CoT does not apply to
    a loglikelihood task: not a missing leaf)."""
    models: dict[str, Model] = {}
    scores: dict[tuple[str, str, str, str], Record] = {}  # (model, task, metric, filter) -> score record
    scored: set[tuple[str, str]] = set()
    applies: set[tuple[str, str]] = set()  # (strategy, task) evaluated by some model
    for r in records:
        if r.record in ("score", "failure") and r.task is not None:
            models.setdefault(r.entry, Model.of(r))
            if r.strategy is not None:
                applies.add((r.strategy, r.task))
        if r.record == "score":
            scores[r.entry, r.task, r.metric, r.filter] = r
            scored.add((r.entry, r.task))
    out = []
    for label, model in models.items():
        for name, group in groups.items():
            leaves = list(group.get("tasks") or [])
            if model.strategy is not None:
                leaves = [t for t in leaves if (model.strategy, t) in applies]
            for position, spec in enumerate(group.get("aggregate") or []):
                metric = spec["metric"]
                filters = spec.get("filter_list")
                if filters is None:  # as lm-eval: every filter the leaves have this metric under
                    seen = [f for (m, t, mt, f) in scores if m == label and t in leaves and mt == metric]
                    filters = list(dict.fromkeys(seen)) or ["none"]
                for i, filt in enumerate(filters):
                    # as lm-eval: a leaf scored without this metric (gsm8k in an acc mean) is not part of it;
                    # unlike lm-eval, a leaf not scored at all (failed) leaves the aggregate missing
                    mine = [t for t in leaves if (label, t) not in scored or (label, t, metric, filt) in scores]
                    found = [scores.get((label, t, metric, filt)) for t in mine]
                    out.append(
                        _aggregate(
                            model,
                            name,
                            mine,
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
        record.error = "missing " + ", ".join(missing) if missing else f"no leaf task reports {metric} ({filt})"
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


# --- views that several renderings share -------------------------------------------------------------------


def comparable(records: list[Record]) -> bool:
    """Scores an average may mix: higher is better and within [0, 1] (accuracies, exact match, F1...)."""
    values = [r.value for r in records if r.value is not None]
    return bool(values) and all(r.higher_is_better is True for r in records) and all(0 <= v <= 1 for v in values)


def average_scores(records: list[Record]) -> tuple[list[str], dict[str, float | None]]:
    """The tasks an average may take (their primary scores comparable), and per model with task records
    the mean of its primary scores over them (None if it lacks one). Models by `Record.entry`."""
    primaries = [r for r in records if r.record == "score" and r.primary]
    tasks = sorted({r.task for r in primaries})
    averaged = [t for t in tasks if comparable([r for r in primaries if r.task == t])]
    value = {(r.entry, r.task): r.value for r in primaries}
    models = dict.fromkeys(r.entry for r in records if r.record in ("score", "failure") and r.task is not None)
    means: dict[str, float | None] = {}
    for model in models:
        scores = [value.get((model, t)) for t in averaged]
        means[model] = sum(scores) / len(scores) if averaged and None not in scores else None
    return averaged, means


def group_leaves(records: list[Record]) -> dict[str, list[str]]:
    """group -> its leaf tasks that have score or failure records (sorted), from the records' `groups`."""
    leaves: dict[str, set[str]] = {}
    for r in records:
        if r.record in ("score", "failure") and r.task is not None:
            for g in r.groups:
                leaves.setdefault(g, set()).add(r.task)
    return {g: sorted(tasks) for g, tasks in sorted(leaves.items())}


def headline(records: list[Record]) -> tuple[str, dict[str, float]]:
    """One score per model, for plots: the primary aggregate of the widest group (most leaf tasks; then by
    name) if any group has one, else the average over comparable primary scores (the leaderboard's
    average). A group that aggregates only the share of parseable answers (the affective groups) has no score.
    Returns what it is ("group (metric)", "average (metrics)") and model (`Record.entry`) -> value."""
    leaves = group_leaves(records)
    aggregates = [r for r in records if r.record == "aggregate" and r.primary and r.metric != PARSE_RATE]
    if aggregates:
        main = min({r.group for r in aggregates}, key=lambda g: (-len(leaves.get(g, ())), g))
        rows = [r for r in aggregates if r.group == main]
        return f"{main} ({rows[0].metric})", {r.entry: r.value for r in rows if r.value is not None}
    averaged, means = average_scores(records)
    if not averaged:
        return "", {}
    metrics = dict.fromkeys(r.metric for r in records if r.record == "score" and r.primary and r.task in averaged)
    return f"average ({', '.join(metrics)})", {m: v for m, v in means.items() if v is not None}
