"""The shipped studies plan as written: the small PEFT-vs-FFT example and the GPU-cluster experiment
(its hub base model stood in for by a local HF cache entry, since nothing is downloaded here)."""

from __future__ import annotations

import json
import os
import subprocess
from collections import Counter

import pytest
import yaml

from pefteval_harness.finetuning import FINETUNE_METHODS
from tests.conftest import PEFTEVAL, REPO


def planned(spec: str) -> str:
    """The plan table `pefteval plan` prints for a shipped spec, built in this process (a subprocess costs
    seconds of imports); the experiments below, which need another HF cache, run the command itself."""
    from pefteval_harness.plan import build_plan
    from pefteval_harness.spec import load_spec

    return build_plan(load_spec(REPO / spec)[0]).describe()


def plan(spec: str, **env: str | None) -> str:
    """`pefteval plan` of a shipped spec; `env` adds variables, or removes those given as None."""
    environment = {k: v for k, v in {**os.environ, **env}.items() if v is not None}
    out = subprocess.run(
        [*PEFTEVAL, "plan", str(REPO / spec)], capture_output=True, text=True, env=environment, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def rows(described: str) -> list[list[str]]:
    """The plan table's rows: job id, kind, model, task, after, resources."""
    lines = [line for line in described.splitlines() if line.startswith("| ") and not line.startswith("| job id")]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]


def test_the_small_example_compares_every_method_on_every_family():
    spec = yaml.safe_load((REPO / "examples/peft_vs_fft_small.yaml").read_text())
    assert {finetune["method"] for finetune in spec["finetunes"].values()} == set(FINETUNE_METHODS)
    table = rows(planned("examples/peft_vs_fft_small.yaml"))
    kinds = Counter(row[1] for row in table)
    trained = {row[2] for row in table if row[1] == "train"}
    assert {label.split("[")[0] for label in trained} == set(spec["finetunes"])
    assert {"lora[r=1]", "lora[r=16]", "prompt_tuning[num_virtual_tokens=4]", "fft[data_fraction=0.25]"} <= trained
    assert kinds["analyze"] == kinds["train"]  # every fine-tune's weight update
    tasks = {row[3] for row in table if row[1] == "evaluate"}
    assert {"pefteval_peft_sst2", "pefteval_peft_e2e_nlg", "pefteval_peft_gsm8k", "pefteval_peft_ifeval"} <= tasks
    assert any(t.startswith("pefteval_adv_") for t in tasks)
    assert kinds["evaluate"] == (len(trained) + 1) * len(tasks)  # every model, base included, on every task


def cached_hub(root, repo: str, model_type: str) -> dict[str, str | None]:
    """The environment of a plan that finds `repo` in a HF cache under `root` (its config.json alone) and
    reads its datasets from the hub, as a cluster does: no local data folder (a sample may lack some)."""
    revision = "1" * 40
    cache = root / "hub" / f"models--{repo.replace('/', '--')}"
    (cache / "snapshots" / revision).mkdir(parents=True)
    (cache / "snapshots" / revision / "config.json").write_text(json.dumps({"model_type": model_type}))
    (cache / "refs").mkdir()
    (cache / "refs" / "main").write_text(revision)
    return {"HF_HUB_CACHE": str(root / "hub"), "HF_HUB_OFFLINE": "1", "PEFTEVAL_DATA_DIR": None}


def test_the_cluster_experiment_plans_offline_from_a_cached_base(tmp_path):
    table = rows(plan("experiments/peft_vs_fft.yaml", **cached_hub(tmp_path, "meta-llama/Llama-3.1-8B", "llama")))
    kinds = Counter(row[1] for row in table)
    assert kinds["train"] == 14 * (1 + 4 + 2 + 11 + 3 + 2)  # 14 training tasks x models per task
    assert kinds["analyze"] == kinds["train"]
    evaluated = {}
    for row in table:
        if row[1] == "evaluate":
            evaluated.setdefault(row[2], set()).add(row[3])
    assert len(evaluated["base"]) == 27  # the base on every task of both suites
    assert evaluated["fft/pefteval_peft_alpaca"] == {"pefteval_peft_alpaca", "pefteval_peft_ifeval"}
    assert evaluated["lora[r=16]/pefteval_peft_mnli"] == {
        "pefteval_peft_mnli", "pefteval_peft_mnli_mismatched", "pefteval_adv_mnli", "pefteval_adv_mnli_mismatched",
        "pefteval_adv_anli_r1", "pefteval_adv_anli_r2", "pefteval_adv_anli_r3", "pefteval_adv_hans",
    }  # fmt: skip
    assert all("1 GPU" in row[5] for row in table if row[1] in ("train", "evaluate"))


