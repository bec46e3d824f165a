"""Evaluate jobs: lm-eval's `simple_evaluate` on one task of a base model, an adapter or a merged model.

Each job is one (model, task), or (model, task, prompting strategy). A worker given several jobs of one model
loads it once (an lm-eval `HFLM`) and scores each task with that task's own settings and strategy (lm-eval
config overrides: `pefteval_harness.prompting`); one task failing fails only its own job. A job with a judge
logs its samples and has the judge (`pefteval_harness.judge`) score the generated replies.

Prompt-learning adapters (prompt tuning, P-tuning, prefix tuning, cartridges) put virtual tokens in front
of the input. lm-eval's log-likelihoods already line up with the real tokens: `HFLM` drops the extra
leading logits a PeftModel returns (`tests/test_finetuning_methods.py` checks it against the PeftModel's
own forward pass). Generation does not, in peft 0.21 with transformers 5: `generate()` with a KV cache,
which lm-eval always asks for, drops the prefix of prefix tuning and cartridges (the base model's text
comes out), and without the cache it still drifts from the forward pass after the first token. So
`load_lm` makes prompt-learning adapters decode greedily with full forward passes, one sequence at a time,
exactly as they were trained (slower: quadratic in the generated length; sampling is refused).
"""

from __future__ import annotations

import functools

from pefteval_harness.jobs import load_kwargs, model_path, prefer_safetensors
from pefteval_harness.jobs.types import Job
from pefteval_harness.progress import RequestProgress
from pefteval_harness.store import Store
from pefteval_harness.tasks import build_task, manager_for


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


def _greedy_by_forward(model, input_ids, attention_mask=None, max_length=None, pad_token_id=None, **kwargs):
    """`generate()` for prompt-learning PeftModels: greedy, each row on its own (no padding next to the
    virtual tokens), stopped at EOS or `max_length` (lm-eval's `max_gen_toks`); lm-eval cuts at its stop
    strings afterwards. Returns the inputs followed by the new tokens, right-padded, as `generate()` does."""
    import torch

    from pefteval_harness.errors import BadInput

    if kwargs.get("do_sample"):
        raise BadInput("sampling (do_sample) is not supported for prompt-learning adapters: use greedy decoding")
    eos = model.config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    masks = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
    rows = []
    for row, mask in zip(input_ids, masks, strict=True):
        ids = row[mask.bool()].unsqueeze(0)  # lm-eval pads on the left
        new: list[int] = []
        while input_ids.shape[1] + len(new) < max_length:
            with torch.no_grad():
                token = int(model(input_ids=ids).logits[0, -1].argmax())
            new.append(token)
            if token in eos:
                break
            ids = torch.cat([ids, ids.new_tensor([[token]])], dim=1)
        rows.append(torch.cat([row, row.new_tensor(new)]))
    width = max(len(r) for r in rows)
    pad = pad_token_id if pad_token_id is not None else next(iter(eos))
    return torch.stack([torch.cat([r, r.new_full((width - len(r),), pad)]) for r in rows])


def load_lm(**model_args):
    """lm-eval's `HFLM` for these `--model hf` arguments, with prompt-learning adapters generating right."""
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(**model_args)
    config = getattr(lm.model, "active_peft_config", None)
    if config is not None and config.is_prompt_learning:
        lm.model.generate = functools.partial(_greedy_by_forward, lm.model)  # see the module docstring
    return lm


# Per-task entries of lm-eval's results dict; everything else (config, versions of packages, environment)
# describes the run and is shared by every task of one `simple_evaluate` call.
_PER_TASK_KEYS = ("results", "group_subtasks", "configs", "versions", "n-shot", "higher_is_better", "n-samples")


def split_results(results: dict, task: str) -> dict:
    """One task's share of an lm-eval results dict, in the same format (as if it had run alone)."""
    if task not in results.get("results", {}):
        raise RuntimeError(f"lm-eval returned no results for {task}")
    shared = {k: v for k, v in results.items() if k not in _PER_TASK_KEYS and k not in ("groups", "samples")}
    own = {k: {task: results[k][task]} if task in results.get(k, {}) else {} for k in _PER_TASK_KEYS}
    if "samples" in results:  # logged for a judge
        own["samples"] = {task: results["samples"].get(task, [])}
    return {**own, **shared}


