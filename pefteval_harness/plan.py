"""The plan: a pure function of the validated spec, a DAG of typed base / train / merge / evaluate jobs.

The plan only expands the spec: fine-tunes per task, merges over their experts, and one evaluation job
per (model, task). What it checks is what only expansion reveals: which tasks the names and globs
resolve to (from lm-eval's task index: no dataset is loaded), whether the training tasks have training
splits, labels that collide, the number of merge weights, where the base model is, and the trust rules
(`trust.py`: a model's own code, tasks that run model-written code, pickle-only folders).

A job's id hashes everything that determines its output: its typed config (which holds its inputs' ids,
method, method version, hyperparameters, task identities, seed), the implementation version of its
kind, and the versions of the packages that change numbers. A job whose id is done in the store is not
run again; any change that matters gives a new id, and only downstream of it.
"""

from __future__ import annotations

import fnmatch
import hashlib
import itertools
import json
import math
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pefteval_harness import tiny_model
from pefteval_harness.errors import BadInput
from pefteval_harness.finetuning import get_method
from pefteval_harness.jobs.types import (
    PLAN_SCHEMA,
    AnalysisSettings,
    AnalyzeConfig,
    ArtifactRef,
    BaseConfig,
    DeepSpeedSettings,
    EvaluateConfig,
    HubRef,
    Job,
    JudgeConfig,
    Lineage,
    LoadedModel,
    LocalRef,
    MergeConfig,
    MergeLineage,
    ModelRef,
    Resources,
    TrainConfig,
    identity_fields,
)
from pefteval_harness.provenance import numeric_versions
from pefteval_harness.spec import BASE_LABEL, TINY, Spec
from pefteval_harness.trust import check_model_code, check_unsafe_code, refuse_pickles


@dataclass
class Plan:
    spec: Spec
    jobs: list[Job] = field(default_factory=list)  # in dependency order
    groups: dict[str, dict] = field(default_factory=dict)  # evaluated groups: leaf tasks, aggregate metrics
    # Shared by every task lookup of this plan: lm-eval's indexes (built-ins take seconds) and task identities.
    task_managers: dict[bool, Any] = field(default_factory=dict, repr=False)
    task_identities: dict[str, str] = field(default_factory=dict, repr=False)
    task_configs: dict[str, dict] = field(default_factory=dict, repr=False)  # resolved YAML: read once
    data_checked: set[tuple[str, bool]] = field(default_factory=set, repr=False)  # (task, for training)
    model_size: tuple[int, int] | None = field(default=None, repr=False)  # the base's, for `auto` memory

    def __post_init__(self) -> None:
        self.spec_hash = self.spec.fingerprint()

    def add(self, label: str, lineage: Lineage, config, resources: Resources, deps=(), keep_artifact=True) -> Job:
        from pefteval_harness.jobs import JOB_KINDS

        if resources.accelerator_memory_gb == "auto":
            resources = self._estimated(config, resources)
        identity = json.dumps(
            {
                "label": label,
                "config": identity_fields(config),
                "implementation": JOB_KINDS[config.kind].version,
                "versions": numeric_versions(),
            },
            sort_keys=True,
        )
        job_id = f"{config.kind}-{hashlib.sha256(identity.encode()).hexdigest()[:16]}"
        deps = list(dict.fromkeys(deps))
        job = Job(
            id=job_id,
            label=label,
            lineage=lineage,
            deps=deps,
            resources=resources,
            spec_hash=self.spec_hash,
            config=config,
            keep_artifact=keep_artifact,
        )
        self.jobs.append(job)
        return job

    def _estimated(self, config, resources: Resources) -> Resources:
        """`accelerator_memory_gb: auto` filled with an estimate from the base model's size (scheduling.py)."""
        from pefteval_harness.scheduling import estimate_accelerator_memory_gb, model_size

        self.model_size = self.model_size or model_size(self.spec.base_model)
        estimate = estimate_accelerator_memory_gb(config, resources, self.model_size)
        return resources.model_copy(update={"accelerator_memory_gb": estimate})

    def to_json(self) -> dict[str, Any]:
        return {
            "schema": PLAN_SCHEMA,
            "name": self.spec.name,
            "spec_hash": self.spec_hash,
            "groups": self.groups,
            "jobs": [job.model_dump(mode="json") for job in self.jobs],
        }

    def describe(self) -> str:
        from tabulate import tabulate

        labels = {j.id: f"{j.kind}:{j.label}" for j in self.jobs}
        rows = [
            [j.id, j.kind, j.label, _task_shown(j.config), ", ".join(labels[d] for d in j.deps) or "-"]
            + [_resources(j.resources)]
            for j in self.jobs
        ]
        from pefteval_harness.jobs import JOB_KINDS

        counts = ", ".join(f"{n} {k}" for k in JOB_KINDS if (n := sum(j.kind == k for j in self.jobs)))
        headers = ["job id", "kind", "model", "task", "after", "resources"]
        table = tabulate(rows, headers=headers, tablefmt="github")
        return f"plan for {self.spec.name!r}: {len(self.jobs)} jobs ({counts})\n\n{table}"


