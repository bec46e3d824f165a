"""Gang fine-tuning: a train job with `workers: 2` runs as a Ray Train gang, through the runner, on CPU.

A LoRA gang (DDP) whose rank 1 is killed mid-training is restarted by Ray Train, resumes from its
checkpoint and saves an adapter that peft loads. ZeRO-2 and ZeRO-3 gangs, their saved weights and their
equality with one worker, run on two nodes in tests/test_two_node.py (with `check_gang_costs` from here).
"""

from __future__ import annotations

import signal
import threading
import time

import pytest
import torch

from pefteval_harness.jobs import gang
from pefteval_harness.jobs.train import tensors_sha256
from pefteval_harness.plan import build_plan
from pefteval_harness.runner import execute
from pefteval_harness.spec import Spec
from pefteval_harness.store import Store

pytestmark = pytest.mark.slow


def run(tiny_model_dir, store: Store, finetunes: dict, *, max_steps: int, during=None):
    """Plan the fine-tunes (2 workers unless they say; no evaluations) and execute them; `during(job)`
    runs alongside in a thread."""
    gangs = {name: {"evaluate": False, "resources": {"workers": 2}, **ft} for name, ft in finetunes.items()}
    spec = Spec.model_validate(
        {
            "base_model": str(tiny_model_dir),
            "train": {"tasks": ["pefteval_quick_sentiment"], "max_steps": max_steps, "batch_size": 8},
            "finetunes": gangs,
            "evaluate": {"tasks": ["pefteval_quick_sentiment"], "limit": 4, "include_base": False},
        }
    )
    plan = build_plan(spec)
    jobs = {j.label: j for j in plan.jobs if j.kind == "train"}
    thread = threading.Thread(target=during, args=list(jobs.values()), daemon=True) if during else None
    if thread:
        thread.start()
    summary = execute(plan, store, max_retries=0)
    if thread:
        thread.join(timeout=60)
    assert not summary.failed, summary.failed
    return {label: job.id for label, job in jobs.items()}


def full_weights(folder) -> dict:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).state_dict()


def check_gang_costs(store: Store, job_id: str, steps: int) -> dict:
    result = store.result(job_id)
    assert store.is_done(job_id) and result["steps"] == steps
    assert result["workers"] == 2
    assert [w["rank"] for w in result["per_worker"]] == [0, 1]
    assert all(w["trained_tokens"] > 0 and w["peak_rss_mb"] > 0 for w in result["per_worker"])
    # Each rank's own count (carried over a restart by our checkpoint files) adds up to the Trainer's
    # (summed over the ranks, carried over by its own checkpoint state).
    assert sum(w["trained_tokens"] for w in result["per_worker"]) == result["trained_tokens"]
    assert result["peak_rss_mb"] == pytest.approx(sum(w["peak_rss_mb"] for w in result["per_worker"]))
    assert result["peak_accelerator_mb"] is None  # no GPU here
    assert not (store.job_dir(job_id) / "gang").exists()  # Ray Train's checkpoints went after the fit
    return result


def test_a_killed_worker_restarts_the_gang_which_resumes_from_its_checkpoint(local_ray, tmp_path, tiny_model_dir):
    import psutil
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    store = Store(tmp_path / "out")
    killed: dict = {}

    def kill_rank_1(job) -> None:
        """Once Ray Train registered a checkpoint and rank 0 is past step 2, SIGKILL rank 1's process."""
        snapshot = store.job_dir(job.id) / "gang" / job.id / "checkpoint_manager_snapshot.json"
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and not store.is_done(job.id):
            progress = store.progress(job.id) or {}
            if snapshot.exists() and progress.get("step", 0) >= 2:
                roster = local_ray.get_actor(gang.roster_name(job.id), namespace=gang.NAMESPACE)
                pid = local_ray.get(roster.attempts.remote())[-1]["ranks"][1]["pid"]
                process = psutil.Process(pid)
                assert "RayTrainWorker" in " ".join(process.cmdline())
                process.send_signal(signal.SIGKILL)
                killed.update(pid=pid, step=progress["step"])
                return
            time.sleep(0.2)

    # 480 steps, a checkpoint every 120 (Ray Train registers one within its 2 s poll): the kill lands
    # after the first one is registered, seconds before the end even on a quiet machine.
    finetunes = {"lora": {"method": "lora", "config": {"r": 4, "target_modules": ["q_proj", "v_proj"]}}}
    jobs = run(tiny_model_dir, store, finetunes, max_steps=480, during=kill_rank_1)
    assert killed, "the gang finished before rank 1 could be killed"
    result = check_gang_costs(store, jobs["lora"], steps=480)
    assert result["restarts"] >= 1 and 0 < result["resumed_from_step"] < 480
    assert result["gang_seconds"] > result["train_seconds"] > 0

    # The DDP gang's adapter: peft loads it onto the base, and it holds the weights the gang trained.
    adapter = store.artifact(jobs["lora"])
    assert tensors_sha256(load_file(adapter / "adapter_model.safetensors")) == result["weights_sha256"]
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), adapter)
    b_factors = [p for name, p in model.named_parameters() if "lora_B" in name]
    assert b_factors and all(b.abs().sum() > 0 for b in b_factors)  # B starts at zero: training moved it
