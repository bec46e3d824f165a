"""Metrics computed locally for the task YAMLs: lm-eval `process_results` hooks and aggregations.

Task folders re-export these through their utils.py (`process_results: !function utils.squad_results`,
`aggregation: !function utils.macro_f1`). Nothing here is fetched at run time: lm-eval loads any metric
name it does not register from the HuggingFace hub, so every hook returns metric names that its YAML
pairs with an explicit `aggregation` (lm-eval's `mean` or `bleu`, or a function of this module).

Scales: every per-document score is in [0, 1] (SQuAD and DROP EM and F1 too, where the official scripts
report 0-100), except BLEU, on sacrebleu's 0-100 scale: lm-eval's `bleu` aggregation (corpus BLEU) and
`sentence_bleu` (FLORES-101, averaged with `mean`).

A new task family adds entries: a parser in `answers.py` if it needs one, a `<task>_results` hook
built from the scorers below, and an aggregation over (gold, pred) items if `mean` is not its metric.
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import random
import re
import string
import threading
from collections import Counter
from collections.abc import Iterable, Sequence
from types import ModuleType
from typing import Any

from pefteval_harness import answers

logger = logging.getLogger(__name__)

Item = tuple[Any, Any]  # (gold, pred), the item shape of lm-eval's corpus-level aggregations


# --- SQuAD v1.1 -------------------------------------------------------------------------------------

_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_squad_answer(text: str) -> str:
    """SQuAD v1.1's answer normalisation, in its order: lower case, remove ASCII punctuation, remove the
    articles a/an/the as whole words, collapse whitespace."""
    text = "".join(char for char in text.lower() if char not in _PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def squad_exact_match(prediction: str, reference: str) -> float:
    """1.0 when prediction and reference are equal after `normalize_squad_answer`, else 0.0."""
    return float(normalize_squad_answer(prediction) == normalize_squad_answer(reference))


def squad_f1(prediction: str, reference: str) -> float:
    """SQuAD v1.1 token F1: harmonic mean of token precision and recall over the normalised answers'
    whitespace tokens, counted with multiplicity. 0.0 when no token is shared (also when either side
    normalises to nothing, as in the v1.1 script)."""
    predicted = normalize_squad_answer(prediction).split()
    gold = normalize_squad_answer(reference).split()
    shared = sum((Counter(predicted) & Counter(gold)).values())
    if shared == 0:
        return 0.0
    precision = shared / len(predicted)
    recall = shared / len(gold)
    return 2 * precision * recall / (precision + recall)


def squad_results(doc: dict, results: Sequence[str]) -> dict[str, float]:
    """Official SQuAD v1.1 scores of one document: exact match and token F1 of the generation
    (`results[0]`), each the maximum over the gold answers `doc["answers"]["text"]`, in [0, 1]
    (the official script's 0-100 divided by 100). Aggregate both with `mean`."""
    prediction = results[0]
    references = list(doc["answers"]["text"])
    if not references:
        return {"exact_match": 0.0, "f1": 0.0}
    return {
        "exact_match": max(squad_exact_match(prediction, reference) for reference in references),
        "f1": max(squad_f1(prediction, reference) for reference in references),
    }


# --- ROUGE-L and BLEU -------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _rouge_l_scorer() -> Any:
    from rouge_score import rouge_scorer

    # No stemming: scores then depend on the words written only, not on an English stemmer's rules.
    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)


def _as_references(reference: str | Sequence[str]) -> list[str]:
    return [reference] if isinstance(reference, str) else list(reference)


def rouge_l(prediction: str, references: str | Sequence[str]) -> float:
    """ROUGE-L F-measure (sentence-level LCS, `rouge_score`, no stemming) of `prediction`, the maximum
    over `references`, in [0, 1]. rouge_score's tokenizer keeps ASCII letters and digits only, so it
    suits English text (other scripts score 0)."""
    scorer = _rouge_l_scorer()
    return max((scorer.score(ref, prediction)["rougeL"].fmeasure for ref in _as_references(references)), default=0.0)


def e2e_results(doc: dict, results: Sequence[str]) -> dict[str, Any]:
    """E2E NLG: a `bleu` item `(reference, prediction)` for lm-eval's corpus BLEU aggregation, and
    ROUGE-L against `doc["human_reference"]` (aggregate with `mean`).

    `human_reference` is one string in the HF schema. A list of references also works: ROUGE-L takes the
    best, and lm-eval's `bleu` takes them all as multiple references, which requires the same number of
    references in every document (it zips them)."""
    reference = doc["human_reference"]
    prediction = results[0]
    bleu_reference = reference if isinstance(reference, str) else list(reference)
    return {"bleu": (bleu_reference, prediction), "rougeL": rouge_l(prediction, reference)}


