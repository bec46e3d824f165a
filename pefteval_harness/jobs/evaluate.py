"""Evaluate jobs: lm-eval's `simple_evaluate` on one task of a base model, an adapter or a merged model.

Each job is one (model, task). A worker given several jobs of one model loads it once (an lm-eval `HFLM`)
and scores each task with that task's own settings; one task failing fails only its own job.
"""

from __future__ import annotations

from pefteval_harness.jobs import load_kwargs, model_path, prefer_safetensors
from pefteval_harness.jobs.types import Job
from pefteval_harness.store import Store
from pefteval_harness.tasks import manager_for


def lm_eval_model_args(job: Job, store: Store) -> dict:
    """`--model hf` arguments for the model a job names (also what users pass to lm_eval by hand)."""
    model = job.config.model
    pretrained = model_path(model.base, store)
    args = {
        "pretrained": pretrained,
        "trust_remote_code": job.config.trust_remote_code,
        **load_kwargs(model.base),
        **prefer_safetensors(pretrained),
    }
    if model.adapter is not None:
        args["peft"] = model_path(model.adapter, store)
    return args


# Per-task entries of lm-eval's results dict; everything else (config, versions of packages, environment)
# describes the run and is shared by every task of one `simple_evaluate` call.
_PER_TASK_KEYS = ("results", "group_subtasks", "configs", "versions", "n-shot", "higher_is_better", "n-samples")


def split_results(results: dict, task: str) -> dict:
    """One task's share of an lm-eval results dict, in the same format (as if it had run alone)."""
    if task not in results.get("results", {}):
        raise RuntimeError(f"lm-eval returned no results for {task}")
    shared = {k: v for k, v in results.items() if k not in _PER_TASK_KEYS and k not in ("groups", "samples")}
    own = {k: {task: results[k][task]} if task in results.get(k, {}) else {} for k in _PER_TASK_KEYS}
    return {**own, **shared}


def evaluate_batch(jobs: list[Job], store: Store) -> dict[str, dict | BaseException]:
    """Evaluate jobs that share one model; job id -> lm-eval's results dict, or the error of that task.

    The model is loaded once and each task is built on its own (a task whose data fails to load fails
    only its job). Built tasks with identical settings are then scored in one `simple_evaluate` call, as
    lm_eval itself does (its per-call overhead, such as collecting environment info, is paid once), and
    the results are split per task; if that call fails, its tasks are scored one by one. Raises if the
    model itself cannot be loaded (every job fails alike).
    """
    import torch
    from lm_eval.models.huggingface import HFLM

    first = jobs[0]
    assert all(job.config.model == first.config.model for job in jobs), "a batch evaluates one model"
    device = "cuda" if first.resources.num_gpus and torch.cuda.is_available() else "cpu"
    model_args = lm_eval_model_args(first, store)
    lm = HFLM(**model_args, device=device, batch_size=first.config.settings.batch_size)
    manager = manager_for([job.config.task for job in jobs], first.config.include_paths)
    results: dict[str, dict | BaseException] = {}
    built: dict[str, object] = {}  # job id -> its lm-eval Task
    same_settings: dict[str, list[Job]] = {}
    for job in jobs:
        try:
            built[job.id] = manager.load([job.config.task])["tasks"][job.config.task]
        except Exception as e:
            results[job.id] = e
            continue
        key = job.config.settings.model_dump_json() + str(job.config.seed)
        same_settings.setdefault(key, []).append(job)
    for together in same_settings.values():
        try:
            combined = _simple_evaluate(lm, together, [built[job.id] for job in together], manager)
            results.update({job.id: split_results(combined, job.config.task) for job in together})
        except Exception as e:
            if len(together) == 1:
                results[together[0].id] = e
                continue
            for job in together:  # find which task fails, and keep the others
                try:
                    result = _simple_evaluate(lm, [job], [built[job.id]], manager)
                    results[job.id] = split_results(result, job.config.task)
                except Exception as error:
                    results[job.id] = error
    for result in results.values():
        if isinstance(result, dict):
            result["config"] = {**result.get("config", {}), "model_args": model_args}
    return results


def _simple_evaluate(lm, jobs: list[Job], tasks: list, manager) -> dict:
    """lm-eval's `simple_evaluate` on these jobs' built tasks, which share their settings and seed."""
    from lm_eval import simple_evaluate

    config = jobs[0].config
    seed = config.seed
    result = simple_evaluate(
        model=lm,
        tasks=tasks,
        task_manager=manager,  # without it lm-eval indexes all of its built-in tasks (seconds)
        log_samples=False,
        random_seed=seed,
        numpy_random_seed=seed,
        torch_random_seed=seed,
        fewshot_random_seed=seed,
        **config.settings.model_dump(exclude={"batch_size"}),
    )
    if result is None:  # lm-eval returns None off rank 0 (LOCAL_RANK set by a launcher)
        raise RuntimeError("lm-eval returned no results: is LOCAL_RANK set to a non-zero rank?")
    return dict(result)
