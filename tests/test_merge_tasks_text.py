"""The merge benchmarks on code, reading, translation and dialogue (pefteval_merge_mbpp, _drop,
_flores101_<src>_<tgt>, _meld, _emorynlp, _meld_mc, _emorynlp_mc): their scoring on hand-written answers,
the dialogue context built from real MELD records, and every task run on the tiny model.

Data: MBPP, MELD and EmoryNLP are the real records under PEFTEVAL_DATA_DIR (tests that need them skip when
it is unset). The shared records have no DROP and no FLORES-101: the tests write records in the hub schemas
(ucinlp/drop; gsarti/flores_101, one folder per language config) themselves.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import random
from pathlib import Path

import pytest
import sacrebleu

from pefteval_harness import metrics
from pefteval_harness.errors import BadInput
from pefteval_harness.tasks import primary_metric, resolve_tasks, task_config, task_configs_path, task_manager
from pefteval_harness.tasks.data import DATA_DIR_ENV

FLORES_LANGS = ("es", "fr", "de", "ru", "zh", "ja", "th", "sw", "bn", "te")
FLORES_PAIRS = [f"{a}_{b}" for lang in FLORES_LANGS for a, b in (("en", lang), (lang, "en"))]
FLORES = [f"pefteval_merge_flores101_{pair}" for pair in FLORES_PAIRS]
GENERATIVE = ["pefteval_merge_mbpp", "pefteval_merge_drop", *FLORES, "pefteval_merge_meld", "pefteval_merge_emorynlp"]
CHOICE = ["pefteval_merge_meld_mc", "pefteval_merge_emorynlp_mc"]
OURS = GENERATIVE + CHOICE
PRIMARY = {name: "sentence_bleu" for name in FLORES} | {
    "pefteval_merge_mbpp": "pass_at_1",
    "pefteval_merge_drop": "f1",
    "pefteval_merge_meld": "weighted_f1",
    "pefteval_merge_emorynlp": "weighted_f1",
    "pefteval_merge_meld_mc": "weighted_f1",
    "pefteval_merge_emorynlp_mc": "weighted_f1",
}
FLORES_CONFIGS = ("eng", "spa", "fra", "deu", "rus", "zho_simpl", "jpn", "tha", "swh", "ben", "tel")


def _utils_text():
    """The task folder's hook module, imported as lm-eval imports it (by file)."""
    path = task_configs_path() / "merge12" / "utils_text.py"
    spec = importlib.util.spec_from_file_location("merge12_utils_text", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _real_records(key: str, split: str) -> list[dict]:
    value = os.environ.get(DATA_DIR_ENV)
    if not value:
        pytest.skip(f"{DATA_DIR_ENV} is not set: this test reads the catalogue's real records from it")
    return [json.loads(line) for line in (Path(value) / key / f"{split}.jsonl").read_text().splitlines() if line]


# ---------------------------------------------------------------------------- records in the HF schema


def _drop_records() -> list[dict]:
    passage = (
        "The Bears scored 14 points in the first quarter and 7 in the second. Smith caught two touchdown "
        "passes and Jones ran for a third."
    )
    rows = [
        ("How many points did the Bears score in the first half?", ["21"], ["number"]),
        ("Who caught touchdown passes?", ["Smith"], ["span"]),
        ("Which players scored touchdowns?", ["Smith", "Jones"], ["span", "span"]),
    ]
    return [
        {"section_id": "nfl_1", "query_id": f"q{i}", "passage": passage, "question": question,
         "answers_spans": {"spans": spans, "types": types}}
        for i, (question, spans, types) in enumerate(rows)
    ]  # fmt: skip


def _flores_records(config: str) -> list[dict]:
    # Hand-written placeholders in the hub schema (the sentences are not real FLORES sentences); the same
    # ids in every language, listed in a different order per language so the join must go by id.
    records = [
        {"id": i, "URL": f"https://example.org/{i}", "domain": "wikinews", "topic": "test", "has_image": 0,
         "has_hyperlink": 0, "sentence": f"Sentence {i} in {config}."}
        for i in (1, 2, 3)
    ]  # fmt: skip
    random.Random(config).shuffle(records)
    return records


def write_records(root: Path, key: str, stem: str, records: list[dict]) -> None:
    path = root / key / f"{stem}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")


