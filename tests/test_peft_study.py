"""The PEFT-vs-FFT study end to end, as a user runs it (`pefteval run`, Ray, real records): sweeps,
every kind of method (full, low-rank, rescaling, virtual tokens), the weight-update analysis against
FFT, and a report with family sections, robustness gaps, costs, weight updates and plots."""

from __future__ import annotations

import json
import os
import textwrap
from pathlib import Path

import pytest

from tests.test_pipeline import leaderboard_rows, pefteval

pytestmark = pytest.mark.slow

SPEC = """
    base_model: tiny
    include_paths: [groups]
    train:
      tasks: [pefteval_peft_sst2, pefteval_peft_rte]
      limit: 16
      max_steps: 4
      batch_size: 8
      max_length: 96
      learning_rate: 0.01
    finetunes:
      fft: {method: full, deepspeed: {zero_stage: 0}, train: {learning_rate: 0.002},
            sweep: {train.data_fraction: [0.5, 1.0]}}
      lora: {method: lora, sweep: {config.r: [2, 8]}}
      ia3: {method: ia3}
      prompt_tuning: {method: prompt_tuning, config: {num_virtual_tokens: 4}, train: {learning_rate: 0.1}}
    analysis: {reference: "fft[data_fraction=1]"}
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
def study(tmp_path_factory):
    if not os.environ.get("PEFTEVAL_DATA_DIR"):
        pytest.skip("PEFTEVAL_DATA_DIR is not set: the study reads the catalogue's real records from it")
    root = tmp_path_factory.mktemp("study")
    (root / "groups").mkdir()
    for name, text in GROUPS.items():
        (root / "groups" / name).write_text(textwrap.dedent(text))
    (root / "spec.yaml").write_text(textwrap.dedent(SPEC))
    run = pefteval("run", root / "spec.yaml", "--output", root / "out", timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    return root / "out"


def test_every_model_is_scored_on_every_task_with_its_sweep_point(study):
    rows = leaderboard_rows(study)
    models = {"base", "fft[data_fraction=0.5]", "fft[data_fraction=1]", "lora[r=2]", "lora[r=8]", "ia3"}
    assert {r["model"] for r in rows} == models | {"prompt_tuning"}
    assert all(len([r for r in rows if r["model"] == m]) == 5 for m in models)
    assert all(isinstance(r["value"], float) for r in rows)
    cola = next(r for r in rows if r["task"] == "pefteval_peft_cola" and r["model"] == "lora[r=8]")
    assert cola["metric"] == "mcc" and cola["stderr"] is not None  # bootstrapped, in the worker
    swept = {r["model"]: r["sweep"] for r in rows if r["sweep_of"] == "lora"}
    assert swept == {"lora[r=2]": {"config.r": 2}, "lora[r=8]": {"config.r": 8}}


def test_the_analysis_measures_each_update_against_fft(study):
    rows = leaderboard_rows(study, "analysis")
    summary = {
        (r["model"], r["metric"]): r["value"] for r in rows if r["module"] is None and r["metric"] != "weight_update"
    }
    assert summary["lora[r=2]", "rank"] <= 2 < summary["fft[data_fraction=1]", "rank"]
    assert summary["lora[r=8]", "rank"] <= 8
    assert 0 < summary["lora[r=8]", "subspace_overlap"] <= 1
    assert ("fft[data_fraction=1]", "subspace_overlap") not in summary or summary[
        "fft[data_fraction=1]", "subspace_overlap"
    ] is None  # the reference is not compared with itself
    no_update = next(r for r in rows if r["model"] == "prompt_tuning" and r["metric"] == "weight_update")
    assert no_update["value"] == 0 and "prompt" in no_update["note"].lower()


def test_the_report_has_families_gaps_costs_weight_updates_and_plots(study):
    board = (study / "leaderboard.md").read_text()
    for heading in ("## study-classification", "## Robustness", "## Training cost", "## Weight updates"):
        assert heading in board, heading
    gaps = leaderboard_rows(study, "gap")
    assert {r["task"] for r in gaps} == {"pefteval_adv_sst2", "pefteval_adv_rte", None}
    costs = {(r["model"], r["metric"]): r["value"] for r in leaderboard_rows(study, "cost")}
    assert costs["lora[r=2]", "trainable_params"] < costs["lora[r=8]", "trainable_params"]
    assert costs["lora[r=8]", "tokens_per_second"] > 0
    for plot in ("score_vs_trainable_params", "score_vs_data_fraction", "robustness_gap", "subspace_overlap_per_layer"):
        png = study / "plots" / f"{plot}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"plots/{plot}.png" in board, plot
    result = json.loads(next(Path(study, "jobs").glob("analyze-*/result.json")).read_text())
    assert set(result) >= {"weight_update", "modules", "summary", "settings"}
