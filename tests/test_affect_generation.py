"""The affective generative tasks (pefteval_affect_eq_bench, _esconv, _empathetic): the AG metrics (BLEU-2,
ROUGE-L, Distinct-1/2) against sacrebleu and hand-computed values, EQ-Bench scoring of hand-written answers,
the ESConv loader on both record forms and the EmpatheticDialogues loader on records in the hub schema, the
task configs and groups, and the three tasks run on the tiny model.

Data: EQ-Bench and ESConv are the real records under PEFTEVAL_DATA_DIR (tests that need them skip when it is
unset; the ESConv sample is in the Blenderbot line form). There is no EmpatheticDialogues sample: the tests
write records in the facebook/empathetic_dialogues schema themselves.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
from pathlib import Path

import pytest
import sacrebleu

from pefteval_harness import generation_metrics as gm
from pefteval_harness.errors import BadInput
from pefteval_harness.tasks import primary_metric, resolve_tasks, task_config, task_configs_path, task_manager
from pefteval_harness.tasks.data import DATA_DIR_ENV, missing_file

OURS = ["pefteval_affect_eq_bench", "pefteval_affect_esconv", "pefteval_affect_empathetic"]
AG = ["pefteval_affect_esconv", "pefteval_affect_empathetic"]
PRIMARY = {
    "pefteval_affect_eq_bench": "eqbench",
    "pefteval_affect_esconv": "bleu2",
    "pefteval_affect_empathetic": "bleu2",
}


def _utils():
    """The task folder's hook module, imported as lm-eval imports it (by file)."""
    path = task_configs_path() / "affective" / "utils_generation.py"
    spec = importlib.util.spec_from_file_location("affective_utils_generation", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _shared(key: str, split: str) -> Path:
    value = os.environ.get(DATA_DIR_ENV)
    if not value:
        pytest.skip(f"{DATA_DIR_ENV} is not set: this test reads the catalogue's real records from it")
    return Path(value) / key / f"{split}.jsonl"


def _write(root: Path, key: str, split: str, records: list[dict]) -> None:
    path = root / key / f"{split}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")


def _empathetic_records(conversations: list[tuple[str, str, str, list[str]]]) -> list[dict]:
    """Rows in the facebook/empathetic_dialogues schema: one per utterance, "_comma_" for commas."""
    rows = []
    for conv_id, emotion, situation, utterances in conversations:
        for number, text in enumerate(utterances, 1):
            rows.append({
                "conv_id": conv_id, "utterance_idx": number, "context": emotion,
                "prompt": situation.replace(",", "_comma_"), "speaker_idx": 100 + number % 2,
                "utterance": text.replace(",", "_comma_"), "selfeval": "5|5|5_2|2|5", "tags": "",
            })  # fmt: skip
    return rows


EMPATHETIC_TEST = [
    ("hit:1_conv:2", "proud", "I finished my first marathon, slowly",
     ["I ran my first marathon yesterday!", "Wow, congratulations! How do you feel?", "Tired, but so proud.",
      "You should be, that is a huge achievement."]),
    ("hit:3_conv:6", "afraid", "A storm knocked out our power",
     ["The storm last night was terrifying.", "Oh no, was anyone hurt?", "No, we just lost power."]),
]  # fmt: skip
EMPATHETIC_TRAIN = [
    ("hit:7_conv:14", "grateful", "My neighbour fixed my fence",
     ["My neighbour fixed my fence for free.", "That is so kind of them!"]),
]  # fmt: skip


# ------------------------------------------------------------------------------------------- metrics


def test_bleu2_is_sacrebleus_corpus_bleu_with_bigrams_lowercased():
    # Hand-computed: unigram precision 5/6, bigram precision 3/5, no brevity penalty: sqrt(1/2).
    assert gm.bleu2([("the cat is on the mat", "The cat sat on the mat")]) == pytest.approx(100 * math.sqrt(0.5))
    items = [
        ("I am so sorry to hear that.", "i am sorry to hear that"),
        ("That sounds really hard, how are you coping?", "That must be hard. How are you?"),
        ("Have you talked to her about it?", "Did you talk to your friend"),
    ]
    golds, replies = zip(*items, strict=True)
    bigram = sacrebleu.metrics.BLEU(max_ngram_order=2, lowercase=True, tokenize="13a")
    assert gm.bleu2(items) == pytest.approx(bigram.corpus_score(list(replies), [list(golds)]).score)
    four = sacrebleu.corpus_bleu([r.lower() for r in replies], [[g.lower() for g in golds]], tokenize="13a")
    assert gm.bleu2(items) > four.score  # order 2, not sacrebleu's default 4
    # Corpus level: n-gram counts pooled over documents (7/8 unigrams, 4/6 bigrams), not sentence scores averaged.
    pooled = [("the cat is on the mat", "the cat sat on the mat"), ("a dog", "a dog")]
    assert gm.bleu2(pooled) == pytest.approx(100 * math.sqrt(7 / 8 * 4 / 6))
    assert gm.bleu2([]) == 0.0


