"""Local metrics: each checked against a reference (hand-computed values, rouge_score, sacrebleu, scikit-learn,
lm-eval's own IFEval checker) on hand-made inputs. IFEval runs in a fresh offline process with no nltk data."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import sacrebleu
from lm_eval.api import metrics as lm_metrics
from rouge_score import rouge_scorer
from sklearn import metrics as sk

from pefteval_harness import metrics

# --- SQuAD v1.1 -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prediction", "references", "exact_match", "f1"),
    [
        ("The Eiffel Tower!", ["eiffel tower"], 1.0, 1.0),  # case, punctuation, article
        ("  Denver\n Broncos ", ["Denver Broncos"], 1.0, 1.0),  # whitespace collapsed
        ("U.S.", ["US"], 1.0, 1.0),  # punctuation inside a word is removed too
        ("in the year 1889", ["1889"], 0.0, 0.5),  # tokens in, year, 1889: P 1/3, R 1
        ("Broncos", ["Denver Broncos", "Broncos", "the Denver Broncos"], 1.0, 1.0),  # max over references
        ("Denver", ["Denver Broncos", "Carolina Panthers"], 0.0, 2 / 3),  # P 1, R 1/2
        ("another theory", ["other theory"], 0.0, 0.5),  # "an" inside "another" is no article
        ("the the cat cat cat", ["cat dog"], 0.0, 0.4),  # multiplicity: shared 1, P 1/3, R 1/2
        ("Carolina Panthers", ["Denver Broncos"], 0.0, 0.0),
        ("", ["Denver"], 0.0, 0.0),
        ("The", ["the"], 1.0, 0.0),  # both normalise to "": equal, but no shared token (v1.1 script)
    ],
)
def test_squad_results(prediction, references, exact_match, f1):
    doc = {"answers": {"text": references, "answer_start": [0] * len(references)}}
    scores = metrics.squad_results(doc, [prediction])
    assert scores["exact_match"] == exact_match
    assert scores["f1"] == pytest.approx(f1)


def test_squad_normalisation_order():
    # Punctuation goes before articles: "the-end" becomes "theend", which is no article.
    assert metrics.normalize_squad_answer("The  (A) the-end, AN apple") == "theend apple"


# --- ROUGE-L and BLEU -------------------------------------------------------------------------------

ROUGE_CASES = [
    ("the cat sat on the mat", "the cat on the mat sat"),
    ("There is a pub near the river.", "The Eagle is a pub by the river, near Burger King."),
    ("Completely different words", "nothing shared here"),
    ("Running runs ran", "run running"),
]


@pytest.mark.parametrize(("prediction", "reference"), ROUGE_CASES)
def test_rouge_l_is_rouge_scores(prediction, reference):
    expected = rouge_scorer.RougeScorer(["rougeL"]).score(reference, prediction)["rougeL"].fmeasure
    assert metrics.rouge_l(prediction, reference) == pytest.approx(expected)


def test_rouge_l_by_hand():
    # LCS of "the cat on the mat sat" and "the cat sat on the mat" is "the cat on the mat": 5 of 6 tokens
    # each way, so P = R = F = 5/6. "cat sat" against the same reference: P = 1, R = 2/6, F = 0.5.
    assert metrics.rouge_l("the cat on the mat sat", "the cat sat on the mat") == pytest.approx(5 / 6)
    assert metrics.rouge_l("Cat, sat!", "the cat sat on the mat") == pytest.approx(0.5)
    # Several references: the best one counts.
    assert metrics.rouge_l("cat sat", ["dog", "the cat sat on the mat", "cat sat"]) == pytest.approx(1.0)
    assert metrics.rouge_l("cat sat", []) == 0.0


def test_alpaca_results():
    doc = {"instruction": "Name a pet.", "input": "", "output": "the cat sat on the mat"}
    assert metrics.alpaca_results(doc, ["cat sat"]) == {"rougeL": pytest.approx(0.5)}


E2E_DOCS = [
    {"meaning_representation": "name[Blue Spice], eatType[pub]", "human_reference": "Blue Spice is a pub."},
    {
        "meaning_representation": "name[The Eagle], near[Burger King]",
        "human_reference": "The Eagle is near Burger King and serves cheap food.",
    },
    {"meaning_representation": "name[Zizzi], food[Italian]", "human_reference": "Zizzi serves Italian food."},
]
E2E_PREDICTIONS = ["Blue Spice is a pub.", "The Eagle is a restaurant near Burger King.", "Zizzi is Italian."]


def test_e2e_results_feed_lm_evals_bleu():
    pairs = list(zip(E2E_DOCS, E2E_PREDICTIONS, strict=True))
    scored = [metrics.e2e_results(doc, [pred]) for doc, pred in pairs]
    assert [s["bleu"] for s in scored] == [(doc["human_reference"], pred) for doc, pred in pairs]
    expected = sacrebleu.corpus_bleu(E2E_PREDICTIONS, [[d["human_reference"] for d in E2E_DOCS]]).score
    assert lm_metrics.bleu([s["bleu"] for s in scored]) == pytest.approx(expected)
    assert 0 < expected < 100
    for (doc, pred), s in zip(pairs, scored, strict=True):
        assert s["rougeL"] == pytest.approx(metrics.rouge_l(pred, doc["human_reference"]))


def test_e2e_results_with_several_references():
    refs = [["Blue Spice is a pub.", "A pub: Blue Spice."], ["Zizzi serves Italian food.", "Zizzi is Italian."]]
    preds = ["Blue Spice is a pub.", "Zizzi is an Italian place."]
    items = [metrics.e2e_results({"human_reference": r}, [p])["bleu"] for r, p in zip(refs, preds, strict=True)]
    expected = sacrebleu.corpus_bleu(preds, [[r[0] for r in refs], [r[1] for r in refs]]).score
    assert lm_metrics.bleu(items) == pytest.approx(expected)


# --- GSM8K ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("generation", "expected"),
    [
        ("He buys it for 80,000 and sells for 150,000, so the profit is $70,000.", 1.0),
        ("Profit = 200000 - 130000 = 70000\n#### 70000\n\nQuestion: Another one with 5", 1.0),
        ("#### 70000.00", 1.0),
        ("#### 70,000", 1.0),
        ("The profit is 70000 dollars, not 7000.", 0.0),  # the last number counts
        ("I do not know.", 0.0),  # unparseable: wrong, not an error
        ("", 0.0),
    ],
)
def test_gsm8k_results(generation, expected):
    doc = {"question": "How much profit?", "answer": "200,000-130,000=$<<200000-130000=70000>>70,000\n#### 70000"}
    assert metrics.gsm8k_results(doc, [generation]) == {"exact_match": expected}


def test_gsm8k_negative_and_decimal_references():
    assert metrics.gsm8k_results({"answer": "#### -3"}, ["The change is -3."]) == {"exact_match": 1.0}
    assert metrics.gsm8k_results({"answer": "#### 3.5"}, ["It costs $3.50"]) == {"exact_match": 1.0}


def test_gsm8k_reference_without_marker_is_an_error():
    with pytest.raises(ValueError, match="####"):
        metrics.gsm8k_results({"answer": "70000"}, ["70000"])


# --- Classification aggregations --------------------------------------------------------------------

GOLDS = [0, 1, 2, 2, 1, 0, 2, 1, 1, 0, 2, 2]
PREDS = [0, 2, 2, 2, 1, 1, 0, 1, 1, 0, 2, 1]
ITEMS = list(zip(GOLDS, PREDS, strict=True))


def test_macro_and_weighted_f1_are_sklearns():
    assert metrics.macro_f1(ITEMS) == pytest.approx(sk.f1_score(GOLDS, PREDS, average="macro"))
    assert metrics.weighted_f1(ITEMS) == pytest.approx(sk.f1_score(GOLDS, PREDS, average="weighted"))
    text_items = [("joy", "joy"), ("anger", "joy"), ("sadness", "sadness"), ("joy", "neutral")]
    golds, preds = zip(*text_items, strict=True)
    assert metrics.macro_f1(text_items) == pytest.approx(sk.f1_score(golds, preds, average="macro", zero_division=0))
    assert metrics.weighted_f1(text_items) == pytest.approx(
        sk.f1_score(golds, preds, average="weighted", zero_division=0)
    )


def test_positive_f1_is_sklearns_binary_f1():
    binary = [(g % 2, p % 2) for g, p in ITEMS]
    golds, preds = zip(*binary, strict=True)
    assert metrics.positive_f1(binary) == pytest.approx(sk.f1_score(golds, preds))
    # Identical to lm-eval's built-in binary `f1` aggregation on 0/1 labels.
    assert metrics.positive_f1(binary) == pytest.approx(lm_metrics.f1_score(binary))


def test_unparsed_predictions_are_wrong_and_no_class():
    items = [(0, 0), (1, None), (1, 1), (0, None)]
    # None is wrong for its gold label; macro-F1 averages over the real classes 0 and 1 only.
    expected = sk.f1_score([0, 1, 1, 0], [0, -1, 1, -1], labels=[0, 1], average="macro")
    assert metrics.macro_f1(items) == pytest.approx(expected)
    assert metrics.positive_f1(items) == pytest.approx(sk.f1_score([0, 1, 1, 0], [0, 0, 1, 0]))
    assert metrics.macro_f1([(0, None), (1, None)]) == 0.0


def test_lm_evals_mcc_and_f1_are_sklearns():
    binary = [(g % 2, p % 2) for g, p in ITEMS]
    golds, preds = zip(*binary, strict=True)
    assert lm_metrics.matthews_corrcoef(binary) == pytest.approx(sk.matthews_corrcoef(golds, preds))
    assert lm_metrics.f1_score(binary) == pytest.approx(sk.f1_score(golds, preds))


def test_class_f1_averages_the_named_classes():
    per_class = sk.f1_score(GOLDS, PREDS, labels=[1, 2], average=None)
    assert metrics.class_f1(ITEMS, [1, 2]) == pytest.approx(per_class.mean())


# --- IFEval, offline --------------------------------------------------------------------------------

_KWARG_NAMES = (
    "num_highlights relation num_words num_placeholders prompt_to_repeat num_bullets section_spliter num_sections "
    "capital_relation capital_frequency keywords num_paragraphs language let_relation letter let_frequency "
    "end_phrase forbidden_words keyword frequency num_sentences postscript_marker first_word nth_paragraph"
).split()


def _ifeval_doc(key: int, instructions: list[tuple[str, dict]]) -> dict:
    """A record shaped like google/IFEval's: every kwargs entry has the union of kwarg names, None when absent."""
    return {
        "key": key,
        "prompt": "Answer the question as instructed.",
        "instruction_id_list": [instruction for instruction, _ in instructions],
        "kwargs": [{name: kwargs.get(name) for name in _KWARG_NAMES} for _, kwargs in instructions],
    }


