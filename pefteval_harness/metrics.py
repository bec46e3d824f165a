"""Metrics computed locally for the task YAMLs: lm-eval `process_results` hooks and aggregations.

Task folders re-export these through their utils.py (`process_results: !function utils.squad_results`,
`aggregation: !function utils.macro_f1`). Nothing here is fetched at run time: lm-eval loads any metric
name it does not register from the HuggingFace hub, so every hook returns metric names that its YAML
pairs with an explicit `aggregation` (lm-eval's `mean` or `bleu`, or a function of this module).

Scales: every per-document score is in [0, 1] (SQuAD EM and F1 too, where the official script reports
0-100); lm-eval's `bleu` aggregation reports sacrebleu's 0-100 corpus BLEU.

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
