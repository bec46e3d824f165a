"""Metrics of the affective generative tasks: the AG tasks' reply metrics and EQ-Bench's score.

AG (pefteval_affect_esconv, _empathetic): `ag_results` scores one generated reply against the gold reply;
the corpus-level aggregations below turn the items of all documents into one number each:

- `bleu2`: sacrebleu corpus BLEU with n-grams up to 2 (equal weights 1/2, brevity penalty, sacrebleu's
  default exponential smoothing), lowercased, sacrebleu's `13a` tokenizer; 0-100 (sacrebleu's scale).
- `rougeL`: the mean over documents of `metrics.rouge_l` (ROUGE-L F-measure, no stemming), 0-1.
- `distinct1`, `distinct2`: distinct n-grams / all n-grams over all replies (n-grams taken within each
  reply, tokens as for BLEU-2), 0-1; 0.0 when the replies hold no n-gram at all.
- `parsed`: 1.0 when the reply is non-empty after stripping (aggregated with `mean`).

EQ-Bench (pefteval_affect_eq_bench): lm-eval's own `eq_bench` scoring, called as is; its
`percent_parseable` (0 or 100 per answer) is reported as `parsed` (0 or 1, so the mean is a share).
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence
from typing import Any

from pefteval_harness.metrics import rouge_l

BLEU_ORDER = 2


@functools.lru_cache(maxsize=1)
def _tokenizer() -> Any:
    from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a

    return Tokenizer13a()


def tokens(text: str) -> list[str]:
    """The reply's tokens for BLEU-2 and Distinct-n: lowercased, sacrebleu's 13a tokenisation."""
    return _tokenizer()(text.lower()).split()


# --- per document -----------------------------------------------------------------------------------


def reply_text(generation: str) -> str:
    """The reply as scored: the generation stripped (the task stops it at the first newline)."""
    return generation.strip()


def ag_results(doc: dict, results: Sequence[str]) -> dict[str, Any]:
    """One AG document: the items of `bleu2` ((gold, reply)), `distinct1`/`distinct2` (the reply), the
    document's ROUGE-L (0-1) and `parsed`. The gold is `doc["reply"]`."""
    reply = reply_text(results[0])
    gold = doc["reply"]
    return {
        "bleu2": (gold, reply),
        "rougeL": rouge_l(reply, gold),
        "distinct1": reply,
        "distinct2": reply,
        "parsed": 1.0 if reply else 0.0,
    }


# --- corpus-level aggregations ----------------------------------------------------------------------


def bleu2(items: Iterable[tuple[str, str]]) -> float:
    """Corpus BLEU-2 (0-100) of the (gold, reply) items: see the module docstring."""
    from sacrebleu.metrics import BLEU

    pairs = list(items)
    if not pairs:
        return 0.0
    golds, replies = zip(*pairs, strict=True)
    scorer = BLEU(lowercase=True, tokenize="13a", max_ngram_order=BLEU_ORDER)
    return float(scorer.corpus_score(list(replies), [list(golds)]).score)


def distinct_n(replies: Iterable[str], n: int) -> float:
    """Distinct-n over a corpus: the number of different n-grams divided by the number of n-grams, over
    every reply's n-grams (an n-gram never spans two replies); 0.0 without any n-gram."""
    seen: set[tuple[str, ...]] = set()
    total = 0
    for reply in replies:
        words = tokens(reply)
        grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
        seen.update(grams)
        total += len(grams)
    return len(seen) / total if total else 0.0


def distinct1(items: Iterable[str]) -> float:
    return distinct_n(items, 1)


def distinct2(items: Iterable[str]) -> float:
    return distinct_n(items, 2)


# --- EQ-Bench ---------------------------------------------------------------------------------------


def eq_bench_results(doc: dict, results: Sequence[str]) -> dict[str, float]:
    """lm-eval's EQ-Bench v2 score of one answer (at most 100, below 0 for answers far from the reference;
    0 when the answer does not name exactly the 4 reference emotions with integer scores) and `parsed`
    (1.0 when it does). lm-eval reads the `Emotion: <int>` pairs anywhere in the answer, the last score
    of an emotion winning."""
    from lm_eval.tasks.eq_bench.utils import calculate_score_fullscale

    scored = calculate_score_fullscale(doc, results)
    return {"eqbench": float(scored["eqbench"]), "parsed": float(scored["percent_parseable"]) / 100}
