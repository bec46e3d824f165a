"""Merge job: the experts trained in this run, merged by the streaming engine (`merging/`)."""

from __future__ import annotations

from pathlib import Path

from pefteval_harness.jobs import model_path
from pefteval_harness.jobs.types import HubRef, Job, MergeConfig
from pefteval_harness.store import Store


def merge(job: Job, store: Store) -> dict:
    from pefteval_harness.merging import merge_models

    config = job.config
    if isinstance(config.base, HubRef):  # the engine streams from local files: the HF cache's snapshot
        from huggingface_hub import snapshot_download

        base = Path(snapshot_download(config.base.repo, revision=config.base.revision))
    else:
        base = Path(model_path(config.base, store))
    theory = _theory_accumulator(config)
    # The engine writes into an empty folder through a sibling temp folder and a rename; the staging folder
    # is that empty folder (local store: renamed into place; remote: uploaded), so nothing is copied twice.
    with store.staging(job.id) as out:
        merge_models(
            method=config.method,
            experts=[store.local_artifact(expert) for expert in config.experts],
            out_dir=out,
            base=base,
            weights=config.weights,
            params=config.parameters,
            space=config.space,
            seed=config.seed,
            observer=theory,
        )
    result = {"method": config.method, "experts": config.experts, "space": config.space}
    if theory is not None:
        result["theory"] = theory.result()
    return result


def _theory_accumulator(config: MergeConfig):
    """What records the theory quantities while the engine streams the tensors, if the merge asks for them.
    RHT's density for the tail statistics: the setting's, else the merge's own density, else RHT's default."""
    if config.theory is None:
        return None
    from pefteval_harness.merging import get_method
    from pefteval_harness.merging.theory import TheoryAccumulator

    density = config.theory.density or config.parameters.get("density") or get_method("rht").validate_params({}).density
    return TheoryAccumulator(density=density, width_samples=config.theory.width_samples, seed=config.seed)
