"""Bad specs fail before anything runs: exit code 2, one line naming the file, key path and problem."""

from __future__ import annotations

import subprocess
import textwrap

import pytest

from pefteval_harness.cli import main
from tests.conftest import PEFTEVAL, REPO

GOOD = """
base_model: tiny
train: {tasks: [pefteval_quick_sentiment]}
finetunes:
  fft: {method: full}
  ex: {method: lora, per_task: true, train: {tasks: [pefteval_quick_sentiment, pefteval_quick_topic]}}
merges:
  m: {method: task_arithmetic, experts: ex}
evaluate: {tasks: ["pefteval_quick_*"], limit: 4}
"""


def run_spec(tmp_path, text: str, capsys, command: str = "run") -> tuple[int, str]:
    spec = tmp_path / "spec.yaml"
    spec.write_text(textwrap.dedent(text))
    code = main([command, str(spec), "--output", str(tmp_path / "out")] if command == "run" else [command, str(spec)])
    return code, capsys.readouterr().err


BAD = [
    ("foo: [1, 2", "spec.yaml:1: not valid YAML"),
    ("- a\n- b", "spec.yaml: expected a mapping of keys at the top level, got list"),
    ("base_model: tiny", "spec.yaml: evaluate: Field required"),
    (GOOD + "evalute: {tasks: [x]}", "spec.yaml: evalute: unknown key"),
    (GOOD.replace("method: full", "method: fulll"), "finetunes.fft.method: unknown fine-tuning method 'fulll'"),
    (
        GOOD.replace("{method: full}", "{method: lora, config: {rank: 4}}"),
        "finetunes.fft.config: LoraConfig: got an unexpected keyword argument 'rank'",
    ),
    (
        GOOD.replace("{method: full}", "{method: lora, config: {r: 4.5}}"),
        "finetunes.fft.config: LoraConfig: r: Input should be a valid integer, got 4.5",
    ),
    (
        GOOD.replace("{method: full}", "{method: lora, config: {use_rslora: 'yes'}}"),
        "finetunes.fft.config: LoraConfig: use_rslora: Input should be a valid boolean, got 'yes'",
    ),
    (
        GOOD.replace("{method: full}", "{method: full, config: {r: 4}}"),
        "finetunes.fft.config: full fine-tuning takes no peft config",
    ),
    (
        GOOD.replace("train: {tasks:", "train: {epochs: -1, tasks:", 1),
        "spec.yaml: train.epochs: Input should be greater than 0",
    ),
    (
        GOOD.replace("{method: full}", "{method: full, train: {learning_rate: fast}}"),
        "finetunes.fft.train.learning_rate: Input should be a valid number",
    ),
    (
        GOOD.replace("limit: 4", "limit: 4, tasks: [nope_*]").replace('tasks: ["pefteval_quick_*"], ', ""),
        "evaluate.tasks: no task matches 'nope_*'",
    ),
    (
        GOOD.replace("[pefteval_quick_sentiment]}", "[pefteval_quick_sentiment_adv]}"),
        "train.tasks: task 'pefteval_quick_sentiment_adv' has no training split",
    ),
    (
        GOOD.replace("experts: ex}", "experts: [ex, exx]}"),
        "merges.m.experts[1]: unknown fine-tune 'exx' (known: fft, ex)",
    ),
    (GOOD.replace("task_arithmetic", "averaging"), "merges.m.method: unknown merge method 'averaging'"),
    (
        GOOD.replace("experts: ex}", "experts: ex, parameters: {lambda: 2}}"),
        "merges.m.parameters: merge method 'task_arithmetic': unknown parameter 'lambda' (known: scaling)",
    ),
    (
        GOOD.replace("task_arithmetic", "ties").replace("experts: ex}", "experts: ex, parameters: {density: 2}}"),
        "merges.m.parameters: merge method 'ties': parameter 'density': Input should be less than or equal to 1",
    ),
    (
        GOOD.replace("experts: ex}", "experts: [ex, fft]}"),
        "merges.m.experts: experts must all be full models or all adapters",
    ),
    (GOOD.replace("experts: ex}", "experts: ex, weights: [1.0]}"), "merges.m.weights: 1 weights for 2 experts"),
    (
        GOOD.replace("experts: ex}", "experts: fft, space: factor}"),
        "merges.m.space: factor space needs adapter experts, these are full models",
    ),
    (
        GOOD.replace("base_model: tiny", "base_model: ./no/such/model"),
        "base_model: no such model folder './no/such/model'",
    ),
    (
        GOOD.replace("base_model: tiny", "base_model: someone/not-cached"),
        "base_model: 'someone/not-cached' is not a local folder and not in the HF cache",
    ),
    (
        GOOD.replace("merges:\n  m:", "merges:\n  fft:"),
        "spec.yaml: merges.fft: the name is already used by a fine-tune or the base",
    ),
    (GOOD.replace("  fft: {method: full}", "  base: {method: full}").replace("[ex, fft]", "[ex]"),
     "finetunes.base: the name 'base' is taken by the base model's row"),
    (
        GOOD.replace("merges:\n  m:", "merges:\n  ex/pefteval_quick_topic:"),
        "merges.ex/pefteval_quick_topic: the model label 'ex/pefteval_quick_topic' is already used by finetunes.ex",
    ),
    (
        GOOD.replace("{method: lora, per_task: true,", "{method: dora, per_task: true,"),
        "merges.m.experts: ex (dora) adapters cannot be merged",
    ),
    (
        GOOD.replace("experts: ex}", "experts: [ex, lo], space: factor}").replace(
            "  fft: {method: full}", "  fft: {method: full}\n  lo: {method: lora, config: {r: 4}}"
        ),
        "merges.m.experts:",
    ),
    (GOOD + "include_paths: [no/such/folder]\n", "include_paths[0]: no such task folder 'no/such/folder'"),
    (
        GOOD.replace("limit: 4}", "limit: 4, per_task: {pefteval_quick_topic: {nshot: 2}}}"),
        "evaluate.per_task.pefteval_quick_topic.nshot: unknown setting",
    ),
    (
        GOOD.replace("limit: 4}", "limit: 4, per_task: {'pefteval_quick_t*': {num_fewshot: -1}}}"),
        "evaluate.per_task.num_fewshot: Input should be greater than or equal to 0 (for task",
    ),
    (
        GOOD.replace("limit: 4}", "limit: 4, per_task: {'nope_*': {num_fewshot: 1}}}"),
        "evaluate.per_task.nope_*: matches none of the evaluated tasks",
    ),
]


