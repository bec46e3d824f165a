"""The runner's scheduling on a simulated grid: makespan against a lower bound (a benchmark, not a test).

Plans a realistic grid with the REAL planner (a spec: fine-tunes, two of them 2-GPU gangs, merges of
LoRA experts, every model scored on the quickstart tasks under two prompting strategies), gives each job
a simulated duration and GPU need, and runs it with the REAL `runner.execute` on a local Ray with
`--gpus` logical GPUs (on 127.0.0.1). Each Ray task sleeps its jobs' durations × `--scale` seconds and
records them done in a real store (so claims and resume are the real ones). The runner gets the
simulated durations as its estimates (`estimate=`), so it knows the true critical path.

    python bench/schedule.py [--gpus 4] [--scale 0.2] [--seed 0] [--tasks-per-worker 24]

Prints, for critical-path-first packing and for plan order (priority off), the makespan in simulated
minutes, the lower bound max(total GPU-minutes / G, critical path) and their ratio (goal: within 10% of
the bound). Exit status 0 whatever the numbers; 1 if a job fails.
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1")

TASKS = ["pefteval_quick_sentiment", "pefteval_quick_topic", "pefteval_quick_arithmetic", "pefteval_quick_echo"]
LORA = {"method": "lora", "config": {"r": 8, "target_modules": "all-linear"}}
GANG = {"method": "full", "deepspeed": {"zero_stage": 3}, "resources": {"workers": 2, "num_gpus": 1}}


def grid_spec() -> dict:
    """8 fine-tunes (6 LoRA on 1 GPU, 2 full fine-tunes as 2-GPU gangs), 4 merges of the LoRA experts,
    each of the 13 models (base included) scored on 5 tasks × 2 strategies = 10 evaluations."""
    finetunes = {f"lora{i}": {**LORA, "train": {"tasks": [TASKS[i % 4]]}} for i in range(1, 7)}
    finetunes |= {"full1": GANG, "full2": GANG}
    experts = [["lora1", "lora2"], ["lora3", "lora4"], ["lora5", "lora6"], [f"lora{i}" for i in range(1, 7)]]
    return {
        "name": "schedule-bench",
        "base_model": "tiny",
        "train": {"tasks": TASKS},
        "finetunes": finetunes,
        "merges": {f"merge{i}": {"method": "task_arithmetic", "experts": e} for i, e in enumerate(experts, 1)},
        "evaluate": {"tasks": ["pefteval_quick_*"], "strategies": ["zero_shot", {"kind": "k_shot", "k": 1}]},
        "resources": {"train": {"num_gpus": 1}, "evaluate": {"num_gpus": 0.25}},
    }


def simulate(plan, seed: int) -> dict[str, float]:
    """Each job's simulated minutes, and its GPU need set on the plan's jobs (in place): fine-tunes
    30-60 min on 1 GPU per worker, merges 5 min on CPU, evaluations 2-6 min on 0.25 GPU (zero-shot) or
    0.5 GPU (k-shot: longer prompts), the base model 1 min on CPU."""
    rng = random.Random(seed)
    minutes = {}
    for i, job in enumerate(plan.jobs):
        if job.kind == "train":
            minutes[job.id] = rng.uniform(30, 60)
        elif job.kind == "evaluate":
            minutes[job.id] = rng.uniform(2, 6)
            if job.config.strategy and job.config.strategy.kind == "k_shot":
                plan.jobs[i] = job.model_copy(update={"resources": job.resources.model_copy(update={"num_gpus": 0.5})})
        else:
            minutes[job.id] = {"merge": 5, "base": 1}.get(job.kind, 5)
    return minutes


def gpu_minutes(plan, minutes: dict[str, float]) -> float:
    return sum(j.resources.num_gpus * j.resources.workers * minutes[j.id] for j in plan.jobs)


def make_task(minutes: dict[str, float], scale: float):
    """The Ray task of a batch: sleep each job's simulated time, then record it done in the store."""
    from pefteval_harness.store import DONE, Store

    def sleep_batch(jobs: list[dict], store_root: str, threads: int) -> dict[str, dict]:
        store = Store(store_root)
        outcomes = {}
        for job in jobs:
            start = time.time()
            time.sleep(minutes[job["id"]] * scale)
            store.record(job, DONE, {"simulated_minutes": minutes[job["id"]], "start": start, "end": time.time()})
            outcomes[job["id"]] = {"state": DONE}
        return outcomes

    return sleep_batch