@pytest.fixture(scope="module")
def task_data(tmp_path_factory) -> Path:
    """A PEFTEVAL_DATA_DIR for these tasks: the real MBPP, MELD and EmoryNLP test records, written DROP and
    FLORES-101 records."""
    value = os.environ.get(DATA_DIR_ENV)
    if not value:
        pytest.skip(f"{DATA_DIR_ENV} is not set: these tests read the catalogue's real records from it")
    root = tmp_path_factory.mktemp("merge_text_data")
    for key in ("mbpp", "meld", "emorynlp"):
        (root / key).mkdir()
        (root / key / "test.jsonl").symlink_to(Path(value) / key / "test.jsonl")
    write_records(root, "drop", "validation", _drop_records())
    for config in FLORES_CONFIGS:
        write_records(root, f"flores101/{config}", "devtest", _flores_records(config))
    return root


@pytest.fixture
def use_task_data(task_data, monkeypatch) -> Path:
    monkeypatch.setenv(DATA_DIR_ENV, str(task_data))
    return task_data


# ------------------------------------------------------------------------------- the tasks and groups


def test_the_tasks_and_the_flores_group_resolve_with_their_metrics():
    manager = task_manager()
    ours = {n for n in manager.all_subtasks if n.startswith("pefteval_merge_")} & set(OURS)
    assert ours == set(OURS)
    assert resolve_tasks(["pefteval-merge-flores101"]).names == FLORES
    for name in [n for n in OURS if n not in FLORES[2:]]:  # the pairs share one template: two stand for all
        config = task_config(manager, name)
        assert primary_metric(config) == (PRIMARY[name], "none"), name
        metric_names = [m["metric"] for m in config["metric_list"]]
        assert PRIMARY[name] in metric_names, name
        assert ("parsed" in metric_names) == (name in GENERATIVE), name
        if name in GENERATIVE:
            assert config["generation_kwargs"]["do_sample"] is False, name  # greedy by default
    assert task_config(manager, "pefteval_merge_mbpp")["unsafe_code"] is True
    assert task_config(manager, "pefteval_merge_flores101_zh_en")["dataset_kwargs"] | {} == {
        "data_key": "flores101/zho_simpl", "hf_path": "gsarti/flores_101", "hf_name": "zho_simpl",
        "splits": ["devtest"], "target": "eng",
    }  # fmt: skip


def test_flores_pairs_join_the_two_languages_by_id(use_task_data):
    tasks = task_manager().load(["pefteval_merge_flores101_en_de", "pefteval_merge_flores101_ja_en"])["tasks"]
    docs = list(tasks["pefteval_merge_flores101_en_de"].eval_docs)
    assert sorted(d["id"] for d in docs) == [1, 2, 3]
    for doc in docs:
        assert doc["source"] == f"Sentence {doc['id']} in eng." and doc["target"] == f"Sentence {doc['id']} in deu."
    task = tasks["pefteval_merge_flores101_ja_en"]
    doc = next(iter(task.eval_docs))
    prompt = task.doc_to_text(doc)
    assert prompt.startswith("Translate the following sentence from Japanese to English.")
    assert prompt.endswith(f"\n\n{doc['source']}") and "'Translation: $SENTENCE'" in prompt
    assert task.doc_to_target(doc) == doc["target"] == f"Sentence {doc['id']} in eng."


def test_a_flores_target_missing_a_sentence_is_bad_input(tmp_path, monkeypatch):
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path))
    write_records(tmp_path, "flores101/eng", "devtest", _flores_records("eng"))
    write_records(tmp_path, "flores101/deu", "devtest", _flores_records("deu")[:2])
    utils_text = _utils_text()
    kwargs = {"data_key": "flores101/eng", "hf_path": "gsarti/flores_101", "hf_name": "eng", "splits": ["devtest"]}
    with pytest.raises(BadInput, match="is missing from 'deu'"):
        utils_text.load_flores_pair(**kwargs, target="deu")
    with pytest.raises(BadInput, match="dataset_kwargs.target"):
        utils_text.load_flores_pair(**kwargs, target="klingon")
    with pytest.raises(BadInput, match=f"{tmp_path / 'flores101' / 'fra' / 'devtest.jsonl'}: no such file"):
        utils_text.load_flores_pair(**kwargs, target="fra")


