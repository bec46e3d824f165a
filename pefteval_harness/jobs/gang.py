"""Gang fine-tuning: a train job with `resources.workers > 1` runs as a Ray Train `TorchTrainer` of N ranks.

`train_gang` runs in the job's coordinator Ray task (which holds no CPU or GPU); each of its N workers
holds `resources` and runs one rank of `train.train_rank`, the same body a one-worker job runs:
DeepSpeed ZeRO 1/2/3 for full fine-tuning (`deepspeed:`), DDP for peft methods (the HF Trainer wraps the
model once Ray Train has initialised torch.distributed: gloo on CPU, nccl on GPUs). The job keeps its id,
its store entry (artifact + result.json) and its cost keys; `batch_size` stays the examples per optimiser
step over all ranks (each rank takes batch_size / N), so the job trains alike on 1 worker or N.

- Checkpoints: the Trainer saves one about every quarter of the run (`CHECKPOINTS_PER_RUN`); every rank
  reports its own part of it to Ray Train (DeepSpeed's ZeRO shards and each rank's RNG state; Ray
  merges them into one checkpoint folder), plus the tokens and seconds it trained so far. A worker that
  dies makes Ray Train restart the gang (`MAX_RESTARTS` times) from the latest checkpoint, which the
  Trainer resumes (`resume_from_checkpoint`). Ray Train's folder (`<job dir>/gang`) goes after a
  successful fit; after a failed one it stays, so the job's next attempt (same run name) resumes from it.
- Result: rank 0's result with the gang's costs (`trained_tokens` summed over ranks, `peak_rss_mb`
  summed, `train_seconds` the slowest rank's, all attempts up to the checkpoint resumed, then the last;
  `peak_accelerator_mb` the largest rank's), `workers`,
  `per_worker`, `restarts`, `resumed_from_step` and `gang_seconds` (the whole fit, restarts included).
- `GangRoster` (a named actor, `roster_name(job id)`) knows each attempt's ranks: their pids and nodes.

Ran here on CPU only (gloo, 2 workers on one node). The GPU path (nccl, `use_gpu`, the device from
LOCAL_RANK, the allocator cap of a GPU share) is written, untested on a GPU.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from contextlib import nullcontext
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import ray

from pefteval_harness.errors import BadInput
from pefteval_harness.jobs.types import Job, Resources
from pefteval_harness.store import Store, is_url

CHECKPOINTS_PER_RUN = 4  # a checkpoint about every quarter of the run's optimiser steps
MAX_RESTARTS = 2  # worker failures Ray Train recovers from (a restart each) before the job fails
NAMESPACE = "pefteval"
PLACEMENT = {"pack": "PACK", "spread": "SPREAD"}  # Resources.placement -> the placement group's strategy
RANK_FILE = "pefteval-rank-{rank}.json"  # in each checkpoint: what that rank trained so far
PER_WORKER_KEYS = ("rank", "node_id", "peak_rss_mb", "trained_tokens", "peak_accelerator_mb")


def roster_name(job_id: str) -> str:
    """The name of the running gang's `GangRoster` actor (namespace `NAMESPACE`)."""
    return f"gang-roster:{job_id}"


@ray.remote(num_cpus=0)
class GangRoster:
    """Each attempt of a gang (a first start or a restart): the step it resumed from and its ranks."""

    def __init__(self):
        self._attempts: dict[str, dict] = {}  # attempt id -> attempt, in the order they started

    def join(self, attempt: str, rank: int, pid: int, node_id: str, resumed_from_step: int) -> None:
        entry = self._attempts.setdefault(attempt, {"resumed_from_step": resumed_from_step, "ranks": {}})
        entry["ranks"][rank] = {"pid": pid, "node_id": node_id}

    def attempts(self) -> list[dict]:
        return list(self._attempts.values())


def scaling_config(resources: Resources):
    """N workers, each holding `resources` (CPUs, a GPU or a share of one, host memory), placed as asked."""
    from ray.train import ScalingConfig

    per_worker: dict[str, float] = {"CPU": resources.num_cpus}
    if resources.num_gpus:
        per_worker["GPU"] = resources.num_gpus
    if resources.memory_gb:
        per_worker["memory"] = int(resources.memory_gb * 2**30)
    return ScalingConfig(
        num_workers=resources.workers,
        use_gpu=resources.num_gpus > 0,  # also picks the backend: nccl on GPUs, gloo on CPU
        resources_per_worker=per_worker,
        placement_strategy=PLACEMENT[resources.placement],
    )