def _task_shown(config) -> str:
    """An evaluation's task, with its prompting strategy when it has one: `pefteval_affect_sst2_gen (cot)`."""
    strategy = getattr(config, "strategy", None)
    task = getattr(config, "task", "")
    return f"{task} ({strategy.name})" if strategy is not None else task


def _resources(r: Resources) -> str:
    parts = [f"{r.num_cpus:g} CPU"] + ([f"{r.num_gpus:g} GPU"] if r.num_gpus else [])
    parts += [f"{r.memory_gb:g} GB"] if r.memory_gb else []
    return ", ".join(parts) + (f" × {r.workers} workers ({r.placement})" if r.workers > 1 else "")


def build_plan(spec: Spec) -> Plan:
    """Expand the spec into jobs; what only expansion reveals is checked here, before anything runs."""
    plan = Plan(spec)
    base, base_deps = _base_reference(spec, plan)
    if isinstance(base, LocalRef) and (spec.merges or spec.analysis):  # both stream the base's safetensors
        refuse_pickles(Path(base.path), "base_model")
    models: list[_Model] = []  # every model to evaluate, in leaderboard order
    if spec.evaluate.include_base:
        models.append(_Model(BASE_LABEL, _lineage(spec, BASE_LABEL, "base"), LoadedModel(base=base), base_deps))
    trained = _train_jobs(spec, plan, base, base_deps, models)
    merged = _merge_jobs(spec, plan, base, base_deps, trained, models)
    _check_labels_unique(trained, merged)
    _analyze_jobs(spec, plan, base, base_deps, trained)
    _evaluate_jobs(spec, plan, models)
    return plan


@dataclass
class _Model:
    """A model to evaluate: its label, lineage, how lm-eval loads it, and the jobs that make it."""

    label: str
    lineage: Lineage
    loaded: LoadedModel
    deps: list[str]


def _lineage(spec: Spec, label: str, method: str, **fields) -> Lineage:
    return Lineage(model=label, method=method, base=spec.base_model, **fields)


def _base_reference(spec: Spec, plan: Plan) -> tuple[ModelRef, list[str]]:
    """How jobs find the base model."""
    return _model_reference(spec, plan, spec.base_model, "base_model")


def _model_reference(spec: Spec, plan: Plan, name: str, where: str) -> tuple[ModelRef, list[str]]:
    """How jobs find a model the spec names (the base, a judge), and the jobs that make it: a job of this
    plan (tiny), a local folder, or a pinned hub revision."""
    if name == TINY:
        config = BaseConfig(fingerprint=tiny_model.fingerprint())
        made = next((job for job in plan.jobs if job.config == config), None)
        job = made or plan.add(BASE_LABEL, _lineage(spec, BASE_LABEL, "base"), config, spec.resources.merge)
        return ArtifactRef(job=job.id), [job.id]
    path = Path(name)
    if path.is_absolute() and path.exists():  # the spec made local folders absolute
        if not (path / "config.json").is_file():
            raise BadInput(f"{where}: {name} is not a model folder (no config.json)")
        try:
            config = json.loads((path / "config.json").read_text())
        except (ValueError, OSError) as e:
            raise BadInput(f"{where}: {name}/config.json is not valid JSON ({e})") from None
        if not isinstance(config, dict) or "model_type" not in config:
            raise BadInput(f"{where}: {name}/config.json has no model_type: not a transformers model config")
        check_model_code(path, spec.trust_remote_code, where)
        # Changing the weights in place must change the ids: fingerprint the folder's files.
        stats = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in path.iterdir() if p.is_file())
        return LocalRef(path=name, fingerprint=hashlib.sha256(repr(stats).encode()).hexdigest()[:16]), []
    if name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise BadInput(f"{where}: no such model folder {name!r} (and not a hub id like org/name)")
    revision = _hub_revision(name, where)
    check_model_code(_hub_config_folder(name, revision), spec.trust_remote_code, where, name=name)
    return HubRef(repo=name, revision=revision), []


