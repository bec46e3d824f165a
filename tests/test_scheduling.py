"""Scheduling: critical path first, packing into the cluster's free resources, jobs no node can hold,
GPU shares from accelerator memory (and its `auto` estimate), per-kind timeouts."""

from __future__ import annotations

import json
import re
import time

import pytest

from pefteval_harness import scheduling
from pefteval_harness.errors import BadInput
from pefteval_harness.jobs.types import BaseConfig, Job, Lineage, Resources

GiB = 2**30
TINY_PARAMS = 147776  # the tiny model: 2 × 512 × 64 (untied embeddings) + 2 layers × 41088 + 64 (final norm)


def job(name: str, deps=()) -> Job:
    lineage = Lineage(model=name, method="base", base="tiny")
    return Job(id=f"base-{name}", label=name, lineage=lineage, deps=[f"base-{d}" for d in deps],
               config=BaseConfig(fingerprint=name))


# --- pure functions ------------------------------------------------------------------------------------


def test_priorities_put_the_longest_chain_first():
    # a -> b -> d is the long chain; c (long itself) hangs off a; e is alone.
    jobs = [job("a"), job("b", ["a"]), job("c", ["a"]), job("d", ["b"]), job("e")]
    seconds = {"base-a": 1, "base-b": 2, "base-c": 4, "base-d": 5, "base-e": 6}
    chain = scheduling.priorities(jobs, lambda j: seconds[j.id])
    assert chain == {"base-a": 8, "base-b": 7, "base-c": 4, "base-d": 5, "base-e": 6}
    # b's own work is small, but the chain behind it is not: it goes before c and e
    assert sorted(["base-c", "base-b", "base-e"], key=lambda i: -chain[i]) == ["base-b", "base-e", "base-c"]


def test_fractional_gpus_are_packed_on_one_gpu_as_ray_does():
    cluster = scheduling.Cluster.of([{"CPU": 8, "GPU": 2, "memory": 16 * GiB, "node:127.0.0.1": 1}])
    assert all(cluster.place(Resources(num_gpus=0.25)) for _ in range(4))  # one GPU, full
    assert cluster.nodes[0].gpus == [0.0, 1.0]
    assert cluster.place(Resources(num_gpus=0.5))
    assert not cluster.fits(Resources(num_gpus=1))  # 0 and 0.5 free: no whole GPU
    assert not cluster.fits(Resources(num_gpus=0.75)) and cluster.fits(Resources(num_gpus=0.5))
    assert not cluster.fits(Resources(num_cpus=9)) and not cluster.fits(Resources(memory_gb=17))
    assert cluster.nodes[0].free["CPU"] == 3  # five 1-CPU jobs


def test_a_gang_needs_all_its_workers_placed_at_once():
    two_nodes = scheduling.Cluster.of([{"CPU": 4, "GPU": 1}, {"CPU": 4, "GPU": 1}])
    gang = Resources(num_gpus=1, workers=2)
    assert scheduling.infeasible(gang, two_nodes) is None
    busy = two_nodes.copy()
    assert busy.place(Resources(num_gpus=0.5))
    assert not busy.fits(gang)  # one GPU left whole: waits, nothing placed
    assert busy.nodes[1].gpus == [1.0]
    why = scheduling.infeasible(Resources(num_gpus=1, workers=3), two_nodes)
    assert why == (
        "asks for 3 workers × 1 CPU, 1 GPU, more than the cluster's nodes can hold (largest node: 4 CPU, 1 GPU)"
    )


def test_a_gpu_on_a_cpu_only_cluster_is_infeasible():
    cpu_only = scheduling.Cluster.of([{"CPU": 2, "memory": 3 * GiB, "object_store_memory": 1e9}])
    why = scheduling.infeasible(Resources(num_gpus=1), cpu_only)
    assert why == (
        "asks for 1 CPU, 1 GPU, more than the cluster's nodes can hold (largest node: 2 CPU, 0 GPU, 3.0 GB memory)"
    )
    assert scheduling.infeasible(Resources(num_cpus=2, memory_gb=2), cpu_only) is None


def test_shadow_reserves_the_blocked_jobs_start():
    totals = scheduling.Cluster.of([{"CPU": 8, "GPU": 2}])
    running = [(Resources(num_gpus=1), 100.0), (Resources(num_gpus=1), 50.0)]
    start, then = scheduling.shadow(running, totals, Resources(num_gpus=1), now=0.0)
    assert start == 50.0 and then.nodes[0].gpus == [0.0, 0.0]  # the job ending at 100 still holds one
    start, _ = scheduling.shadow(running, totals, Resources(num_gpus=2), now=0.0)
    assert start == 100.0
    start, _ = scheduling.shadow(running, totals, Resources(num_gpus=1), now=70.0)  # overdue: ends "now"
    assert start == 70.0


