"""Scheduling: the pure functions the runner places jobs with, and the memory cap a job sets on itself.

- Priorities: a job's priority is the longest chain of estimated work from it to the end of the DAG
  (itself included), so the critical path is started first (`priorities`, `estimate_seconds`).
- Packing: `Cluster` is the driver's model of the cluster's nodes (CPU, memory, custom resources, and each
  GPU's free share, since Ray places a fractional GPU request on one GPU). The runner submits only jobs
  that fit in it right now, so Ray's own queue (not in priority order across resource shapes) stays empty.
- Feasibility: a job no node of the cluster could ever hold (a GPU on a CPU-only cluster, a gang whose
  workers cannot all be placed) fails at once (`infeasible`) instead of waiting forever; `check_feasible`
  refuses such a run before it writes anything.
- Accelerator memory: `gpu_share` turns `accelerator_memory_gb` into a share of one GPU; `auto` is estimated
  from the base model's size (`estimate_accelerator_memory_gb`); `cap_accelerator_memory` holds a job that
  shares a GPU to its share.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from pefteval_harness.errors import BadInput
from pefteval_harness.jobs.types import Job, Resources

GiB = 2**30
EPSILON = 1e-4  # Ray counts resources in units of 1/10000

# --- in a job's process ----------------------------------------------------------------------------------


def cap_accelerator_memory(resources: Resources) -> float | None:
    """In a job's process: cap torch's CUDA allocator to the job's share of its GPU; return the fraction.

    Ray only divides a GPU logically (a 0.25 job may allocate the whole card); the allocator cap makes
    an over-reaching job fail with an out-of-memory error instead of its neighbours. None when the job
    holds no GPU or a whole one, or CUDA is not available. (Written, untested on a GPU.)
    """
    if not 0 < resources.num_gpus < 1:
        return None
    import torch

    if not torch.cuda.is_available():
        return None
    fraction = float(resources.num_gpus)
    torch.cuda.set_per_process_memory_fraction(fraction)  # the device Ray assigned: the visible one, 0
    return fraction


# --- priorities ----------------------------------------------------------------------------------------

# Rough seconds per job of each kind on one worker; only their ratios matter (critical path first, and
# whether a job can run while a larger one waits for room). Better estimates: pass `estimate=` to execute.
DEFAULT_SECONDS = {"base": 60, "train": 3600, "merge": 300, "analyze": 300, "evaluate": 180}


def estimate_seconds(job: Job) -> float:
    """The default estimate: by kind; a training job scaled by its epochs against 3 (unless max_steps
    caps it: steps per epoch are not known before the data are loaded)."""
    seconds = DEFAULT_SECONDS.get(job.kind, 300)
    if job.kind == "train" and job.config.train.max_steps <= 0:
        seconds *= job.config.train.epochs / 3
    return seconds


def priorities(jobs: Iterable[Job], estimate: Callable[[Job], float] = estimate_seconds) -> dict[str, float]:
    """Job id -> the estimated seconds of the longest chain from the job (included) to the end of the DAG."""
    jobs = list(jobs)
    readers: dict[str, list[str]] = {}
    for job in jobs:
        for dep in job.deps:
            readers.setdefault(dep, []).append(job.id)
    chain: dict[str, float] = {}
    for job in reversed(jobs):  # a plan lists jobs in dependency order: readers come later
        chain[job.id] = estimate(job) + max((chain[r] for r in readers.get(job.id, []) if r in chain), default=0)
    return chain


# --- the cluster model ---------------------------------------------------------------------------------


def worker_demand(resources: Resources) -> dict[str, float]:
    """What one worker asks of a node, in Ray's resource names (memory in bytes); GPUs separately."""
    demand = {"CPU": resources.num_cpus}
    if resources.memory_gb:
        demand["memory"] = resources.memory_gb * GiB
    return {name: amount for name, amount in demand.items() if amount}


@dataclass
class Node:
    free: dict[str, float]  # CPU, memory (bytes), custom resources
    gpus: list[float] = field(default_factory=list)  # each GPU's free share

    def take(self, resources: Resources) -> bool:
        """Place one worker here if it fits (GPUs as Ray does: whole free ones, or a share of one)."""
        demand = worker_demand(resources)
        if any(self.free.get(name, 0) + EPSILON < amount for name, amount in demand.items()):
            return False
        gpus = resources.num_gpus
        if gpus >= 1:
            whole = [i for i, f in enumerate(self.gpus) if f > 1 - EPSILON][: math.ceil(gpus - EPSILON)]
            if len(whole) < math.ceil(gpus - EPSILON):
                return False
            for i in whole:
                self.gpus[i] = 0.0
        elif gpus > 0:
            fitting = [i for i, f in enumerate(self.gpus) if f + EPSILON >= gpus]
            if not fitting:
                return False
            best = min(fitting, key=lambda i: self.gpus[i])  # the fullest GPU it fits on
            self.gpus[best] -= gpus
        for name, amount in demand.items():
            self.free[name] -= amount
        return True

    def describe(self) -> str:
        parts = [f"{self.free.get('CPU', 0):g} CPU", f"{len(self.gpus)} GPU"]
        if self.free.get("memory"):
            parts.append(f"{self.free['memory'] / GiB:.1f} GB memory")
        custom = [f"{v:g} {k}" for k, v in sorted(self.free.items()) if k not in ("CPU", "memory")]
        return ", ".join(parts + custom)


