"""What is recorded with every result: which code, which packages, which machine."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
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
    from pefteval_harness import __version__

    return {"pefteval_harness": __version__, **{p: package_version(p) for p in NUMERIC_PACKAGES}}


@cache
def git_sha() -> str | None:
    """The commit of the pefteval checkout this code runs from, if it runs from one."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=5,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def hardware() -> dict:
    import torch

    return {
        "host": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
    }


def provenance(job: dict) -> dict:
    return {
        "job_id": job["id"],
        "spec_hash": job.get("spec_hash"),
        "git_sha": git_sha(),
        "packages": {**numeric_versions(), "ray": package_version("ray")},
        "hardware": hardware(),
    }