# ----------------------------------------------------------------------------------------------- DROP


def test_drop_exact_match_and_f1_on_hand_computed_cases():
    one = [("21",)]
    assert metrics.drop_scores("21", one) == (1.0, 1.0)
    assert metrics.drop_scores("21.0", one) == (1.0, 1.0)  # numbers compare as numbers
    assert metrics.drop_scores("21 points", one) == (0.0, 0.67)  # bag {21, points} vs {21}: P 1/2, R 1
    assert metrics.drop_scores("22", one) == (0.0, 0.0)
    # A gold span with a number scores 0 against a prediction without that number, whatever else matches.
    assert metrics.drop_scores("12 yards", [("13 yards",)]) == (0.0, 0.0)
    # Normalisation: case, punctuation and articles do not count.
    assert metrics.drop_scores("The Chicago Bears.", [("chicago bears",)]) == (1.0, 1.0)
    assert metrics.drop_scores("Bears", [("Chicago Bears",)]) == (0.0, 0.67)
    # Multi-span gold: spans are aligned one to one and F1 is averaged over them.
    both = [("Smith", "Jones")]
    assert metrics.drop_scores("Smith", both) == (0.0, 0.5)
    assert metrics.drop_scores(["Jones", "Smith"], both) == (1.0, 1.0)
    # One predicted span {smith, and, jones}: F1 1/2 against "Smith", nothing left for "Jones": mean 1/4.
    assert metrics.drop_scores("Smith and Jones", both) == (0.0, 0.25)
    # The best over several gold answers.
    assert metrics.drop_scores("Bears", [("Chicago Bears",), ("Bears",)]) == (1.0, 1.0)
    assert metrics.drop_scores("x", []) == (0.0, 0.0)


def test_drop_answers_are_read_from_the_answer_line_in_both_schemas():
    doc = _drop_records()[2]
    assert metrics.drop_golds(doc) == [("Smith", "Jones")]
    # First `Answer:` line, as the authors' regex search reads it.
    assert metrics.drop_results(doc, ["Both scored.\nAnswer: Smith\nAnswer: Jones"]) == {
        "exact_match": 0.0, "f1": 0.5, "parsed": 1.0,
    }  # fmt: skip
    assert metrics.drop_results(doc, ["Smith and Jones scored."]) == {"exact_match": 0.0, "f1": 0.0, "parsed": 0.0}
    assert metrics.drop_results(doc, [""]) == {"exact_match": 0.0, "f1": 0.0, "parsed": 0.0}
    # EleutherAI/drop schema: the answer and its validated alternatives are all gold.
    date = {"day": "", "month": "", "year": ""}
    eleuther = {
        "answer": {"number": "", "date": date, "spans": ["Chicago Bears"]},
        "validated_answers": {"number": ["", ""], "date": [date, date], "spans": [["Bears"], ["Chicago Bears"]]},
    }
    assert metrics.drop_golds(eleuther) == [("Chicago Bears",), ("Bears",)]
    assert metrics.drop_results(eleuther, ["Answer: **Bears**."])["exact_match"] == 1.0


# ----------------------------------------------------------------------------------------- FLORES-101