def _hub_config_folder(repo: str, revision: str) -> Path | None:
    """The local snapshot folder of the repo's config files (config.json, tokenizer_config.json), fetched
    into the HF cache when online; None when neither can be had (the loader then reports what is missing)."""
    from huggingface_hub import hf_hub_download, try_to_load_from_cache

    folder = None
    for filename in ("config.json", "tokenizer_config.json"):
        cached = try_to_load_from_cache(repo, filename, revision=revision)
        if not isinstance(cached, str) and os.environ.get("HF_HUB_OFFLINE") != "1":
            try:
                cached = hf_hub_download(repo, filename, revision=revision)
            except Exception:  # not in this repo, or unreachable: nothing of it to check
                continue
        if isinstance(cached, str):
            folder = Path(cached).parent
    return folder


def _hub_revision(repo: str, where: str = "base_model") -> str:
    """The commit a hub model resolves to now: from the local HF cache offline, else from the hub."""
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(repo, "config.json")
    if isinstance(cached, str):  # .../snapshots/<commit>/config.json
        return Path(cached).parent.name
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        raise BadInput(f"{where}: {repo!r} is not a local folder and not in the HF cache (HF_HUB_OFFLINE=1)")
    from huggingface_hub import HfApi

    try:
        return HfApi().model_info(repo).sha
    except Exception as e:  # not found, gated, no network: all bad input for this spec
        raise BadInput(f"{where}: cannot resolve {repo!r} on the HuggingFace hub ({type(e).__name__})") from None


def _tasks(patterns: list[str], where: str, spec: Spec, plan: Plan):
    from pefteval_harness.tasks import UnsupportedGroup, resolve_tasks

    try:
        return resolve_tasks(patterns, spec.include_paths, managers=plan.task_managers)
    except KeyError as e:
        raise BadInput(f"{where}: no task matches {e.args[0]!r} (see `pefteval tasks list`)") from None
    except UnsupportedGroup as e:
        raise BadInput(f"{where}: {e}") from None


def _check_data(plan: Plan, selection, tasks: list[str], where: str, training: bool) -> None:
    """With PEFTEVAL_DATA_DIR set, every file these tasks will read must be there: bad input now, not a
    failed job later."""
    from pefteval_harness.tasks.data import check_local_files, data_specs

    for task in tasks:
        if (task, training) in plan.data_checked:
            continue
        plan.data_checked.add((task, training))
        try:
            for data in data_specs(_config(plan, selection, task)):
                check_local_files(data, training)
        except BadInput as e:
            raise BadInput(f"{where}: {task}: {e}") from None


def _config(plan: Plan, selection, task: str) -> dict:
    """A task's resolved configuration, read once per plan (its YAML files and hook modules)."""
    from pefteval_harness.tasks import task_config

    if task not in plan.task_configs:
        plan.task_configs[task] = task_config(selection.manager, task)
    return plan.task_configs[task]


def _metadata(plan: Plan, selection, task: str) -> dict:
    return _config(plan, selection, task).get("metadata") or {}


def _identity(plan: Plan, selection, task: str) -> str:
    """A task's identity, computed once per plan."""
    from pefteval_harness.tasks import task_identity

    if task not in plan.task_identities:
        plan.task_identities[task] = task_identity(selection.manager, task, _config(plan, selection, task))
    return plan.task_identities[task]


def _train_jobs(spec, plan, base, base_deps, models) -> dict[str, list[Job]]:
    """One train job per fine-tune or sweep point (per task with per_task); returns label -> its jobs,
    where the label is the fine-tune's name, or a sweep point's (`lora[r=4]`)."""
    trained: dict[str, list[Job]] = {}
    for name, points in spec.finetune_points().items():
        for point in points:
            trained[point.label] = _train_point(spec, plan, name, point, base, base_deps, models)
    return trained


