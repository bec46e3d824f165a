"""The wheel ships the task YAMLs and every module; lm-eval's entry point names the task folder."""

from __future__ import annotations

import importlib.metadata
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from tests.conftest import REPO


def test_wheel_ships_every_module_and_task_file(tmp_path):
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(REPO),
        ],
        check=True,
        capture_output=True,
    )
    wheel = next(tmp_path.glob("pefteval_harness-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    modules = {str(p.relative_to(REPO)) for p in (REPO / "pefteval_harness").rglob("*.py")}
    assert modules <= names, f"missing from the wheel (list the package in pyproject.toml): {modules - names}"
    task_files = {
        "pefteval_harness/task_configs/" + str(p.relative_to(REPO / "task_configs"))
        for p in (REPO / "task_configs").rglob("*")
        if (p.suffix in (".yaml", ".py") or p.name.endswith("_yaml")) and "__pycache__" not in p.parts
    }
    assert task_files <= names, f"task files missing from the wheel: {task_files - names}"

    # Installed from the wheel alone, the package finds its task folder inside itself.
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
        check=True,
        capture_output=True,
    )
    code = "from pefteval_harness.tasks import task_configs_path as p; print(p())"
    # -S: without site-packages, so the editable install of this checkout is out of the way.
    out = subprocess.run(
        [sys.executable, "-S", "-c", code],
        env={"PYTHONPATH": str(target)},
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    path = Path(out.stdout.strip())
    assert path == target / "pefteval_harness" / "task_configs", out.stderr
    assert (path / "quickstart" / "sentiment.yaml").is_file()


def test_lm_eval_tasks_entry_point_points_at_the_task_folder():
    (entry,) = [e for e in importlib.metadata.entry_points(group="lm_eval.tasks") if e.name == "pefteval"]
    assert entry.load()() == REPO / "task_configs"


def test_a_bare_source_tree_finds_its_task_folder(tmp_path):
    """As in a Ray job's uploaded working_dir: the checkout on sys.path, no install at all."""
    shutil.copytree(REPO / "pefteval_harness", tmp_path / "pefteval_harness")
    shutil.copytree(REPO / "task_configs", tmp_path / "task_configs")
    code = "from pefteval_harness.tasks import task_configs_path as p; print(p())"
    out = subprocess.run([sys.executable, "-S", "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert Path(out.stdout.strip()) == tmp_path / "task_configs", out.stderr