@dataclass(frozen=True)
class GangStorage:
    """Ray Train's folder for a job (checkpoints), under the job's own folder in the store."""

    url: str  # <store>/jobs/<id>/gang

    @classmethod
    def of(cls, store: Store, job_id: str) -> GangStorage:
        return cls(f"{store_url(store).rstrip('/')}/jobs/{job_id}/gang")

    def run_config_args(self) -> dict:
        """`storage_path` (and for a remote store `storage_filesystem`) for Ray Train's RunConfig."""
        from fsspec.implementations.local import LocalFileSystem

        fs, path = self._fs()
        if isinstance(fs, LocalFileSystem):
            return {"storage_path": path}
        # Through fsspec, as the store itself reads and writes (same protocols, same credentials).
        from pyarrow.fs import FSSpecHandler, PyFileSystem

        return {"storage_path": path, "storage_filesystem": PyFileSystem(FSSpecHandler(fs))}

    def remove(self) -> None:
        fs, path = self._fs()
        if fs.exists(path):
            fs.rm(path, recursive=True)

    def _fs(self):
        import fsspec

        return fsspec.core.url_to_fs(self.url)


def store_url(store: Store) -> str:
    """A string `Store(...)` accepts again in any worker: the store's URL, or its absolute path."""
    return store.url if is_url(store.url) else str(Path(store.url).resolve())


def train_gang(job: Job, store: Store) -> dict:
    """Train the job on `job.resources.workers` ranks; return its result (rank 0's, with the gang's costs)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig
    from ray.train.torch import TorchTrainer

    workers, batch = job.resources.workers, job.config.train.batch_size
    if batch % workers:
        raise BadInput(
            f"train job {job.label}: train.batch_size {batch} does not split over resources.workers {workers}"
            " (each rank takes batch_size / workers examples per step)"
        )
    # Workers keep this process's working directory (Ray Train would move them to its own): relative
    # paths (PEFTEVAL_DATA_DIR, include paths) then mean in a rank what they mean in a one-worker job.
    os.environ["RAY_CHDIR_TO_TRIAL_DIR"] = "0"
    storage = GangStorage.of(store, job.id)
    roster = GangRoster.options(name=roster_name(job.id), namespace=NAMESPACE).remote()
    trainer = TorchTrainer(
        _rank_main,
        train_loop_config={"job": job.model_dump(mode="json"), "store": store_url(store), "roster": roster},
        scaling_config=scaling_config(job.resources),
        run_config=RunConfig(
            name=job.id,
            failure_config=FailureConfig(max_failures=MAX_RESTARTS),
            checkpoint_config=CheckpointConfig(num_to_keep=1),
            **storage.run_config_args(),
        ),
    )
    started = time.perf_counter()
    try:
        outcome = trainer.fit()  # raises once the gang failed more than MAX_RESTARTS times
        attempts = ray.get(roster.attempts.remote())
    finally:
        ray.kill(roster)
    storage.remove()  # the artifact is what stays; a failed fit keeps its checkpoints for the next attempt
    return {
        **outcome.return_value,
        "restarts": len(attempts) - 1,
        "resumed_from_step": attempts[-1]["resumed_from_step"],  # 0: the last attempt started afresh
        "gang_seconds": time.perf_counter() - started,
    }


@dataclass(frozen=True)
class Restored:
    """Where a restarted rank resumes: the checkpoint's step, and what this rank had trained by then."""

    step: int = 0
    tokens: int = 0
    seconds: float = 0.0

    @classmethod
    def read(cls, folder: str | None, rank: int) -> Restored:
        if folder is None:
            return cls()
        state = json.loads((Path(folder) / "trainer_state.json").read_text())
        mine = json.loads((Path(folder) / RANK_FILE.format(rank=rank)).read_text())
        return cls(step=int(state["global_step"]), tokens=int(mine["tokens"]), seconds=float(mine["seconds"]))


