"""A local LLM-as-judge for affective generation (AG) tasks: off by default, run after lm-eval.

The evaluation worker runs an AG task (`pefteval_affect_esconv`, `pefteval_affect_empathetic`) with
`log_samples=True`, then hands the task's logged samples to `judge_samples`: a causal LM of the user's
choice reads each prompt the evaluated model saw and the reply it gave, rates the reply 1..5 by this
project's rubric (`DEFAULT_RUBRIC`) and ends with `Score: N`. The mean of the parsed scores and the share
of replies whose judgement parsed are the task's `judge_score` and `judge_parsed` (docs/judge.md).
"""

from __future__ import annotations

import gc
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from pefteval_harness.errors import BadInput

DEFAULT_RUBRIC = """\
This is the pefteval-harness rubric for rating one reply in an emotional-support or empathetic conversation \
(the project's own wording, not a published benchmark's).
Rate the reply on one scale from 1 to 5, weighing four qualities together:
- Empathy: does the reply recognise and acknowledge what the speaker feels?
- Relevance: does it respond to this conversation and this speaker, not to a generic situation?
- Fluency: is it clear, natural and grammatical?
- Helpfulness: does it comfort, encourage or offer a useful next step without lecturing?
Scores:
5 = excellent: clearly empathetic, specific to the conversation, fluent and genuinely helpful.
4 = good: empathetic and relevant, with small flaws in wording or helpfulness.
3 = acceptable: relevant but generic, or empathetic but of little help.
2 = poor: barely relevant, cold, awkward or unhelpful.
1 = very poor: off-topic, incoherent, dismissive or harmful, or empty.
Give one short sentence of reasons, then write the score alone on the last line in exactly this form:
Score: N
where N is one of 1, 2, 3, 4, 5."""

# "Score" (any case) then a colon, markdown allowed around it: "Score: 4", "score:4/5", "**Score:** 5".
_SCORE_MARKER = re.compile(r"\bscore\b[\s*_]*:", re.IGNORECASE)
# The value right after the last marker: an integer, optionally "/5"; a decimal is not a score.
_SCORE_VALUE = re.compile(r"[\s*_`\[(]*(\d+(?:\.\d+)?)(?:\s*/\s*(\d+))?")
_MODEL_KEYS = ("pretrained", "revision", "trust_remote_code", "dtype", "use_safetensors")


@dataclass(frozen=True)
class Judgement:
    """One reply's judgement: the judge's prompt, its raw answer and the parsed score (None if none)."""

    doc_id: int
    prompt: str
    reply: str
    judgement: str
    score: int | None


def judge_prompt(context: str, reply: str, rubric: str = DEFAULT_RUBRIC) -> str:
    """The judge's instruction: the rubric, the conversation as the evaluated model saw it, and its reply."""
    return (
        f"{rubric}\n\n"
        f"Conversation (the prompt the rated model was given):\n{context.strip()}\n\n"
        f"Reply to rate:\n{reply.strip()}\n\n"
        "Your rating:"
    )


def parse_judgement(text: str) -> int | None:
    """The score after the LAST `Score:` marker, when it is an integer in 1..5 (out of 5); else None."""
    markers = list(_SCORE_MARKER.finditer(text))
    if not markers:
        return None
    match = _SCORE_VALUE.match(text, markers[-1].end())
    if match is None or "." in match.group(1):
        return None
    if match.group(2) is not None and match.group(2) != "5":
        return None  # "4/10" is another scale
    score = int(match.group(1))
    return score if 1 <= score <= 5 else None


def conversation_and_reply(sample: dict) -> tuple[str, str]:
    """The prompt the model saw and its reply, from one sample lm-eval 0.4.13 logs with `log_samples=True`.

    In memory `arguments` is `[(context, generation_kwargs)]`; in lm-eval's samples files it is
    `{"gen_args_0": {"arg_0": context, "arg_1": ...}}`. The reply is `filtered_resps[0]`, stripped.
    """
    where = f"logged sample doc_id={sample.get('doc_id', '?')}"
    arguments, responses = sample.get("arguments"), sample.get("filtered_resps")
    if not arguments or not isinstance(responses, list) or not responses:
        raise BadInput(f"{where}: no arguments/filtered_resps (was the task run with log_samples=True?)")
    if isinstance(arguments, dict):  # the samples-file form
        first = arguments.get("gen_args_0") or {}
        context = first.get("arg_0")
    else:
        context = arguments[0][0] if isinstance(arguments[0], list | tuple) and arguments[0] else None
    reply = responses[0]
    if isinstance(reply, list | tuple):  # a task without a take_first filter keeps every generation
        reply = reply[0] if reply else ""
    if not isinstance(context, str) or not isinstance(reply, str):
        raise BadInput(f"{where}: not a generate_until sample (context {type(context).__name__}, "
                       f"reply {type(reply).__name__})")  # fmt: skip
    return context, reply.strip()