def test_gpu_share_from_accelerator_memory():
    assert scheduling.gpu_share(Resources(accelerator_memory_gb=10), 40).num_gpus == 0.25
    assert scheduling.gpu_share(Resources(accelerator_memory_gb=10.1), 40).num_gpus == 0.26  # rounded up
    assert scheduling.gpu_share(Resources(accelerator_memory_gb=10), None).num_gpus == 0  # no GPU size: as asked
    assert scheduling.gpu_share(Resources(num_gpus=1, accelerator_memory_gb=10), 40).num_gpus == 1  # given wins
    with pytest.raises(BadInput, match="more than one GPU's 40 GB"):
        scheduling.gpu_share(Resources(accelerator_memory_gb=50), 40)


def test_cap_accelerator_memory_is_none_without_cuda():
    import torch

    assert not torch.cuda.is_available()  # this machine; on a GPU node the cap is set (untested here)
    assert scheduling.cap_accelerator_memory(Resources(num_gpus=0.25)) is None
    assert scheduling.cap_accelerator_memory(Resources(num_gpus=1)) is None
    assert scheduling.cap_accelerator_memory(Resources()) is None


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    """A model folder with only the tiny model's config.json: enough to plan, and to estimate from."""
    from transformers import LlamaConfig

    from pefteval_harness import tiny_model

    folder = tmp_path_factory.mktemp("config-only") / "model"
    LlamaConfig(vocab_size=tiny_model.VOCAB_SIZE, **tiny_model.TINY_CONFIG).save_pretrained(folder)
    return folder


def test_auto_accelerator_memory_is_estimated_from_the_models_config(model_folder):
    from pefteval_harness.plan import build_plan
    from pefteval_harness.spec import Spec

    assert scheduling.model_size(str(model_folder)) == (TINY_PARAMS, 4) == scheduling.model_size("tiny")
    spec = Spec.model_validate({
        "base_model": str(model_folder),
        "train": {"tasks": ["pefteval_quick_sentiment"]},
        "finetunes": {
            "lora": {"method": "lora", "config": {"r": 4}},
            "fft": {"method": "full", "deepspeed": {"zero_stage": 3}, "resources": {"workers": 2}},
        },
        "evaluate": {"tasks": ["pefteval_quick_sentiment"]},
        "resources": {kind: {"accelerator_memory_gb": "auto"} for kind in ("train", "evaluate")},
    })
    need = {(j.kind, j.label): j.resources.accelerator_memory_gb for j in build_plan(spec).jobs}
    gb = TINY_PARAMS / GiB
    assert need[("evaluate", "base")] == pytest.approx(gb * 4 * 1.2, abs=1e-6)  # float32 weights × 1.2
    assert need[("train", "lora")] == pytest.approx(gb * 4 * 1.2, abs=1e-6)
    assert need[("train", "fft")] == pytest.approx(gb * 16 / 2, abs=1e-6)  # ZeRO-3 over 2 workers


# --- on Ray (marked slow: they start Ray) ------------------------------------------------------------


def plan_of(model_folder, tasks: list[str], finetunes: dict | None = None, resources: dict | None = None):
    from pefteval_harness.plan import build_plan
    from pefteval_harness.spec import Spec

    spec = {"base_model": str(model_folder), "evaluate": {"tasks": tasks}, "resources": resources or {}}
    if finetunes:
        spec |= {"finetunes": finetunes, "train": {"tasks": ["pefteval_quick_sentiment"]}}
    return build_plan(Spec.model_validate(spec))


def make_sleeper(seconds: dict[str, float]):
    """A batch task that sleeps each job's seconds and records it done with its start time."""

    def sleep_batch(jobs: list[dict], store_root: str, threads: int) -> dict[str, dict]:
        from pefteval_harness.store import DONE, Store

        store = Store(store_root)
        for job in jobs:
            start = time.time()
            time.sleep(seconds[job["id"]])
            store.record(job, DONE, {"start": start})
        return {job["id"]: {"state": DONE} for job in jobs}

    return sleep_batch


