"""The plan: a pure function of the spec, a DAG of base / train / merge / evaluate jobs.

A job's id hashes everything that determines its output (kind, configuration with its inputs' ids,
task config versions, seed, and the versions of the packages that change numbers), so a job whose id
is already done in the store is never run again, and any change that matters gives a new id.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pefteval_harness import tiny_model
from pefteval_harness.errors import BadInput
from pefteval_harness.finetuning import get_method
from pefteval_harness.provenance import numeric_versions
from pefteval_harness.spec import TINY, DeepSpeedSettings, JobResources, Spec


@dataclass(frozen=True)
class Job:
    id: str
    kind: str  # base | train | merge | evaluate
    label: str  # the model's name in the leaderboard
    deps: tuple[str, ...]
    resources: dict
    config: dict
    spec_hash: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Plan:
    spec: Spec
    jobs: list[Job] = field(default_factory=list)  # in dependency order

    def __post_init__(self) -> None:
        self.spec_hash = self.spec.fingerprint()

    def add(self, kind: str, label: str, config: dict, resources: JobResources, deps=()) -> Job:
        identity = json.dumps(
            {"kind": kind, "label": label, "config": config, "versions": numeric_versions()}, sort_keys=True
        )
        job_id = f"{kind}-{hashlib.sha256(identity.encode()).hexdigest()[:16]}"
        job = Job(job_id, kind, label, tuple(deps), resources.model_dump(), config, self.spec_hash)
        self.jobs.append(job)
        return job

    def describe(self) -> str:
        from tabulate import tabulate

        labels = {j.id: f"{j.kind}:{j.label}" for j in self.jobs}
        rows = [
            [j.id, j.kind, j.label, ", ".join(labels[d] for d in j.deps) or "-", _resources(j.resources)]
            for j in self.jobs
        ]
        counts = ", ".join(f"{sum(j.kind == k for j in self.jobs)} {k}" for k in ("base", "train", "merge", "evaluate"))
        table = tabulate(rows, headers=["job id", "kind", "model", "after", "resources"], tablefmt="github")
        return f"plan for {self.spec.name!r}: {len(self.jobs)} jobs ({counts})\n\n{table}"


def _resources(r: dict) -> str:
    parts = [f"{r['num_cpus']:g} CPU"] + ([f"{r['num_gpus']:g} GPU"] if r["num_gpus"] else [])
    return ", ".join(parts + ([f"{r['memory_gb']:g} GB"] if r.get("memory_gb") else []))


def _base_reference(spec: Spec, plan: Plan) -> tuple[dict, list[str]]:
    """How jobs find the base model: a job of this plan (tiny), a local folder, or a HF hub id."""
    name = spec.base_model
    if name == TINY:
        job = plan.add("base", "base", {"builder": TINY, "tiny": tiny_model.fingerprint()}, spec.resources.merge)
        return {"job": job.id}, [job.id]
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise BadInput(f"base_model: {name} is not a model folder (no config.json)")
        # Changing the weights in place must change the ids: fingerprint the folder's files.
        stats = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in path.iterdir() if p.is_file())
        return {"path": str(path.resolve()), "files": hashlib.sha256(repr(stats).encode()).hexdigest()[:16]}, []
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise BadInput(f"base_model: no such model folder {name!r}")
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        from huggingface_hub import try_to_load_from_cache

        if not isinstance(try_to_load_from_cache(name, "config.json"), str):
            raise BadInput(f"base_model: {name!r} is not a local folder and not in the HF cache (HF_HUB_OFFLINE=1)")
    return {"path": name}, []


def _tasks(patterns: list[str], where: str, spec: Spec, training: bool = False):
    """Resolve task names or globs to (names, {name: config version}); training tasks need a train split."""
    from pefteval_harness.tasks import resolve_tasks, task_version

    if not patterns:
        raise BadInput(f"{where}: no tasks given")
    try:
        names, manager = resolve_tasks(patterns, spec.include_paths)
    except KeyError as e:
        raise BadInput(f"{where}: no task matches {e.args[0]!r} (see `pefteval tasks list`)") from None
    for name in names if training else ():
        config = manager.task_index[name].cfg
        if config is not None and not config.get("training_split"):
            raise BadInput(f"{where}: task {name!r} has no training split")
    return names, {n: task_version(manager, n) for n in names}


def build_plan(spec: Spec) -> Plan:
    """Expand the spec into jobs; every reference and name is checked here, before anything runs."""
    plan = Plan(spec)
    base, base_deps = _base_reference(spec, plan)
    finetuned = _train_jobs(spec, plan, base, base_deps)
    merged = _merge_jobs(spec, plan, base, base_deps, finetuned)
    _evaluate_jobs(spec, plan, base, finetuned, merged)
    return plan


def _common(spec: Spec) -> dict:
    return {"seed": spec.seed, "trust_remote_code": spec.trust_remote_code, "include_paths": spec.include_paths}


def _train_jobs(spec: Spec, plan: Plan, base: dict, base_deps: list[str]) -> dict[str, list[tuple[Job, str]]]:
    """One train job per fine-tune (per task with per_task); returns name -> [(job, method name)]."""
    finetuned: dict[str, list[tuple[Job, str]]] = {}
    for name, ft in spec.finetunes.items():
        try:
            method = get_method(ft.method)
        except BadInput as e:
            raise BadInput(f"finetunes.{name}.method: {e}") from None
        try:
            if method.is_full and ft.config:
                raise BadInput("full fine-tuning takes no peft config (use deepspeed: for its settings)")
            if not method.is_full:
                method.peft_config(ft.config)
        except BadInput as e:
            raise BadInput(f"finetunes.{name}.config: {e}") from None
        settings = spec.train_settings(ft)
        where = f"finetunes.{name}.train.tasks" if "tasks" in ft.train else "train.tasks"
        tasks, versions = _tasks(settings.tasks, where, spec, training=True)
        deepspeed = ft.deepspeed or (DeepSpeedSettings() if method.is_full else None)
        finetuned[name] = []
        for group in [[t] for t in tasks] if ft.per_task else [tasks]:
            config = {
                **_common(spec),
                "method": method.name,
                "peft": None if method.is_full else {**method.defaults, **ft.config},
                "deepspeed": deepspeed.model_dump() if deepspeed else None,
                "train": {**settings.model_dump(), "tasks": group},
                "task_versions": {t: versions[t] for t in group},
                "base": base,
            }
            label = f"{name}/{group[0]}" if ft.per_task else name
            finetuned[name].append((plan.add("train", label, config, spec.resources.train, base_deps), method.name))
    return finetuned


def _merge_jobs(spec, plan, base, base_deps, finetuned) -> dict[str, tuple[Job, bool]]:
    """One merge job per merge; returns name -> (job, whether its output is an adapter)."""
    merged: dict[str, tuple[Job, bool]] = {}
    from pefteval_harness.merging import get_method as get_merge_method

    for name, merge in spec.merges.items():
        where = f"merges.{name}"
        try:
            method = get_merge_method(merge.method)
        except BadInput as e:
            raise BadInput(f"{where}.method: {e}") from None
        try:
            method.resolve_params(merge.parameters)
        except BadInput as e:
            raise BadInput(f"{where}.parameters: {e}") from None
        experts = [pair for expert in merge.experts for pair in finetuned[expert]]
        jobs = [job for job, _ in experts]
        kinds = sorted({method for _, method in experts})
        if len(kinds) > 1:
            raise BadInput(f"{where}.experts: experts must come from one method, got {', '.join(kinds)}")
        kind = kinds[0]
        if kind not in ("full", "lora"):
            raise BadInput(f"{where}.experts: {kind} experts cannot be merged yet (full and lora can)")
        if kind == "lora" and any(job.config["peft"].get("use_dora") for job in jobs):
            raise BadInput(f"{where}.experts: DoRA experts cannot be merged yet")
        if merge.space == "factor" and kind != "lora":
            raise BadInput(f"{where}.space: factor space needs lora experts, got {kind}")
        if merge.space == "factor" and len({json.dumps(j.config["peft"], sort_keys=True) for j in jobs}) > 1:
            raise BadInput(f"{where}.experts: factor space needs experts with one LoRA config (rank, modules)")
        if merge.weights is not None and len(merge.weights) != len(experts):
            raise BadInput(f"{where}.weights: {len(merge.weights)} weights for {len(experts)} experts")
        config = {
            "method": merge.method,
            "parameters": merge.parameters,
            "weights": merge.weights,
            "space": merge.space,
            "expert_kind": kind,
            "experts": [job.id for job in jobs],
            "base": base,
        }
        job = plan.add("merge", name, config, spec.resources.merge, [*base_deps, *(j.id for j in jobs)])
        merged[name] = (job, kind == "lora" and merge.space == "factor")
    return merged


def _evaluate_jobs(spec, plan, base, finetuned, merged) -> None:
    """One evaluate job per model: the base, each fine-tune, each merge (unless told not to)."""
    tasks, versions = _tasks(spec.evaluate.tasks, "evaluate.tasks", spec)
    # (label, method, how lm-eval loads the model: a base and maybe an adapter)
    models: list[tuple[str, str, dict]] = []
    if spec.evaluate.include_base:
        models.append(("base", "base", {"base": base}))
    for name, ft in spec.finetunes.items():
        for job, method in finetuned[name] if ft.evaluate else ():
            model = {"base": {"job": job.id}} if method == "full" else {"base": base, "adapter": {"job": job.id}}
            models.append((job.label, method, model))
    for name, (job, is_adapter) in merged.items():
        if spec.merges[name].evaluate:
            model = {"base": base, "adapter": {"job": job.id}} if is_adapter else {"base": {"job": job.id}}
            models.append((name, f"merge:{spec.merges[name].method}", model))
    settings = spec.evaluate.model_dump(exclude={"tasks", "include_base"})
    for label, method, model in models:
        config = {
            **_common(spec),
            **settings,
            "method": method,
            "model": model,
            "tasks": tasks,
            "task_versions": versions,
        }
        deps = [ref["job"] for ref in model.values() if "job" in ref]
        plan.add("evaluate", label, config, spec.resources.evaluate, deps)
