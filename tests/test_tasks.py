"""The plugin's lm-eval tasks: generated deterministically, found by lm_eval, resolved without building
anything, identified by their resolved configuration, rendered for training."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pefteval_harness.tasks import (
    EVALUATE_ARGUMENTS,
    GroupInfo,
    UnsupportedGroup,
    check_evaluate_arguments,
    primary_metric,
    quickstart,
    resolve_tasks,
    task_config,
    task_configs_path,
    task_identity,
    task_manager,
)
from pefteval_harness.tasks.rendering import gold_target, training_examples
from tests.conftest import PEFTEVAL, REPO

QUICK = sorted(f"pefteval_quick_{t}" for t in ("sentiment", "sentiment_adv", "topic", "arithmetic", "echo"))
# The quickstart group's `task:` order.
QUICK_GROUP = [f"pefteval_quick_{t}" for t in ("sentiment", "sentiment_adv", "topic", "arithmetic", "echo")]
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


def test_every_task_yaml_is_indexed_and_every_leaf_builds_with_test_docs():
    manager = task_manager()
    root = task_configs_path().resolve()
    # lm-eval skips a YAML it cannot parse with only a debug log: every *.yaml must be in the index (a
    # file meant only for `include:` must not end in .yaml, lm-eval's own convention).
    files = {p.resolve() for p in root.rglob("*.yaml")}
    indexed = {Path(e.yaml_path).resolve() for e in manager.task_index.values() if e.yaml_path is not None}
    assert files and files == indexed
    quick = root / "quickstart"  # the catalogue families need data: tests/test_peft_tasks.py builds them
    leaves = [n for n in manager.all_subtasks if Path(manager.task_index[n].yaml_path).resolve().is_relative_to(quick)]
    assert sorted(leaves) == QUICK
    for name in leaves:
        task = manager.load([name])["tasks"][name]
        assert task.has_test_docs() and len(task.test_docs()) > 0, name


def test_globs_groups_and_tags_resolve_from_the_index():
    selection = resolve_tasks(["pefteval_quick_*"])
    assert selection.names == QUICK and selection.groups == {}  # a glob matches leaves only
    assert "arc_easy" not in selection.manager.task_index  # lm-eval's built-ins not indexed
    group = resolve_tasks(["pefteval-quick"])
    assert group.names == QUICK_GROUP  # the group expands to its leaves, in its own order
    assert group.groups == {"pefteval-quick": GroupInfo(tasks=QUICK_GROUP, aggregate=[])}
    assert resolve_tasks(["pefteval-quick-tasks"]).names == QUICK  # a tag: its tasks, sorted as lm-eval does
    both = resolve_tasks(["pefteval_quick_topic", "pefteval-quick", "pefteval_quick_t*"])
    assert both.names == ["pefteval_quick_topic", *(n for n in QUICK_GROUP if n != "pefteval_quick_topic")]
    assert both.groups_json() == {"pefteval-quick": {"tasks": QUICK_GROUP, "aggregate": []}}


@pytest.mark.slow  # indexes lm-eval's built-in tasks (seconds), once: the resolutions share the index
def test_unknown_names_and_built_in_tasks_resolve():
    managers = {}
    with pytest.raises(KeyError, match="pefteval_quick_nope"):
        resolve_tasks(["pefteval_quick_nope"], managers=managers)
    assert set(managers) == {False}  # no built-in task YAML names it: lm-eval's own index is not even built
    selection = resolve_tasks(["pefteval_quick_topic", "arc_easy"], managers=managers)  # lm-eval's own tasks work too
    assert set(managers) == {False, True}
    assert selection.names == ["pefteval_quick_topic", "arc_easy"] and "arc_easy" in selection.manager.task_index
    identity = task_identity(selection.manager, "arc_easy")
    assert identity == task_identity(selection.manager, "arc_easy") and len(identity) == 16
    assert primary_metric(task_config(selection.manager, "arc_easy")) == ("acc", "none")
    mmlu = resolve_tasks(["mmlu"], managers=managers)
    assert len(mmlu.names) == 57 and {"mmlu", "mmlu_stem", "mmlu_humanities"} <= set(mmlu.groups)
    assert mmlu.groups["mmlu"].tasks == mmlu.names
    assert mmlu.groups["mmlu"].aggregate == [
        {"metric": "acc", "aggregation": "mean", "weight_by_size": True, "filter_list": None}
    ]


def test_resolving_and_identifying_build_no_task_and_load_no_data(monkeypatch):
    import datasets
    from lm_eval.api.task import ConfigurableTask

    def refuse(*args, **kwargs):
        raise AssertionError("planning built a task or loaded data")

    monkeypatch.setattr(quickstart, "dataset", refuse)
    monkeypatch.setattr(quickstart, "adversarial_dataset", refuse)
    monkeypatch.setattr(datasets, "load_dataset", refuse)
    monkeypatch.setattr(ConfigurableTask, "__init__", refuse)
    selection = resolve_tasks(["pefteval-quick", "pefteval_quick_*", "pefteval-quick-tasks"])
    assert selection.names == QUICK_GROUP
    for name in selection.names:
        assert len(task_identity(selection.manager, name)) == 16
        primary_metric(task_config(selection.manager, name))
    with pytest.raises(AssertionError, match="planning built"):  # the traps are live
        selection.manager.load(["pefteval_quick_topic"])


FAMILY = {
    "_common.yaml": (  # included by both tasks; has no `task:`, so the index skips it
        "output_type: multiple_choice\n"
        "doc_to_text: '{{text}}'\n"
        "doc_to_target: label\n"
        "doc_to_choice: [no, yes]\n"
        "test_split: test\n"
        "process_docs: !function utils.process_docs\n"
    ),
    "a.yaml": "include: _common.yaml\ntask: fam_a\ndataset_path: org/data\ndataset_kwargs:\n  revision: abc\n",
    "b.yaml": "include: _common.yaml\ntask: fam_b\ncustom_dataset: !function utils.data_b\n",
    "utils.py": "def process_docs(docs):\n    return docs\n\n\ndef data_b(**kwargs):\n    return None\n",
}


def _identities(folder: Path) -> dict[str, str]:
    manager = task_manager([folder])
    return {name: task_identity(manager, name) for name in ("fam_a", "fam_b")}


def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new))


def test_task_identity_follows_the_resolved_config_only(tmp_path):
    folder = tmp_path / "fam"
    folder.mkdir()
    for name, text in FAMILY.items():
        (folder / name).write_text(text)
    manager = task_manager([folder])
    config = task_config(manager, "fam_b")
    assert config["doc_to_text"] == "{{text}}"  # the include is merged
    assert config["process_docs"].startswith("!function utils.process_docs sha256:")
    assert config["custom_dataset"].startswith("!function utils.data_b sha256:")
    assert "include" not in config and str(tmp_path) not in json.dumps(config)

    before = _identities(folder)
    assert before["fam_a"] != before["fam_b"]
    # The same files elsewhere: the same identities (nothing depends on where the folder lives).
    shutil.copytree(folder, tmp_path / "elsewhere" / "fam")
    assert _identities(tmp_path / "elsewhere" / "fam") == before

    _edit(folder / "a.yaml", "task: fam_a\n", "task: fam_a\nnum_fewshot: 2\n")  # one task's own YAML
    after = _identities(folder)
    assert after["fam_a"] != before["fam_a"] and after["fam_b"] == before["fam_b"]

    before = after
    _edit(folder / "a.yaml", "revision: abc", "revision: def")  # the dataset's revision
    after = _identities(folder)
    assert after["fam_a"] != before["fam_a"] and after["fam_b"] == before["fam_b"]

    before = after
    _edit(folder / "_common.yaml", "{{text}}", "Text: {{text}}")  # the shared include
    after = _identities(folder)
    assert after["fam_a"] != before["fam_a"] and after["fam_b"] != before["fam_b"]

    before = after
    _edit(folder / "utils.py", "return docs", "return docs.shuffle()")  # the !function module
    after = _identities(folder)
    assert after["fam_a"] != before["fam_a"] and after["fam_b"] != before["fam_b"]

    before = after
    (folder / "c.yaml").write_text("include: _common.yaml\ntask: fam_c\n")  # a new sibling
    assert _identities(folder) == before


def test_quickstart_identities_cover_their_data_hooks():
    manager = task_manager()
    identities = {name: task_identity(manager, name) for name in QUICK}
    assert len(set(identities.values())) == len(QUICK)
    config = task_config(manager, "pefteval_quick_sentiment_adv")
    assert config["custom_dataset"].startswith("!function utils.sentiment_adversarial sha256:")
    assert config["doc_to_choice"] == ["negative", "positive"]  # from the included sentiment.yaml
    assert "tag" not in config  # lm-eval drops it before building the task
    with pytest.raises(ValueError, match="not a task"):
        task_identity(manager, "pefteval-quick")


GROUPS = {
    "outer.yaml": """