def test_sentence_bleu_is_sacrebleus_and_needs_a_translation_line():
    reference = "The quick brown fox jumps over the lazy dog near the river bank."
    hypothesis = "The fast brown fox jumps over a lazy dog near the river."
    expected = sacrebleu.sentence_bleu(hypothesis, [reference]).score
    assert 0 < expected < 100
    assert metrics.sentence_bleu(hypothesis, reference) == pytest.approx(expected)
    doc = {"target": reference, "target_config": "eng"}
    answer = f"Let me translate.\nTranslation: {hypothesis}\nTranslation: something else"
    assert metrics.flores_results(doc, [answer]) == {"sentence_bleu": pytest.approx(expected), "parsed": 1.0}
    assert metrics.flores_results(doc, [f'**Translation:** "{reference}"'])["sentence_bleu"] == pytest.approx(100)
    assert metrics.flores_results(doc, [hypothesis]) == {"sentence_bleu": 0.0, "parsed": 0.0}
    assert metrics.flores_results(doc, ["Translation:   "]) == {"sentence_bleu": 0.0, "parsed": 0.0}
    # Chinese is scored with sacrebleu's Chinese tokenizer (13a would see one word per sentence).
    zh_reference, zh_hypothesis = "我们今天去公园散步。", "我们今天在公园散步。"
    zh = {"target": zh_reference, "target_config": "zho_simpl"}
    zh_expected = sacrebleu.sentence_bleu(zh_hypothesis, [zh_reference], tokenize="zh").score
    assert metrics.flores_results(zh, [f"Translation: {zh_hypothesis}"])["sentence_bleu"] == pytest.approx(zh_expected)
    assert zh_expected != pytest.approx(sacrebleu.sentence_bleu(zh_hypothesis, [zh_reference]).score)


# ----------------------------------------------------------------------------------------------- MBPP


def test_mbpp_scores_real_records_by_running_their_tests():
    doc = next(r for r in _real_records("mbpp", "test") if not r["test_setup_code"])
    reference = f"Here you go:\n```python\n{doc['code']}\n```\n"
    assert metrics.mbpp_results(doc, [reference]) == {"pass_at_1": 1.0, "parsed": 1.0}
    wrong = "```python\n" + doc["code"].replace("return", "return None and", 1) + "\n```"
    assert metrics.mbpp_results(doc, [wrong]) == {"pass_at_1": 0.0, "parsed": 1.0}
    assert metrics.mbpp_results(doc, ["I cannot write this function."]) == {"pass_at_1": 0.0, "parsed": 0.0}


# ------------------------------------------------------------------------------------ MELD, EmoryNLP


def test_meld_context_is_the_preceding_turns_of_the_same_dialogue():
    records = _real_records("meld", "test")
    utils_text = _utils_text()
    dialogue_id = records[0]["Dialogue_ID"]
    dialogue = sorted((r for r in records if r["Dialogue_ID"] == dialogue_id), key=lambda r: r["Utterance_ID"])
    assert len(dialogue) >= 3
    shuffled = list(records)
    random.Random(0).shuffle(shuffled)  # the file's order does not matter, only Utterance_ID
    histories = utils_text.dialogue_histories(shuffled, ["Dialogue_ID"], "Utterance_ID")
    by_turn = {(r["Dialogue_ID"], r["Utterance_ID"]): h for r, h in zip(shuffled, histories, strict=True)}
    turns = [f"{r['Speaker']}: {r['Utterance']}" for r in dialogue]
    for position, record in enumerate(dialogue):
        assert by_turn[dialogue_id, record["Utterance_ID"]] == turns[:position]
    other = next(r for r in records if r["Dialogue_ID"] != dialogue_id and r["Utterance_ID"] == 1)
    assert all(turn not in turns for turn in by_turn[other["Dialogue_ID"], 1])
    with pytest.raises(BadInput, match="Utterance_ID"):
        utils_text.dialogue_histories([{"Dialogue_ID": 1}], ["Dialogue_ID"], "Utterance_ID")


def test_emorynlp_scenes_and_speakers(use_task_data):
    utils_text = _utils_text()
    assert utils_text.speaker_name("['Monica Geller']") == "Monica Geller"
    assert utils_text.speaker_name("['Ross Geller', 'Rachel Green']") == "Ross Geller and Rachel Green"
    assert utils_text.speaker_name("Phoebe") == "Phoebe"
    task = task_manager().load(["pefteval_merge_emorynlp"])["tasks"]["pefteval_merge_emorynlp"]
    docs = list(task.eval_docs)
    scene = (docs[0]["Season"], docs[0]["Episode"], docs[0]["Scene_ID"])
    members = sorted((d for d in docs if (d["Season"], d["Episode"], d["Scene_ID"]) == scene),
                     key=lambda d: d["Utterance_ID"])  # fmt: skip
    last = members[-1]
    assert last["history"] == [f"{utils_text.speaker_name(d['Speaker'])}: {d['Utterance']}" for d in members[:-1]]
    prompt = task.doc_to_text(last)
    assert prompt.endswith(f"Utterance:\n{last['speaker']}: {last['Utterance']}\n\nOptions: "
                           "Neutral, Joyful, Peaceful, Powerful, Scared, Mad, Sad")  # fmt: skip
    assert "History:\n- " + members[0]["speaker"] in prompt and "'Answer: $EMOTION'" in prompt


