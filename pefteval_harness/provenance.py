"""What is recorded with every result: which code, which packages, which machine."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
import sys
from functools import cache
from pathlib import Path

# Packages whose version changes numbers: part of every job id, so an upgrade reruns the jobs.
NUMERIC_PACKAGES = ("torch", "transformers", "peft", "deepspeed", "lm_eval", "datasets", "safetensors")


def package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


@cache
def numeric_versions() -> dict[str, str | None]:
    """What changes numbers besides a job's own config: package versions and the pinned CPU numerics."""
    from pefteval_harness import __version__
    from pefteval_harness.numerics import NUMERICS_ENV

    versions = {"pefteval_harness": __version__, **{p: package_version(p) for p in NUMERIC_PACKAGES}}
    return {**versions, "numerics": ",".join(f"{k}={v}" for k, v in sorted(NUMERICS_ENV.items()))}


def _git(args: list[str], cwd: Path) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


PACKAGE = Path(__file__).resolve().parent


@cache
def source_revision(package: Path = PACKAGE) -> dict | None:
    """The commit of the pefteval checkout this code runs from, with a dirty flag; None when installed.

    Only pefteval's own repository counts: a package installed inside a user's repository (a venv in
    their project) must not record the user's commit, so the git top level must be the package's parent.
    """
    top = _git(["rev-parse", "--show-toplevel"], package)
    if top is None or Path(top).resolve() != package.parent:
        return None
    sha = _git(["rev-parse", "HEAD"], package)
    tracked = ["pefteval_harness", "task_configs", "pyproject.toml"]  # what changes the results
    changes = _git(["status", "--porcelain", "--", *tracked], package.parent)
    return {"sha": sha, "dirty": bool(changes)} if sha else None


def hardware() -> dict:
    import torch

    return {
        "host": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
    }


def ray_node_id() -> str | None:
    """The Ray node this process runs on (a job's worker: the node that ran it); None outside Ray.

    Read only when Ray is already imported and initialised here: recording it must not start a Ray."""
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return None
    return ray.get_runtime_context().get_node_id()


def provenance(job) -> dict:
    return {
        "job_id": job.id,
        "spec_hash": job.spec_hash,
        "source": source_revision(),
        "packages": {**numeric_versions(), "ray": package_version("ray")},
        "hardware": hardware(),
        "ray_node_id": ray_node_id(),
    }
