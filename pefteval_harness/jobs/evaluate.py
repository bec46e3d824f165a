"""Evaluate job: lm-eval's `simple_evaluate` on a base model, an (unmerged) adapter or a merged model."""

from __future__ import annotations

from pefteval_harness.jobs import model_path
from pefteval_harness.store import Store
from pefteval_harness.tasks import manager_for


def lm_eval_model_args(config: dict, store: Store) -> dict:
    """`--model hf` arguments for the model a job's config names."""
    model = config["model"]
    args = {"pretrained": model_path(model["base"], store), "trust_remote_code": config["trust_remote_code"]}
    if "adapter" in model:
        args["peft"] = model_path(model["adapter"], store)
    return args


def evaluate(job: dict, store: Store) -> dict:
    import torch
    from lm_eval import simple_evaluate

    config = job["config"]
    seed = config["seed"]
    results = simple_evaluate(
        model="hf",
        model_args=lm_eval_model_args(config, store),
        tasks=config["tasks"],
        task_manager=manager_for(config["tasks"], config["include_paths"]),
        num_fewshot=config["num_fewshot"],
        batch_size=config["batch_size"],
        device="cuda" if job["resources"]["num_gpus"] and torch.cuda.is_available() else "cpu",
        limit=config["limit"],
        bootstrap_iters=config["bootstrap_iters"],
        log_samples=False,
        random_seed=seed,
        numpy_random_seed=seed,
        torch_random_seed=seed,
        fewshot_random_seed=seed,
    )
    if results is None:  # lm-eval returns None off rank 0 (LOCAL_RANK set by a launcher)
        raise RuntimeError("lm-eval returned no results: is LOCAL_RANK set to a non-zero rank?")
    return dict(results)
