"""The quickstart tasks: small synthetic datasets generated from a seed, no download.

Each generator returns a list of records for a split. The lm-eval YAMLs in
`task_configs/quickstart/` load them through `custom_dataset: !function utils.<task>`, so the tasks are
ordinary lm-eval tasks: `lm_eval --include_path ... --tasks pefteval_quick_*` scores them like any other.

The tasks are small enough for a tiny model to learn in a minute of CPU training, and distinct enough
to train one expert per task and merge them:
- sentiment (classification) and sentiment_adv (the same test docs with perturbed inputs),
- topic (three-way classification),
- arithmetic (reasoning with a numeric answer, generated),
- echo (generation: repeat a short word sequence).

Job ids hash the task YAMLs, not this module: after changing a generator, bump `metadata.version` in
the YAMLs of the tasks it feeds, so that stored results of the old data are not reused.
"""

from __future__ import annotations

import random
from collections.abc import Callable

import datasets

SEED = 20261129
SPLIT_SIZES = {"train": 320, "test": 120}

POSITIVE = ["good", "great", "lovely", "superb", "wonderful", "fine", "brilliant", "pleasant"]
NEGATIVE = ["bad", "awful", "terrible", "dull", "boring", "poor", "horrible", "nasty"]
NOUNS = ["film", "meal", "book", "show", "song", "trip", "game", "play", "hotel", "class"]
INTENSIFIERS = ["", "really ", "very ", "quite ", "so "]

TOPICS = {
    "sports": ["goal", "match", "team", "ball", "coach", "score", "league", "runner"],
    "food": ["bread", "soup", "cheese", "salad", "pasta", "sugar", "apple", "cake"],
    "science": ["atom", "cell", "energy", "planet", "theory", "data", "gene", "laser"],
}
FILLERS = ["the", "a", "my", "our", "this", "that", "new", "old", "big", "small"]

COLOURS = ["red", "blue", "green", "black", "white", "pink", "gold", "grey"]


def _sentiment(rng: random.Random) -> dict:
    label = rng.randrange(2)
    adjective = rng.choice(POSITIVE if label else NEGATIVE)
    sentence = f"the {rng.choice(NOUNS)} was {rng.choice(INTENSIFIERS)}{adjective}"
    return {"sentence": sentence, "label": label}


def _perturb(sentence: str, rng: random.Random) -> str:
    """Adversarial twin: a distractor clause plus a swapped-letter typo, the label unchanged."""
    words = sentence.split()
    i = rng.randrange(len(words))
    if len(words[i]) > 3:
        w = words[i]
        j = rng.randrange(1, len(w) - 2)
        words[i] = w[:j] + w[j + 1] + w[j] + w[j + 2 :]
    return f"honestly , {' '.join(words)} , or so they said"


def _topic(rng: random.Random) -> dict:
    label = rng.randrange(len(TOPICS))
    keywords = list(TOPICS.values())[label]
    words = [rng.choice(FILLERS), rng.choice(keywords), rng.choice(FILLERS), rng.choice(keywords)]
    return {"text": " ".join(words), "label": label}


def _arithmetic(rng: random.Random) -> dict:
    a, b = rng.randrange(10), rng.randrange(10)
    return {"question": f"What is {a} plus {b}?", "answer": str(a + b)}


def _echo(rng: random.Random) -> dict:
    words = [rng.choice(COLOURS) for _ in range(rng.randint(2, 3))]
    return {"source": " ".join(words), "target": " ".join(words)}


GENERATORS: dict[str, Callable[[random.Random], dict]] = {
    "sentiment": _sentiment,
    "topic": _topic,
    "arithmetic": _arithmetic,
    "echo": _echo,
}


def records(task: str, split: str, seed: int = SEED) -> list[dict]:
    """The records of one split, identical on every machine for the same seed."""
    rng = random.Random(f"{seed}/{task}/{split}")
    return [GENERATORS[task](rng) for _ in range(SPLIT_SIZES[split])]


def dataset(task: str, seed: int = SEED) -> datasets.DatasetDict:
    return datasets.DatasetDict(
        {split: datasets.Dataset.from_list(records(task, split, seed)) for split in SPLIT_SIZES}
    )


def adversarial_dataset(task: str = "sentiment", seed: int = SEED) -> datasets.DatasetDict:
    """The clean task's test docs, perturbed; no training split (it is an evaluation-only twin)."""
    rng = random.Random(f"{seed}/{task}/adversarial")
    docs = [{**r, "sentence": _perturb(r["sentence"], rng)} for r in records(task, "test", seed)]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(docs)})


# Plain statements of what the tasks ask about, without their prompts: the tiny base model is
# pre-trained on these, so it "knows" the domain and fine-tuning (even a small adapter) only has to
# teach each task's format, as with a real pre-trained model.
PRETRAIN_SIZE = 3000


def _statement(rng: random.Random) -> str:
    kind = rng.randrange(4)
    if kind == 0:
        r = _sentiment(rng)
        return f"{r['sentence']} . so it was {'positive' if r['label'] else 'negative'} ."
    if kind == 1:
        r = _topic(rng)
        return f"{r['text']} . this is about {list(TOPICS)[r['label']]} ."
    if kind == 2:
        a, b = rng.randrange(10), rng.randrange(10)
        return f"{a} plus {b} is {a + b} ."
    words = _echo(rng)["source"]
    return f"{words} , again : {words} ."


def pretraining_texts(seed: int = SEED) -> list[str]:
    rng = random.Random(f"{seed}/pretrain")
    return [_statement(rng) for _ in range(PRETRAIN_SIZE)]


def corpus(seed: int = SEED) -> list[str]:
    """Every text the quickstart tasks can show, for training the tiny model's tokenizer."""
    texts = [" ".join(str(v) for v in r.values()) for t in GENERATORS for s in SPLIT_SIZES for r in records(t, s, seed)]
    texts += [
        " ".join(POSITIVE + NEGATIVE + NOUNS + FILLERS + COLOURS),
        " ".join(w for ws in TOPICS.values() for w in ws),
    ]
    texts += pretraining_texts(seed)
    texts += ["Review: Sentiment: positive negative Topic: sports food science Question: Answer: Repeat: Output:"]
    return texts
