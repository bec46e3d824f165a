"""The model-merging benchmarks (pefteval_merge_*) of knowledge and math. Their `Answer: X` parsing on
hand-written model outputs, the tasks built by lm-eval from the catalogue's real records (PEFTEVAL_DATA_DIR;
those tests skip when it is unset), scored through their own YAML hooks and run on the tiny model. (Stock
`lm_eval validate` of every plugin task, these too: tests/test_tasks.py.)
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
from pathlib import Path

import pytest

from pefteval_harness import answers
from pefteval_harness.tasks import primary_metric, resolve_tasks, task_config, task_configs_path, task_manager
from pefteval_harness.tasks.data import DATA_DIR_ENV

LANGUAGES = ["en", "es", "fr", "de", "ru", "zh", "ja", "th", "sw", "bn", "te"]
MGSM = [f"pefteval_merge_mgsm_{lang}" for lang in LANGUAGES]
CHOICE_KEYS = ["mmlu", "mmlu_pro", "arc_challenge", "commonsense_qa"]
GENERATIVE = [f"pefteval_merge_{k}" for k in [*CHOICE_KEYS, "gsm8k", "math"]] + MGSM
LOGLIKELIHOOD = [f"pefteval_merge_{k}_mc" for k in CHOICE_KEYS]
OURS = GENERATIVE + LOGLIKELIHOOD
# The other members of the groups (code, reading, translation, dialogue: tests/test_merge_tasks_text.py).
PART_B = ["pefteval_merge_mbpp", "pefteval_merge_drop", "pefteval_merge_meld", "pefteval_merge_emorynlp"]
PART_B_MC = ["pefteval_merge_meld_mc", "pefteval_merge_emorynlp_mc"]


def _merge12_utils():
    """The folder's hook module, imported from its file as lm-eval imports it."""
    path = task_configs_path() / "merge12" / "utils.py"
    spec = importlib.util.spec_from_file_location("pefteval_merge12_utils", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def data_root() -> Path:
    value = os.environ.get(DATA_DIR_ENV)
    if not value:
        pytest.skip(f"{DATA_DIR_ENV} is not set: these tests read the catalogue's real records from it")
    return Path(value)


@pytest.fixture(scope="module")
def built(data_root):
    """Every part-A task, built once by lm-eval from the real records."""
    return task_manager().load(OURS)["tasks"]


# ---------------------------------------------------------------------------------- answer parsing


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Let's see. B is wrong.\nAnswer: (B)", 1),
        ("answer: b.", 1),
        ("Answer: **C**", 2),
        ("Final answer: D) Paris", 3),
        ("Answer: [a]", 0),
        ("Answer: \\boxed{B}", 1),
        ("Answer: C\n\nQuestion: next one?\nAnswer: A", 2),  # the first `Answer:` line, as the authors' regex
        ("The answer is C", None),  # no colon: the authors' regex does not read it either
        ("Answer: Paris", None),  # no letter at the start of the value
        ("Answer: E", None),  # no option E among four
        ("Answer:", None),
        ("", None),
    ],
)
def test_choice_letter(text, expected):
    assert answers.choice_letter(text, 4) == expected


def test_choice_letter_reaches_ten_options():
    assert answers.choice_letter("Answer: J", 10) == 9
    assert answers.choice_letter("Answer: J", 9) is None
    assert answers.choice_letters(5) == "ABCDE"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("16 - 3 - 4 = 9 eggs, 9 * 2 = 18.\nAnswer: 18", "18"),
        ("Answer: $1,000,000 dollars.", "1000000"),
        ("Answer: 5 + 13 = 18", "18"),  # the final number of the line
        ("Answer: 3.50", "3.5"),
        ("Answer: 70,000\nAnswer: 12", "70000"),
        ("So she makes 18 dollars.", None),  # a number without an `Answer:` line is no answer
        ("Answer: eighteen", None),
    ],
)
def test_answer_number(text, expected):
    assert answers.answer_number(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("so $x = \\boxed{\\frac{1}{2}}$.", "\\frac{1}{2}"),
        ("\\boxed{a} then \\boxed{\\sqrt{b^{2}}}", "\\sqrt{b^{2}}"),  # the last box, braces balanced
        ("\\fbox{7}", "7"),
        ("\\boxed 5$", "5"),
        ("\\boxed{1", None),
        ("no box", None),
    ],
)
def test_boxed(text, expected):
    assert answers.boxed(text) == expected


