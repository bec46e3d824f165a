"""Train jobs on Ray: FFT through DeepSpeed ZeRO-3 and a LoRA adapter that lm-eval then loads, on the tiny
model. (Every other peft method, DoRA and AdaLoRA included, trains through the same job body in
tests/test_finetuning_methods.py.)"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from pefteval_harness.plan import build_plan
from pefteval_harness.runner import execute
from pefteval_harness.spec import Spec
from pefteval_harness.store import Store
from pefteval_harness.tasks.rendering import Example

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained(local_ray, tmp_path_factory, tiny_model_dir):
    spec = Spec.model_validate(
        {
            "base_model": str(tiny_model_dir),  # a local model folder, as users name their own
            "train": {"tasks": ["pefteval_quick_sentiment"], "max_steps": 4, "batch_size": 8},
            "finetunes": {
                # its saved weights are checked below; lm-eval scoring a full fine-tune: the quickstart's
                "zero3": {"method": "full", "deepspeed": {"zero_stage": 3}, "evaluate": False},
                "lora": {"method": "lora", "config": {"r": 4, "target_modules": ["q_proj", "v_proj"]}},
            },
            # the adapter only: lm-eval loads it with the base (the base alone is scored everywhere else)
            "evaluate": {"tasks": ["pefteval_quick_sentiment"], "limit": 4, "include_base": False},
        }
    )
    plan = build_plan(spec)
    store = Store(tmp_path_factory.mktemp("train"))
    summary = execute(plan, store, max_retries=0)
    assert not summary.failed, summary.failed
    jobs = {(j.kind, j.label): j.id for j in plan.jobs}  # one evaluated task: one evaluate job per model
    assert {label for kind, label in jobs if kind == "evaluate"} == {"lora"}
    return store, jobs


def test_full_finetune_with_zero3_saves_a_whole_changed_model(trained, tiny_model_dir):
    store, jobs = trained
    assert ("base", "base") not in jobs  # a local base is used in place, not rebuilt
    base = load_file(tiny_model_dir / "model.safetensors")
    tuned = load_file(store.artifact(jobs["train", "zero3"]) / "model.safetensors")
    assert base.keys() == tuned.keys()
    assert all(base[k].shape == tuned[k].shape for k in base)  # ZeRO-3 partitions were gathered
    assert any(not torch.equal(base[k], tuned[k]) for k in base)
    result = store.result(jobs["train", "zero3"])
    assert result["trainable_params"] == result["total_params"] and result["steps"] == 4
    # costs: 4 steps of 8 examples, no padding counted; the weights are the whole model
    assert 0 < result["trained_tokens"] < 4 * 8 * 128 and result["tokens_per_second"] > 0
    assert result["peak_accelerator_mb"] is None  # no GPU here
    weights = (store.artifact(jobs["train", "zero3"]) / "model.safetensors").stat().st_size
    assert weights < result["adapter_bytes"] < result["artifact_bytes"]


def test_a_peft_method_saves_an_adapter_that_loads_and_was_trained(trained, tiny_model_dir):
    from peft import PeftConfig

    store, jobs = trained
    adapter = store.artifact(jobs["train", "lora"])
    config = PeftConfig.from_pretrained(adapter)
    assert config.peft_type.value == "LORA" and set(config.target_modules) == {"q_proj", "v_proj"}
    weights = load_file(adapter / "adapter_model.safetensors")
    b_factors = [w for name, w in weights.items() if "lora_B" in name]
    assert b_factors and all(b.abs().sum() > 0 for b in b_factors)  # B starts at zero: training moved it
    result = store.result(jobs["train", "lora"])
    assert 0 < result["trainable_params"] < result["total_params"]
    assert result["adapter_bytes"] < (tiny_model_dir / "model.safetensors").stat().st_size  # an adapter, not a model
    assert store.is_done(jobs["evaluate", "lora"])  # lm-eval loaded base + adapter


def test_tokenize_masks_the_prompt_and_ends_with_eos(tiny_model_dir):
    from transformers import AutoTokenizer

    from pefteval_harness.jobs.train import tokenize

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    (row,) = tokenize([Example("Review: the film was good\nSentiment:", " positive")], tokenizer, 64).rows
    n_prompt = len(tokenizer("Review: the film was good\nSentiment:")["input_ids"])
    assert row["labels"][:n_prompt] == [-100] * n_prompt
    assert row["labels"][n_prompt:] == row["input_ids"][n_prompt:]
    assert tokenizer.decode(row["input_ids"][n_prompt:-1]) == " positive"
    assert row["input_ids"][-1] == tokenizer.eos_token_id


def test_too_long_examples_lose_the_start_of_the_prompt_never_the_answer(tiny_model_dir):
    from transformers import AutoTokenizer

    from pefteval_harness.jobs.train import tokenize

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    prompt = "Review: " + "the film was good " * 20 + "\nSentiment:"
    answer = [tokenizer.eos_token_id]
    out = tokenize([Example(prompt, " positive"), Example("Review: empty\nSentiment:", "")], tokenizer, 16)
    (row,) = out.rows
    assert (out.truncated_prompts, out.without_answer) == (1, 1)  # the empty answer is dropped and counted
    assert len(row["input_ids"]) == 16
    kept = [t for t, label in zip(row["input_ids"], row["labels"], strict=True) if label != -100]
    assert tokenizer.decode(kept[:-1]) == " positive" and kept[-1:] == answer  # the whole answer, then EOS
    assert tokenizer.decode(row["input_ids"][: 16 - len(kept)]).endswith("Sentiment:")  # the prompt's end kept


def test_deepspeed_jobs_build_no_shared_memory_collectives():
    """DeepSpeed's CPU backend would JIT-compile this C++ op (over a minute) for an all-reduce training never uses."""
    from deepspeed.comm.torch import build_shm_op

    from pefteval_harness.jobs.train import _without_shared_memory_collectives

    _without_shared_memory_collectives()  # what every DeepSpeed train job calls before DeepSpeed starts
    assert build_shm_op() is None
