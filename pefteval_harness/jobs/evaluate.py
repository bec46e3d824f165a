"""Evaluate jobs: lm-eval's `simple_evaluate` on one task of a base model, an adapter or a merged model.

Each job is one (model, task). A worker given several jobs of one model loads it once (an lm-eval `HFLM`)
and runs each task with that task's own settings; one task failing fails only its own job.
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


def evaluate_batch(jobs: list[Job], store: Store) -> dict[str, dict | BaseException]:
    """Evaluate jobs that share one model; job id -> lm-eval's results dict, or the error of that task.

    Raises if the model itself cannot be loaded (every job fails alike).
    """
    import torch
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    first = jobs[0]
    assert all(job.config.model == first.config.model for job in jobs), "a batch evaluates one model"
    device = "cuda" if first.resources.num_gpus and torch.cuda.is_available() else "cpu"
    model_args = lm_eval_model_args(first, store)
    lm = HFLM(**model_args, device=device, batch_size=first.config.settings.batch_size)
    manager = manager_for([job.config.task for job in jobs], first.config.include_paths)
    results: dict[str, dict | BaseException] = {}
    for job in jobs:
        config, seed = job.config, job.config.seed
        settings = config.settings.model_dump(exclude={"batch_size"})
        try:
            result = simple_evaluate(
                model=lm,
                tasks=[config.task],
                task_manager=manager,
                log_samples=False,
                random_seed=seed,
                numpy_random_seed=seed,
                torch_random_seed=seed,
                fewshot_random_seed=seed,
                **settings,
            )
            if result is None:  # lm-eval returns None off rank 0 (LOCAL_RANK set by a launcher)
                raise RuntimeError("lm-eval returned no results: is LOCAL_RANK set to a non-zero rank?")
            results[job.id] = dict(result)
            results[job.id]["config"] = {**results[job.id].get("config", {}), "model_args": model_args}
        except Exception as e:
            results[job.id] = e
    return results