def test_rouge_l_is_the_lcs_f_measure_of_each_reply_then_averaged():
    # LCS of "the cat sat on the mat" and "the cat is on the mat": "the cat on the mat", 5 of 6 tokens each way.
    doc = {"reply": "The cat is on the mat"}
    out = gm.ag_results(doc, ["  the cat sat on the mat\n"])
    assert out["rougeL"] == pytest.approx(5 / 6)
    assert out["bleu2"] == ("The cat is on the mat", "the cat sat on the mat")
    assert out["distinct1"] == out["distinct2"] == "the cat sat on the mat"
    assert out["parsed"] == 1.0
    # Precision 2/2, recall 2/4: F = 2/3.
    assert gm.ag_results({"reply": "I feel so sad"}, ["so sad"])["rougeL"] == pytest.approx(2 / 3)
    empty = gm.ag_results(doc, [" \t "])
    assert (empty["rougeL"], empty["parsed"], empty["distinct1"]) == (0.0, 0.0, "")


def test_distinct_n_counts_distinct_ngrams_over_all_replies():
    replies = ["I am so sorry", "I am glad!"]
    # Tokens: [i, am, so, sorry], [i, am, glad, !]: 8 unigrams, 6 distinct; 6 bigrams, 5 distinct (i am twice).
    assert gm.tokens("I am glad!") == ["i", "am", "glad", "!"]
    assert gm.distinct1(replies) == pytest.approx(6 / 8)
    assert gm.distinct2(replies) == pytest.approx(5 / 6)
    # No bigram spans two replies: "sorry i" is not counted.
    assert gm.distinct2(["sorry", "i"]) == 0.0
    assert gm.distinct1(["", "  "]) == 0.0
    assert gm.distinct1(["Yes yes YES"]) == pytest.approx(1 / 3)


def test_eq_bench_scores_hand_written_answers_as_lm_eval_does():
    doc = {
        "reference_answer_fullscale": "{'emotion1': 'Defensive', 'emotion2': 'Empathy', 'emotion3': 'Fear',"
        " 'emotion4': 'Condescension', 'emotion1_score': '7', 'emotion2_score': 0, 'emotion3_score': 0,"
        " 'emotion4_score': '5'}"
    }
    exact = "Defensive: 7\nEmpathy: 0\nFear: 0\nCondescension: 5"
    assert gm.eq_bench_results(doc, [exact]) == {"eqbench": 100.0, "parsed": 1.0}
    # Off by 2 on one emotion: the S-shaped penalty 6.5 / (1 + e^(-1.2 (2 - 4))), scaled by 0.7477, x10.
    penalty = 6.5 / (1 + math.exp(2.4))
    off = gm.eq_bench_results(doc, ["First pass scores:\nDefensive: 5\nEmpathy: 0\nFear: 0\nCondescension: 5"])
    assert off == {"eqbench": pytest.approx((10 - penalty * 0.7477) * 10), "parsed": 1.0}
    # Off by 6 (beyond 5): the difference itself; the last score of an emotion wins (the revised scores).
    revised = exact.replace("Defensive: 7", "Defensive: 1") + "\n\nRevised scores:\nDefensive: 1"
    assert gm.eq_bench_results(doc, [revised])["eqbench"] == pytest.approx((10 - 6 * 0.7477) * 10)
    # Unparsed (no scores), partially parsed (3 emotions; or 4 with one not in the reference): 0, not parsed.
    for answer in ["I think Robert is defensive.", "Defensive: 7\nEmpathy: 0\nFear: 0",
                   "Defensive: 7\nEmpathy: 0\nFear: 0\nAnger: 5"]:  # fmt: skip
        assert gm.eq_bench_results(doc, [answer]) == {"eqbench": 0.0, "parsed": 0.0}, answer


# ------------------------------------------------------------------------------------------- loaders


