"""The local LLM-as-judge (pefteval_harness/judge.py): score parsing on hand-written judgements, the judge's
prompt, and a real run: lm-eval logs the samples of a generative task on the tiny model, which then judges
them (its judgements are noise: the test checks their form and determinism, not their quality).
"""

from __future__ import annotations

import json
import shutil

import pytest

from pefteval_harness import judge
from pefteval_harness.errors import BadInput


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("The reply is warm and specific.\nScore: 4", 4),
        ("score:4/5", 4),
        ("**Score:** 5", 5),
        ("SCORE: 2", 2),
        ("Final score: **3**", 3),
        ("Score: [1]", 1),
        ("Reasons: kind but generic.\n\nScore: 3\n", 3),
        ("Score: 0", None),
        ("Score: 6", None),
        ("Score: 7", None),
        ("Score: 45", None),
        ("Score: 4.5", None),
        ("Score: 4/10", None),  # another scale, not this rubric's
        ("Score: 2\nOn reflection the reply is excellent.\nScore: 5", 5),
        ("Score: 5 ... rethinking it.\nScore: none", None),  # the last marker rules
        ("Score: N", None),
        ("I would give it a 4 out of 5.", None),
        ("", None),
    ],
)
def test_parse_judgement(text, expected):
    assert judge.parse_judgement(text) == expected


def test_judge_prompt_holds_rubric_context_and_reply():
    prompt = judge.judge_prompt("Seeker: I lost my job today.\nSupporter:", "  That sounds really hard.  ")
    assert prompt.startswith(judge.DEFAULT_RUBRIC)
    assert "Seeker: I lost my job today.\nSupporter:" in prompt
    assert "That sounds really hard." in prompt and "  That" not in prompt
    assert "Score: N" in judge.DEFAULT_RUBRIC and "pefteval-harness rubric" in judge.DEFAULT_RUBRIC
    assert judge.judge_prompt("c", "r", rubric="MY RUBRIC").startswith("MY RUBRIC\n")


def test_bad_samples_and_model_args_are_one_line_errors():
    with pytest.raises(BadInput, match="doc_id=3: no arguments/filtered_resps"):
        judge.conversation_and_reply({"doc_id": 3, "doc": {}})
    with pytest.raises(BadInput, match="not a generate_until sample"):  # a loglikelihood sample: (ctx, cont) pairs
        judge.conversation_and_reply({"doc_id": 0, "arguments": [["ctx", " a"]], "filtered_resps": [[-1.0, False]]})
    sample = {"doc_id": 0, "arguments": [("Hi\nSupporter:", {})], "filtered_resps": ["Hello"]}
    with pytest.raises(BadInput, match="judge model folder not found: /nonexistent/judge-model"):
        judge.judge_samples([sample], {"pretrained": "/nonexistent/judge-model"})
    with pytest.raises(BadInput, match=r"judge model_args: .*'batch_size'"):
        judge.judge_samples([sample], {"pretrained": "x", "batch_size": 2})


@pytest.fixture(scope="module")
def echo_samples(tiny_model_dir):
    """Samples logged by a real lm-eval run of a generative quickstart task on the tiny model (2 docs)."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    from pefteval_harness.tasks import task_manager

    lm = HFLM(pretrained=str(tiny_model_dir), device="cpu", batch_size=2)
    out = lm_eval.simple_evaluate(model=lm, tasks=["pefteval_quick_echo"], task_manager=task_manager(), limit=2,
                                  bootstrap_iters=0, log_samples=True)  # fmt: skip
    return out["samples"]["pefteval_quick_echo"]


@pytest.mark.slow  # lm-eval on the tiny model, then the tiny model judging three times (about 20 s)
def test_judge_samples_on_a_real_lm_eval_run(echo_samples, tiny_model_dir, tmp_path):
    samples = echo_samples
    context, reply = judge.conversation_and_reply(samples[0])
    assert context == samples[0]["arguments"][0][0] and context.startswith("Repeat: ")
    assert reply == samples[0]["filtered_resps"][0].strip()
    # lm-eval's samples-file form of the same sample gives the same pair.
    on_disk = {**samples[0], "arguments": {"gen_args_0": {"arg_0": context, "arg_1": {}}}}
    assert judge.conversation_and_reply(json.loads(json.dumps(on_disk))) == (context, reply)

    # One more sample with an empty reply: never sent to the judge, counted unparsed.
    empty = {**samples[1], "doc_id": 99, "filtered_resps": ["  "]}
    batch = [*samples, empty]
    model_args = {"pretrained": str(tiny_model_dir)}
    summary, judgements = judge.judge_samples(batch, model_args, batch_size=2, max_new_tokens=12)
    assert [j.doc_id for j in judgements] == [0, 1, 99]
    assert all(j.score is None or 1 <= j.score <= 5 for j in judgements)
    assert all(j.score == judge.parse_judgement(j.judgement) for j in judgements)
    assert all(j.judgement for j in judgements[:2])  # the tiny model always says something
    assert judgements[2].judgement == "" and judgements[2].score is None and judgements[2].reply == ""
    scores = [j.score for j in judgements if j.score is not None]
    assert summary["judge_parsed"] == len(scores) / 3 and 0.0 <= summary["judge_parsed"] <= 2 / 3
    assert summary["judge_score"] == (sum(scores) / len(scores) if scores else None)

    records = judge.judgement_records(judgements)
    assert json.loads(json.dumps(records)) == records
    for record, sample in zip(records, samples, strict=False):
        assert record["prompt"] == judge.judge_prompt(*judge.conversation_and_reply(sample))
        assert set(record) == {"doc_id", "prompt", "reply", "judgement", "score"}

    # Deterministic: a second call (model loaded again) judges identically.
    again = judge.judge_samples(batch, model_args, batch_size=2, max_new_tokens=12)
    assert again == (summary, judgements)

    # A judge with a chat template gets its prompt in that template (and no second BOS).
    chat_dir = tmp_path / "chat-judge"
    shutil.copytree(tiny_model_dir, chat_dir)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(chat_dir)
    tokenizer.chat_template = "{% for m in messages %}<s>[{{ m.role }}] {{ m.content }}\n{% endfor %}[assistant] "
    tokenizer.save_pretrained(chat_dir)
    assert judge._render(AutoTokenizer.from_pretrained(chat_dir), "PROMPT") == "<s>[user] PROMPT\n[assistant] "
    chat_summary, chat_judgements = judge.judge_samples(samples, {"pretrained": str(chat_dir)}, max_new_tokens=12)
    assert all(j.score is None or 1 <= j.score <= 5 for j in chat_judgements)
    assert 0.0 <= chat_summary["judge_parsed"] <= 1.0
