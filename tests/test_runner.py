"""How runs execute: dry runs, retries by failure class, one failing task (two runs sharing a folder, and a leftover
Ray: tests/test_chaos.py, tests/test_signals.py)."""

from __future__ import annotations

import json
import textwrap

import pytest

from tests.test_pipeline import leaderboard_rows, pefteval

pytestmark = pytest.mark.slow

FLAKY_TASKS = {
    # Fails on its first load in a run folder, then works: a transient error, retried.
    "flaky.yaml": """
        include: base.yaml
        task: t_flaky
        custom_dataset: !function utils.flaky
    """,
    # Raises BadInput every time: deterministic, never retried.
    "broken.yaml": """
        include: base.yaml
        task: t_broken
        custom_dataset: !function utils.broken
    """,
    "fine.yaml": """
        include: base.yaml
        task: t_fine
    """,
    "base.yaml": """
        custom_dataset: !function utils.fine
        test_split: test
        output_type: multiple_choice
        doc_to_text: "Review: {{sentence}}\\nSentiment:"
        doc_to_target: label
        doc_to_choice: ["negative", "positive"]
        metric_list: [{metric: acc}]
    """,
    "utils.py": """
        import os
        from pathlib import Path

        from pefteval_harness.errors import BadInput
        from pefteval_harness.tasks import quickstart

        CALLS = Path(os.environ["FLAKY_CALLS"])


        def _count(name):
            with open(CALLS / name, "a") as f:
                f.write("x")
            return len((CALLS / name).read_text())


        def fine(**kwargs):
            return quickstart.dataset("sentiment")


        def flaky(**kwargs):
            if _count("flaky") == 1:
                raise ConnectionError("the dataset server hung up")
            return fine()


        def broken(**kwargs):
            _count("broken")
            raise BadInput("t_broken: the dataset's label column is missing")
    """,
}


@pytest.fixture
def task_folder(tmp_path, monkeypatch):
    folder = tmp_path / "tasks"
    folder.mkdir()
    for name, text in FLAKY_TASKS.items():
        (folder / name.replace("base.yaml", "_base.yaml")).write_text(textwrap.dedent(text).replace(
            "include: base.yaml", "include: _base.yaml"))
    calls = tmp_path / "calls"
    calls.mkdir()
    monkeypatch.setenv("FLAKY_CALLS", str(calls))
    return folder, calls


def write_spec(tmp_path, tasks: str, folder) -> str:
    spec = tmp_path / "spec.yaml"
    spec.write_text(textwrap.dedent(f"""
        base_model: tiny
        include_paths: [{folder}]
        evaluate: {{tasks: {tasks}, limit: 8}}
        resources: {{max_retries: 1}}
    """))
    return spec


def test_transient_failures_are_retried_bad_input_is_not_and_one_task_fails_alone(tmp_path, task_folder):
    folder, calls = task_folder
    # utils.py is loaded by the plan (index only: no dataset built), then by the worker that evaluates.
    spec = write_spec(tmp_path, "[t_fine, t_flaky, t_broken]", folder)
    run = pefteval("run", spec, "--output", tmp_path / "out", timeout=600)
    assert run.returncode == 1, run.stderr[-3000:]
    assert "1 failed" in run.stdout
    assert (calls / "flaky").read_text() == "xx"  # failed once, retried once, done
    assert (calls / "broken").read_text() == "x"  # bad input: never retried
    rows = {r["task"]: r for r in leaderboard_rows(tmp_path / "out")}
    assert set(rows) == {"t_fine", "t_flaky"} and all(isinstance(r["value"], float) for r in rows.values())
    (failure,) = leaderboard_rows(tmp_path / "out", record="failure")
    assert failure["task"] == "t_broken" and "label column is missing" in failure["error"]
    statuses = [json.loads(p.read_text()) for p in (tmp_path / "out").glob("jobs/*/status.json")]
    assert {s["state"] for s in statuses} == {"done", "failed"}
    (failed,) = [s for s in statuses if s["state"] == "failed"]
    assert failed["error_class"] == "bad_input" and failed["attempts"] == 1


def test_dry_run_prints_the_plan_and_writes_nothing(tmp_path, task_folder):
    folder, _ = task_folder
    spec = write_spec(tmp_path, "[t_fine]", folder)
    out = tmp_path / "out"
    dry = pefteval("run", spec, "--output", out, "--dry-run", timeout=300)
    assert dry.returncode == 0, dry.stderr
    assert "2 of 2 jobs to run" in dry.stdout and "t_fine" in dry.stdout
    assert not out.exists()
