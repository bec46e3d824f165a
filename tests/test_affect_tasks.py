"""The affective-understanding classification tasks (task_configs/affective, pefteval_affect_<key> and
_gen): their configs against the task contract, the data they build from the catalogue's real records
(PEFTEVAL_DATA_DIR; those tests skip when it is unset), their prompts, their scoring through their own
hooks, and every task on the tiny model. (Stock `lm_eval validate` of every plugin task, these too:
tests/test_tasks.py.)"""

from __future__ import annotations

import importlib.util
import math
import os

import pytest

from pefteval_harness.errors import BadInput
from pefteval_harness.tasks import primary_metric, resolve_tasks, task_configs_path, task_manager
from pefteval_harness.tasks.data import DATA_DIR_ENV

STANCE = [f"tweet_stance_{t}" for t in ("abortion", "atheism", "climate", "feminist", "hillary")]
KEYS = ["sst2", "sst5", "tweet_sentiment", "tweet_emotion", "tweet_irony", "tweet_hate", "tweet_offensive", *STANCE,
        "absa_laptop14", "absa_rest14", "implicit_sentiment", "meld_erc", "emorynlp_erc", "emobench_eu",
        "emobench_ea", "soul_rc"]  # fmt: skip
CHOICE = [f"pefteval_affect_{k}" for k in KEYS]
GENERATIVE = [f"{name}_gen" for name in CHOICE]
OURS = CHOICE + GENERATIVE
PRIMARY = {"sst2": "acc", "sst5": "acc", "tweet_sentiment": "macro_recall", "tweet_emotion": "macro_f1",
           "tweet_irony": "irony_f1", "tweet_hate": "macro_f1", "tweet_offensive": "macro_f1",
           **dict.fromkeys(STANCE, "stance_f1"), "absa_laptop14": "acc", "absa_rest14": "acc",
           "implicit_sentiment": "acc", "meld_erc": "weighted_f1", "emorynlp_erc": "weighted_f1",
           "emobench_eu": "acc", "emobench_ea": "acc", "soul_rc": "acc"}  # fmt: skip
NO_TRAIN = {"emobench_eu", "emobench_ea"}
UTILS_PREFIX = task_configs_path() / "affective" / "utils."