def alpaca_results(doc: dict, results: Sequence[str]) -> dict[str, float]:
    """Alpaca: ROUGE-L of the generation against `doc["output"]` (aggregate with `mean`)."""
    return {"rougeL": rouge_l(results[0], doc["output"])}


# --- Exact match of parsed answers ------------------------------------------------------------------


def gsm8k_results(doc: dict, results: Sequence[str]) -> dict[str, float]:
    """GSM8K: 1.0 when the model's final number (`answers.final_number`: after "####", else its last
    number) equals the reference's number after "####" (`answers.gsm8k_reference`), both in canonical
    form ("1,000" = "1000", "3.50" = "3.5"); 0.0 otherwise, also when the generation has no number."""
    gold = answers.gsm8k_reference(doc["answer"])
    if gold is None:
        raise ValueError(f"GSM8K reference without a number after '####': {doc['answer'][-80:]!r}")
    return {"exact_match": float(answers.final_number(results[0]) == gold)}


# --- IFEval -----------------------------------------------------------------------------------------

IFEVAL_METRICS = ("prompt_level_strict_acc", "inst_level_strict_acc", "prompt_level_loose_acc", "inst_level_loose_acc")
PUNKT_MISSING_NOTE = (
    "IFEval: nltk's punkt_tab English model is not installed (`python -m nltk.downloader punkt_tab`); "
    "number_sentences and capital_word_frequency split sentences with an untrained Punkt tokenizer (common "
    "abbreviations added), so their counts may differ slightly"
)
# Common English abbreviations that end with a full stop inside a sentence. The untrained Punkt
# tokenizer knows none and would end a sentence at "Dr." or "e.g."; the trained English model does not.
_ABBREVIATIONS = frozenset(
    "mr mrs ms dr prof st jr sr inc ltd co corp vs etc e.g i.e a.m p.m u.s u.k no fig approx".split()
)

_ifeval_lock = threading.Lock()
_ifeval_utils: ModuleType | None = None


def punkt_english_installed() -> bool:
    """Whether nltk finds its punkt_tab English model (what lm-eval's IFEval checker loads)."""
    import nltk

    try:
        nltk.data.find("tokenizers/punkt_tab/english/")
    except LookupError:
        return False
    return True


def _untrained_sentence_tokenizer() -> Any:
    from nltk.tokenize.punkt import PunktParameters, PunktSentenceTokenizer

    parameters = PunktParameters()
    parameters.abbrev_types = set(_ABBREVIATIONS)
    return PunktSentenceTokenizer(parameters)


class _NltkWithoutPunktData:
    """nltk as lm-eval's IFEval checker sees it when punkt_tab is missing: everything is nltk's own,
    except that `word_tokenize` splits sentences with the given tokenizer instead of loading punkt_tab
    (its words are then nltk's Treebank tokens of each sentence, as in nltk's own `word_tokenize`)."""

    def __init__(self, nltk: ModuleType, sentences: Any) -> None:
        self._nltk = nltk
        self._sentences = sentences

    def __getattr__(self, name: str) -> Any:
        return getattr(self._nltk, name)

    def word_tokenize(self, text: str, language: str = "english", preserve_line: bool = False) -> list[str]:
        sentences = [text] if preserve_line else self._sentences.tokenize(text)
        return [token for sentence in sentences for token in self._nltk.word_tokenize(sentence, preserve_line=True)]


def _no_download(*args: Any, **kwargs: Any) -> bool:
    return False