group: pe_outer
task:
  - pefteval_quick_topic
  - group: pe_inline
    task: [pefteval_quick_echo, pefteval_quick_arithmetic]
    aggregate_metric_list:
      metric: exact_match
      filter_list: strip
  - pe_inner
  - pefteval-quick-tasks
aggregate_metric_list:
  - metric: acc
    weight_by_size: false
    filter_list: [none]
  - metric: exact_match
""",
    "inner.yaml": """
group: pe_inner
task:
  - task: pefteval_quick_sentiment
    task_alias: sentiment
""",
    "overrides.yaml": """
group: pe_fewshot
task:
  - task: pefteval_quick_topic
    num_fewshot: 3
""",
}


def test_groups_expand_nested_groups_and_read_their_aggregates(tmp_path):
    for name, text in GROUPS.items():
        (tmp_path / name).write_text(text)
    selection = resolve_tasks(["pe_outer"], include_paths=[tmp_path])
    leaves = [f"pefteval_quick_{t}" for t in ("topic", "echo", "arithmetic", "sentiment", "sentiment_adv")]
    assert selection.names == leaves
    assert selection.groups_json() == {
        "pe_outer::pe_inline": {
            "tasks": ["pefteval_quick_echo", "pefteval_quick_arithmetic"],
            "aggregate": [
                {"metric": "exact_match", "aggregation": "mean", "weight_by_size": True, "filter_list": ["strip"]}
            ],
        },
        "pe_inner": {"tasks": ["pefteval_quick_sentiment"], "aggregate": []},
        "pe_outer": {
            "tasks": leaves,
            "aggregate": [
                {"metric": "acc", "aggregation": "mean", "weight_by_size": False, "filter_list": ["none"]},
                {"metric": "exact_match", "aggregation": "mean", "weight_by_size": True, "filter_list": None},
            ],
        },
    }
    # lm-eval, building the group, finds the same groups, leaves and aggregates.
    built = selection.manager.load(["pe_outer"])
    assert set(built["groups"]) == set(selection.groups)
    for name, group in built["groups"].items():
        assert list(dict.fromkeys(t.task_name for t in group.get_all_tasks())) == selection.groups[name].tasks
        ours = selection.groups[name].aggregate
        assert [(a.metric, a.weight_by_size, a.filter_list) for a in group.aggregate_metric_list or []] == [
            (a["metric"], a["weight_by_size"], a["filter_list"]) for a in ours
        ]
    # A group that changes a member's settings would score it unlike the leaf alone.
    with pytest.raises(UnsupportedGroup, match="num_fewshot"):
        resolve_tasks(["pe_fewshot"], include_paths=[tmp_path])


def test_primary_metric_is_the_metadata_choice_or_the_first_metric():
    manager = task_manager()
    assert primary_metric(task_config(manager, "pefteval_quick_topic")) == ("acc", "none")
    assert primary_metric(task_config(manager, "pefteval_quick_arithmetic")) == ("exact_match", "number")
    assert primary_metric(task_config(manager, "pefteval_quick_echo")) == ("exact_match", "strip")
    metrics = [{"metric": "f1"}, {"metric": "em"}]
    filters = [{"name": "first", "filter": []}, {"name": "second", "filter": []}]
    assert primary_metric({"metric_list": metrics}) == ("f1", "none")
    assert primary_metric({"metric_list": metrics, "filter_list": filters}) == ("f1", "first")
    chosen = {"primary_metric": "em", "primary_filter": "second"}
    assert primary_metric({"metric_list": metrics, "filter_list": filters, "metadata": chosen}) == ("em", "second")
    assert primary_metric({"output_type": "multiple_choice"}) == ("acc", "none")  # lm-eval's default metrics
    assert primary_metric({}) == ("exact_match", "none")  # lm-eval's default output type generates


def test_evaluate_arguments_are_simple_evaluate_parameters():
    check_evaluate_arguments(EVALUATE_ARGUMENTS)
    check_evaluate_arguments()
    with pytest.raises(RuntimeError, match="no parameter 'num_shots'"):
        check_evaluate_arguments(["limit", "num_shots"])


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


@pytest.mark.slow  # a real lm_eval run (about 15 s: lm-eval indexes its built-in tasks too)
def test_lm_eval_cli_finds_the_plugin_tasks(tmp_path, tiny_model_dir):
    """`pefteval lm-eval`: lm-eval's own CLI with the plugin's folder added, on the quickstart family (no data
    needed). Stock `lm_eval --include_path` finds every plugin task below (validate) and runs the catalogue
    families in tests/test_peft_tasks.py."""
    command = [
        *PEFTEVAL, "lm-eval", "--model", "hf", "--model_args", f"pretrained={tiny_model_dir}",
        "--tasks", "pefteval_quick_*", "--device", "cpu", "--limit", "2", "--batch_size", "4",
        "--output_path", str(tmp_path),
    ]  # fmt: skip
    out = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    assert _lm_eval_tasks(tmp_path) == set(QUICK)
    # The primary metric names a key lm-eval reports, read from its own dump of the config too.
    results = json.loads(next(tmp_path.rglob("results_*.json")).read_text())
    for name in QUICK:
        metric, filter_name = primary_metric(results["configs"][name])
        assert f"{metric},{filter_name}" in results["results"][name], name

    # The leaderboard reads plain lm-eval results folders too.
    board = subprocess.run(
        [*PEFTEVAL, "leaderboard", str(tmp_path), "--format", "json"], capture_output=True, text=True
    )
    rows = json.loads(board.stdout)
    scores = [r for r in rows if r["record"] == "score"]
    assert sorted(r["task"] for r in scores) == QUICK
    assert all(r["method"] == "lm-eval" and str(tiny_model_dir) in r["model"] for r in rows)
    assert all(isinstance(r["value"], float) for r in scores)
    # the adversarial twin is paired with its clean task: a robustness gap per task, and their mean
    assert {(r["task"], r["metric"]) for r in rows if r["record"] == "gap"} == {
        ("pefteval_quick_sentiment_adv", "acc"),
        (None, "mean"),
    }


@pytest.mark.slow  # lm-eval indexes its built-in tasks too (about 15 s): one run for every family
def test_stock_lm_eval_validate_finds_every_plugin_task_group_and_tag(tmp_path):
    """Stock `lm_eval validate --include_path` over everything in the plugin's folder: the quickstart,
    PEFT, adversarial, merge and affective families' tasks, their groups and tags."""
    manager = task_manager()
    names = manager.all_tasks
    families = {"pefteval-quick-tasks", "pefteval-peft15", "pefteval-adv11", "pefteval-merge12", "pefteval-affect"}
    assert families <= set(names) and len(manager.all_subtasks) > 100
    command = [*LM_EVAL, "validate", "--tasks", ",".join(names), "--include_path", str(task_configs_path())]
    run = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert run.returncode == 0 and "All tasks found and valid" in run.stdout, run.stdout[-2000:] + run.stderr[-2000:]


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