def test_the_small_merge_scaling_example_merges_every_k_with_four_methods():
    spec = yaml.safe_load((REPO / "examples/merge_scaling_small.yaml").read_text())
    table = rows(planned("examples/merge_scaling_small.yaml"))
    kinds = Counter(row[1] for row in table)
    assert kinds["train"] == 8  # the pool of experts
    merged = [row[2] for row in table if row[1] == "merge"]
    methods = {label.split("[")[0] for label in merged}
    assert methods == set(spec["merges"]) and len(methods) >= 4
    assert kinds["merge"] == len(methods) * 6 * 4  # k = 1..6, four subsets each
    assert {f"rht[k={k},s=4]" for k in range(1, 7)} <= set(merged)
    tasks = {row[3] for row in table if row[1] == "evaluate"}
    assert kinds["evaluate"] == (kinds["merge"] + 1) * len(tasks)  # every merge and the base on every task


def test_the_merge_scaling_experiment_plans_offline_from_a_cached_base(tmp_path):
    table = rows(plan("experiments/merge_scaling.yaml", **cached_hub(tmp_path, "google/gemma-2-2b-it", "gemma2")))
    kinds = Counter(row[1] for row in table)
    trained = {row[2] for row in table if row[1] == "train"}
    assert len(trained) == 10 and all(label.startswith("expert/pefteval_tulu_") for label in trained)
    merged = [row[2] for row in table if row[1] == "merge"]
    assert kinds["merge"] == 8 * (9 * 3 + 1)  # 8 merge entries; k = 1..9 three subsets each, k = 10 the one
    assert "rht_factor[k=10,s=1]" in merged and "ties[k=7,s=3]" in merged
    tasks = {row[3] for row in table if row[1] == "evaluate"}
    assert {"pefteval_merge_mmlu", "pefteval_merge_mbpp", "pefteval_merge_mgsm_sw", "pefteval_merge_drop"} <= tasks
    assert kinds["evaluate"] == (kinds["merge"] + 1) * len(tasks)  # the base and every merge, every task
    assert all("1 GPU" in row[5] for row in table if row[1] in ("train", "evaluate"))
    assert all("GPU" not in row[5] for row in table if row[1] == "merge")


def test_the_small_affective_example_crosses_methods_and_strategies():
    table = rows(planned("examples/affective_small.yaml"))
    kinds = Counter(row[1] for row in table)
    assert kinds["train"] == 4 and {row[2] for row in table if row[1] == "train"} == {
        "full", "lora", "p_tuning", "prompt_tuning"
    }  # fmt: skip
    cells = {(row[2], row[3]) for row in table if row[1] == "evaluate"}
    for model in ("base", "full", "lora", "p_tuning", "prompt_tuning"):
        assert (model, "pefteval_affect_sst2 (2-shot)") in cells and (model, "pefteval_affect_sst2_gen (cot)") in cells
        assert (model, "pefteval_affect_esconv (zero-shot)") in cells and (
            model,
            "pefteval_affect_esconv (2-shot)",
        ) not in cells
    assert kinds["evaluate"] == 5 * (9 + 8 + 4)  # 9 tasks zero-shot, 8 with a local training split 2-shot, 4 CoT


@pytest.mark.slow
def test_the_affective_experiment_plans_offline_from_a_cached_base(tmp_path):
    env = cached_hub(tmp_path, "meta-llama/Llama-3.1-8B-Instruct", "llama")
    cached_hub(tmp_path, "Qwen/Qwen2.5-7B-Instruct", "qwen2")  # the judge
    table = rows(plan("experiments/affective.yaml", **env))
    kinds = Counter(row[1] for row in table)
    assert kinds["train"] == 4 and kinds["evaluate"] > 5 * 40 * 2
    evaluated = {row[3] for row in table if row[1] == "evaluate" and row[2] == "lora"}
    assert {"pefteval_affect_tweet_stance_hillary_gen (cot)", "pefteval_affect_eq_bench (zero-shot)",
            "pefteval_affect_empathetic (5-shot)", "pefteval_affect_emobench_eu (zero-shot)"} <= evaluated  # fmt: skip
    assert "pefteval_affect_emobench_eu (5-shot)" not in evaluated  # no training split to draw examples from
    assert all("1 GPU" in row[5] for row in table if row[1] in ("train", "evaluate"))