def _load_ifeval_checker() -> ModuleType:
    """lm-eval's IFEval checker (`lm_eval.tasks.ifeval.utils`), made to work offline.

    Importing lm-eval's `instructions_util` calls `nltk.download("punkt_tab")` when nltk cannot find it;
    offline that is a network attempt (nltk's socket timeout is 120 s). When the English model is not
    installed, `nltk.download` is replaced by a no-op for the import (and the false "Downloaded punkt_tab"
    line it prints is dropped), and the two checks that load punkt_tab (sentence counts and
    `word_tokenize` for capital-word counts) get an untrained Punkt tokenizer that needs no data files,
    told the common abbreviations in `_ABBREVIATIONS`.
    With the model installed, lm-eval's checker runs unchanged.
    """
    import langdetect
    import nltk

    trained = punkt_english_installed()
    if trained:
        from lm_eval.tasks.ifeval import instructions_util, utils
    else:
        real_download = nltk.download
        nltk.download = _no_download
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                from lm_eval.tasks.ifeval import instructions_util, utils
        finally:
            nltk.download = real_download
        sentences = _untrained_sentence_tokenizer()
        # count_sentences looks this factory up at call time; instructions.py reaches nltk through it.
        instructions_util._get_sentence_tokenizer = lambda: sentences
        instructions_util.nltk = _NltkWithoutPunktData(nltk, sentences)
        logger.warning(PUNKT_MISSING_NOTE)
    # langdetect samples at random unless seeded: seed it, so that language checks repeat exactly.
    if langdetect.DetectorFactory.seed is None:
        langdetect.DetectorFactory.seed = 0
    return utils


def ifeval_checker() -> ModuleType:
    """lm-eval's IFEval checker module, loaded once per process (see `_load_ifeval_checker`)."""
    global _ifeval_utils
    with _ifeval_lock:
        if _ifeval_utils is None:
            _ifeval_utils = _load_ifeval_checker()
        return _ifeval_utils


def ifeval_results(doc: dict, results: Sequence[str]) -> dict[str, Any]:
    """IFEval scores of one google/IFEval record, by lm-eval's own checker (`process_results`):
    prompt-level accuracies as 0.0/1.0 (aggregate with `mean`), instruction-level ones as a list of one
    bool per instruction (aggregate with `ifeval_inst_level_acc`). Strict checks the response as is,
    loose also with markdown `*` removed and the first or last line dropped.

    Where a record's kwargs are missing or invalid (a `letter` that is no letter), lm-eval's instructions
    draw random ones from Python's `random`; here that draw is seeded by the record's key, so a record
    scores the same on every run, and the global random state is restored afterwards."""
    checker = ifeval_checker()
    state = random.getstate()
    random.seed(f"ifeval:{doc.get('key')}")
    try:
        scores = checker.process_results(doc, list(results))
    finally:
        random.setstate(state)
    return {
        "prompt_level_strict_acc": float(scores["prompt_level_strict_acc"]),
        "inst_level_strict_acc": [bool(ok) for ok in scores["inst_level_strict_acc"]],
        "prompt_level_loose_acc": float(scores["prompt_level_loose_acc"]),
        "inst_level_loose_acc": [bool(ok) for ok in scores["inst_level_loose_acc"]],
    }


def ifeval_inst_level_acc(items: Iterable[Sequence[bool]]) -> float:
    """Instruction-level accuracy: the share of all instructions followed, over all documents
    (lm-eval's `agg_inst_level_acc`)."""
    return float(ifeval_checker().agg_inst_level_acc(list(items)))


# --- Classification aggregations over (gold, pred) items --------------------------------------------
# A prediction of None is an answer that could not be parsed: it is wrong for every gold label and is
# no class of its own (it never enters a macro average).


def _encoded(items: Iterable[Item]) -> tuple[list[int], list[int], list[int]]:
    """Golds and preds as class indices (None -> -1) and the indices of every real class seen."""
    index: dict[Any, int] = {}
    golds: list[int] = []
    preds: list[int] = []
    for gold, pred in items:
        if gold is None:
            raise ValueError("a gold label is None")
        golds.append(index.setdefault(gold, len(index)))
        preds.append(-1 if pred is None else index.setdefault(pred, len(index)))
    if not golds:
        raise ValueError("no items to aggregate")
    return golds, preds, list(range(len(index)))


def _f1(items: Iterable[Item], average: str) -> float:
    from sklearn.metrics import f1_score

    golds, preds, labels = _encoded(items)
    return float(f1_score(golds, preds, labels=labels, average=average, zero_division=0))


def macro_f1(items: Iterable[Item]) -> float:
    """Macro-averaged F1 (unweighted mean of per-class F1) over every class that occurs as a gold label
    or a parsed prediction (scikit-learn, zero division counted as 0)."""
    return _f1(items, "macro")


def weighted_f1(items: Iterable[Item]) -> float:
    """F1 per class averaged with weights equal to each class's number of gold items (scikit-learn)."""
    return _f1(items, "weighted")


