"""Task data: the same DatasetDict from local JSON lines (PEFTEVAL_DATA_DIR) or from a dataset loaded with
`datasets.load_dataset` (here a dataset folder on local disk: no network), a held-out slice that is the
same both ways, one-line errors, and `pefteval data export`."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from pefteval_harness.cli import main
from pefteval_harness.errors import BadInput
from pefteval_harness.tasks import task_manager
from pefteval_harness.tasks.data import DATA_DIR_ENV, DataSpec, Holdout, load, source_identity, task_data_specs

# Records in the shape of a small two-split HF dataset.
TRAIN = [{"text": f"train sentence {i}", "label": i % 2, "idx": i} for i in range(40)]
VALIDATION = [{"text": f"validation sentence {i}", "label": (i + 1) % 2, "idx": i} for i in range(10)]


def _write_jsonl(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture
def hub_folder(tmp_path) -> Path:
    """A dataset folder that `datasets.load_dataset(folder)` reads as splits train and validation."""
    folder = tmp_path / "hub" / "toy"
    _write_jsonl(folder / "train.jsonl", TRAIN)
    _write_jsonl(folder / "validation.jsonl", VALIDATION)
    return folder


def real_data_dir() -> Path:
    value = os.environ.get(DATA_DIR_ENV)
    if not value:
        pytest.skip(f"{DATA_DIR_ENV} is not set: this test reads the catalogue's real records from it")
    return Path(value)


def test_local_files_load_with_split_renames_and_sub_paths(monkeypatch):
    root = real_data_dir()
    monkeypatch.setenv(DATA_DIR_ENV, str(root))
    # anli's HF split dev_r1 is the file dev.jsonl; lm-eval's metadata and model arguments are ignored.
    anli = load(data_key="anli_r1", hf_path="facebook/anli", splits={"dev_r1": "dev"}, version=1.0, pretrained="m")
    assert list(anli) == ["dev_r1"]
    assert len(anli["dev_r1"]) == len((root / "anli_r1" / "dev.jsonl").read_text().splitlines())
    assert {"uid", "premise", "hypothesis", "label", "reason"} <= set(anli["dev_r1"].column_names)
    mgsm = load(data_key="mgsm/de", hf_path="juletxara/mgsm", hf_name="de", splits=["test"])
    assert list(mgsm) == ["test"] and len(mgsm["test"]) > 0
    assert mgsm["test"][0] == _read_jsonl(root / "mgsm" / "de" / "test.jsonl")[0]


def test_a_missing_file_is_one_line_naming_the_path_and_the_key(tmp_path, monkeypatch):
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path))
    _write_jsonl(tmp_path / "toy" / "train.jsonl", TRAIN)
    with pytest.raises(BadInput) as caught:
        load(data_key="toy", hf_path="org/toy", splits=["train", "validation"])
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"{tmp_path / 'toy' / 'validation.jsonl'}: no such file")
    assert "'toy'" in message and DATA_DIR_ENV in message


def test_a_missing_optional_training_split_is_empty_until_training_needs_it(tmp_path, monkeypatch):
    """A sample holding only evaluation records still evaluates (zero-shot); training on it is refused
    with the missing path, and a missing evaluation split always is."""
    from pefteval_harness.tasks.rendering import training_examples

    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path))
    kwargs = {"data_key": "sst2", "hf_path": "nyu-mll/glue", "splits": ["train", "validation"]}
    _write_jsonl(tmp_path / "sst2" / "validation.jsonl", [{"sentence": "good ", "label": 1, "idx": 0}])
    with pytest.raises(BadInput, match="sst2/train.jsonl: no such file"):
        load(**kwargs)
    assert len(load(**kwargs, optional_splits=["train"])["train"]) == 0
    task = task_manager().load(["pefteval_peft_sst2"])["tasks"]["pefteval_peft_sst2"]  # optional train split
    assert len(task.test_docs() if task.has_test_docs() else task.validation_docs()) == 1
    with pytest.raises(BadInput, match=f"^{tmp_path / 'sst2' / 'train.jsonl'}: no such file"):
        training_examples(task)
    with pytest.raises(BadInput, match="optional_splits"):
        load(**kwargs, optional_splits=["test"])


@pytest.mark.parametrize(
    "kwargs, expected",
    [
        ({"hf_path": "org/x", "splits": ["train"]}, "data_key"),
        ({"data_key": "../x", "hf_path": "org/x", "splits": ["train"]}, "relative folder"),
        ({"data_key": "x", "splits": ["train"]}, "hf_path"),
        ({"data_key": "x", "hf_path": "org/x", "splits": []}, "splits"),
        ({"data_key": "x", "hf_path": "org/x", "splits": {"train": "/etc/train"}}, "relative file stem"),
        ({"data_key": "x", "hf_path": "org/x", "splits": ["train"], "holdout": {"split": "train"}}, "holdout"),
        (
            {"data_key": "x", "hf_path": "org/x", "splits": ["train"],
             "holdout": {"split": "train", "into": "train", "fraction": 0.1, "fields": ["a"]}},
            "holdout",
        ),
        (
            {"data_key": "x", "hf_path": "org/x", "splits": ["train"],
             "holdout": {"split": "train", "into": "held", "fraction": 1.5, "fields": ["a"]}},
            "fraction",
        ),
    ],
)  # fmt: skip
def test_bad_dataset_kwargs_are_one_line_errors(kwargs, expected):
    with pytest.raises(BadInput, match=expected) as caught:
        DataSpec.from_kwargs(kwargs)
    assert "\n" not in str(caught.value)


def test_online_loading_keeps_only_the_named_splits(hub_folder, monkeypatch):
    monkeypatch.delenv(DATA_DIR_ENV, raising=False)
    online = load(data_key="toy", hf_path=str(hub_folder), splits=["validation"])
    assert list(online) == ["validation"] and online["validation"].to_list() == VALIDATION
    with pytest.raises(BadInput, match="Unknown split \"test\""):
        load(data_key="toy", hf_path=str(hub_folder), splits=["test"])


HOLDOUT = {"split": "train", "into": "heldout", "fraction": 0.25, "fields": ["text"]}


def test_a_holdout_is_disjoint_deterministic_and_the_same_online_and_offline(hub_folder, tmp_path, monkeypatch):
    kwargs = {"data_key": "toy", "hf_path": str(hub_folder), "splits": ["train"], "holdout": HOLDOUT}
    monkeypatch.delenv(DATA_DIR_ENV, raising=False)
    online = load(**kwargs)
    _write_jsonl(tmp_path / "local" / "toy" / "train.jsonl", TRAIN)
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path / "local"))
    offline = load(**kwargs)
    for data in (online, offline):
        assert sorted(data) == ["heldout", "train"]
        kept, held = data["train"].to_list(), data["heldout"].to_list()
        assert held and kept and len(kept) + len(held) == len(TRAIN)
        assert not {r["text"] for r in kept} & {r["text"] for r in held}
        assert sorted(kept + held, key=lambda r: r["idx"]) == TRAIN  # a partition, source order kept
    assert online["heldout"].to_list() == offline["heldout"].to_list()
    # Membership is a function of the hashed fields alone: the same record is held out in any dataset.
    holdout = Holdout("train", "heldout", 0.25, ("text",))
    assert [r for r in TRAIN if holdout.contains(r)] == offline["heldout"].to_list()


# ------------------------------------------------------------------------------------------- export

TASK_YAML = """
task: toy_task
custom_dataset: !function pefteval_harness.tasks.data.load
dataset_kwargs: {{data_key: {key}, hf_path: {path}, splits: {splits}{extra}}}
output_type: multiple_choice
training_split: train
{eval_split}
doc_to_text: "{{{{text}}}}"
doc_to_target: label
doc_to_choice: ["no", "yes"]
"""


def _task_folder(tmp_path: Path, hub_folder: Path, name: str = "toy_task", **fields) -> Path:
    folder = tmp_path / "tasks"
    folder.mkdir(exist_ok=True)
    values = {"key": "toy", "path": hub_folder, "splits": "{train: train, validation: dev}", "extra": "",
              "eval_split": "validation_split: validation"} | fields  # fmt: skip
    (folder / f"{name}.yaml").write_text(TASK_YAML.format(**values).replace("toy_task", name))
    return folder


def test_data_export_writes_the_local_layout_from_a_dataset_folder(hub_folder, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv(DATA_DIR_ENV, raising=False)
    tasks = _task_folder(tmp_path, hub_folder)  # the HF split "validation" is stored as dev.jsonl
    out = tmp_path / "out"
    assert main(["data", "export", "--out", str(out), "--tasks", "toy_task", "--include-path", str(tasks)]) == 0
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.jsonl")) == ["toy/dev.jsonl", "toy/train.jsonl"]
    assert _read_jsonl(out / "toy" / "train.jsonl") == TRAIN
    assert _read_jsonl(out / "toy" / "dev.jsonl") == VALIDATION
    assert "2 files for 1 tasks written" in capsys.readouterr().out

    # The exported folder gives the task the same documents it reads online.
    manager = task_manager([tasks])
    online = manager.load(["toy_task"])["tasks"]["toy_task"]
    monkeypatch.setenv(DATA_DIR_ENV, str(out))
    offline = task_manager([tasks]).load(["toy_task"])["tasks"]["toy_task"]
    assert list(offline.validation_docs()) == list(online.validation_docs())
    assert list(offline.training_docs()) == list(online.training_docs())


def test_data_export_writes_a_holdout_source_whole_and_merges_the_splits_of_a_key(hub_folder, tmp_path, monkeypatch):
    monkeypatch.delenv(DATA_DIR_ENV, raising=False)
    holdout = ", holdout: {split: train, into: heldout, fraction: 0.25, fields: [text]}"
    _task_folder(tmp_path, hub_folder, "toy_held", splits="[train]", extra=holdout, eval_split="test_split: heldout")
    tasks = _task_folder(tmp_path, hub_folder, "toy_dev", splits="{validation: dev}", eval_split="")
    manager = task_manager([tasks])
    specs = task_data_specs(manager, ["toy_held", "toy_dev", "pefteval_quick_topic"])
    assert sorted(specs) == ["toy_dev", "toy_held"]  # the quickstart task generates its data
    out = tmp_path / "out"
    assert main(["data", "export", "--out", str(out), "--tasks", "toy_*", "--include-path", str(tasks)]) == 0
    assert _read_jsonl(out / "toy" / "train.jsonl") == TRAIN  # the whole source split; the slice is carved on load
    assert _read_jsonl(out / "toy" / "dev.jsonl") == VALIDATION


def test_data_export_bad_input_exits_2_with_one_line(hub_folder, tmp_path, capsys):
    out = str(tmp_path / "out")
    assert main(["data", "export", "--out", out, "--tasks", "pefteval_quick_topic"]) == 2
    assert "pefteval's data loader" in capsys.readouterr().err
    assert main(["data", "export", "--out", out, "--include-path", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert "--include-path" in err and err.count("\n") == 1
    tasks = _task_folder(tmp_path, hub_folder, "toy_a")
    _task_folder(tmp_path, hub_folder, "toy_b", key="toy", path="org/other")
    assert main(["data", "export", "--out", out, "--tasks", "toy_*", "--include-path", str(tasks)]) == 2
    err = capsys.readouterr().err
    assert "data key 'toy' names two datasets" in err and err.count("\n") == 1
    assert not Path(out).exists()


def test_the_source_identity_follows_the_records_read(tmp_path, monkeypatch):
    spec = DataSpec.from_kwargs({"data_key": "toy", "hf_path": "org/toy", "hf_name": "c", "splits": ["train"]})
    monkeypatch.delenv(DATA_DIR_ENV, raising=False)
    assert source_identity(spec) == "hub:org/toy:c:None"
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path))
    _write_jsonl(tmp_path / "toy" / "train.jsonl", TRAIN)
    first = source_identity(spec)
    assert first.startswith("local:") and source_identity(spec) == first
    _write_jsonl(tmp_path / "toy" / "train.jsonl", TRAIN[:-1])
    assert source_identity(spec) != first


def test_a_run_whose_data_dir_lacks_a_tasks_files_stops_before_anything_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path / "data"))
    _write_jsonl(tmp_path / "data" / "sst2" / "validation.jsonl", [{"sentence": "good ", "label": 1, "idx": 0}])
    spec = tmp_path / "spec.yaml"
    spec.write_text(
        "base_model: tiny\ntrain: {tasks: [pefteval_peft_sst2]}\nfinetunes: {lora: {method: lora}}\n"
        "evaluate: {tasks: [pefteval_peft_sst2]}\n"
    )
    code = main(["run", str(spec), "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert f"train.tasks: pefteval_peft_sst2: {tmp_path / 'data' / 'sst2' / 'train.jsonl'}: no such file" in err
    assert not (tmp_path / "out").exists()
    spec.write_text("base_model: tiny\nevaluate: {tasks: [pefteval_peft_rte]}\n")  # evaluation only
    assert main(["plan", str(spec)]) == 2
    assert "evaluate.tasks: pefteval_peft_rte: " in capsys.readouterr().err


def test_a_translation_pair_reads_both_languages_files(tmp_path, monkeypatch):
    """A FLORES pair reads two files: both are checked at plan time and both are part of its identity."""
    from pefteval_harness.tasks import task_config, task_identity, task_manager
    from pefteval_harness.tasks.data import check_local_files, data_specs

    manager = task_manager()
    source, target = data_specs(task_config(manager, "pefteval_merge_flores101_en_fr"))
    assert (source.key, source.hf_name, target.key, target.hf_name) == ("flores101/eng", "eng", "flores101/fra", "fra")
    for lang in ("eng", "fra"):
        (tmp_path / "flores101" / lang).mkdir(parents=True)
        (tmp_path / "flores101" / lang / "devtest.jsonl").write_text(json.dumps({"id": 1, "sentence": lang}) + "\n")
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path))
    before = task_identity(manager, "pefteval_merge_flores101_en_fr")
    (tmp_path / "flores101" / "fra" / "devtest.jsonl").write_text(json.dumps({"id": 1, "sentence": "autre"}) + "\n")
    assert task_identity(manager, "pefteval_merge_flores101_en_fr") != before  # the target's records count
    (tmp_path / "flores101" / "fra" / "devtest.jsonl").unlink()
    check_local_files(source, training=False)
    with pytest.raises(BadInput, match="flores101/fra/devtest.jsonl: no such file"):
        check_local_files(target, training=False)
