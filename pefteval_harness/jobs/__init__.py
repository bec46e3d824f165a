"""The jobs a plan is made of: one registry entry per kind, with its implementation version.

Each kind's `run(job, store)` writes its artifact (if any) into the store and returns its result, which
the store records with provenance. `version` is part of every job id of that kind: bump it when a change
to the kind's code changes what it produces, so stored results of the old code are not reused.
Evaluations of one model can run as a batch in one worker (`run_batch`), loading the model once.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pefteval_harness.errors import failure_class
from pefteval_harness.jobs.job_log import JobLog
from pefteval_harness.jobs.memory_cap import MemoryCap
from pefteval_harness.jobs.types import ArtifactRef, HubRef, Job, LocalRef, ModelRef
from pefteval_harness.secrets import redact
from pefteval_harness.store import DONE, FAILED, Store

log = logging.getLogger(__name__)


def model_path(ref: ModelRef, store: Store) -> str:
    """Where a model reference's files are: another job's artifact (a local folder: the store's own, or this
    node's cached copy of a remote store's), a local folder, or a hub repo id."""
    if isinstance(ref, ArtifactRef):
        return str(store.local_artifact(ref.job))
    if isinstance(ref, LocalRef):
        return ref.path
    return ref.repo


def load_kwargs(ref: ModelRef) -> dict[str, Any]:
    """from_pretrained arguments for a reference: the pinned hub revision; safetensors when the folder has them."""
    if isinstance(ref, HubRef):
        return {"revision": ref.revision}
    return {}


def prefer_safetensors(folder: str) -> dict[str, Any]:
    """Load weights from safetensors when a local folder has them, never from its pickles."""
    from pathlib import Path

    from pefteval_harness.trust import has_safetensors

    if has_safetensors(Path(folder)):
        return {"use_safetensors": True}
    return {}


def _base(job: Job, store: Store) -> dict:
    from pefteval_harness import tiny_model

    with store.staging(job.id) as out:
        tiny_model.build(out)
    return {"builder": job.config.builder}


def _train(job: Job, store: Store) -> dict:
    from pefteval_harness.jobs.train import train

    return train(job, store)


def _merge(job: Job, store: Store) -> dict:
    from pefteval_harness.jobs.merge import merge

    return merge(job, store)


def _analyze(job: Job, store: Store) -> dict:
    from pefteval_harness.jobs.analyze import analyze

    return analyze(job, store)


def _evaluate(job: Job, store: Store) -> dict:
    from pefteval_harness.jobs.evaluate import evaluate_batch

    result = evaluate_batch([job], store)[job.id]
    if isinstance(result, BaseException):
        raise result
    return result


@dataclass(frozen=True)
class JobKind:
    run: Callable[[Job, Store], dict]
    version: int


JOB_KINDS: dict[str, JobKind] = {
    "base": JobKind(_base, version=1),
    "train": JobKind(_train, version=2),  # 2: prompts truncated from the left, answers kept whole
    "merge": JobKind(_merge, version=3),  # 3: streamed output, model card, theory quantities
    "evaluate": JobKind(_evaluate, version=2),  # 2: one task per job
    "analyze": JobKind(_analyze, version=1),
}


def outcome_of(error: BaseException) -> dict:
    """A failed job's status: its one-line reason (redacted) and class (`errors.FAILURE_CLASSES`)."""
    lines = str(error).strip().splitlines()
    reason = redact(f"{type(error).__name__}: {lines[-1] if lines else ''}")
    return {"state": FAILED, "reason": reason, "error_class": failure_class(error)}


def _record_done(job: Job, store: Store, result: dict, numerics: dict, logged: dict) -> dict:
    from pefteval_harness.provenance import provenance

    result["pefteval"] = {"model": job.label, "kind": job.kind, **provenance(job), "numerics": numerics}
    store.record(job.model_dump(mode="json"), DONE, result, **logged)
    return {"state": DONE}


def run_batch(jobs: list[dict], store_root: str, threads: int = 1) -> dict[str, dict]:
    """The body of every worker: run these jobs (one, or a model's evaluations) and record each.

    Returns job id -> outcome ({"state": "done"} or a failure from `outcome_of`). A job's failure is
    returned, not raised, so that the driver decides about retries; only a dying process escapes.
    `threads` is the jobs' CPU count (torch's threads); a batch's jobs share one `resources`.
    """
    try:
        return _run_batch(jobs, store_root, threads)
    finally:
        _release_memory()


def _release_memory() -> None:
    """The worker may run other jobs next (runner.JOBS_PER_WORKER): free what this batch's models left,
    torch's cached GPU memory included, which other processes on the GPU could not use otherwise."""
    import gc
    import sys

    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


def _run_batch(jobs: list[dict], store_root: str, threads: int) -> dict[str, dict]:
    from pefteval_harness.numerics import pin_numerics
    from pefteval_harness.progress import ProgressWriter
    from pefteval_harness.scheduling import cap_accelerator_memory

    numerics = pin_numerics(threads)
    store = Store(store_root)
    typed = [Job.model_validate(j) for j in jobs]
    if typed and typed[0].resources.workers == 1:  # a gang's coordinator holds no GPU: its workers cap
        cap_accelerator_memory(typed[0].resources)  # a job sharing a GPU keeps to its share
    outcomes: dict[str, dict] = {}
    todo = []
    for job in typed:
        if store.is_done(job.id) and not store.artifact_deleted(job.id):  # a deleted artifact is rebuilt
            outcomes[job.id] = {"state": DONE}
        else:
            todo.append(job)
    # A gang's coordinator holds nothing itself: its memory cap would be its Ray Train workers'.
    memory_gb = typed[0].resources.memory_gb if typed and typed[0].resources.workers == 1 else None
    with JobLog() as job_log:
        if todo and all(job.kind == "evaluate" for job in todo):
            return {**outcomes, **_evaluate_all(todo, store, numerics, job_log, memory_gb)}
        for job in todo:
            job_log.start()
            if job.kind != "train":  # training reports its steps itself; the others say they have started
                ProgressWriter(store, job.id)({"phase": job.kind, "message": "started"}, force=True)
            try:
                with MemoryCap(memory_gb):
                    result = JOB_KINDS[job.kind].run(job, store)
                outcomes[job.id] = _record_done(job, store, result, numerics, job_log.save(store, job.id))
            except Exception as e:
                log.exception("job %s failed", job.id)
                outcomes[job.id] = {**outcome_of(e), **job_log.save(store, job.id)}
    return outcomes


def _evaluate_all(todo: list[Job], store: Store, numerics: dict, job_log: JobLog, memory_gb) -> dict[str, dict]:
    """A model's evaluations in this worker; each job's log is the batch's (one process, one model load)."""
    from pefteval_harness.jobs.evaluate import evaluate_batch

    try:
        with MemoryCap(memory_gb):
            results = evaluate_batch(todo, store)
    except Exception as e:  # the model did not load: every evaluation of it fails alike
        log.exception("the evaluations of %s failed", todo[0].label)
        results = {job.id: e for job in todo}
    for job in todo:
        if isinstance(results[job.id], BaseException):
            log.error("job %s failed", job.id, exc_info=results[job.id])
    outcomes = {}
    for job in todo:
        result, logged = results[job.id], job_log.save(store, job.id)
        if isinstance(result, BaseException):
            outcomes[job.id] = {**outcome_of(result), **logged}
        else:
            outcomes[job.id] = _record_done(job, store, result, numerics, logged)
    return outcomes
