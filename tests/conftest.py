"""Shared test setup: offline, loopback-only Ray, the tiny model built once per session."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PEFTEVAL = [sys.executable, "-m", "pefteval_harness.cli"]

# Set before any library import reads them (and inherited by every subprocess and Ray worker).
os.environ.update(
    HF_HUB_OFFLINE="1",
    HF_DATASETS_OFFLINE="1",
    TRANSFORMERS_OFFLINE="1",
    TOKENIZERS_PARALLELISM="false",
    DS_ACCELERATOR="cpu",
    # Keeps Ray's node on 127.0.0.1 (Ray 2.60 otherwise binds the machine's network address).
    RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
    RAY_AUTH_MODE="disabled",
)
os.environ.pop("RAY_ADDRESS", None)  # tests start their own loopback Ray, never join another

# The files that take longest (pytest's --durations in CI), longest first. pytest-xdist's `--dist loadfile`
# hands files to its workers in collection order, one at a time as a worker runs low: longest first keeps
# the two workers busy to the end. (Its default order, most tests first, left these few-test files for last.)
LONGEST_FILES = [
    "test_chaos.py", "test_pipeline.py", "test_two_node.py", "test_gang.py", "test_signals.py",
    "test_failures.py", "test_store_fsspec.py", "test_runner.py", "test_peft_study.py", "test_ray_cluster.py",
    "test_examples.py", "test_affective_study.py", "test_merge_study.py", "test_tasks.py",
]  # fmt: skip


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the others keep their order


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """Torch in this process on one thread, as a job with the default 1 CPU pins it: the tiny model's ops are
    far too small to share, and a second thread waits for the other core whenever anything else runs (a
    Ray worker, another process): on the 2-core test VM a forward pass then took 150 ms, on one thread 1.7 ms."""
    import torch

    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """The embedded default model, built as users build it (`pefteval tiny-model`, numerics pinned)."""
    import subprocess

    out = tmp_path_factory.mktemp("tiny") / "model"
    subprocess.run([*PEFTEVAL, "tiny-model", "--out", str(out)], check=True, capture_output=True, timeout=300)
    return out


@pytest.fixture
def isolated_process_state():
    """For tests that run a job in this process: its numerics pins (environment, torch threads) are undone."""
    import torch

    env, threads = dict(os.environ), torch.get_num_threads()
    deterministic = torch.are_deterministic_algorithms_enabled()
    yield
    os.environ.clear()
    os.environ.update(env)
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(deterministic)


@pytest.fixture(scope="session")
def local_ray():
    """One local Ray for the session, on loopback only (asserted)."""
    import ray

    from pefteval_harness.runner import init_ray

    init_ray(None, num_cpus=2)
    assert {n["NodeManagerAddress"] for n in ray.nodes()} == {"127.0.0.1"}
    yield ray
    ray.shutdown()