def _train_point(spec, plan, name, point, base, base_deps, models) -> list[Job]:
    ft = point.item
    method = get_method(ft.method)
    settings = spec.train_settings(ft)
    where = f"finetunes.{name}.train.tasks" if "tasks" in ft.train else "train.tasks"
    if not settings.tasks:
        raise BadInput(f"{where}: no training tasks given")
    selection = _tasks(settings.tasks, where, spec, plan)
    for task in selection.names:
        config = selection.manager.task_index[task].cfg
        if config is not None and not config.get("training_split"):
            raise BadInput(f"{where}: task {task!r} has no training split")
    _check_data(plan, selection, selection.names, where, training=True)
    deepspeed = ft.deepspeed or (DeepSpeedSettings() if method.produces == "model" else None)
    jobs = []
    for tasks in [[t] for t in selection.names] if ft.per_task else [selection.names]:
        config = TrainConfig(
            method=method.name,
            method_version=method.version,
            peft=ft.config if method.peft_config_class else None,
            deepspeed=deepspeed,
            train=settings.model_copy(update={"tasks": tasks}),
            task_identities={t: _identity(plan, selection, t) for t in tasks},
            base=base,
            seed=spec.seed,
            trust_remote_code=spec.trust_remote_code,
            include_paths=spec.include_paths,
        )
        label = f"{point.label}/{tasks[0]}" if ft.per_task else point.label
        lineage = _lineage(spec, label, method.name, trained_on=tasks, sweep_of=point.sweep_of, sweep=point.values)
        resources = Resources.model_validate({**spec.resources.train.model_dump(), **ft.resources})
        if settings.batch_size % resources.workers:  # the batch is global: each rank takes an equal share
            raise BadInput(
                f"finetunes.{name}: batch_size {settings.batch_size} does not split over {resources.workers} workers"
            )
        job = plan.add(label, lineage, config, resources, base_deps)
        jobs.append(job)
        if ft.evaluate:
            loaded = _loaded(job, method.produces, base)
            deps = [job.id] if method.produces == "model" else [*base_deps, job.id]
            models.append(_Model(label, lineage, loaded, deps))
    return jobs


def _loaded(job: Job, produces: str, base: ModelRef) -> LoadedModel:
    """How lm-eval (or the analysis) loads what a train or merge job made: a model, or base + adapter."""
    own = ArtifactRef(job=job.id)
    return LoadedModel(base=own) if produces == "model" else LoadedModel(base=base, adapter=own)


def _analyze_jobs(spec: Spec, plan: Plan, base: ModelRef, base_deps: list[str], trained) -> None:
    """With `analysis:`, one job per trained model: its weight update, and its overlap with the
    reference full fine-tune trained on the same tasks (if the spec names one)."""
    if spec.analysis is None:
        return
    reference = spec.analysis.reference
    references = {tuple(j.config.train.tasks): j for j in trained[reference]} if reference else {}
    settings = AnalysisSettings(**spec.analysis.model_dump(exclude={"reference"}))
    for jobs in trained.values():
        for job in jobs:
            ref = references.get(tuple(job.config.train.tasks))
            ref = None if ref is None or ref.id == job.id else ref
            config = AnalyzeConfig(
                method=job.config.method,
                base=base,
                model=_loaded(job, get_method(job.config.method).produces, base),
                reference=_loaded(ref, "model", base) if ref else None,
                settings=settings,
                trust_remote_code=spec.trust_remote_code,
            )
            deps = [*base_deps, job.id, *([ref.id] if ref else [])]
            plan.add(job.label, job.lineage, config, spec.resources.analyze, deps)


def _merge_jobs(spec, plan, base, base_deps, trained, models) -> list[Job]:
    """One merge job per merge or sweep point, over every expert job of the fine-tunes it names (the pool),
    or, with `subsets`, one per chosen subset of k of them (the scaling sweep)."""
    merged = []
    for name, points in spec.merge_points().items():
        for point in points:
            pool = [job for expert in point.item.experts for job in trained[expert]]
            if point.item.weights is not None and len(point.item.weights) != len(pool):
                raise BadInput(f"merges.{name}.weights: {len(point.item.weights)} weights for {len(pool)} experts")
            for label, values, experts in _expert_sets(spec, name, point, pool):
                merged.append(_merge_job(spec, plan, name, point.item, label, values, experts, base, base_deps, models))
    return merged


def _expert_sets(spec, name, point, pool):
    """(label, sweep values, experts) of each merge a point makes: the whole pool, or each chosen subset."""
    subsets = point.item.subsets
    if subsets is None:
        yield point.label, point.values, pool
        return
    seed = spec.seed if subsets.seed is None else subsets.seed
    for k in subsets.k:
        if k > len(pool):
            raise BadInput(f"merges.{name}.subsets.k: {k} is larger than the pool of {len(pool)} experts")
        for i, chosen in enumerate(choose_subsets(len(pool), k, subsets.per_k, seed), 1):
            shown = f"k={k},s={i}"
            label = f"{point.label[:-1]},{shown}]" if point.sweep_of else f"{point.label}[{shown}]"
            yield label, {**point.values, "k": k, "subset": i}, [pool[j] for j in chosen]


