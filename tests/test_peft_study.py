"""The PEFT-vs-FFT study end to end (`pefteval run` on the session's Ray, real records): a full fine-tune and
a swept LoRA, the weight-update analysis against FFT, and a report with family sections, robustness gaps,
costs, weight updates and plots.

Every model costs fresh workers for its training, its analysis and its evaluations, so the spec keeps to
these two methods: every other method trains and is scored by lm-eval in tests/test_finetuning_methods.py,
its update is analysed in tests/test_analysis.py (prompt learning's "no weight update" too), and the
report's rows for it are tests/test_report.py's."""

from __future__ import annotations

import json
import os
import textwrap
from pathlib import Path

import pytest

from tests.test_pipeline import leaderboard_rows, pefteval_here

pytestmark = pytest.mark.slow

# The sweep is LoRA's (an adapter trains faster than a full model). The base is the session's tiny model
# folder, used in place: `base_model: tiny` (a build job) is the quickstart's.
SPEC = """
    base_model: %s
    include_paths: [groups]
    train:
      tasks: [pefteval_peft_sst2, pefteval_peft_rte]
      limit: 16
      max_steps: 4
      batch_size: 8
      max_length: 96
      learning_rate: 0.01
    finetunes:
      fft: {method: full, deepspeed: {zero_stage: 0}, train: {learning_rate: 0.002}}
      lora: {method: lora, config: {r: 2}, sweep: {train.data_fraction: [0.5, 1.0]}}
    analysis: {reference: fft}
    evaluate:
      tasks: [study-classification, study-adversarial]
      limit: 8
"""

GROUPS = {
    "classification.yaml": """
        group: study-classification
        task: [pefteval_peft_sst2, pefteval_peft_rte, pefteval_peft_cola]
        aggregate_metric_list: [{metric: acc, aggregation: mean, weight_by_size: false}]
    """,
    "adversarial.yaml": """
        group: study-adversarial
        task: [pefteval_adv_sst2, pefteval_adv_rte]
        aggregate_metric_list: [{metric: acc, aggregation: mean, weight_by_size: false}]
    """,
}


@pytest.fixture(scope="module")
def study(tmp_path_factory, tiny_model_dir, local_ray):
    if not os.environ.get("PEFTEVAL_DATA_DIR"):
        pytest.skip("PEFTEVAL_DATA_DIR is not set: the study reads the catalogue's real records from it")
    root = tmp_path_factory.mktemp("study")
    (root / "groups").mkdir()
    for name, text in GROUPS.items():
        (root / "groups" / name).write_text(textwrap.dedent(text))
    (root / "spec.yaml").write_text(textwrap.dedent(SPEC) % tiny_model_dir)
    code, printed = pefteval_here("run", root / "spec.yaml", "--output", root / "out")
    assert code == 0, printed[-3000:]
    return root / "out"


def test_every_model_is_scored_on_every_task_with_its_sweep_point(study):
    rows = leaderboard_rows(study)
    models = {"base", "fft", "lora[data_fraction=0.5]", "lora[data_fraction=1]"}
    assert {r["model"] for r in rows} == models
    assert all(len([r for r in rows if r["model"] == m]) == 5 for m in models)
    assert all(isinstance(r["value"], float) for r in rows)
    cola = next(r for r in rows if r["task"] == "pefteval_peft_cola" and r["model"] == "lora[data_fraction=1]")
    assert cola["metric"] == "mcc" and cola["stderr"] is not None  # bootstrapped, in the worker
    swept = {r["model"]: r["sweep"] for r in rows if r["sweep_of"] == "lora"}
    assert swept == {
        "lora[data_fraction=0.5]": {"train.data_fraction": 0.5},
        "lora[data_fraction=1]": {"train.data_fraction": 1.0},
    }


def test_the_analysis_measures_each_update_against_fft(study):
    rows = leaderboard_rows(study, "analysis")
    summary = {
        (r["model"], r["metric"]): r["value"] for r in rows if r["module"] is None and r["metric"] != "weight_update"
    }
    for lora in ("lora[data_fraction=0.5]", "lora[data_fraction=1]"):
        assert summary[lora, "rank"] <= 2 < summary["fft", "rank"]  # r = 2
        assert 0 < summary[lora, "subspace_overlap"] <= 1
    assert summary.get(("fft", "subspace_overlap")) is None  # the reference is not compared with itself
    assert {r["model"] for r in rows} == {"fft", "lora[data_fraction=0.5]", "lora[data_fraction=1]"}


def test_the_report_has_families_gaps_costs_weight_updates_and_plots(study):
    board = (study / "leaderboard.md").read_text()
    for heading in ("## study-classification", "## Robustness", "## Training cost", "## Weight updates"):
        assert heading in board, heading
    gaps = leaderboard_rows(study, "gap")
    assert {r["task"] for r in gaps} == {"pefteval_adv_sst2", "pefteval_adv_rte", None}
    costs = {(r["model"], r["metric"]): r["value"] for r in leaderboard_rows(study, "cost")}
    assert 0 < costs["lora[data_fraction=1]", "trainable_params"] < costs["fft", "trainable_params"]
    assert costs["lora[data_fraction=1]", "trainable_share"] < costs["fft", "trainable_share"] == 1
    assert costs["lora[data_fraction=1]", "tokens_per_second"] > 0
    for plot in ("score_vs_trainable_params", "score_vs_data_fraction", "robustness_gap", "subspace_overlap_per_layer"):
        png = study / "plots" / f"{plot}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"plots/{plot}.png" in board, plot
    result = json.loads(next(Path(study, "jobs").glob("analyze-*/result.json")).read_text())
    assert set(result) >= {"weight_update", "modules", "summary", "settings"}