def test_emotions_are_parsed_from_the_answer_line():
    doc = {"Emotion": "joy"}
    cases = {
        "The speaker is delighted.\nAnswer: Joy.": "joy",
        "answer: **anger**": "anger",
        "Answer: surprise (and some joy)": "surprise",
        "Answer: joy\nAnswer: anger": "joy",  # the first line, as the authors' regex search reads it
        "The answer is joy": None,  # no colon
        "Answer: happy": None,  # not one of the 7 emotions
        "Answer: E": None,  # the authors' letters are not the options here
        "": None,
    }
    for text, expected in cases.items():
        result = metrics.meld_results(doc, [text])
        assert result["weighted_f1"] == ("joy", expected), text
        assert result["parsed"] == float(expected is not None) and result["acc"] == float(expected == "joy"), text
    # EmoryNLP's labels are capitalised in the data; answers in any case match, the gold keeps its spelling.
    assert metrics.emorynlp_results({"Emotion": "Mad"}, ["Answer: mad"])["weighted_f1"] == ("Mad", "Mad")
    # Unparsed answers are wrong for every class: weighted F1 over the items counts them.
    items = [("joy", "joy"), ("anger", None), ("anger", "anger"), ("neutral", "joy")]
    assert metrics.weighted_f1(items) == pytest.approx((2 / 3 + 2 * (2 / 3) + 0) / 4)
    with pytest.raises(ValueError, match="none of"):
        metrics.meld_results({"Emotion": "boredom"}, ["Answer: joy"])


def test_emotion_choice_scoring():
    lls = [(-5.0, False), (-3.2, False), (-9.0, False), (-3.0, True), (-8.0, False), (-6.0, False), (-7.0, False)]
    result = metrics.meld_choice_results({"Emotion": "sadness"}, lls)
    assert result["acc"] == 1.0 and result["weighted_f1"] == ("sadness", "sadness")
    # acc_norm divides by the label's length: "surprise" (-3.2 / 8 letters) beats "sadness" (-3.0 / 7).
    assert result["acc_norm"] == 0.0
    with pytest.raises(ValueError, match="log-likelihoods for 7 emotions"):
        metrics.meld_choice_results({"Emotion": "joy"}, lls[:3])


# ---------------------------------------------------------------------------------- on the tiny model


@pytest.mark.slow  # every task on the tiny model, MBPP code execution included (about 20 s)
def test_every_task_reports_its_metrics_on_the_tiny_model_and_mbpp_needs_consent(use_task_data, tiny_model_dir):
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=str(tiny_model_dir), device="cpu", batch_size=8)
    groups = ["pefteval_merge_mbpp", "pefteval_merge_drop", "pefteval-merge-flores101", "pefteval_merge_meld",
              "pefteval_merge_emorynlp", *CHOICE]  # fmt: skip
    settings = {"limit": 2, "bootstrap_iters": 0, "gen_kwargs": "max_gen_toks=16", "log_samples": False}
    with pytest.raises(ValueError, match="confirm_run_unsafe_code"):
        lm_eval.simple_evaluate(model=lm, tasks=["pefteval_merge_mbpp"], task_manager=task_manager(), **settings)
    out = lm_eval.simple_evaluate(
        model=lm, tasks=groups, task_manager=task_manager(), confirm_run_unsafe_code=True, **settings
    )
    results = out["results"]
    for name in OURS:
        value = results[name][f"{PRIMARY[name]},none"]
        assert isinstance(value, float | int) and math.isfinite(value), (name, value)
        if name in GENERATIVE:
            assert 0.0 <= results[name]["parsed,none"] <= 1.0, name
        assert out["n-samples"][name]["effective"] == 2, name
    assert math.isfinite(results["pefteval-merge-flores101"]["sentence_bleu,none"])