def _rank_main(config: dict) -> dict | None:
    """One rank, in a Ray Train worker process: pin numerics, train (resuming the latest checkpoint if the
    gang restarted), gather every rank's costs to rank 0, which returns the job's result."""
    from pefteval_harness.numerics import pin_numerics

    job = Job.model_validate(config["job"])
    pin_numerics(max(1, int(job.resources.num_cpus)))  # before torch computes anything in this process
    from pefteval_harness.scheduling import cap_accelerator_memory

    cap_accelerator_memory(job.resources)

    import ray.train
    import torch
    import torch.distributed as dist

    from pefteval_harness.jobs.train import Rank, peak_accelerator_mb, peak_rss_mb, train_rank

    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    if torch.cuda.is_available():  # the GPU Ray Train assigned this rank (written, untested on a GPU)
        from ray.train.torch import get_device

        torch.cuda.set_device(get_device())
    attempt = [uuid.uuid4().hex if rank == 0 else None]
    dist.broadcast_object_list(attempt, src=0)  # one id per attempt, for the roster
    checkpoint = ray.train.get_checkpoint()
    with checkpoint.as_directory() if checkpoint else nullcontext() as resume:
        restored = Restored.read(resume, rank)
        node_id = ray.get_runtime_context().get_node_id()
        ray.get(config["roster"].join.remote(attempt[0], rank, os.getpid(), node_id, restored.step))
        me = Rank(rank=rank, world=world, resume_from=resume, tokens=restored.tokens, checkpoints=CHECKPOINTS_PER_RUN)
        me.callbacks.append(_report_checkpoints_class()(me, restored.seconds))
        trained = train_rank(job, Store(config["store"]), me)
    mine = {
        "rank": rank,
        "node_id": node_id,
        "peak_rss_mb": peak_rss_mb(),
        "trained_tokens": trained.tokens,  # all attempts: restored from the checkpoint, then counted
        "peak_accelerator_mb": peak_accelerator_mb(),
        "train_seconds": restored.seconds + trained.seconds,
    }
    ranks: list[dict | None] = [None] * world
    dist.all_gather_object(ranks, mine)
    # fit() hands rank 0's return value back (Ray Train V2 keeps only metrics reported with a checkpoint).
    return _gang_result(trained.result, ranks) if rank == 0 else None


def _gang_result(result: dict, ranks: list[dict]) -> dict:
    """Rank 0's result with the gang's costs. Its `trained_tokens` is the Trainer's count, already summed
    over the ranks and carried over restarts by the Trainer's own checkpoint; `per_worker` has each rank's."""
    tokens = result["trained_tokens"]
    seconds = max(r["train_seconds"] for r in ranks)  # the ranks step together: the slowest one's time
    accelerator = [r["peak_accelerator_mb"] for r in ranks if r["peak_accelerator_mb"] is not None]
    return {
        **result,
        "train_seconds": seconds,
        "tokens_per_second": tokens / seconds if seconds > 0 else None,
        "peak_rss_mb": sum(r["peak_rss_mb"] for r in ranks),
        "peak_accelerator_mb": max(accelerator) if accelerator else None,  # what one device had to hold
        "workers": len(ranks),
        "per_worker": [{k: r[k] for k in PER_WORKER_KEYS} for r in sorted(ranks, key=lambda r: r["rank"])],
    }


@cache
def _report_checkpoints_class():
    """A Trainer callback (built on first use: transformers imports slowly) that hands each checkpoint the
    Trainer saved to Ray Train, from every rank: Ray merges the ranks' files into one checkpoint folder."""
    from ray.train import Checkpoint
    from transformers import TrainerCallback
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    class ReportCheckpoints(TrainerCallback):
        def __init__(self, rank, seconds_before: float):
            self.rank, self.seconds_before = rank, seconds_before
            self.started = time.perf_counter()

        def on_train_begin(self, args, state, control, **kwargs):
            self.started = time.perf_counter()

        def on_save(self, args, state, control, **kwargs):
            folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
            folder.mkdir(parents=True, exist_ok=True)
            trained = {"tokens": self.rank.tokens, "seconds": self.seconds_before + time.perf_counter() - self.started}
            (folder / RANK_FILE.format(rank=self.rank.rank)).write_text(json.dumps(trained))
            ray.train.report(
                {"step": state.global_step},
                checkpoint=Checkpoint.from_directory(str(folder)),
                delete_local_checkpoint_after_upload=True,
            )

    return ReportCheckpoints
