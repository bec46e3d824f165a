"""The PEFT-vs-FFT tasks (pefteval_peft_*) and their adversarial sets (pefteval_adv_*): they build with
lm-eval, adversarial tasks score with their clean partner's prompt and label words, every task with a
training split renders its training examples, and every task scores its primary metric on the tiny model.

Data: the real records under PEFTEVAL_DATA_DIR (tests that need them skip when it is unset). The shared
records lack some datasets and splits; for those the tests write records in the HF schema themselves:
hand-written records for qqp, squad, alpaca, hans and paws, and, for a split missing beside real ones,
the real records of another split of the same dataset (STAND_INS).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pefteval_harness.errors import BadInput
from pefteval_harness.tasks import primary_metric, resolve_tasks, task_config, task_configs_path, task_manager
from pefteval_harness.tasks.data import DATA_DIR_ENV, task_data_specs
from pefteval_harness.tasks.rendering import gold_target, training_examples

GLUE = ["sst2", "cola", "mrpc", "qqp", "mnli", "mnli_mismatched", "qnli", "rte"]
PEFT_KEYS = [*GLUE, "e2e_nlg", "squad", "gsm8k", "arc_challenge", "commonsense_qa", "winogrande", "alpaca", "ifeval"]
PEFT = [f"pefteval_peft_{k}" for k in PEFT_KEYS]
FAMILIES = {
    "pefteval-peft-classification": [f"pefteval_peft_{k}" for k in GLUE],
    "pefteval-peft-generation": ["pefteval_peft_e2e_nlg", "pefteval_peft_squad"],
    "pefteval-peft-reasoning": [
        f"pefteval_peft_{k}" for k in ("gsm8k", "arc_challenge", "commonsense_qa", "winogrande")
    ],
    "pefteval-peft-instruction": ["pefteval_peft_alpaca", "pefteval_peft_ifeval"],
}
# adversarial task -> (its data key, its clean partner)
ADVERSARIAL = {
    "pefteval_adv_sst2": ("adv_sst2", "pefteval_peft_sst2"),
    "pefteval_adv_qqp": ("adv_qqp", "pefteval_peft_qqp"),
    "pefteval_adv_mnli": ("adv_mnli", "pefteval_peft_mnli"),
    "pefteval_adv_mnli_mismatched": ("adv_mnli_mismatched", "pefteval_peft_mnli_mismatched"),
    "pefteval_adv_qnli": ("adv_qnli", "pefteval_peft_qnli"),
    "pefteval_adv_rte": ("adv_rte", "pefteval_peft_rte"),
    "pefteval_adv_anli_r1": ("anli_r1", "pefteval_peft_mnli"),
    "pefteval_adv_anli_r2": ("anli_r2", "pefteval_peft_mnli"),
    "pefteval_adv_anli_r3": ("anli_r3", "pefteval_peft_mnli"),
    "pefteval_adv_hans": ("hans", "pefteval_peft_mnli"),
    "pefteval_adv_paws": ("paws", "pefteval_peft_qqp"),
}
ADV = list(ADVERSARIAL)
ALL = PEFT + ADV
LM_EVAL = str(Path(sys.executable).parent / "lm_eval")
NOT_TRAINABLE = {"pefteval_peft_ifeval", "pefteval_peft_mnli_mismatched", *ADV}
PRIMARY = {name: "acc" for name in ALL} | {
    "pefteval_peft_cola": "mcc",
    "pefteval_peft_e2e_nlg": "bleu",
    "pefteval_peft_squad": "exact_match",
    "pefteval_peft_gsm8k": "exact_match",
    "pefteval_peft_alpaca": "rougeL",
    "pefteval_peft_ifeval": "prompt_level_strict_acc",
}

# ---------------------------------------------------------------------------- records in the HF schema


def _qqp(n: int) -> list[dict]:
    pairs = [
        ("How do I learn to cook rice?", "What is the best way to cook rice?", 1),
        ("Why is the sky blue?", "How far away is the moon?", 0),
        ("What is a good laptop for students?", "Which laptop should a student buy?", 1),
        ("How do plants make food?", "Why do cats purr?", 0),
        ("How can I improve my English?", "What are ways to get better at English?", 1),
        ("Is coffee bad for you?", "Where was coffee first grown?", 0),
    ]
    return [{"question1": q1, "question2": q2, "label": y, "idx": i} for i, (q1, q2, y) in enumerate(pairs[:n])]


def _squad(n: int, split: str) -> list[dict]:
    facts = [
        ("Paris", "The Eiffel Tower stands in Paris. It was finished in 1889.", "Where is the Eiffel Tower?", "Paris"),
        ("Rivers", "The Nile flows north through Egypt into the Mediterranean Sea.", "Where does the Nile end?",
         "the Mediterranean Sea"),
        ("Music", "Ludwig van Beethoven wrote nine symphonies.", "How many symphonies did Beethoven write?", "nine"),
        ("Space", "The Moon orbits the Earth about once every 27 days.", "What orbits the Earth?", "The Moon"),
        ("Birds", "Penguins cannot fly, but they swim very well.", "What can penguins do well?", "swim"),
    ]  # fmt: skip
    records = []
    for i, (title, context, question, answer) in enumerate(facts[:n]):
        start = context.index(answer)
        records.append({
            "id": f"{split}{i:04d}", "title": title, "context": context, "question": question,
            "answers": {"text": [answer, answer], "answer_start": [start, start]},
        })  # fmt: skip
    return records


def _alpaca(n: int) -> list[dict]:
    preamble = (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request."
    )
    records = []
    for i in range(n):
        a, b = i % 17, i % 5
        instruction, source, output = [
            (f"Add {a} and {b}.", "", str(a + b)),
            (f"Write the word number {i} in capitals.", "", f"NUMBER {i}"),
            ("Translate the sentence into French.", f"I have {a} cats.", f"J'ai {a} chats."),
            (f"Name a colour, example {i}.", "", "Blue."),
        ][i % 4]
        text = f"{preamble}\n\n### Instruction:\n{instruction}\n\n### Response:\n{output}"
        if source:
            text = f"{preamble}\n\n### Instruction:\n{instruction}\n\n### Input:\n{source}\n\n### Response:\n{output}"
        records.append({"instruction": instruction, "input": source, "output": output, "text": text})
    return records


def _hans(n: int) -> list[dict]:
    rows = [
        ("The doctor saw the lawyer .", "The lawyer saw the doctor .", 1, "lexical_overlap", "ln_subject/object_swap"),
        ("The actor who the judge saw ran .", "The actor ran .", 0, "subsequence", "sn_NP/S"),
        ("The artist slept .", "The artist slept .", 0, "lexical_overlap", "le_relative_clause"),
        ("Whether or not the tourist danced , the author waited .", "The tourist danced .", 1, "constituent",
         "cn_embedded_under_if"),
        ("The banker near the senator called the students .", "The senator called the students .", 1,
         "subsequence", "sn_PP_on_subject"),
    ]  # fmt: skip
    return [
        {
            "premise": p, "hypothesis": h, "label": y,
            "parse_premise": f"(ROOT (S {p}))", "parse_hypothesis": f"(ROOT (S {h}))",
            "binary_parse_premise": f"( {p} )", "binary_parse_hypothesis": f"( {h} )",
            "heuristic": heuristic, "subcase": subcase, "template": f"temp{i + 1}",
        }  # fmt: skip
        for i, (p, h, y, heuristic, subcase) in enumerate(rows[:n])
    ]


def _paws(n: int) -> list[dict]:
    pairs = [
        ("The river flows from the north to the south of the valley .",
         "The river flows from the south to the north of the valley .", 0),
        ("She moved to Berlin in 1990 and worked there as a teacher .",
         "In 1990 she moved to Berlin , where she worked as a teacher .", 1),
        ("The club was founded by John and later led by Mary .",
         "The club was founded by Mary and later led by John .", 0),
        ("The album was released in May and reached the top ten .",
         "Released in May , the album reached the top ten .", 1),
        ("The bridge connects the old town with the harbour .",
         "The bridge connects the harbour with the old town .", 1),
    ]  # fmt: skip
    return [{"id": i + 1, "sentence1": a, "sentence2": b, "label": y} for i, (a, b, y) in enumerate(pairs[:n])]


# data key -> file stem -> records, for the datasets the shared records lack.
BUILT = {
    "qqp": {"train": _qqp(6), "validation": _qqp(6)},
    "squad": {"train": _squad(5, "t"), "validation": _squad(5, "v")},
    "alpaca": {"train": _alpaca(240)},
    "hans": {"validation": _hans(5)},
    "paws": {"test": _paws(5)},
}
# (data key, missing file stem) -> the stem of real records of the same dataset that stand in for it.
STAND_INS = {
    ("e2e_nlg", "train"): "validation",
    ("arc_challenge", "train"): "validation",
    ("commonsense_qa", "train"): "validation",
    ("winogrande", "train"): "validation",
    ("anli_r1", "test"): "dev",
    ("anli_r2", "test"): "dev",
    ("anli_r3", "test"): "dev",
}


def write_records(root: Path, key: str, stem: str, records: list[dict]) -> None:
    path = root / key / f"{stem}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")


@pytest.fixture(scope="session")
def task_data(tmp_path_factory) -> Path:
    """A PEFTEVAL_DATA_DIR with every file the 27 tasks read: the real records where they exist, else
    built ones (BUILT, STAND_INS)."""
    value = os.environ.get(DATA_DIR_ENV)
    if not value:
        pytest.skip(f"{DATA_DIR_ENV} is not set: these tests read the catalogue's real records from it")
    real = Path(value)
    root = tmp_path_factory.mktemp("task_data")
    specs = task_data_specs(task_manager(), ALL)
    assert sorted(specs) == sorted(ALL)
    for spec in [spec for found in specs.values() for spec in found]:
        for stem in spec.splits.values():
            target = root / spec.key / f"{stem}.jsonl"
            if target.exists():
                continue
            if (real / spec.key / f"{stem}.jsonl").is_file():
                source = real / spec.key / f"{stem}.jsonl"
            elif spec.key in BUILT:
                write_records(root, spec.key, stem, BUILT[spec.key][stem])
                continue
            else:
                source = real / spec.key / f"{STAND_INS[spec.key, stem]}.jsonl"
            target.parent.mkdir(parents=True, exist_ok=True)
            target.symlink_to(source)
    return root


@pytest.fixture
def use_task_data(task_data, monkeypatch) -> Path:
    monkeypatch.setenv(DATA_DIR_ENV, str(task_data))
    return task_data


@pytest.fixture(scope="module")
def built_tasks(task_data):
    """Every task, built once (its data loaded from task_data)."""
    previous = os.environ.get(DATA_DIR_ENV)
    os.environ[DATA_DIR_ENV] = str(task_data)
    try:
        return task_manager().load(ALL)["tasks"]
    finally:
        os.environ[DATA_DIR_ENV] = previous  # task_data skips unless it was set


# --------------------------------------------------------------------------------------- the tasks


def test_the_catalogue_tasks_and_groups_resolve_from_the_index():
    manager = task_manager()
    root = task_configs_path()
    ours = {n for n in manager.all_subtasks if n.startswith(("pefteval_peft_", "pefteval_adv_"))}
    assert ours == set(ALL)
    assert resolve_tasks(["pefteval-peft15"]).names == PEFT
    assert resolve_tasks(["pefteval-adv11"]).names == ADV
    for group, members in FAMILIES.items():
        assert resolve_tasks([group]).names == members
    assert sorted(sum(FAMILIES.values(), [])) == sorted(PEFT)
    selection = resolve_tasks(["pefteval_*"])  # groups do not match the leaf glob
    assert set(ALL) <= set(selection.names) and not selection.groups
    for name in ALL:
        config = task_config(manager, name)
        assert config["metadata"]["version"] == 1.0, name
        assert primary_metric(config) == (PRIMARY[name], "none"), name
        assert PRIMARY[name] in [m["metric"] for m in config["metric_list"]], name
        folder = Path(manager.task_index[name].yaml_path).parent
        assert folder == root / ("adversarial" if name in ADVERSARIAL else "peft15"), name
    for name, (key, partner) in ADVERSARIAL.items():
        config = task_config(manager, name)
        assert config["metadata"]["clean_partner"] == partner
        assert config["dataset_kwargs"]["data_key"] == key
        assert config.get("training_split") is None
    for name, key in zip(PEFT, PEFT_KEYS, strict=True):
        assert task_config(manager, name)["dataset_kwargs"]["data_key"] == key.replace("_mismatched", ""), name


def test_every_task_builds_with_lm_eval_and_has_eval_docs(built_tasks):
    assert sorted(built_tasks) == sorted(ALL)
    for name, task in built_tasks.items():
        assert len(task.eval_docs) > 0, name
        assert task.has_training_docs() == (name not in NOT_TRAINABLE), name
        expected = "multiple_choice"
        if name in ("pefteval_peft_e2e_nlg", "pefteval_peft_squad", "pefteval_peft_gsm8k", "pefteval_peft_alpaca",
                    "pefteval_peft_ifeval"):  # fmt: skip
            expected = "generate_until"
            assert task.config.generation_kwargs["until"] and task.config.generation_kwargs["max_gen_toks"] <= 256
        assert task.OUTPUT_TYPE == expected, name


def test_a_missing_data_file_names_the_path_and_the_key(tmp_path, monkeypatch):
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path))
    with pytest.raises(BadInput) as caught:
        task_manager().load(["pefteval_adv_anli_r2"])
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"{tmp_path / 'anli_r2' / 'dev.jsonl'}: no such file")
    assert "data key 'anli_r2'" in message and "facebook/anli" in message


def _partner_view(name: str, doc: dict) -> dict:
    """The clean partner's record for an adversarial record: PAWS sentence pairs are QQP's question pairs."""
    if name == "pefteval_adv_paws":
        return {"question1": doc["question1"], "question2": doc["question2"], "label": doc["label"], "idx": 0}
    return doc


def test_adversarial_tasks_render_exactly_like_their_clean_partners(built_tasks):
    manager = task_manager()
    for name, (_, partner_name) in ADVERSARIAL.items():
        task, partner = built_tasks[name], built_tasks[partner_name]
        ours, theirs = task_config(manager, name), task_config(manager, partner_name)
        for field in ("doc_to_text", "doc_to_choice", "target_delimiter", "output_type", "metric_list"):
            assert ours[field] == theirs[field], (name, field)
        assert task.config.target_delimiter == partner.config.target_delimiter == " "
        for doc in list(task.eval_docs)[:3]:
            clean = _partner_view(name, doc)
            assert task.doc_to_text(doc) == partner.doc_to_text(clean), name
            assert task.doc_to_choice(doc) == partner.doc_to_choice(clean), name
            if name != "pefteval_adv_hans":
                assert task.doc_to_target(doc) == partner.doc_to_target(clean) == doc["label"], name
    # PAWS: the sentence pair is shown exactly where QQP shows its question pair.
    paws = next(iter(built_tasks["pefteval_adv_paws"].eval_docs))
    assert built_tasks["pefteval_adv_paws"].doc_to_text(paws).startswith(f"Text 1: {paws['question1']}\nText 2: ")
    assert paws["question1"] == _paws(1)[0]["sentence1"]


def test_hans_scores_two_classes_with_mnli_label_words(built_tasks):
    hans = built_tasks["pefteval_adv_hans"]
    assert hans.doc_to_choice({"premise": "a", "hypothesis": "b", "label": 0}) == ["yes", "maybe", "no"]

    def acc(label: int, answer: int) -> float:
        lls = [-3.0, -3.0, -3.0]
        lls[answer] = -1.0
        doc = {"premise": "a", "hypothesis": "b", "label": label}
        return hans.process_results(doc, [(ll, False) for ll in lls])["acc"]

    # Entailment is right only as "yes"; non-entailment is right as "maybe" (neutral) or "no" (contradiction).
    assert [acc(0, answer) for answer in range(3)] == [1.0, 0.0, 0.0]
    assert [acc(1, answer) for answer in range(3)] == [0.0, 1.0, 1.0]


def test_training_examples_for_every_task_with_a_training_split(built_tasks):
    for name, task in built_tasks.items():
        if name in NOT_TRAINABLE:
            with pytest.raises(ValueError, match="no training split"):
                training_examples(task)
            continue
        examples = training_examples(task, limit=3)
        docs = list(task.training_docs())[:3]
        assert len(examples) == 3, name
        for example, doc in zip(examples, docs, strict=True):
            if task.OUTPUT_TYPE == "multiple_choice":
                # The gold request lm-eval scores for this doc is exactly the training string.
                contexts = task.fewshot_context(doc=doc, num_fewshot=0)
                gold = task.doc_to_text(doc) if task.multiple_input else task.doc_to_target(doc)
                requests = task.construct_requests(doc, contexts, metadata=(name, 0, 1))
                assert requests[gold].arguments == (example.prompt, example.continuation), name
            else:
                until = task.config.generation_kwargs["until"][0]
                assert example.prompt == task.doc_to_text(doc), name
                assert example.continuation == f" {gold_target(task, doc)}{until}", name


def test_special_training_renderings(built_tasks):
    # Winogrande: the gold option fills the blank in the prompt; the continuation is the rest.
    winogrande = built_tasks["pefteval_peft_winogrande"]
    doc = next(iter(winogrande.training_docs()))
    blank = doc["sentence"].index("_")
    option = doc["option1"] if doc["answer"] == "1" else doc["option2"]
    example = training_examples(winogrande, limit=1)[0]
    assert example.prompt == doc["sentence"][:blank] + option
    assert example.continuation == " " + doc["sentence"][blank + 1 :].strip()
    # Label-string choices (ARC): the gold choice's text.
    arc = built_tasks["pefteval_peft_arc_challenge"]
    doc = next(iter(arc.training_docs()))
    gold = doc["choices"]["text"][doc["choices"]["label"].index(doc["answerKey"])]
    assert training_examples(arc, limit=1)[0].continuation == f" {gold}"
    # GSM8K trains on the worked solution, up to its "#### <number>" line, then the stop sequence.
    gsm8k = training_examples(built_tasks["pefteval_peft_gsm8k"], limit=1)[0]
    assert "\n#### " in gsm8k.continuation and gsm8k.continuation.endswith("\n\n")
    # Alpaca trains on its train split minus the held-out slice it is scored on.
    alpaca = built_tasks["pefteval_peft_alpaca"]
    train, held = list(alpaca.training_docs()), list(alpaca.eval_docs)
    assert held and len(train) + len(held) == len(BUILT["alpaca"]["train"])
    assert not {d["instruction"] for d in train} & {d["instruction"] for d in held}
    with_input = next(d for d in train if d["input"])
    expected = f"Instruction: {with_input['instruction']}\nInput: {with_input['input']}\nResponse:"
    assert alpaca.doc_to_text(with_input) == expected
    without = next(d for d in train if not d["input"])
    assert alpaca.doc_to_text(without) == f"Instruction: {without['instruction']}\nResponse:"


# ---------------------------------------------------------------------------------- on the tiny model


@pytest.mark.slow  # 27 tasks on the tiny model, generation included
def test_every_task_reports_its_primary_metric_on_the_tiny_model(use_task_data, tiny_model_dir):
    import lm_eval

    out = lm_eval.simple_evaluate(
        model="hf",
        model_args=f"pretrained={tiny_model_dir}",
        tasks=["pefteval-peft15", "pefteval-adv11"],
        task_manager=task_manager(),
        limit=4,
        batch_size=8,
        device="cpu",
        bootstrap_iters=0,  # lm-eval's default bootstraps mcc and f1 100,000 times
        gen_kwargs="max_gen_toks=32",  # the tiny model's context is 256 tokens; gsm8k and ifeval allow 256
    )
    results = out["results"]
    for name in ALL:
        value = results[name][f"{PRIMARY[name]},none"]
        assert isinstance(value, float | int) and math.isfinite(value), (name, value)
    for group in ("pefteval-peft15", "pefteval-adv11"):
        assert math.isfinite(results[group]["acc,none"]), group


# The stock CLI cannot set bootstrap_iters: lm-eval then bootstraps the stderr of mcc and f1 (CoLA, MRPC,
# QQP, PAWS, AdvGLUE QQP) 100,000 times, minutes per task on a small CPU. This run keeps to tasks whose
# stderr is closed-form or capped (BLEU), and covers each output type and group aggregation once.
@pytest.mark.slow  # a real lm_eval run (about 25 s)
def test_stock_lm_eval_cli_runs_the_tasks(use_task_data, tiny_model_dir, tmp_path):
    tasks = "pefteval-peft-reasoning,pefteval-peft-instruction,pefteval-peft-generation,pefteval_adv_hans"
    command = [
        LM_EVAL, "--include_path", str(task_configs_path()), "--tasks", tasks,
        "--model", "hf", "--model_args", f"pretrained={tiny_model_dir}", "--device", "cpu",
        "--limit", "2", "--batch_size", "8", "--gen_kwargs", "max_gen_toks=8", "--output_path", str(tmp_path),
    ]  # fmt: skip
    run = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    results = json.loads(next(tmp_path.rglob("results_*.json")).read_text())["results"]
    for name in [*FAMILIES["pefteval-peft-reasoning"], *FAMILIES["pefteval-peft-instruction"],
                 *FAMILIES["pefteval-peft-generation"], "pefteval_adv_hans"]:  # fmt: skip
        assert math.isfinite(results[name][f"{PRIMARY[name]},none"]), name
    assert math.isfinite(results["pefteval-peft-reasoning"]["acc,none"])