def _utils():
    """The folder's hook module, imported from its file as lm-eval imports it."""
    spec = importlib.util.spec_from_file_location("affective_utils", task_configs_path() / "affective" / "utils.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def manager():
    return task_manager()


def _config(manager, name: str) -> dict:
    """A task's YAML with its includes merged, functions unresolved (task_config's hashing of every hook's
    sources is not needed here, and costs a second per task)."""
    from lm_eval.tasks._yaml_loader import load_yaml

    return load_yaml(manager.task_index[name].yaml_path, resolve_func=False, recursive=True)


@pytest.fixture(scope="module")
def built(manager):
    if not os.environ.get(DATA_DIR_ENV):
        pytest.skip(f"{DATA_DIR_ENV} is not set: these tests read the catalogue's real records from it")
    return manager.load(OURS)["tasks"]


# ------------------------------------------------------------------------------- configs and groups


def test_every_leaf_follows_the_contract(manager):
    for key in KEYS:
        choice, gen = _config(manager, f"pefteval_affect_{key}"), _config(manager, f"pefteval_affect_{key}_gen")
        has_train = key not in NO_TRAIN
        for config, generative in ((choice, False), (gen, True)):
            name, meta = config["task"], config["metadata"]
            assert primary_metric(config) == (PRIMARY[key], "none"), name
            metric_names = [m["metric"] for m in config["metric_list"]]
            assert metric_names[0] == PRIMARY[key] and "acc" in metric_names, name
            assert ("parsed" in metric_names) == generative, name
            assert meta["version"] == 1.0 and meta["affect"] == "understanding", name
            assert meta["form"] == ("generative" if generative else "loglikelihood"), name
            expected = ["zero_shot"] + (["k_shot"] if has_train else []) + (["cot"] if generative else [])
            assert meta["strategies"] == expected, name
            assert meta.get("base_task") == (f"pefteval_affect_{key}" if generative else None), name
            assert config.get("fewshot_split") == ("train" if has_train else None), name
            for metric in config["metric_list"]:  # no metric name lm-eval would try to download
                aggregation = str(metric["aggregation"])
                assert aggregation == "mean" or aggregation.startswith(str(UTILS_PREFIX)), name
        assert choice["dataset_kwargs"] == gen["dataset_kwargs"] and choice["test_split"] == gen["test_split"], key
        assert choice["output_type"] == "multiple_choice" and gen["output_type"] == "generate_until", key
        assert gen["gen_prefix"] == "Answer:" and gen["target_delimiter"] == " ", key
        assert gen["generation_kwargs"] == {"until": ["\n"], "max_gen_toks": 16, "do_sample": False}, key


def test_data_keys_name_the_same_source_as_the_other_folders(manager):
    def source(name):
        kwargs = _config(manager, name)["dataset_kwargs"]
        return kwargs["data_key"], kwargs["hf_path"], kwargs.get("hf_name")

    assert source("pefteval_affect_sst2") == source("pefteval_peft_sst2")
    assert source("pefteval_affect_meld_erc") == source("pefteval_merge_meld")
    assert source("pefteval_affect_emorynlp_erc") == source("pefteval_merge_emorynlp")
    for key in ("meld_erc", "emorynlp_erc"):  # the same dialogue definition as the merge tasks
        ours = _config(manager, f"pefteval_affect_{key}")["dataset_kwargs"]
        theirs = _config(manager, f"pefteval_merge_{key.split('_')[0]}")["dataset_kwargs"]
        assert (ours["dialogue_fields"], ours["turn_field"]) == (theirs["dialogue_fields"], theirs["turn_field"])
    assert source("pefteval_affect_tweet_stance_hillary") == (
        "tweet_eval_stance_hillary", "cardiffnlp/tweet_eval", "stance_hillary"
    )


def test_the_au_group_lists_every_leaf_and_nests_stance(manager):
    if "pefteval_affect_eq_bench" not in manager.task_index:
        pytest.skip("pefteval_affect_eq_bench (written with the generation tasks) is not in this checkout")
    selection = resolve_tasks(["pefteval-affect-au"])
    assert set(selection.names) == {*OURS, "pefteval_affect_eq_bench"} and len(selection.names) == len(OURS) + 1
    stance = resolve_tasks(["pefteval-affect-tweet-stance"]).names
    assert stance == [f"pefteval_affect_{k}" for k in STANCE] + [f"pefteval_affect_{k}_gen" for k in STANCE]
    aggregate = selection.groups["pefteval-affect-au"].aggregate
    assert [(a["metric"], a["aggregation"], a["weight_by_size"]) for a in aggregate] == [("parsed", "mean", False)]
    assert selection.groups["pefteval-affect-tweet-stance"].aggregate == []


# ------------------------------------------------------------------------------- data and prompts


def test_records_become_documents_with_their_gold_label_words(built):
    utils = _utils()
    docs = {name: list(task.eval_docs) for name, task in built.items()}
    for name in CHOICE:
        task, gen = built[name], built[f"{name}_gen"]
        assert len(docs[name]) == len(docs[f"{name}_gen"]) > 0, name
        for doc in docs[name][:20]:
            choices = task.doc_to_choice(doc)
            assert choices[task.doc_to_target(doc)] == gen.doc_to_target(doc), name
    # Label ids and names as the datasets define them.
    def first(key: str, field: str):  # the first test record's raw label and its gold label word
        docs_ = docs[f"pefteval_affect_{key}_gen"]
        return docs_[0][field], built[f"pefteval_affect_{key}_gen"].doc_to_target(docs_[0])

    assert first("tweet_emotion", "label") == (3, "sadness")
    assert first("tweet_irony", "label") == (1, "ironic")
    assert first("tweet_offensive", "label") == (0, "not offensive")
    assert first("tweet_stance_climate", "label") == (0, "none")
    assert first("sst5", "label_text") == ("negative", "negative")
    assert first("soul_rc", "label") == ("not-given", "not given")
    assert first("emorynlp_erc", "Emotion") == ("Mad", "mad")
    sst5 = docs["pefteval_affect_sst5_gen"][1]
    assert sst5["label_text"] == "very negative" == built["pefteval_affect_sst5_gen"].doc_to_target(sst5)
    # EmoBench: English only, EU one document per question (emotion, then cause).
    eu, ea = docs["pefteval_affect_emobench_eu"], docs["pefteval_affect_emobench_ea"]
    assert len(eu) == 200 and len(ea) == 100  # 100 English of 200 records; EU asks two questions of each
    assert [d["question_type"] for d in eu[:2]] == ["emotion", "cause"] and eu[0]["qid"] == eu[1]["qid"] == "2"
    assert eu[0]["options"][eu[0]["answer"]] == "Delight" and "Why would Simon feel Delight" in eu[1]["question"]
    assert all(utils.TASKS["emobench_eu"].text(d).isascii() for d in eu)  # no Chinese record slipped in
    # MELD: the utterance with its dialogue's earlier turns.
    meld = next(d for d in docs["pefteval_affect_meld_erc_gen"] if d["Utterance_ID"] == 2)
    prompt = built["pefteval_affect_meld_erc_gen"].doc_to_text(meld)
    assert "\n".join(meld["history"]) in prompt and len(meld["history"]) == 2
    assert prompt.endswith(f"Utterance: {meld['speaker']}: {meld['Utterance']}\n")


def test_loader_rejects_unknown_keys_and_labels(tmp_path, monkeypatch):
    utils = _utils()
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path))
    with pytest.raises(BadInput, match="none of the affective tasks"):
        utils.load_affect(data_key="tweet_eval_sarcasm", hf_path="x", splits=["test"])
    (tmp_path / "soul").mkdir()
    (tmp_path / "soul" / "test.jsonl").write_text('{"review_text": "r", "statement": "s", "label": "maybe"}\n')
    doc = next(iter(utils.load_affect(data_key="soul", hf_path="DAMO-NLP-SG/SOUL", splits=["test"])["test"]))
    with pytest.raises(BadInput, match="'maybe' is none of the label words"):
        utils.gold_label(doc)
    record = {"qid": "9", "language": "en", "scenario": "s", "subject": "Ann", "question type": "Response",
              "choices": ["a", "b"], "label": "c"}  # fmt: skip
    with pytest.raises(BadInput, match="qid 9: gold 'c' is none of its options"):
        utils.emobench_questions([record], "emobench_ea")