def evaluate_batch(jobs: list[Job], store: Store) -> dict[str, dict | BaseException]:
    """Evaluate jobs that share one model; job id -> lm-eval's results dict, or the error of that task.

    The model is loaded once and each task is built on its own (a task whose data fails to load fails
    only its job). Built tasks with identical settings are then scored in one `simple_evaluate` call, as
    lm_eval itself does (its per-call overhead, such as collecting environment info, is paid once), and
    the results are split per task; if that call fails, its tasks are scored one by one. Raises if the
    model itself cannot be loaded (every job fails alike).
    """
    import os

    import torch

    # lm-eval bootstraps the stderr of MCC, F1, BLEU... in a multiprocessing pool forked from this worker,
    # whose threads (Ray's, torch's) can hold locks at the fork: the children then hang for good. A job
    # has its own CPUs anyway: bootstrap in this process (lm-eval's switch; its resamples are seeded).
    os.environ["DISABLE_MULTIPROC"] = "1"
    first = jobs[0]
    assert all(job.config.model == first.config.model for job in jobs), "a batch evaluates one model"
    device = "cuda" if first.resources.num_gpus and torch.cuda.is_available() else "cpu"
    model_args = lm_eval_model_args(first, store)
    lm = load_lm(**model_args, device=device, batch_size=first.config.settings.batch_size)
    progress = RequestProgress(lm, store)  # each job's requests scored so far, for `pefteval status`
    manager = manager_for([job.config.task for job in jobs], first.config.include_paths)
    results: dict[str, dict | BaseException] = {}
    built: dict[str, object] = {}  # job id -> its lm-eval Task
    same_settings: dict[str, list[Job]] = {}
    for job in jobs:
        try:
            built[job.id] = build_strategy_task(manager, job)
        except Exception as e:
            results[job.id] = e
            continue
        # One call scores tasks of one name once: a task under two strategies goes to two calls.
        config = job.config
        key = config.model_dump_json(include={"settings", "seed", "strategy", "judge"})
        same_settings.setdefault(key, []).append(job)
    for together in same_settings.values():
        try:
            with progress.scoring({job.id: job.config.task for job in together}):
                combined = _simple_evaluate(lm, together, [built[job.id] for job in together], manager)
            results.update({job.id: split_results(combined, job.config.task) for job in together})
        except Exception as e:
            if len(together) == 1:
                results[together[0].id] = e
                continue
            for job in together:  # find which task fails, and keep the others
                try:
                    with progress.scoring({job.id: job.config.task}):
                        result = _simple_evaluate(lm, [job], [built[job.id]], manager)
                    results[job.id] = split_results(result, job.config.task)
                except Exception as error:
                    results[job.id] = error
    for job in jobs:
        result = results.get(job.id)
        if not isinstance(result, dict):
            continue
        result["config"] = {**result.get("config", {}), "model_args": model_args}
        if job.config.judge is not None:
            try:
                _judge(job, result, store, device)
            except Exception as e:
                results[job.id] = e
        result.pop("samples", None)  # logged for the judge only: lm-eval's results JSON as before
    return results


def build_strategy_task(manager, job: Job):
    """The job's lm-eval task, with its prompting strategy's config overrides applied (built twice then:
    a strategy may read the built task, such as its few-shot docs)."""
    name = job.config.task
    task = build_task(manager, name)
    strategy = job.config.strategy
    if strategy is not None and (overrides := strategy.overrides(task, job.config.seed)):
        task = build_task(manager, name, overrides)
    return task


def _judge(job: Job, result: dict, store: Store, device: str) -> None:
    """Score the job's generated replies with its judge model; the metrics join lm-eval's, the prompts and
    raw judgements are kept in the result (`pefteval_judge`)."""
    from pefteval_harness.judge import judge_samples, judgement_records

    judge, task = job.config.judge, job.config.task
    path = model_path(judge.model, store)
    model_args = {"pretrained": path, "trust_remote_code": job.config.trust_remote_code, **load_kwargs(judge.model)}
    metrics, judgements = judge_samples(
        (result.get("samples") or {}).get(task, []),
        {**model_args, **prefer_safetensors(path)},
        rubric=judge.rubric,
        max_new_tokens=judge.max_new_tokens,
        batch_size=judge.batch_size,
        device=device,
    )
    for name, value in metrics.items():  # as lm-eval reports an unfiltered metric
        result["results"][task][f"{name},none"] = value
        result.setdefault("higher_is_better", {}).setdefault(task, {})[name] = True
    records = judgement_records(judgements)
    result["pefteval_judge"] = {"model": model_args, "rubric": judge.rubric, "judgements": records}


def _simple_evaluate(lm, jobs: list[Job], tasks: list, manager) -> dict:
    """lm-eval's `simple_evaluate` on these jobs' built tasks, which share their settings and seed."""
    from lm_eval import simple_evaluate

    config = jobs[0].config
    seed = config.seed
    settings = config.settings.model_dump(exclude={"batch_size"})
    if config.strategy is not None:
        settings["num_fewshot"] = config.strategy.shots()
    result = simple_evaluate(
        model=lm,
        tasks=tasks,
        task_manager=manager,  # without it lm-eval indexes all of its built-in tasks (seconds)
        log_samples=config.judge is not None,  # the judge reads the generated replies
        random_seed=seed,
        numpy_random_seed=seed,
        torch_random_seed=seed,
        fewshot_random_seed=seed,
        **settings,
    )
    if result is None:  # lm-eval returns None off rank 0 (LOCAL_RANK set by a launcher)
        raise RuntimeError("lm-eval returned no results: is LOCAL_RANK set to a non-zero rank?")
    return dict(result)