def class_f1(items: Iterable[Item], classes: Sequence[Any]) -> float:
    """Mean over `classes` of each class's one-vs-rest F1 (0 when a class is neither gold nor predicted)."""
    from sklearn.metrics import f1_score

    pairs = list(items)
    if not pairs:
        raise ValueError("no items to aggregate")
    scores = [
        f1_score([gold == label for gold, _ in pairs], [pred == label for _, pred in pairs], zero_division=0)
        for label in classes
    ]
    return float(sum(scores) / len(scores))


def positive_f1(items: Iterable[Item]) -> float:
    """Binary F1 of label 1 (precision and recall of predicting 1); any other label or None is negative."""
    return class_f1(items, [1])


# --- Merge benchmarks: DROP, FLORES-101, MBPP, emotion recognition in conversation ------------------
# Each generative hook also returns `parsed`: 1.0 when the generation holds the answer in the form the
# prompt asks for (an `Answer:` line, a `Translation:` line, Python code), else 0.0. An unparsed answer
# scores as wrong (0 for every metric) and is counted there, never raised.


def drop_golds(doc: dict) -> list[tuple[str, ...]]:
    """The gold answers of a DROP record, each a tuple of spans (one span, or several for a multi-span
    answer), empty ones dropped.

    ucinlp/drop (`answers_spans: {spans, types}`) holds one answer per question: its spans are the parts
    of that answer (a number, a date or one or more passage spans). Records in the EleutherAI/drop schema
    (`answer` and `validated_answers`) give several alternative answers; lm-eval's own parser reads them.
    """
    if "answers_spans" in doc:
        spans = tuple(str(s) for s in (doc["answers_spans"] or {}).get("spans") or () if str(s).strip())
        return [spans] if spans else []
    if "answer" in doc and "validated_answers" in doc:
        from lm_eval.tasks.drop.utils import get_answers

        return [g for g in get_answers(doc) if g and g[0].strip()]
    raise ValueError(f"DROP record without answers_spans or answer/validated_answers: {sorted(doc)}")


def drop_scores(prediction: str | Sequence[str], golds: Sequence[Sequence[str]]) -> tuple[float, float]:
    """Official DROP exact match and F1 of a prediction (one span, or a list of spans), each the maximum
    over the gold answers, in [0, 1]: lm-eval's port of the official script (answers are normalised
    (lower case, punctuation and articles removed, numbers as floats: "2.0" = "2"), split into spans and
    the spans into bags of tokens; EM needs the same set of normalised spans; F1 aligns predicted and gold
    spans one to one (optimal assignment) and averages token-bag F1 over the spans, a pair scoring 0 when
    the gold span has numbers and the predicted one shares none). (0, 0) without gold answers."""
    from lm_eval.tasks.drop.utils import get_metrics

    predicted = [prediction] if isinstance(prediction, str) else list(prediction)
    best_em, best_f1 = 0.0, 0.0
    for gold in golds:
        em, f1 = get_metrics(predicted, list(gold))
        best_em, best_f1 = max(best_em, float(em)), max(best_f1, float(f1))
    return best_em, best_f1


def drop_results(doc: dict, results: Sequence[str]) -> dict[str, float]:
    """DROP: the value of the generation's first `Answer:` line (`answers.answer_line`; the merging study's
    evaluator reads it with a regex search, which finds the first) is the predicted answer, one span as
    written, as theirs; `drop_scores` against the record's gold answers. No `Answer:` line: 0 for both and
    `parsed` 0. Aggregate all three with `mean`."""
    prediction = answers.answer_line(results[0], position="first")
    if prediction is None:
        return {"exact_match": 0.0, "f1": 0.0, "parsed": 0.0}
    exact_match, f1 = drop_scores(prediction, drop_golds(doc))
    return {"exact_match": exact_match, "f1": f1, "parsed": 1.0}


# The word "translation" (any case) and a colon, as `answers.answer_line` reads "Answer:".
_TRANSLATION_LINE = re.compile(r"\btranslation\b\s*:(?P<value>[^\n]*)", re.IGNORECASE)
# sacrebleu's tokenizer for targets that do not separate words with spaces; "13a" (its default) otherwise.
# FLORES-101's own spBLEU tokenizer ("flores101") downloads its model at first use, so it is not the default.
BLEU_TOKENIZERS = {
    "zho_simpl": "zh",
    "zho_trad": "zh",
    "jpn": "char",
    "tha": "char",
    "mya": "char",
    "khm": "char",
    "lao": "char",
}