# (doc, response, strict per instruction, loose per instruction)
IFEVAL_CASES = [
    (
        _ifeval_doc(
            1, [("punctuation:no_comma", {}), ("startend:end_checker", {"end_phrase": "Any other questions?"})]
        ),
        "Sure, here you go\nThe plan is simple\nAny other questions?",
        [False, True],
        [True, True],  # loose drops the first line, which holds the comma
    ),
    (
        # Two sentences: "Dr." ends none (a plain untrained Punkt tokenizer would count three).
        _ifeval_doc(2, [("length_constraints:number_sentences", {"num_sentences": 3, "relation": "less than"})]),
        "Dr. Smith arrived at noon. He sat down.",
        [True],
        [True],
    ),
    (
        _ifeval_doc(
            3,
            [
                ("length_constraints:number_sentences", {"num_sentences": 3, "relation": "at least"}),
                ("change_case:capital_word_frequency", {"capital_frequency": 2, "capital_relation": "at least"}),
            ],
        ),
        "One fish. Two fish. RED fish. BLUE fish.",
        [True, True],
        [True, True],
    ),
    (
        _ifeval_doc(
            4,
            [
                ("change_case:capital_word_frequency", {"capital_frequency": 2, "capital_relation": "at least"}),
                ("change_case:english_lowercase", {}),
            ],
        ),
        "this answer is written in calm and quiet english words, with nothing shouted at all.",
        [False, True],
        [False, True],
    ),
    (_ifeval_doc(5, [("punctuation:no_comma", {})]), "", [False], [False]),  # an empty response follows nothing
    (
        # "#" is no letter: lm-eval draws a random one (seeded by the key here); no letter occurs 50 times.
        _ifeval_doc(
            6, [("keywords:letter_frequency", {"letter": "#", "let_frequency": 50, "let_relation": "at least"})]
        ),
        "A short answer.",
        [False],
        [False],
    ),
]