def machine() -> str:
    model = next((line.split(":", 1)[1].strip() for line in subprocess.run(
        ["lscpu"], capture_output=True, text=True).stdout.splitlines() if line.startswith("Model name")), "?")
    load = os.getloadavg()
    return f"{model}, nproc {os.cpu_count()}, load {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpus", type=int, default=4)
    parser.add_argument("--scale", type=float, default=0.2, help="seconds per simulated minute")
    parser.add_argument("--seed", type=int, default=0, help="draws the simulated durations")
    parser.add_argument("--tasks-per-worker", type=int, default=24, help="as resources.tasks_per_worker")
    parser.add_argument("--only", choices=["priority", "fifo"], help="run one of the two orders")
    parser.add_argument("--verbose", action="store_true", help="the runner's log: submissions, ends")
    args = parser.parse_args()
    if args.verbose:
        import logging

        logging.basicConfig(level=logging.INFO, format="%(created).3f %(message)s")
        logging.getLogger("pefteval_harness.runner").setLevel(logging.DEBUG)

    from pefteval_harness.runner import LOOPBACK_ENV

    os.environ.update(LOOPBACK_ENV)  # before Ray is imported: a local Ray on 127.0.0.1
    import ray
    import yaml

    from pefteval_harness import scheduling
    from pefteval_harness.plan import build_plan
    from pefteval_harness.runner import execute
    from pefteval_harness.spec import load_spec
    from pefteval_harness.store import Store

    print(f"machine: {machine()}")
    work = Path(tempfile.mkdtemp(prefix="pefteval-bench-schedule-"))
    (work / "spec.yaml").write_text(yaml.safe_dump(grid_spec()))
    spec, _ = load_spec(work / "spec.yaml")
    plan = build_plan(spec)
    minutes = simulate(plan, args.seed)
    critical = max(scheduling.priorities(plan.jobs, lambda j: minutes[j.id]).values())
    bound = max(gpu_minutes(plan, minutes) / args.gpus, critical)
    kinds = {k: sum(j.kind == k for j in plan.jobs) for k in ("base", "train", "merge", "evaluate")}
    print(f"plan: {len(plan.jobs)} jobs {kinds}; {gpu_minutes(plan, minutes):.0f} GPU-min on {args.gpus} GPUs;"
          f" critical path {critical:.1f} min; lower bound {bound:.1f} min; 1 min = {args.scale:g} s")

    # Enough logical CPUs that only GPUs bind; Ray keeps up to that many idle workers for reuse.
    ray.init(address="local", num_cpus=8 * args.gpus, num_gpus=args.gpus, _node_ip_address="127.0.0.1",
             include_dashboard=False, log_to_driver=False)
    assert {n["NodeManagerAddress"] for n in ray.nodes()} == {"127.0.0.1"}
    task = ray.remote(make_task(minutes, args.scale))  # workers reused: no process start per job
    # Start the worker pool first, so that neither run pays for process starts (seconds each on a busy
    # machine). Ray reuses a worker that held a GPU only for GPU tasks: start both kinds, all at once.
    hold = ray.remote(lambda: time.sleep(3))
    ray.get([hold.options(num_gpus=0.01).remote() for _ in range(5 * args.gpus)]
            + [hold.remote() for _ in range(2 * args.gpus)])

    rows = []
    for name, prioritize in (("critical path first", True), ("plan order (FIFO)", False)):
        if args.only and prioritize != (args.only == "priority"):
            continue
        store = Store(work / name.split()[0])
        start = time.monotonic()
        summary = execute(plan, store, max_retries=0, tasks_per_worker=args.tasks_per_worker, task=task,
                          estimate=lambda j: minutes[j.id] * args.scale, prioritize=prioritize)
        makespan = (time.monotonic() - start) / args.scale
        if summary.failed:
            print(f"{name}: {len(summary.failed)} jobs failed: {next(iter(summary.failed.values()))}")
            return 1
        rows.append((name, makespan, len(summary.ran)))
    ray.shutdown()

    print("\n| order | jobs ran | makespan min | lower bound min | ratio |\n|---|---|---|---|---|")
    for name, makespan, ran in rows:
        print(f"| {name} | {ran} | {makespan:.1f} | {bound:.1f} | {makespan / bound:.3f} |")
    print(f"\nmachine after: load {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
