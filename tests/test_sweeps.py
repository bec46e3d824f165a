"""Sweeps: one fine-tune or merge expanded over a grid of field values, each point its own model and job;
and the analysis jobs the plan adds for `analysis:`. Planning only: nothing is trained here."""

from __future__ import annotations

import textwrap

import pytest

from pefteval_harness.cli import main
from pefteval_harness.errors import BadInput
from pefteval_harness.jobs.train import _share
from pefteval_harness.plan import build_plan
from pefteval_harness.spec import load_spec

SPEC = """
base_model: tiny
train: {tasks: [pefteval_quick_sentiment, pefteval_quick_topic], epochs: 1}
finetunes:
  fft: {method: full, per_task: true}
  lora:
    method: lora
    per_task: true
    sweep: {config.r: [2, 4], train.data_fraction: [0.5, 1.0]}
merges:
  m: {method: ties, experts: "lora[r=2,data_fraction=1]", sweep: {parameters.density: [0.3, 0.7]}}
analysis: {reference: fft}
evaluate: {tasks: [pefteval_quick_sentiment], limit: 4}
"""


def plan_of(tmp_path, text: str = SPEC):
    path = tmp_path / "spec.yaml"
    path.write_text(textwrap.dedent(text))
    spec, _ = load_spec(path)
    return build_plan(spec)


def test_grid_points_are_models_with_their_values(tmp_path):
    plan = plan_of(tmp_path)
    trains = [j for j in plan.jobs if j.kind == "train" and j.lineage.sweep_of == "lora"]
    points = {j.label.split("/")[0] for j in trains}
    assert points == {f"lora[r={r},data_fraction={f}]" for r in (2, 4) for f in ("0.5", "1")}
    assert len(trains) == 8  # 4 points x 2 per-task experts
    for job in trains:
        r, fraction = job.lineage.sweep["config.r"], job.lineage.sweep["train.data_fraction"]
        assert job.config.peft["r"] == r and job.config.train.data_fraction == fraction
        assert job.config.peft["lora_alpha"] == 16  # the method's defaults still fill the rest
    assert len({j.id for j in trains}) == 8
    merges = [j for j in plan.jobs if j.kind == "merge"]
    densities = [(j.label, j.config.parameters["density"]) for j in merges]
    assert densities == [("m[density=0.3]", 0.3), ("m[density=0.7]", 0.7)]
    assert all(j.lineage.sweep_of == "m" for j in merges)
    unswept = next(j for j in plan.jobs if j.label == "fft/pefteval_quick_sentiment")
    assert unswept.lineage.sweep_of is None and unswept.lineage.sweep == {}


def test_a_point_is_the_fine_tune_written_out_by_hand(tmp_path):
    """A sweep point is an ordinary job: written out by hand, the same settings give the same config
    (the id differs only because the label, the model's name in the store and report, is part of it)."""
    common = "base_model: tiny\ntrain: {tasks: [pefteval_quick_sentiment], epochs: 1}\n"
    common += "evaluate: {tasks: [pefteval_quick_sentiment], limit: 4}\nfinetunes:\n"
    swept = plan_of(tmp_path, common + "  lora: {method: lora, sweep: {config.r: [2, 4], train.data_fraction: [0.5]}}")
    by_hand = plan_of(tmp_path, common + "  lora: {method: lora, config: {r: 4}, train: {data_fraction: 0.5}}")
    point = next(j for j in swept.jobs if j.label == "lora[r=4,data_fraction=0.5]" and j.kind == "train")
    plain = next(j for j in by_hand.jobs if j.label == "lora" and j.kind == "train")
    assert point.config == plain.config and point.id != plain.id


def test_analysis_jobs_compare_with_the_reference_trained_on_the_same_task(tmp_path):
    plan = plan_of(tmp_path)
    by_id = {j.id: j for j in plan.jobs}
    analyses = [j for j in plan.jobs if j.kind == "analyze"]
    assert len(analyses) == 10  # every trained model: 2 fft + 8 lora
    for job in analyses:
        trained = [by_id[d] for d in job.deps if by_id[d].kind == "train"]
        own = next(t for t in trained if t.label == job.label)
        references = [t for t in trained if t is not own]
        if own.lineage.method == "full":
            assert job.config.reference is None and not references  # not compared with itself
        else:
            (reference,) = references
            assert reference.config.method == "full" and reference.config.train.tasks == own.config.train.tasks
            assert job.config.reference.base.job == reference.id
            assert job.config.model.adapter.job == own.id


def test_no_analysis_section_no_analysis_jobs(tmp_path):
    plan = plan_of(tmp_path, SPEC.replace("analysis: {reference: fft}\n", ""))
    assert not [j for j in plan.jobs if j.kind == "analyze"]


BAD = [
    ("{config.rank: [1]}", "finetunes.lora.sweep: point rank=1: config: LoraConfig: got an unexpected keyword"),
    ("{train.foo: [1]}", "finetunes.lora.sweep.train.foo: TrainSettings has no field 'foo'"),
    ("{foo: [1]}", "finetunes.lora.sweep.foo: 'foo' is not a field that can be swept"),
    ("{config.r: []}", "finetunes.lora.sweep.config.r: a sweep needs a non-empty list of values"),
    ("{config.r: 4}", "finetunes.lora.sweep.config.r: Input should be a valid list"),
    ("{config.r: [4, 4]}", "finetunes.lora.sweep.config.r: a value is listed twice"),
    ("{train.data_fraction: [0, 1]}", "greater than 0 (sweep point lora[data_fraction=0])"),
]


@pytest.mark.parametrize("sweep,message", BAD, ids=[b[0] for b in BAD])
def test_bad_sweeps_fail_at_load_with_one_line(tmp_path, capsys, sweep, message):
    text = SPEC.replace("{config.r: [2, 4], train.data_fraction: [0.5, 1.0]}", sweep)
    without_merges = [line for line in text.splitlines() if not line.startswith(("merges:", "  m:"))]
    (tmp_path / "spec.yaml").write_text("\n".join(without_merges))
    code = main(["plan", str(tmp_path / "spec.yaml")])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err


def test_a_merge_names_a_sweep_point_not_the_swept_fine_tune(tmp_path):
    with pytest.raises(BadInput, match=r"merges.m.experts\[0\]: unknown fine-tune 'lora' \(lora is swept: name one of"):
        plan_of(tmp_path, SPEC.replace('"lora[r=2,data_fraction=1]"', "lora"))


def test_analysis_reference_must_be_a_full_fine_tune(tmp_path):
    with pytest.raises(BadInput, match=r"analysis.reference: lora\[r=2,data_fraction=1\] \(lora\) is not a full"):
        plan_of(tmp_path, SPEC.replace("reference: fft", 'reference: "lora[r=2,data_fraction=1]"'))
    with pytest.raises(BadInput, match="analysis.reference: unknown fine-tune 'nope'"):
        plan_of(tmp_path, SPEC.replace("reference: fft", "reference: nope"))


def test_data_fraction_keeps_a_seeded_subset_in_order():
    examples = list(range(100))
    half = _share(examples, 0.5, seed=1)
    assert len(half) == 50 and half == sorted(half) and half == _share(examples, 0.5, seed=1)
    assert half != _share(examples, 0.5, seed=2)
    assert _share(examples, 1.0, seed=1) == examples
    assert _share(examples[:3], 0.01, seed=1) != []  # at least one example
