"""The affective-understanding metrics (macro recall, irony F1, stance F1, the generic per-document hooks)
against scikit-learn or hand-computed values, and the label parsing of the generative forms
(`answers.affect_label`, `answers.affect_choice`) on hand-written replies."""

from __future__ import annotations

import pytest
from sklearn.metrics import f1_score, recall_score

from pefteval_harness import answers, metrics

SENTIMENT = ["negative", "neutral", "positive"]
OFFENSIVE = ["not offensive", "offensive"]


def _sklearn(items, scorer, **kwargs):
    # None (unparsed) is its own value for scikit-learn, but it must never be a class of the average.
    golds = [gold for gold, _ in items]
    preds = ["<none>" if pred is None else pred for _, pred in items]
    labels = sorted({*golds, *(p for p in preds if p != "<none>")})
    return scorer(golds, preds, labels=labels, zero_division=0, **kwargs)


ITEMS = [
    ("positive", "positive"),
    ("positive", "neutral"),
    ("negative", "negative"),
    ("negative", None),
    ("neutral", "neutral"),
    ("neutral", "positive"),
    ("positive", "positive"),
    ("negative", "positive"),
]


def test_macro_recall_is_sklearns_over_gold_and_predicted_classes():
    assert metrics.macro_recall(ITEMS) == pytest.approx(_sklearn(ITEMS, recall_score, average="macro"))
    # By hand: recall positive 2/3, negative 1/3 (the None counts as wrong), neutral 1/2.
    assert metrics.macro_recall(ITEMS) == pytest.approx((2 / 3 + 1 / 3 + 1 / 2) / 3)
    # A class only predicted has recall 0 (scikit-learn's rule): it enters the mean.
    assert metrics.macro_recall([("joy", "joy"), ("joy", "anger")]) == pytest.approx((1 / 2 + 0) / 2)
    # None is no class of its own: all unparsed is 0, not an average over a "None" class.
    assert metrics.macro_recall([("joy", None), ("anger", None)]) == 0.0
    with pytest.raises(ValueError, match="no items"):
        metrics.macro_recall([])


def test_irony_f1_is_the_f1_of_the_irony_class():
    items = [("ironic", "ironic"), ("ironic", "not ironic"), ("not ironic", "ironic"), ("not ironic", None),
             ("ironic", None), ("not ironic", "not ironic")]  # fmt: skip
    golds = [g == "ironic" for g, _ in items]
    preds = [p == "ironic" for _, p in items]
    assert metrics.irony_f1(items) == pytest.approx(f1_score(golds, preds))
    # By hand: 1 true positive, 1 false positive, 2 false negatives: P 1/2, R 1/3, F1 2/5.
    assert metrics.irony_f1(items) == pytest.approx(0.4)
    assert metrics.irony_f1([("not ironic", "not ironic")]) == 0.0


def test_stance_f1_is_the_mean_of_against_and_favor_f1():
    items = [("against", "against"), ("against", "none"), ("favor", "favor"), ("favor", "against"),
             ("none", "favor"), ("none", "none"), ("against", None), ("none", "against")]  # fmt: skip
    expected = _sklearn(items, f1_score, average=None)  # per class, labels sorted: against, favor, none
    assert metrics.stance_f1(items) == pytest.approx((expected[0] + expected[1]) / 2)
    # By hand: against P 1/3, R 1/3 -> 1/3; favor P 1/2, R 1/2 -> 1/2; "none" is left out of the mean.
    assert metrics.stance_f1(items) == pytest.approx((1 / 3 + 1 / 2) / 2)


def test_the_reused_aggregations_agree_with_sklearn_on_affect_items():
    assert metrics.macro_f1(ITEMS) == pytest.approx(_sklearn(ITEMS, f1_score, average="macro"))
    assert metrics.weighted_f1(ITEMS) == pytest.approx(_sklearn(ITEMS, f1_score, average="weighted"))


def test_per_document_hooks_return_the_named_metrics():
    got = metrics.label_generation_results("offensive", "not offensive", ["macro_f1", "acc"])
    assert got == {"macro_f1": ("offensive", "not offensive"), "acc": 0.0, "parsed": 1.0}
    got = metrics.label_generation_results("offensive", None, ["macro_f1", "acc"])
    assert got == {"macro_f1": ("offensive", None), "acc": 0.0, "parsed": 0.0}
    lls = [(-4.0, False), (-1.5, True), (-3.0, False)]
    assert metrics.label_choice_results("neutral", SENTIMENT, lls, ["macro_recall", "acc"]) == {
        "macro_recall": ("neutral", "neutral"), "acc": 1.0,
    }  # fmt: skip
    # The first of equal log-likelihoods wins.
    assert metrics.label_choice_results("positive", SENTIMENT, [(-1.0, 0)] * 3, ["acc"]) == {"acc": 0.0}
    with pytest.raises(ValueError, match="3 log-likelihoods for 2 labels"):
        metrics.label_choice_results("offensive", OFFENSIVE, lls, ["acc"])


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (" Positive", "positive"),  # the plain generative reply: no marker, any case
        (" NEGATIVE.", "negative"),
        (" I think it is neutral, maybe positive", "neutral"),  # the first label word in the text
        ("The tweet sounds positive.\nAnswer: negative", "negative"),  # a marker: its value, not the text
        ("Answer: **Neutral**.", "neutral"),
        ("It is positive.\nAnswer: I cannot tell", None),  # a marker without a label: None
        ("It is positive.\nAnswer:", None),  # an empty marker: None
        ("Answer: positive\nLet me check again.\nFinal answer: negative", "negative"),  # the last marker wins
        ("answer: neutral\nanswer: ", None),  # the last marker is empty
        (" positively moving", None),  # whole words only
        ("", None),
        (" I have no idea", None),
    ],
)
def test_affect_label(text, expected):
    assert answers.affect_label(text, SENTIMENT) == expected


def test_affect_label_prefers_the_longer_of_overlapping_labels():
    assert answers.affect_label(" not offensive", OFFENSIVE) == "not offensive"
    assert answers.affect_label(" Offensive", OFFENSIVE) == "offensive"
    assert answers.affect_label("Not Offensive at all", OFFENSIVE) == "not offensive"
    assert answers.affect_label("It is offensive.\nAnswer: not offensive", OFFENSIVE) == "not offensive"
    assert answers.affect_label("It is not offensive.\nAnswer: offensive", OFFENSIVE) == "offensive"
    assert answers.affect_label(" very negative", ["very negative", "negative"]) == "very negative"
    assert answers.affect_label(" not given", ["true", "false", "not given"]) == "not given"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (" B", 1),
        (" (c) because she is kind", 2),
        (" **A**.", 0),
        ("Let me think. A seems rude.\nAnswer: D) Seek help", 3),  # the last marker's value
        ("Answer: A\nAnswer: B", 1),
        ("Answer: maybe", None),  # a marker without a letter
        (" E", None),  # beyond four options
        (" Suggest professional help", None),  # not a letter
        ("", None),
    ],
)
def test_affect_choice(text, expected):
    assert answers.affect_choice(text, 4) == expected


def test_choice_letter_is_unchanged_by_the_shared_letter_rule():
    assert answers.choice_letter("Answer: (B)\nAnswer: C", 4) == 1  # still the first line
    assert answers.choice_letter("The answer is C", 4) is None