def judge_samples(
    samples: list[dict],
    model_args: dict,
    *,
    rubric: str = DEFAULT_RUBRIC,
    max_new_tokens: int = 32,
    batch_size: int = 4,
    device: str = "cpu",
) -> tuple[dict, list[Judgement]]:
    """Judge every sample's reply with the model `model_args` names; the aggregates and each judgement.

    `model_args`: `pretrained` (folder or hub id), optional `revision`, `trust_remote_code` (default False)
    and `dtype`. Greedy decoding with `torch.manual_seed(0)`, batches left-padded, so a rerun gives the
    same judgements. An empty reply is not sent to the judge (score None, judgement ""). The model is
    freed before returning.
    """
    if batch_size < 1 or max_new_tokens < 1:
        raise BadInput(f"judge: batch_size ({batch_size}) and max_new_tokens ({max_new_tokens}) must be >= 1")
    pairs = [conversation_and_reply(sample) for sample in samples]
    doc_ids = [int(sample.get("doc_id", index)) for index, sample in enumerate(samples)]
    prompts = [judge_prompt(context, reply, rubric) for context, reply in pairs]
    to_judge = [index for index, (_, reply) in enumerate(pairs) if reply]
    answers = dict(zip(to_judge, _generate([prompts[i] for i in to_judge], model_args, max_new_tokens,
                                           batch_size, device), strict=True)) if to_judge else {}  # fmt: skip
    judgements = [
        Judgement(doc_id, prompt, reply, answers.get(index, ""), parse_judgement(answers.get(index, "")))
        for index, (doc_id, prompt, (_, reply)) in enumerate(zip(doc_ids, prompts, pairs, strict=True))
    ]
    scores = [j.score for j in judgements if j.score is not None]
    summary = {
        "judge_score": sum(scores) / len(scores) if scores else None,
        "judge_parsed": len(scores) / len(judgements) if judgements else None,
    }
    return summary, judgements


def judgement_records(judgements: Sequence[Judgement]) -> list[dict]:
    """The judgements as JSON-ready dicts (stored with the task's results)."""
    return [asdict(judgement) for judgement in judgements]


def _generate(prompts: list[str], model_args: dict, max_new_tokens: int, batch_size: int, device: str) -> list[str]:
    """Greedy judgements for `prompts`, in order; the model is loaded here and freed on the way out."""
    tokenizer, model = _load(model_args, device)
    import torch  # after _load: a bad model_args fails before torch is imported

    try:
        torch.manual_seed(0)
        texts = [_render(tokenizer, prompt) for prompt in prompts]
        # A chat template writes its own special tokens; a plain prompt gets the tokenizer's.
        special = tokenizer.chat_template is None
        answers: list[str] = []
        with torch.inference_mode():
            for start in range(0, len(texts), batch_size):
                batch = tokenizer(texts[start : start + batch_size], return_tensors="pt", padding=True,
                                  add_special_tokens=special).to(device)  # fmt: skip
                output = model.generate(
                    **batch,
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    num_beams=1,
                    pad_token_id=tokenizer.pad_token_id,
                )
                new = output[:, batch["input_ids"].shape[1] :]
                answers.extend(text.strip() for text in tokenizer.batch_decode(new, skip_special_tokens=True))
        return answers
    finally:
        del model
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _load(model_args: dict, device: str):
    """The judge's tokenizer (left padding, a pad token) and model in eval mode on `device`."""
    unknown = sorted(set(model_args) - set(_MODEL_KEYS))
    if unknown or not model_args.get("pretrained"):
        raise BadInput(f"judge model_args: need `pretrained`, may have {', '.join(_MODEL_KEYS[1:])}; "
                       f"got {sorted(model_args)}")  # fmt: skip
    pretrained = str(model_args["pretrained"])
    path = Path(pretrained).expanduser()
    # A hub id is "name" or "org/name"; anything else that is not on disk is a missing folder.
    if not path.exists() and (pretrained.startswith(("/", ".", "~")) or pretrained.count("/") > 1):
        raise BadInput(f"judge model folder not found: {pretrained}")
    source = str(path) if path.exists() else pretrained
    from transformers import AutoModelForCausalLM, AutoTokenizer

    common = {"revision": model_args.get("revision"), "trust_remote_code": bool(model_args.get("trust_remote_code"))}
    tokenizer = AutoTokenizer.from_pretrained(source, **common)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise BadInput(f"judge model {pretrained}: its tokenizer has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    extra = {key: model_args[key] for key in ("dtype", "use_safetensors") if model_args.get(key)}
    model = AutoModelForCausalLM.from_pretrained(source, **common, **extra).to(device)
    model.eval()
    return tokenizer, model


def _render(tokenizer, prompt: str) -> str:
    """The prompt as the judge expects it: in its chat template when it has one, else as is."""
    if tokenizer.chat_template is None:
        return prompt
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
    )
