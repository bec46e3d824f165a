"""The merge-scaling study end to end, as a user runs it: per-task LoRA experts, merges of k of them with
two methods over seeded subsets, each scored, its theory quantities recorded and its model deleted once
scored; the report's Scaling section; a new task rebuilds the deleted merges and nothing else."""

from __future__ import annotations

import json
import math

import pytest

from pefteval_harness.store import Store
from tests.test_pipeline import pefteval

pytestmark = pytest.mark.slow

SPEC = """
name: scaling
base_model: tiny
seed: 1234
train:
  tasks: [pefteval_quick_sentiment, pefteval_quick_topic, pefteval_quick_arithmetic]
  limit: 32
  epochs: 1
  batch_size: 16
  learning_rate: 0.01
finetunes:
  expert: {method: lora, per_task: true, evaluate: false}
merges:
  ta: {method: task_arithmetic, experts: expert, subsets: {k: [1, 3], per_k: 2}, theory: true, keep_model: false}
  rht: {method: rht, experts: expert, subsets: {k: [1, 3], per_k: 2}, theory: {width_samples: 16}}
evaluate:
  tasks: [%s]
  limit: 10
  batch_size: 16
"""


def test_scaling_study_scores_records_theory_and_deletes_spent_merges(tmp_path):
    spec, out = tmp_path / "scaling.yaml", tmp_path / "run"
    spec.write_text(SPEC % "pefteval_quick_sentiment")
    first = pefteval("run", spec, "--output", out, timeout=900)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-4000:]
    plan = json.loads((out / "plan.json").read_text())
    merges = [j for j in plan["jobs"] if j["config"]["kind"] == "merge"]
    assert len(merges) == 2 * (2 + 1)  # per method: k=1 two subsets, k=3 the one there is
    store = Store(out)
    for job in merges:
        theory = store.result(job["id"])["theory"]
        assert theory["experts"] == job["lineage"]["merge"]["k"]
        # One expert: nothing to conflict with, and a width of 0 in expectation (E<g, τ> = 0)
        conflicts, width, error = theory["sign_conflict_rate"], theory["gaussian_width"], theory["gaussian_width_se"]
        if theory["experts"] == 1:
            assert math.isnan(conflicts) and abs(width) < 5 * error
        else:
            assert 0 <= conflicts <= 1 and width > 0
        assert 0 < theory["coverage_merged"] <= 1
        deleted = job["lineage"]["sweep_of"] == "ta"
        assert store.artifact_deleted(job["id"]) == deleted
        assert store.artifact(job["id"]).exists() != deleted
        if not deleted:
            card = (store.artifact(job["id"]) / "README.md").read_text()
            assert "rht" in card and "density" in card  # the model card carries the recipe
    markdown = (out / "leaderboard.md").read_text()
    section = markdown.split("## Scaling with the number of merged experts", 1)[1].split("\n## ", 1)[0]
    assert "| ta " in section and "| rht " in section and "Theory quantities" in section
    assert (out / "plots" / "scaling.png").exists()

    # A new task: the deleted merges are rebuilt to be scored on it, then deleted again.
    spec.write_text(SPEC % "pefteval_quick_sentiment, pefteval_quick_topic")
    second = pefteval("run", spec, "--output", out, timeout=900)
    assert second.returncode == 0, second.stdout[-2000:] + second.stderr[-4000:]
    jobs = json.loads((out / "plan.json").read_text())["jobs"]
    topic = [j for j in jobs if j["config"]["kind"] == "evaluate" and j["config"]["task"] == "pefteval_quick_topic"]
    assert len(topic) == 1 + len(merges) and all(store.is_done(j["id"]) for j in topic)
    rebuilt = sum(j["lineage"]["sweep_of"] == "ta" for j in merges)
    assert f"{len(topic) + rebuilt} jobs ran" in second.stdout  # nothing else: the kept merges are reused
    for job in merges:
        assert store.artifact_deleted(job["id"]) == (job["lineage"]["sweep_of"] == "ta")