def test_esconv_hf_form_gives_one_doc_per_supporter_turn_after_the_first(tmp_path, monkeypatch):
    dialog = [
        {"text": "Hi, how can I help?", "speaker": "sys", "strategy": "Question"},
        {"text": "I lost my  job.", "speaker": "usr"},
        {"text": "I am sorry to hear that.", "speaker": "sys", "strategy": "Reflection of feelings"},
        {"text": "Have you looked for another one?", "speaker": "sys", "strategy": "Question"},
        {"text": "Not yet.", "speaker": "usr"},
    ]
    record = {"text": json.dumps({"emotion_type": "sadness", "problem_type": "job crisis", "situation": "x",
                                  "dialog": dialog})}  # fmt: skip
    docs = _utils().esconv_docs([record], context_turns=2)
    assert docs == [
        {"conversation": 0, "turn": 2, "context": ["Supporter: Hi, how can I help?", "Seeker: I lost my job."],
         "reply": "I am sorry to hear that.", "strategy": "Reflection of feelings"},
        {"conversation": 0, "turn": 3, "context": ["Seeker: I lost my job.", "Supporter: I am sorry to hear that."],
         "reply": "Have you looked for another one?", "strategy": "Question"},
    ]  # fmt: skip
    # Through the loader hook: an HF-form test file; the missing (optional) train split stays empty and
    # still names the file it would be read from.
    _write(tmp_path, "esconv", "test", [record])
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path))
    kwargs = {"data_key": "esconv", "hf_path": "thu-coai/esconv", "splits": ["train", "test"]}
    loaded = _utils().load_esconv(**kwargs, optional_splits=["train"], context_turns=2)
    assert list(loaded["test"]) == docs
    assert len(loaded["train"]) == 0 and missing_file(loaded["train"]).startswith(str(tmp_path / "esconv"))
    with pytest.raises(BadInput, match="context_turns"):
        _utils().load_esconv(**kwargs, optional_splits=["train"], context_turns=0)
    with pytest.raises(BadInput, match="record 0: dialog turn 1"):
        _utils().esconv_docs([{"text": json.dumps({"dialog": [dialog[0], {"speaker": "bot", "text": "?"}]})}])


def test_esconv_line_form_of_the_shared_sample_gives_the_docs_of_the_hf_form():
    lines = [json.loads(line) for line in _shared("esconv", "test").read_text().splitlines() if line]
    utils = _utils()
    docs = utils.esconv_docs(lines, context_turns=4)
    assert len(docs) == len(lines)
    first = docs[1]
    assert first["context"] == [
        "Seeker: Hello, my name is dj, thank you for your time. How are you?",
        "Supporter: Hi, i'm vicky! I'm doing pretty well :) How can i help you through your issues today?",
        "Seeker: I'm glad to hear that you are doing well. As far as the issue, i'm not sure how you can other than"
        " listening and encouraging.",
    ]
    assert first["reply"].startswith("No problem! I would love") and first["strategy"] == "Affirmation and Reassurance"
    assert all(1 <= len(d["context"]) <= 4 and not d["reply"].startswith("[") for d in docs)
    assert len({d["conversation"] for d in docs}) == 30  # the manifest's 30 sampled conversations
    # The first conversation rebuilt from its lines' turns, in the HF form: the same documents.
    conversation = [d for d in docs if d["conversation"] == 0]
    turns = {}
    for line in lines[: len(conversation)]:
        for segment in line["text"].split(" EOS "):
            turn = utils._tsv_turn(segment, "test")
            turns[turn["turn"]] = turn
    assert sorted(turns) == list(range(len(turns)))
    dialog = [{"text": t["text"], "speaker": "sys" if t["role"] == "Supporter" else "usr", "strategy": t["strategy"]}
              for _, t in sorted(turns.items())]  # fmt: skip
    assert utils.esconv_docs([{"text": json.dumps({"dialog": dialog})}], context_turns=4) == conversation


def test_empathetic_docs_are_the_listener_turns_in_order(tmp_path, monkeypatch):
    records = _empathetic_records(EMPATHETIC_TEST)
    docs = _utils().empathetic_docs(list(reversed(records)))  # rows in any order: utterance_idx orders turns
    order = [(d["conversation"], d["turn"]) for d in docs]
    assert order == [("hit:3_conv:6", 1), ("hit:1_conv:2", 1), ("hit:1_conv:2", 3)]  # conversations as first seen
    assert docs[2] == {
        "conversation": "hit:1_conv:2", "turn": 3,
        "context": ["Speaker: I ran my first marathon yesterday!", "Listener: Wow, congratulations! How do you feel?",
                    "Speaker: Tired, but so proud."],
        "reply": "You should be, that is a huge achievement.", "emotion": "proud",
        "situation": "I finished my first marathon, slowly",
    }  # fmt: skip
    with pytest.raises(BadInput, match="record 0: expected conv_id"):
        _utils().empathetic_docs([{"conv_id": "a", "utterance": "hi"}], split="test")
    # Through the task: the loader hook, the prompt and a one-shot context from the train split.
    _write(tmp_path, "empathetic", "test", records)
    _write(tmp_path, "empathetic", "train", _empathetic_records(EMPATHETIC_TRAIN))
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path))
    task = task_manager().load(["pefteval_affect_empathetic"])["tasks"]["pefteval_affect_empathetic"]
    doc = task.test_docs()[2]
    assert task.fewshot_context(doc, 0, gen_prefix=task.doc_to_prefix(doc)).endswith(
        "feels.\n\nSpeaker: The storm last night was terrifying.\nListener:"
    )
    assert "\nListener: That is so kind of them!\n\n" in task.fewshot_context(doc, 1, gen_prefix="Listener:")