@pytest.mark.parametrize(
    ("prediction", "reference"),
    [
        ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
        ("\\dfrac12", "\\frac{1}{2}"),
        ("0.5", "\\frac{1}{2}"),  # a plain rational number compares by value
        ("1/2", "\\tfrac{1}{2}"),
        ("-0.125", "-\\frac{1}{8}"),
        ("\\frac{-1}{8}", "-\\frac{1}{8}"),
        ("3.0", "3"),
        ("x = 5", "5"),
        ("120", "120^\\circ"),
        ("85", "85\\text{ feet}"),
        ("40000", "40,\\!000"),
        ("50\\%", "50"),
        ("\\left( \\frac{4}{3}, -\\frac{1}{3} \\right)", "(\\frac{4}{3},-\\frac{1}{3})"),
        ("\\sqrt3/2", "\\sqrt{3}/2"),
        ("Dana", "\\text{Dana}"),
    ],
)
def test_math_answers_that_are_equal(prediction, reference):
    assert answers.math_equivalent(prediction, reference)


@pytest.mark.parametrize(
    ("prediction", "reference"),
    [
        ("0.33", "\\frac{1}{3}"),  # a rounded value is another value
        ("\\frac{1}{8}", "-\\frac{1}{8}"),
        ("x+2", "x+3"),
        ("(1,4)", "(4,1)"),
        (None, "0"),  # no answer
    ],
)
def test_math_answers_that_differ(prediction, reference):
    assert not answers.math_equivalent(prediction, reference)


def test_math_answer_reads_the_answer_line_only():
    assert answers.math_answer("We get 1/2.\nAnswer: $\\dfrac{1}{2}$") == "\\dfrac{1}{2}"
    assert answers.math_answer("Answer: \\boxed{7}") == "7"
    assert answers.math_answer("so the answer is \\boxed{7}") is None  # the protocol asks for `Answer:`


def test_answer_line_default_is_still_the_last():
    assert answers.answer_line("Answer: A\nAnswer: B") == "B"
    assert answers.answer_line("Answer: A\nAnswer: B", position="first") == "A"


# ------------------------------------------------------------------------------ the tasks and groups


def test_tasks_and_groups_resolve_from_the_index():
    manager = task_manager()
    indexed = {n for n in manager.all_subtasks if n.startswith("pefteval_merge_")}
    assert set(OURS) <= indexed
    assert resolve_tasks(["pefteval-merge-mgsm"]).names == MGSM
    for name in OURS:
        config = task_config(manager, name)
        assert config["metadata"]["version"] == 1.0, name
        assert primary_metric(config) == ("acc", "none"), name
        metrics = [m["metric"] for m in config["metric_list"]]
        assert metrics == (["acc", "parsed"] if name in GENERATIVE else ["acc", "acc_norm"]), name
        assert "training_split" not in config, name  # zero-shot: nothing to train on or sample shots from
        if name in GENERATIVE:
            assert config["generation_kwargs"]["do_sample"] is False, name  # greedy unless the job samples
    for lang, name in zip(LANGUAGES, MGSM, strict=True):
        kwargs = task_config(manager, name)["dataset_kwargs"]
        assert (kwargs["data_key"], kwargs["hf_path"], kwargs["hf_name"]) == (f"mgsm/{lang}", "juletxara/mgsm", lang)
    # The groups name their members exactly.
    merge12 = manager.task_index["pefteval-merge12"].cfg["task"]
    assert merge12 == [*GENERATIVE[:6], "pefteval-merge-mgsm", *PART_B[:2], "pefteval-merge-flores101", *PART_B[2:]]
    assert manager.task_index["pefteval-merge12-mc"].cfg["task"] == LOGLIKELIHOOD + PART_B_MC


def test_the_twelve_benchmark_groups_resolve_with_part_b():
    manager = task_manager()
    missing = [n for n in [*PART_B, *PART_B_MC, "pefteval-merge-flores101"] if n not in manager.task_index]
    assert not missing, f"tasks missing from task_configs/merge12: {missing}"
    names = resolve_tasks(["pefteval-merge12"]).names
    assert names[:6] == GENERATIVE[:6] and names[6:17] == MGSM and set(PART_B) <= set(names)
    assert all(n.startswith("pefteval_merge_flores101_") for n in names if n not in GENERATIVE + PART_B)
    assert resolve_tasks(["pefteval-merge12-mc"]).names == LOGLIKELIHOOD + PART_B_MC


