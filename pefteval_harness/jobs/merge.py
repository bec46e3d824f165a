"""Merge job: the experts trained in this run, merged by the streaming engine (`merging/`)."""

from __future__ import annotations

import shutil
from pathlib import Path

from pefteval_harness.jobs import model_path
from pefteval_harness.store import Store


def merge(job: dict, store: Store) -> dict:
    from pefteval_harness.merging import merge_models

    config = job["config"]
    base = Path(model_path(config["base"], store))
    if not base.is_dir():  # a hub id: the engine streams from local files (the HF cache)
        from huggingface_hub import snapshot_download

        base = Path(snapshot_download(str(base)))
    out = store.artifact(job["id"])
    if out.exists():  # left by an attempt that died before its status was written
        shutil.rmtree(out)
    merge_models(
        method=config["method"],
        experts=[store.artifact(expert) for expert in config["experts"]],
        out_dir=out,
        base=base,
        weights=config["weights"],
        params=config["parameters"],
        space=config["space"],
    )
    return {"method": config["method"], "experts": config["experts"], "space": config["space"]}