def translation_line(text: str) -> str | None:
    """The value of the first `Translation: X` in `text` (as the merging study's regex search finds it): the
    rest of that line, stripped of whitespace, markdown wrapping and quotes; None when there is none or it
    is empty."""
    match = _TRANSLATION_LINE.search(text)
    if match is None:
        return None
    value = match.group("value").strip(" \t*_`\"'“”«»")
    return value or None


def sentence_bleu(prediction: str, reference: str, tokenize: str = "13a") -> float:
    """sacrebleu's sentence BLEU (0-100; exponential smoothing, effective n-gram order) of one prediction
    against one reference, with sacrebleu's tokenizer `tokenize`."""
    import sacrebleu

    return float(sacrebleu.sentence_bleu(prediction, [reference], tokenize=tokenize).score)


def flores_results(doc: dict, results: Sequence[str]) -> dict[str, float]:
    """FLORES-101 pair: sentence BLEU (0-100) of the generation's first `Translation:` line against the
    target sentence (`doc["target"]`), tokenised for the target language (`BLEU_TOKENIZERS`); averaged
    over sentences with `mean`, as the merging study averages its sentence BLEU. No `Translation:` line:
    BLEU 0 and `parsed` 0."""
    prediction = translation_line(results[0])
    if prediction is None:
        return {"sentence_bleu": 0.0, "parsed": 0.0}
    tokenize = BLEU_TOKENIZERS.get(doc.get("target_config", ""), "13a")
    return {"sentence_bleu": sentence_bleu(prediction, doc["target"], tokenize), "parsed": 1.0}


def mbpp_results(doc: dict, results: Sequence[str]) -> dict[str, float]:
    """MBPP pass@1 (one greedy sample): the code in the generation (`code_execution.extract_code`), after
    the standard-library imports MBPP solutions assume (`code_execution.PRELUDE`), passes every assert of
    `doc["test_list"]` after `doc["test_setup_code"]`, run by `code_execution.run_tests` (a separate,
    limited process; 10 s per program). No parseable code: 0 and `parsed` 0. Only reached when the user
    confirmed running model-written code (the task is `unsafe_code: true`)."""
    from pefteval_harness import code_execution

    code = code_execution.extract_code(results[0])
    if code is None:
        return {"pass_at_1": 0.0, "parsed": 0.0}
    passed, _ = code_execution.run_tests(
        code_execution.PRELUDE + "\n" + code, list(doc["test_list"]), setup=doc.get("test_setup_code") or ""
    )
    return {"pass_at_1": float(passed), "parsed": 1.0}


MELD_EMOTIONS = ("neutral", "surprise", "fear", "sadness", "joy", "disgust", "anger")
EMORYNLP_EMOTIONS = ("Neutral", "Joyful", "Peaceful", "Powerful", "Scared", "Mad", "Sad")


def _gold_emotion(doc: dict, labels: Sequence[str]) -> str:
    gold = next((label for label in labels if label.lower() == str(doc["Emotion"]).strip().lower()), None)
    if gold is None:
        raise ValueError(f"emotion {doc['Emotion']!r} is none of {list(labels)}")
    return gold


def emotion_results(doc: dict, results: Sequence[str], labels: Sequence[str]) -> dict[str, Any]:
    """Emotion recognition in conversation (generative): the first of `labels` named in the value of the
    generation's first `Answer:` line (`answers.answer_line`, then `answers.find_label`; case ignored)
    against `doc["Emotion"]`. Returns `weighted_f1`, a (gold, pred) item for the `weighted_f1` aggregation
    (pred None when unparsed: wrong for every class), `acc` and `parsed` (aggregate with `mean`)."""
    gold = _gold_emotion(doc, labels)
    value = answers.answer_line(results[0], position="first")
    prediction = answers.find_label(value, labels) if value is not None else None
    parsed = float(prediction is not None)
    return {"weighted_f1": (gold, prediction), "acc": float(prediction == gold), "parsed": parsed}


def meld_results(doc: dict, results: Sequence[str]) -> dict[str, Any]:
    """MELD (`emotion_results` over its 7 emotions)."""
    return emotion_results(doc, results, MELD_EMOTIONS)


def emorynlp_results(doc: dict, results: Sequence[str]) -> dict[str, Any]:
    """EmoryNLP (`emotion_results` over its 7 emotions)."""
    return emotion_results(doc, results, EMORYNLP_EMOTIONS)