def test_every_task_builds_from_the_real_records(built):
    assert sorted(built) == sorted(OURS)
    for name, task in built.items():
        docs = list(task.eval_docs)
        assert docs, name
        assert task.OUTPUT_TYPE == ("generate_until" if name in GENERATIVE else "multiple_choice"), name
        for doc in docs:  # every record has a gold answer the hooks can read
            target = task.doc_to_target(doc)
            assert target is not None and target != "", (name, doc)
            if name in LOGLIKELIHOOD:
                assert 0 <= target < len(task.doc_to_choice(doc)), name


def test_prompts_follow_the_authors_wording(built):
    mmlu = built["pefteval_merge_mmlu"]
    doc = next(iter(mmlu.eval_docs))
    prompt = mmlu.doc_to_text(doc)
    assert prompt.startswith(f"Answer the following {doc['subject'].replace('_', ' ')} question. The last line")
    assert "'Answer: $LETTER' (without quotes) where LETTER is one of ABCD." in prompt
    assert f"\n\nA. {doc['choices'][0]}\nB. " in prompt and prompt.endswith("\n\nLet's think step by step.")
    pro = built["pefteval_merge_mmlu_pro"]
    doc = next(d for d in pro.eval_docs if len(d["options"]) == 10)
    assert "where LETTER is one of ABCDEFGHIJ." in pro.doc_to_text(doc)
    assert f"\nJ. {doc['options'][9]}\n\nLet's think" in pro.doc_to_text(doc)
    arc = built["pefteval_merge_arc_challenge"]
    doc = next(iter(arc.eval_docs))
    assert f"\n\nA) {doc['choices']['text'][0]}\n" in arc.doc_to_text(doc)
    csqa = built["pefteval_merge_commonsense_qa"]
    doc = next(iter(csqa.eval_docs))
    assert csqa.doc_to_text(doc).startswith(f"Answer the following {doc['question_concept']} question step by step.")
    assert csqa.doc_to_text(doc).endswith(f"E) {doc['choices']['text'][4]}")
    for name in ("pefteval_merge_gsm8k", "pefteval_merge_math", "pefteval_merge_mgsm_zh"):
        task = built[name]
        doc = next(iter(task.eval_docs))
        prompt = task.doc_to_text(doc)
        assert prompt.startswith("Solve the following math problem step by step."), name
        assert (doc.get("question") or doc.get("problem")) in prompt, name
        assert prompt.endswith(
            "you do not need to use a \\boxed command, always respond in English."
            if name.endswith("_zh")
            else "you do not need to use a \\boxed command."
        ), name


def _score(task, doc, text: str) -> tuple[float, float]:
    result = task.process_results(doc, [text])
    return result["acc"], result["parsed"]


def test_the_hooks_score_hand_written_answers(built):
    mmlu = built["pefteval_merge_mmlu"]
    doc = next(iter(mmlu.eval_docs))
    gold = "ABCD"[doc["answer"]]
    wrong = "ABCD"[(doc["answer"] + 1) % 4]
    assert _score(mmlu, doc, f"First, ...\nAnswer: ({gold})") == (1.0, 1.0)
    assert _score(mmlu, doc, f"answer: {gold.lower()}.") == (1.0, 1.0)
    assert _score(mmlu, doc, f"Answer: {wrong}") == (0.0, 1.0)
    assert _score(mmlu, doc, f"The answer is {gold}") == (0.0, 0.0)  # no answer: wrong, and counted
    assert _score(mmlu, doc, "") == (0.0, 0.0)
    # ARC records labelled 1-4: the gold is the lettered option at answerKey's position.
    arc = built["pefteval_merge_arc_challenge"]
    doc = next(iter(arc.eval_docs))
    doc = {**doc, "choices": {"text": doc["choices"]["text"][:4], "label": ["1", "2", "3", "4"]}, "answerKey": "2"}
    assert _score(arc, doc, "Answer: B") == (1.0, 1.0)
    assert _score(arc, doc, "Answer: 2") == (0.0, 0.0)  # a digit is no letter
    pro = built["pefteval_merge_mmlu_pro"]
    doc = next(iter(pro.eval_docs))
    assert _score(pro, doc, f"Answer: {doc['answer']}") == (1.0, 1.0)
    gsm8k = built["pefteval_merge_gsm8k"]
    doc = next(iter(gsm8k.eval_docs))
    gold = answers.gsm8k_reference(doc["answer"])
    assert _score(gsm8k, doc, f"Answer: ${int(gold):,}.") == (1.0, 1.0)
    assert _score(gsm8k, doc, f"So the profit is {gold}.") == (0.0, 0.0)
    assert _score(gsm8k, doc, f"Answer: {int(gold) + 1}") == (0.0, 1.0)
    mgsm = built["pefteval_merge_mgsm_ja"]
    doc = next(iter(mgsm.eval_docs))
    assert _score(mgsm, doc, f"Answer: {doc['answer_number']}") == (1.0, 1.0)
    maths = built["pefteval_merge_math"]
    doc = next(d for d in maths.eval_docs if answers.math_reference(d["solution"]) == "-\\frac{1}{8}")
    assert _score(maths, doc, "Answer: $-\\dfrac18$") == (1.0, 1.0)
    assert _score(maths, doc, "Answer: -0.125") == (1.0, 1.0)
    assert _score(maths, doc, "Answer: \\frac{1}{8}") == (0.0, 1.0)
    assert _score(maths, doc, "so x = \\boxed{-\\frac{1}{8}}") == (0.0, 0.0)


