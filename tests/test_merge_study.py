"""The merge-scaling study end to end (`pefteval run` on the session's Ray): per-task LoRA experts, merges
of k of them with two methods over seeded subsets, each scored, its theory quantities recorded and its
model deleted once scored; the report's Scaling section; a new task rebuilds the deleted merges and
nothing else."""

from __future__ import annotations

import json
import math

import pytest

from pefteval_harness.store import Store
from tests.test_pipeline import pefteval_here

pytestmark = pytest.mark.slow

# Two experts, one subset per k: k = 1 and k = 2 are the two cases the theory quantities tell apart (how
# many subsets per k a spec gets is tests/test_scaling_sweep.py's). The base is the session's tiny model
# folder, used in place (`base_model: tiny`, a build job, is the quickstart's).
SPEC = """
name: scaling
base_model: {base}
seed: 1234
train:
  tasks: [pefteval_quick_sentiment, pefteval_quick_topic]
  limit: 32
  epochs: 1
  batch_size: 16
  learning_rate: 0.01
finetunes:
  expert: {{method: lora, per_task: true, evaluate: false}}
merges:
  ta: {{method: task_arithmetic, experts: expert, subsets: {{k: [1, 2], per_k: 1}}, theory: true, keep_model: false}}
  rht: {{method: rht, experts: expert, subsets: {{k: [1, 2], per_k: 1}}, theory: {{width_samples: 16}}}}
evaluate:
  tasks: [{tasks}]
  limit: 10
  batch_size: 16
"""


def test_scaling_study_scores_records_theory_and_deletes_spent_merges(tmp_path, tiny_model_dir, local_ray):
    spec, out = tmp_path / "scaling.yaml", tmp_path / "run"
    spec.write_text(SPEC.format(base=tiny_model_dir, tasks="pefteval_quick_sentiment"))
    code, first = pefteval_here("run", spec, "--output", out)
    assert code == 0, first[-2000:]
    plan = json.loads((out / "plan.json").read_text())
    merges = [j for j in plan["jobs"] if j["config"]["kind"] == "merge"]
    assert len(merges) == 2 * 2  # per method: one subset of each k
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
    spec.write_text(SPEC.format(base=tiny_model_dir, tasks="pefteval_quick_sentiment, pefteval_quick_topic"))
    code, second = pefteval_here("run", spec, "--output", out)
    assert code == 0, second[-2000:]
    jobs = json.loads((out / "plan.json").read_text())["jobs"]
    topic = [j for j in jobs if j["config"]["kind"] == "evaluate" and j["config"]["task"] == "pefteval_quick_topic"]
    assert len(topic) == 1 + len(merges) and all(store.is_done(j["id"]) for j in topic)
    rebuilt = sum(j["lineage"]["sweep_of"] == "ta" for j in merges)
    assert f"{len(topic) + rebuilt} jobs ran" in second  # nothing else: the kept merges are reused
    for job in merges:
        assert store.artifact_deleted(job["id"]) == (job["lineage"]["sweep_of"] == "ta")