def emotion_choice_results(doc: dict, results: Sequence[tuple[float, bool]], labels: Sequence[str]) -> dict[str, Any]:
    """Emotion recognition scored by log-likelihood: the prediction is the label whose continuation the
    model finds most likely (`results`: lm-eval's (loglikelihood, is_greedy) per label, in `labels`
    order). `acc` and `acc_norm` (the log-likelihood per character of the label, as lm-eval's acc_norm),
    aggregated with `mean`, and `weighted_f1` (a (gold, pred) item)."""
    if len(results) != len(labels):
        raise ValueError(f"{len(results)} log-likelihoods for {len(labels)} emotions")
    gold = _gold_emotion(doc, labels)
    scores = [float(ll) for ll, _ in results]
    per_char = [score / len(label) for score, label in zip(scores, labels, strict=True)]
    prediction = labels[scores.index(max(scores))]
    prediction_norm = labels[per_char.index(max(per_char))]
    return {
        "acc": float(prediction == gold),
        "acc_norm": float(prediction_norm == gold),
        "weighted_f1": (gold, prediction),
    }


def meld_choice_results(doc: dict, results: Sequence[tuple[float, bool]]) -> dict[str, Any]:
    """MELD by log-likelihood (`emotion_choice_results`)."""
    return emotion_choice_results(doc, results, MELD_EMOTIONS)


def emorynlp_choice_results(doc: dict, results: Sequence[tuple[float, bool]]) -> dict[str, Any]:
    """EmoryNLP by log-likelihood (`emotion_choice_results`)."""
    return emotion_choice_results(doc, results, EMORYNLP_EMOTIONS)


# --- Affective understanding ------------------------------------------------------------------------
# The classification tasks of task_configs/affective: items are (gold label word, predicted label word or
# None), as above; each task's YAML names the aggregations its official convention reports.

TWEET_IRONY_LABELS = ("not ironic", "ironic")  # tweet_eval irony ids 0 non_irony, 1 irony
TWEET_STANCE_LABELS = ("none", "against", "favor")  # tweet_eval stance ids 0 none, 1 against, 2 favor


def macro_recall(items: Iterable[Item]) -> float:
    """Macro-averaged recall (unweighted mean of per-class recall) over every class that occurs as a gold
    label or a parsed prediction, as scikit-learn's `recall_score(average="macro")` (a class never gold
    has recall 0). TweetEval's sentiment metric."""
    from sklearn.metrics import recall_score

    golds, preds, labels = _encoded(items)
    return float(recall_score(golds, preds, labels=labels, average="macro", zero_division=0))


def irony_f1(items: Iterable[Item]) -> float:
    """F1 of the irony class alone (TweetEval's irony metric): `class_f1` of "ironic"."""
    return class_f1(items, [TWEET_IRONY_LABELS[1]])


def stance_f1(items: Iterable[Item]) -> float:
    """Mean of the F1 of "against" and of "favor" (TweetEval's and SemEval-2016's stance metric); "none"
    is a class of the predictions and golds but has no F1 of its own in the mean."""
    return class_f1(items, list(TWEET_STANCE_LABELS[1:]))


def _label_metrics(gold: str, prediction: str | None, metrics: Sequence[str]) -> dict[str, Any]:
    # `acc` is a per-document score (aggregate with `mean`); every other metric is a corpus-level
    # aggregation over (gold, pred) items.
    return {name: float(prediction == gold) if name == "acc" else (gold, prediction) for name in metrics}


def label_generation_results(gold: str, prediction: str | None, metrics: Sequence[str]) -> dict[str, Any]:
    """A generative classification document's results: each of `metrics` (`acc` as 0/1, the others as a
    (gold, pred) item), and `parsed` (1.0 when a label was read; a None prediction is wrong, never raised)."""
    return {**_label_metrics(gold, prediction, metrics), "parsed": float(prediction is not None)}


def label_choice_results(
    gold: str, labels: Sequence[str], results: Sequence[tuple[float, bool]], metrics: Sequence[str]
) -> dict[str, Any]:
    """A log-likelihood classification document's results: the prediction is the label whose continuation
    the model finds most likely (`results`: lm-eval's (loglikelihood, is_greedy) per label, in `labels`
    order; the first of equals wins); each of `metrics` as in `label_generation_results`, no `parsed`."""
    if len(results) != len(labels):
        raise ValueError(f"{len(results)} log-likelihoods for {len(labels)} labels")
    scores = [float(ll) for ll, _ in results]
    return _label_metrics(gold, labels[scores.index(max(scores))], metrics)
