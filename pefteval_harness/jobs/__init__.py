"""The jobs a plan is made of. One entry per kind; each takes the job and the store, writes its
artifact (if any) into the store and returns its result, which the store records.
"""

from __future__ import annotations

from collections.abc import Callable

from pefteval_harness.store import Store


def model_path(ref: dict, store: Store) -> str:
    """A model reference in a job's config: another job's artifact, a local folder or a hub id."""
    return str(store.artifact(ref["job"])) if "job" in ref else ref["path"]


def _base(job: dict, store: Store) -> dict:
    from pefteval_harness import tiny_model

    tiny_model.build(store.artifact(job["id"]))
    return {"builder": job["config"]["builder"]}


def _train(job: dict, store: Store) -> dict:
    from pefteval_harness.jobs.train import train

    return train(job, store)


def _merge(job: dict, store: Store) -> dict:
    from pefteval_harness.jobs.merge import merge

    return merge(job, store)


def _evaluate(job: dict, store: Store) -> dict:
    from pefteval_harness.jobs.evaluate import evaluate

    return evaluate(job, store)


JOB_KINDS: dict[str, Callable[[dict, Store], dict]] = {
    "base": _base,
    "train": _train,
    "merge": _merge,
    "evaluate": _evaluate,
}


def run_job(job: dict, store: Store) -> dict:
    """Run one job unless the store already has it; record the result with its provenance."""
    from pefteval_harness.provenance import provenance

    if store.is_done(job["id"]):
        return store.status(job["id"])
    result = JOB_KINDS[job["kind"]](job, store)
    result["pefteval"] = {"model": job["label"], "kind": job["kind"], **provenance(job)}
    store.record(job, "done", result)
    return store.status(job["id"])