def _run_script(script: str, stdin: object, env: dict) -> subprocess.CompletedProcess:
    """A Python script in a fresh process (this environment's nltk state untouched), fed JSON on stdin."""
    done = subprocess.run(
        [sys.executable, "-c", script],
        input=json.dumps(stdin),
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done


_IFEVAL_SCRIPT = textwrap.dedent(
    """
    import json, os, sys

    network = []

    # Connections and name lookups (urllib3's import-time IPv6 probe only binds a socket to ::1).
    NETWORK_EVENTS = {"socket.connect", "socket.getaddrinfo", "socket.gethostbyname", "socket.sendto", "urllib.Request"}

    def refuse_network(event, args):
        if event in NETWORK_EVENTS:
            network.append(event)
            raise RuntimeError("network access attempted: " + event)

    sys.addaudithook(refuse_network)

    import nltk

    # Only the empty folder is searched, even where a user folder (~/nltk_data) holds punkt_tab.
    nltk.data.path[:] = [os.environ["NLTK_DATA"]]
    downloads = []
    nltk.download = lambda *args, **kwargs: downloads.append(args) or False

    from pefteval_harness import metrics

    request = json.load(sys.stdin)
    scored = [metrics.ifeval_results(doc, [response]) for doc, response in request["cases"]]
    # The aggregation over the hand-made records only.
    aggregates = {
        name: metrics.ifeval_inst_level_acc([s[name] for s in scored[: request["hand"]]])
        for name in ("inst_level_strict_acc", "inst_level_loose_acc")
    }
    again = [metrics.ifeval_results(doc, [response]) for doc, response in request["cases"]]
    result = {"scored": scored, "aggregates": aggregates, "repeatable": again == scored}
    json.dump({**result, "network": network, "downloads": downloads}, sys.stdout)
    """
)


def _real_ifeval_records() -> list[dict]:
    root = os.environ.get("PEFTEVAL_DATA_DIR")
    if not root:
        return []
    with open(Path(root) / "ifeval" / "train.jsonl", encoding="utf-8") as lines:
        return [json.loads(line) for line in lines if line.strip()]


@pytest.fixture(scope="module")
def offline_ifeval(tmp_path_factory) -> dict:
    """IFEval scored in a fresh process: HF offline, nltk searching an empty folder, any network use refused."""
    nltk_data = tmp_path_factory.mktemp("nltk_data")
    real = _real_ifeval_records()
    # Real records with two responses each: the prompt itself and a lower-cased, comma-free version of it.
    real_cases = [[doc, doc["prompt"]] for doc in real]
    real_cases += [[doc, doc["prompt"].lower().replace(",", "")] for doc in real]
    cases = [[doc, response] for doc, response, _, _ in IFEVAL_CASES] + real_cases
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env["NLTK_DATA"] = str(nltk_data)
    done = _run_script(_IFEVAL_SCRIPT, {"cases": cases, "hand": len(IFEVAL_CASES)}, env)
    out = json.loads(done.stdout)
    out["stderr"] = done.stderr
    out["nltk_data_files"] = list(nltk_data.iterdir())
    out["hand"] = out["scored"][: len(IFEVAL_CASES)]
    out["real"] = list(zip([doc for doc, _ in real_cases], out["scored"][len(IFEVAL_CASES) :], strict=True))
    return out


def test_ifeval_runs_offline_without_downloading(offline_ifeval):
    assert offline_ifeval["network"] == []
    assert offline_ifeval["downloads"] == []  # nltk.download was never called
    assert offline_ifeval["nltk_data_files"] == []
    assert "Downloaded punkt_tab" not in offline_ifeval["stderr"]
    # One line says what is missing and what differs.
    assert offline_ifeval["stderr"].count(metrics.PUNKT_MISSING_NOTE) == 1


@pytest.mark.parametrize("index", range(len(IFEVAL_CASES)))
def test_ifeval_hand_made_records(offline_ifeval, index):
    _, _, strict, loose = IFEVAL_CASES[index]
    assert offline_ifeval["hand"][index] == {
        "prompt_level_strict_acc": float(all(strict)),
        "inst_level_strict_acc": strict,
        "prompt_level_loose_acc": float(all(loose)),
        "inst_level_loose_acc": loose,
    }


def test_ifeval_scores_repeat(offline_ifeval):
    assert offline_ifeval["repeatable"]


def test_ifeval_inst_level_acc(offline_ifeval):
    # Over all instructions of all documents: 5 of 9 strict, 6 of 9 loose.
    strict = [followed for _, _, s, _ in IFEVAL_CASES for followed in s]
    loose = [followed for _, _, _, s in IFEVAL_CASES for followed in s]
    assert sum(strict) / len(strict) == 5 / 9 and sum(loose) / len(loose) == 6 / 9
    assert offline_ifeval["aggregates"] == {"inst_level_strict_acc": 5 / 9, "inst_level_loose_acc": 6 / 9}


def _valid_letter(letter: str | None) -> bool:
    return letter is None or (len(letter) == 1 and "a" <= letter.lower() <= "z")


def test_ifeval_real_records(offline_ifeval):
    if not offline_ifeval["real"]:
        pytest.skip("PEFTEVAL_DATA_DIR is not set: no real google/IFEval records to score")
    ids = {instruction for doc, _ in offline_ifeval["real"] for instruction in doc["instruction_id_list"]}
    # The two checks that need nltk's punkt model are among the ones that ran offline.
    assert {"length_constraints:number_sentences", "change_case:capital_word_frequency"} <= ids
    for doc, scores in offline_ifeval["real"]:
        for level in ("strict", "loose"):
            followed = scores[f"inst_level_{level}_acc"]
            assert len(followed) == len(doc["instruction_id_list"])
            assert scores[f"prompt_level_{level}_acc"] == float(all(followed))
        # Loose tries the strict response among others: it never follows fewer instructions, except where
        # lm-eval draws a random parameter, separately for each (a `letter` that is not one letter a-z).
        checks = zip(doc["kwargs"], scores["inst_level_strict_acc"], scores["inst_level_loose_acc"], strict=True)
        assert all(loose or not strict for kwargs, strict, loose in checks if _valid_letter(kwargs.get("letter")))
    # Echoing the prompt follows some instructions (no_comma, for one, after dropping commas) and not all.
    share = sum(s["prompt_level_loose_acc"] for _, s in offline_ifeval["real"]) / len(offline_ifeval["real"])
    assert 0 < share < 1


def test_untrained_sentence_tokenizer_knows_common_abbreviations():
    tokenizer = metrics._untrained_sentence_tokenizer()
    text = "Dr. Smith met Mr. Jones at 3 p.m. in the U.S. capital, e.g. near the mall. Then they left! Why?"
    assert tokenizer.tokenize(text) == [
        "Dr. Smith met Mr. Jones at 3 p.m. in the U.S. capital, e.g. near the mall.",
        "Then they left!",
        "Why?",
    ]


_INSTALLED_MODEL_SCRIPT = textwrap.dedent(
    """
    import json, os, sys

    import nltk

    nltk.data.path[:] = [os.environ["NLTK_DATA"]]
    from pefteval_harness import metrics
    from lm_eval.tasks.ifeval import instructions_util

    doc = json.load(sys.stdin)
    scores = metrics.ifeval_results(doc, ["Dr. Smith arrived at noon. He sat down."])
    print(json.dumps({"unchanged": instructions_util.nltk is nltk, "scores": scores}))
    """
)


def test_ifeval_uses_an_installed_punkt_model_unchanged(tmp_path):
    # A minimal punkt_tab English model in nltk's own file format: one abbreviation, "dr".
    english = tmp_path / "tokenizers" / "punkt_tab" / "english"
    english.mkdir(parents=True)
    for name in ("collocations.tab", "sent_starters.txt", "ortho_context.tab"):
        (english / name).write_text("")
    (english / "abbrev_types.txt").write_text("dr\n")
    doc = _ifeval_doc(7, [("length_constraints:number_sentences", {"num_sentences": 3, "relation": "less than"})])
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "NLTK_DATA": str(tmp_path)}
    done = _run_script(_INSTALLED_MODEL_SCRIPT, doc, env)
    out = json.loads(done.stdout)
    assert out["unchanged"]  # lm-eval's checker reaches nltk itself, not the stand-in
    assert out["scores"]["inst_level_strict_acc"] == [True]
    assert metrics.PUNKT_MISSING_NOTE not in done.stderr