def choose_subsets(n: int, k: int, count: int, seed: int) -> list[tuple[int, ...]]:
    """`count` distinct k-subsets of range(n) as sorted index tuples, all of them (in order) if there are no
    more. Drawn from a generator seeded by (seed, n, k) alone, so every method merging a pool of this size
    is scored on the same subsets."""
    if math.comb(n, k) <= count:
        return list(itertools.combinations(range(n), k))
    rng = random.Random(f"{seed}/{n}/{k}")  # a str seed hashes the same in every process
    chosen: dict[tuple[int, ...], None] = {}
    while len(chosen) < count:
        chosen.setdefault(tuple(sorted(rng.sample(range(n), k))))
    return list(chosen)


def _merge_job(spec, plan, name, merge, label, values, experts, base, base_deps, models) -> Job:
    from pefteval_harness.merging import get_method as get_merge_method

    method = get_merge_method(merge.method)
    try:
        method.resolve_weights(merge.weights, len(experts))  # e.g. SLERP's two experts
    except BadInput as e:
        raise BadInput(f"merges.{name}: {e}") from None
    produces = "adapter" if merge.space == "factor" else "model"
    seed = spec.seed if merge.seed is None else merge.seed
    weights = merge.weights
    if merge.normalize_weights:
        given = weights or [1.0] * len(experts)
        weights = [w / sum(given) for w in given]
    config = MergeConfig(
        method=merge.method,
        method_version=method.version,
        parameters=merge.parameters,
        weights=weights,
        space=merge.space,
        experts=[job.id for job in experts],
        base=base,
        seed=seed,
        produces=produces,
        theory=merge.theory,
    )
    lineage = _lineage(
        spec,
        label,
        f"merge:{merge.method}",
        trained_on=sorted({t for j in experts for t in j.config.train.tasks}),
        merge=MergeLineage(method=merge.method, experts=[j.label for j in experts], k=len(experts), seed=seed),
        sweep_of=name if values else None,
        sweep=values,
    )
    deps = [*base_deps, *(j.id for j in experts)]
    job = plan.add(label, lineage, config, spec.resources.merge, deps, keep_artifact=merge.keep_model)
    if merge.evaluate:
        deps = [*base_deps, job.id] if produces == "adapter" else [job.id]
        models.append(_Model(label, lineage, _loaded(job, produces, base), deps))
    return job


def _check_labels_unique(trained: dict[str, list[Job]], merged: list[Job]) -> None:
    """Every model is one leaderboard row: two models with one label would merge silently."""
    seen: dict[str, str] = {}
    labels = [(job.label, f"finetunes.{name}") for name, jobs in trained.items() for job in jobs]
    labels += [(job.label, f"merges.{job.lineage.sweep_of or job.label}") for job in merged]
    for label, where in labels:
        if label in seen or label == BASE_LABEL:
            other = seen.get(label, "the base model")
            raise BadInput(f"{where}: the model label {label!r} is already used by {other}")
        seen[label] = where