@pytest.mark.parametrize("text, expected", BAD, ids=[e for _, e in BAD])
def test_bad_spec_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys, text, expected):
    code, err = run_spec(tmp_path, text, capsys)
    assert code == 2
    assert expected in err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert str(tmp_path / "spec.yaml") in err  # names the file
    assert not (tmp_path / "out").exists()


def test_good_spec_plans(tmp_path, capsys):
    code, _ = run_spec(tmp_path, GOOD, capsys, command="plan")
    assert code == 0


def test_missing_spec_file_and_bad_arguments_exit_2(tmp_path):
    missing = subprocess.run([*PEFTEVAL, "run", str(tmp_path / "nope.yaml")], capture_output=True, text=True)
    assert missing.returncode == 2 and "no such spec file" in missing.stderr and "Traceback" not in missing.stderr
    unknown = subprocess.run([*PEFTEVAL, "frobnicate"], capture_output=True, text=True, cwd=REPO)
    assert unknown.returncode == 2


def test_per_fine_tune_train_settings_override_the_defaults(tmp_path):
    from pefteval_harness.spec import load_spec

    (tmp_path / "s.yaml").write_text(GOOD.replace("{method: full}", "{method: full, train: {epochs: 7}}"))
    spec, _ = load_spec(tmp_path / "s.yaml")
    assert spec.train_settings(spec.finetunes["fft"]).epochs == 7
    assert spec.train_settings(spec.finetunes["fft"]).tasks == ["pefteval_quick_sentiment"]
    assert spec.train_settings(spec.finetunes["ex"]).epochs == 3
    assert spec.name == "s"


def test_relative_paths_resolve_against_the_specs_folder(tmp_path, tiny_model_dir):
    import os
    import shutil

    from pefteval_harness.plan import build_plan
    from pefteval_harness.spec import load_spec

    tasks = tmp_path / "tasks"
    shutil.copytree(REPO / "task_configs" / "quickstart", tasks)
    for path in tasks.glob("*.yaml"):
        path.write_text(path.read_text().replace("pefteval_quick_", "mine_").replace("pefteval-quick", "mine-quick"))
    folder = tmp_path / "experiments"
    folder.mkdir()
    model = os.path.relpath(tiny_model_dir, folder)
    (folder / "s.yaml").write_text(
        f"base_model: {model}\ninclude_paths: [../tasks]\noutput: ../runs/s\nevaluate: {{tasks: [mine_topic]}}\n"
    )
    spec, _ = load_spec(folder / "s.yaml")  # the current folder is the repository, not the spec's
    assert spec.include_paths == [str(tasks.resolve())] and spec.output == str((tmp_path / "runs" / "s").resolve())
    (job,) = build_plan(spec).jobs
    assert job.config.model.base.path == str(tiny_model_dir.resolve()) and job.config.task == "mine_topic"