def test_generative_and_few_shot_prompts(built):
    task = built["pefteval_affect_absa_rest14_gen"]
    doc = next(iter(task.eval_docs))
    zero = task.fewshot_context(doc, num_fewshot=0, gen_prefix=task.doc_to_prefix(doc))
    expected = (
        "What sentiment does the sentence express towards the aspect? Answer with one of: negative, neutral,"
        f" positive.\n\nSentence: {doc['text'].strip()}\nAspect: {doc['aspect']}\nAnswer:"
    )
    assert zero == expected
    few = task.fewshot_context(doc, num_fewshot=2, gen_prefix=task.doc_to_prefix(doc))
    blocks = few.split("\n\n")
    assert few.endswith(expected) and few.count("Answer with one of:") == 3
    shots = [b for b in blocks if b.startswith("Sentence:") and not b.endswith("Answer:")]
    assert len(shots) == 2
    for shot in shots:  # each example ends with its gold label after the cue
        assert shot.splitlines()[-1] in ("Answer: negative", "Answer: neutral", "Answer: positive"), shot
    # The log-likelihood form: the same text ending with the cue, the label words as continuations.
    choice = built["pefteval_affect_absa_rest14"]
    assert choice.doc_to_text(doc) == expected and choice.doc_to_choice(doc) == ["negative", "neutral", "positive"]


def test_the_hooks_score_hand_written_replies(built):
    utils = _utils()
    doc = next(d for d in built["pefteval_affect_tweet_offensive_gen"].eval_docs if d["label"] == 1)
    assert utils.gen_results(doc, [" Offensive"]) == {"macro_f1": ("offensive", "offensive"), "acc": 1.0, "parsed": 1.0}
    assert utils.gen_results(doc, [" not offensive"])["acc"] == 0.0
    cot = utils.gen_results(doc, ["It is offensive.\nAnswer: not sure"])  # after the cot filter or not
    assert cot == {"macro_f1": ("offensive", None), "acc": 0.0, "parsed": 0.0}
    eu = next(iter(built["pefteval_affect_emobench_eu_gen"].eval_docs))
    gold = "ABCDEF"[eu["answer"]]
    assert utils.gen_results(eu, [f" {gold}. {eu['options'][eu['answer']]}"]) == {"acc": 1.0, "parsed": 1.0}
    assert utils.gen_results(eu, [f" {eu['options'][eu['answer']]}"]) == {"acc": 0.0, "parsed": 0.0}
    stance = next(iter(built["pefteval_affect_tweet_stance_abortion"].eval_docs))
    result = utils.choice_results(stance, [(-3.0, False), (-1.0, True), (-2.0, False)])
    assert result == {"stance_f1": (utils.gold_label(stance), "against"), "acc": float(stance["label"] == 1)}


# ---------------------------------------------------------------------------------- on the tiny model


@pytest.mark.slow  # 40 tasks, 2 documents each, in one evaluation
def test_every_task_runs_on_the_tiny_model(built, tiny_model_dir):
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=str(tiny_model_dir), device="cpu", batch_size=8)
    out = lm_eval.simple_evaluate(model=lm, tasks=OURS, task_manager=task_manager(), limit=2, bootstrap_iters=0,
                                  log_samples=False)  # fmt: skip
    results = out["results"]
    for name in OURS:
        key = name.removeprefix("pefteval_affect_").removesuffix("_gen")
        value = results[name][f"{PRIMARY[key]},none"]
        assert isinstance(value, float | int) and math.isfinite(value) and 0 <= value <= 1, (name, value)
        if name in GENERATIVE:
            assert 0.0 <= results[name]["parsed,none"] <= 1.0, name
        assert out["n-samples"][name]["effective"] == 2, name
