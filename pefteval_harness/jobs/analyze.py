"""Analyze job: one fine-tune's weight update ΔW, measured from its artifact and its base's files.

The result (rank, effective rank, norms per changed module, and the overlap of each ΔW's top singular
subspace with the reference fine-tune's) is `pefteval_harness.analysis.analyze_update`'s; docs/analysis.md
describes it. Nothing is written besides the result.
"""

from __future__ import annotations

from pathlib import Path

from pefteval_harness.errors import BadInput
from pefteval_harness.jobs import model_path
from pefteval_harness.jobs.types import HubRef, Job, LoadedModel, ModelRef
from pefteval_harness.store import Store


def _files(ref: ModelRef, store: Store) -> Path:
    """A local folder with the reference's files: the analysis streams safetensors, so a hub model is read
    from its snapshot in the HF cache (pinned revision)."""
    if isinstance(ref, HubRef):
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(ref.repo, revision=ref.revision))
    return Path(model_path(ref, store))


def _fine_tune(loaded: LoadedModel, base: ModelRef, store: Store, what: str) -> tuple[Path | None, Path | None]:
    """(full model folder, None) or (None, adapter folder); an adapter must sit on the analysed base."""
    if loaded.adapter is None:
        return _files(loaded.base, store), None
    if loaded.base != base:  # ΔW is measured against `base`; an adapter on another model would mix two updates
        raise BadInput(f"analyze: the {what} is an adapter on {loaded.base}, not on the analysed base {base}")
    return None, _files(loaded.adapter, store)


def analyze(job: Job, store: Store) -> dict:
    from pefteval_harness.analysis import analyze_update

    config = job.config
    model, adapter = _fine_tune(config.model, config.base, store, "model")
    reference, reference_adapter = (
        _fine_tune(config.reference, config.base, store, "reference") if config.reference else (None, None)
    )
    return analyze_update(
        _files(config.base, store),
        model,
        adapter,
        reference=reference,
        reference_adapter=reference_adapter,
        settings=config.settings,
        method=config.method,
        trust_remote_code=config.trust_remote_code,
    )