# Ray's bookkeeping resources: not asked for by jobs, left out of the model.
_NOT_MODELLED = ("node:", "accelerator_type:", "object_store_memory", "GPU")


@dataclass
class Cluster:
    nodes: list[Node]

    @classmethod
    def of(cls, totals: list[dict[str, float]]) -> Cluster:
        """An empty cluster from each node's total resources (`ray.nodes()[i]["Resources"]`)."""
        nodes = []
        for resources in totals:
            free = {k: float(v) for k, v in resources.items() if not k.startswith(_NOT_MODELLED)}
            nodes.append(Node(free, [1.0] * int(resources.get("GPU", 0) + EPSILON)))
        return cls(nodes)

    @classmethod
    def of_ray(cls) -> Cluster:
        """The connected Ray cluster's live nodes, empty."""
        import ray

        return cls.of([node["Resources"] for node in ray.nodes() if node["Alive"]])

    def copy(self) -> Cluster:
        return Cluster([Node(dict(n.free), list(n.gpus)) for n in self.nodes])

    def place(self, resources: Resources) -> bool:
        """Place every worker of a job (first fit, node by node); unchanged and False if they do not all fit.

        Ray Train's PACK and SPREAD are preferences, not constraints: first fit models both."""
        trial = self.copy()
        for _ in range(resources.workers):
            if not any(node.take(resources) for node in trial.nodes):
                return False
        self.nodes = trial.nodes
        return True

    def fits(self, resources: Resources) -> bool:
        return self.copy().place(resources)

    def largest_node(self) -> Node:
        return max(self.nodes, key=lambda n: (len(n.gpus), n.free.get("CPU", 0), n.free.get("memory", 0)))


def infeasible(resources: Resources, totals: Cluster) -> str | None:
    """Why no placement on the empty cluster `totals` could ever hold the job; None if one can.

    Assumes a fixed set of nodes: an autoscaling cluster would add a node for it instead (relax this there)."""
    if totals.fits(resources):
        return None
    asks = describe_ask(resources)
    largest = totals.largest_node().describe() if totals.nodes else "none"
    return f"asks for {asks}, more than the cluster's nodes can hold (largest node: {largest})"


def local_cluster(num_cpus: int | None = None) -> Cluster:
    """The local Ray `runner.init_ray` would start, without starting it: `--num-cpus` (else every CPU), the
    visible CUDA devices and the machine's memory. Each is at least what that Ray offers jobs, so a job
    this cluster cannot hold, that Ray could not either."""
    import psutil
    import torch

    cpus = num_cpus or os.cpu_count() or 1
    return Cluster.of([{"CPU": cpus, "GPU": torch.cuda.device_count(), "memory": psutil.virtual_memory().total}])


def check_feasible(jobs: Iterable[Job], gpu_memory_gb: float | None, num_cpus: int | None = None) -> None:
    """BadInput for the first job no node could ever hold, so that a run fails before it writes anything
    instead of waiting for room that never comes. The cluster is the Ray this process has joined, else the
    local one a run would start (`local_cluster`: Ray is not started for this)."""
    import sys

    ray = sys.modules.get("ray")  # not imported here: a local Ray must be set up before ray is imported
    cluster = Cluster.of_ray() if ray is not None and ray.is_initialized() else local_cluster(num_cpus)
    for job in jobs:
        why = infeasible(gpu_share(job.resources, gpu_memory_gb), cluster)
        if why:
            section = "merge" if job.kind == "base" else job.kind  # the tiny base is built with merge's resources
            raise BadInput(f"resources.{section}: {job.kind} job {job.label} {why}")


def describe_ask(r: Resources) -> str:
    parts = [f"{r.num_cpus:g} CPU"] + ([f"{r.num_gpus:g} GPU"] if r.num_gpus else [])
    parts += [f"{r.memory_gb:g} GB memory"] if r.memory_gb else []
    return (f"{r.workers} workers × " if r.workers > 1 else "") + ", ".join(parts)