@pytest.mark.slow  # Ray
def test_ready_jobs_start_in_priority_order(local_ray, model_folder, tmp_path):
    from pefteval_harness.runner import execute
    from pefteval_harness.store import Store

    # Each job takes both CPUs of the test Ray: they run one at a time, in the order the runner picks.
    finetunes = {"lora": {"method": "lora", "config": {"r": 4}}}
    plan = plan_of(model_folder, ["pefteval_quick_sentiment", "pefteval_quick_topic"], finetunes,
                   {"train": {"num_cpus": 2}, "evaluate": {"num_cpus": 2}})
    name = {j.id: f"{j.kind} {j.label} {getattr(j.config, 'task', '')}".strip() for j in plan.jobs}
    estimate = {"train lora": 1, "evaluate lora pefteval_quick_sentiment": 5, "evaluate lora pefteval_quick_topic": 4,
                "evaluate base pefteval_quick_sentiment": 3, "evaluate base pefteval_quick_topic": 2}
    task = local_ray.remote(make_sleeper({j.id: 0.2 for j in plan.jobs}))  # reused workers: quick starts

    def started(prioritize: bool) -> list[str]:
        store = Store(tmp_path / str(prioritize))
        summary = execute(plan, store, tasks_per_worker=1, task=task, prioritize=prioritize,
                          estimate=lambda j: estimate[name[j.id]])
        assert len(summary.ran) == 5 and not summary.failed
        return sorted(name, key=lambda i: store.result(i)["start"])

    # The train job first (its own estimate is the smallest, its chain the longest), then the fine-tune's
    # evaluations, which became ready after the base model's but lead longer chains.
    assert [name[i] for i in started(True)] == [
        "train lora", "evaluate lora pefteval_quick_sentiment", "evaluate lora pefteval_quick_topic",
        "evaluate base pefteval_quick_sentiment", "evaluate base pefteval_quick_topic",
    ]
    assert [name[i] for i in started(False)][:3] == [  # plan order: the base model's evaluations first
        "train lora", "evaluate base pefteval_quick_sentiment", "evaluate base pefteval_quick_topic",
    ]


@pytest.mark.slow  # Ray
def test_a_job_past_its_timeout_is_cancelled_and_recorded(local_ray, model_folder, tmp_path):
    from pefteval_harness.runner import execute
    from pefteval_harness.store import Store

    plan = plan_of(model_folder, ["pefteval_quick_sentiment"], resources={"evaluate": {"timeout_minutes": 0.02}})
    (evaluation,) = plan.jobs
    store = Store(tmp_path / "out")
    start = time.monotonic()
    summary = execute(plan, store, max_retries=2, task=make_sleeper({evaluation.id: 60}))
    assert time.monotonic() - start < 30  # cancelled after 1.2 s, not slept out (60 s)
    assert summary.failed == {evaluation.id: "timeout: still running after 0.02 min"}
    status = store.status(evaluation.id)
    assert status["error_class"] == "timeout" and status["attempts"] == 1  # never retried


@pytest.mark.slow  # Ray
def test_a_gpu_job_on_a_cpu_only_ray_fails_at_once(local_ray, model_folder, tmp_path):
    from pefteval_harness.runner import execute
    from pefteval_harness.store import Store

    plan = plan_of(model_folder, ["pefteval_quick_sentiment"], resources={"evaluate": {"num_gpus": 1}})
    store = Store(tmp_path / "out")
    start = time.monotonic()
    summary = execute(plan, store)  # `pefteval run` exits 1 when a job failed
    assert time.monotonic() - start < 20  # not waiting for a GPU that never comes
    (status_file,) = (tmp_path / "out").glob("jobs/*/status.json")
    status = json.loads(status_file.read_text())
    assert status["state"] == "failed" and status["error_class"] == "bad_input"
    assert summary.failed == {plan.jobs[0].id: status["reason"]}
    assert re.fullmatch(  # the node's memory is what Ray measured on this machine
        r"evaluate base on pefteval_quick_sentiment asks for 1 CPU, 1 GPU, more than the cluster's nodes can"
        r" hold \(largest node: 2 CPU, 0 GPU, [\d.]+ GB memory\)",
        status["reason"],
    ), status["reason"]


@pytest.mark.slow  # Ray
def test_a_lost_worker_is_recorded_with_rays_reason(local_ray, model_folder, tmp_path):
    from pefteval_harness.runner import execute
    from pefteval_harness.store import Store

    plan = plan_of(model_folder, ["pefteval_quick_sentiment"])
    store = Store(tmp_path / "out")

    def crash(jobs: list[dict], store_root: str, threads: int) -> dict[str, dict]:
        import os

        os._exit(1)  # as a worker whose process (or node) is lost

    summary = execute(plan, store, max_retries=0, task=crash)  # no retry left: Ray gives up at once
    (reason,) = summary.failed.values()
    assert reason.startswith("WorkerCrashedError: The worker died unexpectedly while executing this task.")
    assert store.status(plan.jobs[0].id)["error_class"] == "killed"