# ----------------------------------------------------------------------------------- configs, groups


def test_the_tasks_and_groups_resolve_with_their_metadata_and_metrics():
    from lm_eval.tasks import TaskManager

    manager = task_manager()
    for name in OURS:
        config = task_config(manager, name)
        metadata = config["metadata"]
        assert primary_metric(config) == (PRIMARY[name], "none"), name
        assert metadata["form"] == "generative" and metadata["version"] == 1.0 and "base_task" not in metadata
        metrics = [m["metric"] for m in config["metric_list"]]
        if name in AG:
            assert metrics == ["bleu2", "rougeL", "distinct1", "distinct2", "parsed"], name
            assert (metadata["affect"], metadata["strategies"]) == ("generation", ["zero_shot", "k_shot"])
            assert config["fewshot_split"] == "train" and config["test_split"] == "test"
            assert config["generation_kwargs"] == {"until": ["\n"], "max_gen_toks": 64, "do_sample": False}
        else:
            assert metrics == ["eqbench", "parsed"]
            assert (metadata["affect"], metadata["strategies"]) == ("understanding", ["zero_shot"])
            assert "fewshot_split" not in config
    kwargs = {n: task_config(manager, n)["dataset_kwargs"] for n in OURS}
    assert kwargs["pefteval_affect_empathetic"]["hf_revision"] == "refs/convert/parquet"
    assert kwargs["pefteval_affect_esconv"]["hf_path"] == "thu-coai/esconv"
    assert kwargs["pefteval_affect_eq_bench"] == {"data_key": "eq_bench", "hf_path": "pbevan11/EQ-Bench",
                                                  "splits": ["validation"]}  # fmt: skip
    assert resolve_tasks(["pefteval-affect-ag"]).names == AG
    everything = resolve_tasks(["pefteval-affect"])
    assert everything.names[-3:] == OURS and {"pefteval-affect-au", "pefteval-affect-ag"} <= set(everything.groups)
    # What `lm_eval validate` checks (every name in the index of the plugin's folder), without indexing
    # lm-eval's built-in tasks (seconds).
    names = [*OURS, "pefteval-affect-ag", "pefteval-affect"]
    assert TaskManager(include_path=str(task_configs_path()), include_defaults=False).match_tasks(names) == sorted(
        names
    )


# ---------------------------------------------------------------------------------- on the tiny model


@pytest.mark.slow  # the three tasks on the tiny model (a few seconds)
def test_the_three_tasks_report_their_metrics_on_the_tiny_model(tmp_path, monkeypatch, tiny_model_dir):
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    for key, split in (("eq_bench", "validation"), ("esconv", "test")):
        (tmp_path / key).mkdir()
        (tmp_path / key / f"{split}.jsonl").symlink_to(_shared(key, split))
    _write(tmp_path, "empathetic", "test", _empathetic_records(EMPATHETIC_TEST))
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path))
    lm = HFLM(pretrained=str(tiny_model_dir), device="cpu", batch_size=8)
    out = lm_eval.simple_evaluate(
        model=lm,
        tasks=["pefteval_affect_eq_bench", "pefteval-affect-ag"],
        task_manager=task_manager(),
        limit=2,
        bootstrap_iters=0,
        log_samples=False,
    )
    results = out["results"]
    for name in OURS:
        metrics = ["eqbench", "parsed"] if name not in AG else ["bleu2", "rougeL", "distinct1", "distinct2", "parsed"]
        for metric in metrics:
            value = results[name][f"{metric},none"]
            assert isinstance(value, float | int) and math.isfinite(value), (name, metric, value)
        assert 0.0 <= results[name]["parsed,none"] <= 1.0, name
        assert out["n-samples"][name]["effective"] == 2, name
    for name in AG:
        assert all(0.0 <= results[name][f"{m},none"] <= 1.0 for m in ("rougeL", "distinct1", "distinct2"))
        assert 0.0 <= results[name]["bleu2,none"] <= 100.0
    assert 0.0 <= results["pefteval-affect-ag"]["parsed,none"] <= 1.0