def shadow(
    running: list[tuple[Resources, float]], totals: Cluster, blocked: Resources, now: float
) -> tuple[float, Cluster]:
    """When a blocked job can start if running jobs end as estimated, and the cluster then with it placed.

    `running` holds each running job's resources and estimated end. This is the reservation of EASY
    backfilling: a lower-priority job may start now only if it ends before that time, or fits beside it.
    """
    ends = sorted({max(end, now) for _, end in running})
    for t in ends:
        later = totals.copy()
        for resources, end in running:
            if max(end, now) > t:
                later.place(resources)
        if later.place(blocked):
            return t, later
    return math.inf, totals.copy()  # cannot happen for a feasible job: the empty cluster holds it


# --- accelerator memory ----------------------------------------------------------------------------------


def gpu_share(resources: Resources, gpu_memory_gb: float | None) -> Resources:
    """A job that gives its accelerator memory (GB) and no num_gpus asks for that share of one GPU of
    `gpu_memory_gb`, rounded up to 1/100; more than one GPU is bad input (use a gang, or larger GPUs)."""
    memory = resources.accelerator_memory_gb
    if resources.num_gpus or not gpu_memory_gb or not isinstance(memory, int | float):
        return resources
    share = math.ceil(round(memory / gpu_memory_gb * 100, 6)) / 100
    if share > 1:
        raise BadInput(
            f"accelerator_memory_gb: {memory:g} GB is more than one GPU's {gpu_memory_gb:g} GB"
            " (resources.gpu_memory_gb): split it over a gang (train workers, ZeRO-3) or ask num_gpus"
        )
    return resources.model_copy(update={"num_gpus": share})


_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8, "int8": 1, "float8_e4m3fn": 1}


def model_size(base_model: str) -> tuple[int, int]:
    """(parameters, bytes per parameter as loaded) of a model, from its config.json alone: the tiny
    model, a local folder, or a hub model's cached (else downloaded) config. Counted exactly by building
    the model on torch's meta device (no memory); custom architectures (trust_remote_code) are not."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from pefteval_harness import tiny_model
    from pefteval_harness.spec import TINY

    if base_model == TINY:
        from transformers import LlamaConfig

        config = LlamaConfig(vocab_size=tiny_model.VOCAB_SIZE, **tiny_model.TINY_CONFIG)
    else:
        folder = Path(base_model)
        source = folder if folder.is_dir() else _hub_config(base_model)
        config = AutoConfig.from_pretrained(source)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    params = sum(p.numel() for p in model.parameters())
    dtype = str(getattr(config, "dtype", None) or "float32")  # transformers reads torch_dtype into dtype
    return params, _DTYPE_BYTES.get(dtype.removeprefix("torch."), 4)


def _hub_config(repo: str) -> Path:
    from huggingface_hub import hf_hub_download, try_to_load_from_cache

    cached = try_to_load_from_cache(repo, "config.json")
    if isinstance(cached, str):
        return Path(cached).parent
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        raise BadInput(f"accelerator_memory_gb: auto: {repo}'s config.json is not in the HF cache (offline)")
    return Path(hf_hub_download(repo, "config.json")).parent


def estimate_accelerator_memory_gb(job_config, resources: Resources, size: tuple[int, int]) -> float | None:
    """An ESTIMATE of the accelerator memory one worker of a job needs, in GB, from the base model's
    (parameters, bytes per parameter); None for the kinds that run on CPU (base, merge).

    - evaluate: the weights as loaded × 1.2 (activations, KV cache of a batch; a judge model is not counted)
    - train, peft: the fp32 weights (training loads float32) × 1.2 (adapter, its optimizer, activations)
    - train, full: 16 bytes/param (fp32 weights 4 + gradients 4 + Adam moments 8), ZeRO-sharded over
      the gang's workers as DeepSpeed shards it: stage 1 the moments, stage 2 also the gradients, stage 3 all
    - analyze: the fp32 weights of each model it holds (base, fine-tune, reference) × 1.2
    Activations of long sequences or large batches are not modelled: give a number when it matters.
    """
    params, loaded_bytes = size
    kind = job_config.kind
    if kind == "evaluate":
        need = params * loaded_bytes * 1.2
    elif kind == "train" and job_config.peft is not None:
        need = params * 4 * 1.2
    elif kind == "train":
        stage = job_config.deepspeed.zero_stage if job_config.deepspeed else 0
        weights, grads, moments = 4.0, 4.0, 8.0
        workers = resources.workers
        moments /= workers if stage >= 1 else 1
        grads /= workers if stage >= 2 else 1
        weights /= workers if stage >= 3 else 1
        need = params * (weights + grads + moments)
    elif kind == "analyze":
        need = params * 4 * 1.2 * (3 if job_config.reference else 2)
    else:
        return None
    return round(need / GiB, 6)