def _evaluate_jobs(spec: Spec, plan: Plan, models: list[_Model]) -> None:
    """One evaluation job per (model, task, prompting strategy), with the task's own settings."""
    from pefteval_harness.tasks import check_evaluate_arguments

    selection = _tasks(spec.evaluate.tasks, "evaluate.tasks", spec, plan)
    plan.groups = selection.groups_json()
    for pattern in spec.evaluate.per_task:
        if not fnmatch.filter(selection.names, pattern):
            raise BadInput(f"evaluate.per_task.{pattern}: matches none of the evaluated tasks")
    settings = {task: spec.evaluate.settings_for(task) for task in selection.names}
    for task in selection.names:
        check_unsafe_code(task, _config(plan, selection, task), settings[task])
    check_evaluate_arguments(
        [k for s in settings.values() for k in s.model_dump(exclude_defaults=True) if k != "batch_size"]
    )
    _check_data(plan, selection, selection.names, "evaluate.tasks", training=False)
    identities = {task: _identity(plan, selection, task) for task in selection.names}
    applies = _strategies_by_task(spec, plan, selection)
    judges = _judges(spec, plan, selection)
    taught_by = {}
    if spec.evaluate.trained_tasks_only:
        from pefteval_harness.tasks import trained_by

        taught_by = {task: trained_by(selection.manager, task) for task in selection.names}
    for model in models:
        tasks = selection.names
        if taught_by and model.lineage.trained_on:  # the base model is scored on every task
            tasks = [t for t in tasks if taught_by[t] in model.lineage.trained_on]
            if not tasks:
                trained = ", ".join(model.lineage.trained_on)
                raise BadInput(f"evaluate.trained_tasks_only: {model.label} is trained on {trained}, none evaluated")
        for strategy, task in itertools.product(spec.evaluate.strategies or [None], tasks):
            if strategy is not None and task not in applies[strategy.name]:
                continue
            judge, judge_deps = judges.get(task, (None, []))
            config = EvaluateConfig(
                task=task,
                task_identity=identities[task],
                model=model.loaded,
                settings=settings[task],
                seed=spec.seed,
                trust_remote_code=spec.trust_remote_code,
                include_paths=spec.include_paths,
                strategy=strategy,
                judge=judge,
            )
            plan.add(model.label, model.lineage, config, spec.resources.evaluate, model.deps + judge_deps)


def _strategies_by_task(spec: Spec, plan: Plan, selection) -> dict[str, list[str]]:
    """Strategy name -> the evaluated tasks it applies to (a task's `metadata.strategies`); a k-shot pool
    larger than a task's local few-shot split is bad input now, not a failed job later."""
    from pefteval_harness.prompting import KShot, few_shot_split

    applies: dict[str, list[str]] = {}
    configs = {task: _config(plan, selection, task) for task in selection.names}
    for i, strategy in enumerate(spec.evaluate.strategies):
        where = f"evaluate.strategies[{i}] ({strategy.name})"
        applies[strategy.name] = [task for task, config in configs.items() if strategy.applies_to(task, config)]
        if not applies[strategy.name]:
            raise BadInput(f"{where}: applies to none of the evaluated tasks (see their metadata.strategies)")
        if isinstance(strategy, KShot):
            for task in applies[strategy.name]:
                available = _local_records(configs[task], few_shot_split(configs[task]))
                if available is not None and available < strategy.pool_size:
                    raise BadInput(
                        f"{where}: k-shot needs a pool of {strategy.pool_size} examples, but {task}'s few-shot"
                        f" split has {available} records in PEFTEVAL_DATA_DIR"
                    )
    return applies


def _local_records(config: dict, split: str | None) -> int | None:
    """Records of a task's split in PEFTEVAL_DATA_DIR (0 when its file is missing); None when the data
    come from the hub or are generated (counted only when the job loads them)."""
    from pefteval_harness.tasks.data import data_dir, data_specs

    root = data_dir()
    files = [data.local_file(root, split) for data in data_specs(config) if split in data.splits] if root else []
    if not files:
        return None
    return sum(sum(1 for line in path.open(encoding="utf-8") if line.strip()) for path in files if path.is_file())


def _judges(spec: Spec, plan: Plan, selection) -> dict[str, tuple[JudgeConfig, list[str]]]:
    """Task -> the judge of its replies and the jobs that make the judge model, for the judged tasks."""
    judge = spec.evaluate.judge
    if judge is None:
        return {}
    from pefteval_harness.judge import DEFAULT_RUBRIC

    if judge.tasks is None:
        judged = [t for t in selection.names if _metadata(plan, selection, t).get("affect") == "generation"]
        if not judged:
            raise BadInput("evaluate.judge: no evaluated task is a generation task (metadata.affect): name its tasks")
    else:
        judged = []
        for pattern in judge.tasks:
            matched = fnmatch.filter(selection.names, pattern)
            if not matched:
                raise BadInput(f"evaluate.judge.tasks: {pattern!r} matches none of the evaluated tasks")
            judged += [t for t in matched if t not in judged]
    for task in judged:
        if _config(plan, selection, task).get("output_type") != "generate_until":
            raise BadInput(f"evaluate.judge.tasks: {task} is not generative: there are no replies to judge")
    reference, deps = _model_reference(spec, plan, judge.model, "evaluate.judge.model")
    config = JudgeConfig(
        model=reference,
        rubric=judge.rubric or DEFAULT_RUBRIC,
        max_new_tokens=judge.max_new_tokens,
        batch_size=judge.batch_size,
    )
    return {task: (config, deps) for task in judged}
