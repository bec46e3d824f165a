"""The plugin's lm-eval tasks: generated deterministically, found by lm_eval, rendered for training."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pefteval_harness.tasks import quickstart, resolve_tasks, task_configs_path, task_manager
from pefteval_harness.tasks.rendering import gold_target, training_examples
from tests.conftest import PEFTEVAL, REPO

QUICK = sorted(f"pefteval_quick_{t}" for t in ("sentiment", "sentiment_adv", "topic", "arithmetic", "echo"))
LM_EVAL = [str(Path(sys.executable).parent / "lm_eval")]


def test_quickstart_data_is_deterministic_and_train_test_disjoint_enough():
    for task in quickstart.GENERATORS:
        assert quickstart.records(task, "train") == quickstart.records(task, "train")
        assert quickstart.records(task, "test") != quickstart.records(task, "train")
    adversarial = quickstart.adversarial_dataset()["test"]
    clean = quickstart.dataset("sentiment")["test"]
    assert adversarial["label"] == clean["label"]  # same docs, same gold labels
    assert all(a != c for a, c in zip(adversarial["sentence"], clean["sentence"], strict=True))


def test_task_folder_is_the_checkout_in_an_editable_install():
    assert task_configs_path() == REPO / "task_configs"
    out = subprocess.run([*PEFTEVAL, "tasks", "path"], capture_output=True, text=True, check=True)
    assert Path(out.stdout.strip()) == REPO / "task_configs"


def test_globs_groups_and_unknown_names_resolve():
    names, manager = resolve_tasks(["pefteval_*"])
    assert names == QUICK and "arc_easy" not in manager.task_index  # lm-eval's built-ins not indexed
    assert resolve_tasks(["pefteval-quick"])[0] == QUICK  # the group expands to its leaves
    with pytest.raises(KeyError):
        resolve_tasks(["pefteval_quick_nope"])
    names, manager = resolve_tasks(["pefteval_quick_topic", "arc_easy"])  # lm-eval's own tasks work too
    assert names == ["pefteval_quick_topic", "arc_easy"] and "arc_easy" in manager.task_index


def test_tasks_list_cli_shows_family_and_metrics():
    out = subprocess.run([*PEFTEVAL, "tasks", "list", "--family", "quickstart"], capture_output=True, text=True)
    assert out.returncode == 0
    for name in QUICK:
        assert name in out.stdout
    assert "exact_match" in out.stdout and "multiple_choice" in out.stdout
    bad = subprocess.run([*PEFTEVAL, "tasks", "list", "--family", "nope"], capture_output=True, text=True)
    assert bad.returncode == 2 and "no tasks in family 'nope'" in bad.stderr


def test_training_examples_are_the_strings_lm_eval_scores():
    tasks = task_manager().load(["pefteval_quick_sentiment", "pefteval_quick_arithmetic"])["tasks"]
    sentiment = tasks["pefteval_quick_sentiment"]
    doc = next(iter(sentiment.training_docs()))
    example = training_examples(sentiment, limit=1)[0]
    # lm-eval scores the gold choice as a continuation of doc_to_text, joined by target_delimiter.
    request = sentiment.construct_requests(doc, sentiment.doc_to_text(doc), metadata=("t", 0, 1))
    context, continuation = request[doc["label"]].arguments
    assert (example.prompt, example.continuation) == (context, continuation)
    assert continuation == " " + ["negative", "positive"][doc["label"]]

    arithmetic = tasks["pefteval_quick_arithmetic"]
    example = training_examples(arithmetic, limit=1)[0]
    doc = next(iter(arithmetic.training_docs()))
    assert example.prompt == arithmetic.doc_to_text(doc)
    assert example.continuation == f" {gold_target(arithmetic, doc)}\n"  # ends with the task's stop string
    assert len(training_examples(arithmetic, limit=5)) == 5
    with pytest.raises(ValueError, match="no training split"):
        training_examples(
            task_manager().load(["pefteval_quick_sentiment_adv"])["tasks"]["pefteval_quick_sentiment_adv"]
        )


def _lm_eval_tasks(out_dir: Path) -> set[str]:
    results = json.loads(next(out_dir.rglob("results_*.json")).read_text())
    return set(results["configs"])


@pytest.mark.parametrize("via", ["lm_eval", "pefteval lm-eval"])
def test_lm_eval_cli_finds_every_plugin_task(tmp_path, tiny_model_dir, via):
    flags = [
        "--model", "hf", "--model_args", f"pretrained={tiny_model_dir}", "--tasks", "pefteval_*",
        "--device", "cpu", "--limit", "2", "--batch_size", "4", "--output_path", str(tmp_path),
    ]  # fmt: skip
    if via == "lm_eval":
        command = [*LM_EVAL, "--include_path", str(task_configs_path()), *flags]
    else:
        command = [*PEFTEVAL, "lm-eval", *flags]
    out = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    assert _lm_eval_tasks(tmp_path) == set(QUICK)

    # The leaderboard reads plain lm-eval results folders too.
    board = subprocess.run(
        [*PEFTEVAL, "leaderboard", str(tmp_path), "--format", "json"], capture_output=True, text=True
    )
    rows = json.loads(board.stdout)
    assert sorted(r["task"] for r in rows) == QUICK
    assert all(r["method"] == "lm-eval" and str(tiny_model_dir) in r["model"] for r in rows)
    assert all(isinstance(r["value"], float) for r in rows)


def test_pefteval_lm_eval_refuses_a_second_include_path(tmp_path):
    out = subprocess.run(
        [*PEFTEVAL, "lm-eval", "--include_path", str(tmp_path), "--tasks", "x"], capture_output=True, text=True
    )
    assert out.returncode == 2 and "--include_path" in out.stderr


def test_tiny_model_cli_writes_a_loadable_model_deterministically(tmp_path, tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = subprocess.run([*PEFTEVAL, "tiny-model", "--out", str(tmp_path / "tiny")], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (tmp_path / "tiny" / name).read_bytes() == (tiny_model_dir / name).read_bytes(), name
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "tiny")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "tiny")
    assert model.config.model_type == "llama" and tokenizer("the film was good")["input_ids"]
    again = subprocess.run([*PEFTEVAL, "tiny-model", "--out", str(tmp_path / "tiny")], capture_output=True, text=True)
    assert again.returncode == 2 and "exists and is not empty" in again.stderr