def test_math_loads_every_subject_config_from_the_hub(tmp_path, monkeypatch):
    """Online, MATH is the seven per-type configs its YAML lists (hf_name), concatenated in that order (a
    local dataset folder with the hub's layout of configs stands in for EleutherAI/hendrycks_math)."""
    import datasets

    from pefteval_harness.tasks.data import data_spec, load_source

    spec = data_spec(task_config(task_manager(), "pefteval_merge_math"))
    subjects = spec.hf_name
    configs = []
    for number, subject in enumerate(subjects):
        record = {"problem": f"p{number}", "level": "Level 1", "type": subject, "solution": f"\\boxed{{{number}}}"}
        (tmp_path / subject).mkdir()
        (tmp_path / subject / "test.jsonl").write_text(json.dumps(record) + "\n")
        configs.append(f"- config_name: {subject}\n  data_files:\n  - split: test\n    path: {subject}/test.jsonl\n")
    (tmp_path / "README.md").write_text("---\nconfigs:\n" + "".join(configs) + "---\n")
    monkeypatch.delenv(DATA_DIR_ENV, raising=False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    loaded = load_source(dataclasses.replace(spec, hf_path=str(tmp_path)))
    assert len(subjects) == 7 and list(loaded) == ["test"]
    assert loaded["test"]["type"] == list(subjects)
    utils = _merge12_utils()
    assert [utils.math_gold(d) for d in loaded["test"]] == [str(n) for n in range(7)]


# ---------------------------------------------------------------------------------- on the tiny model


@pytest.mark.slow  # 19 tasks on the tiny model, generation included (about 20 s)
def test_every_task_reports_acc_and_parsed_on_the_tiny_model(data_root, tiny_model_dir):
    import lm_eval

    out = lm_eval.simple_evaluate(
        model="hf",
        model_args=f"pretrained={tiny_model_dir}",
        tasks=[*GENERATIVE[:6], "pefteval-merge-mgsm", *LOGLIKELIHOOD],
        task_manager=task_manager(),
        limit=2,
        batch_size=8,
        device="cpu",
        bootstrap_iters=0,
        # The authors' sampling, as a user sets it; max_gen_toks: the tiny model's context is 256 tokens.
        gen_kwargs="do_sample=true,temperature=0.2,top_p=0.75,max_gen_toks=16",
    )
    results = out["results"]
    for name in OURS:
        metrics = ("acc", "parsed") if name in GENERATIVE else ("acc", "acc_norm")
        for metric in metrics:
            value = results[name][f"{metric},none"]
            assert isinstance(value, float | int) and 0 <= value <= 1, (name, metric, value)
    for metric in ("acc", "parsed"):
        assert 0 <= results["pefteval-merge-mgsm"][f"{metric},none"] <= 1
    settings = out["configs"]["pefteval_merge_gsm8k"]["generation_kwargs"]
    assert settings["do_sample"] is True and (settings["temperature"], settings["top_p"]) == (0.2, 0.75)
    assert settings["until"] == []  # no stop string: the model's end-of-sequence token ends the reasoning
    samples = out["samples"]["pefteval_merge_gsm8k"]
    assert len(samples) == 2 and all(isinstance(s["resps"][0][0], str) for s in samples)
