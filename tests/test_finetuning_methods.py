"""Every registered peft method, run for real on the tiny model: bad configs refused at spec load; a few
optimiser steps in the train job; a standard peft adapter that lm-eval loads with `peft=`, whose scores
differ from the base model's, line up with the PeftModel's own forward pass (virtual tokens of
prompt-learning adapters excluded) and, where peft can merge the adapter, equal the merged model's.

A new `FINETUNE_METHODS` entry is tested here without any edit: the tests are parametrized over the registry.
"""

from __future__ import annotations

import math
import textwrap

import pytest
import torch

from pefteval_harness.cli import main
from pefteval_harness.finetuning import FINETUNE_METHODS

ADAPTERS = [name for name, m in FINETUNE_METHODS.items() if m.produces == "adapter"]
PROMPT_LEARNING = [name for name in ADAPTERS if FINETUNE_METHODS[name].prompt_learning]
# LoRA initialisations that rewrite the base weights: their adapters are saved converted (tested below).
LORA_OPTIONS = {
    "lora+pissa": {"init_lora_weights": "pissa_niter_2"},  # fast SVD: random, so only the conversion reloads it
    "lora+olora": {"init_lora_weights": "olora"},
}
# (context, continuation) pairs scored with lm-eval's loglikelihood, of different lengths (one padded batch).
REQUESTS = [
    ("Review: the film was good\nSentiment:", " positive"),
    ("Review: a dull and awful plot\nSentiment:", " negative"),
    ("Review: fine\nSentiment:", " positive"),
    ("Hi", " there, how are you"),
]
GENERATE = ("Review: the film was good\nSentiment:", {"until": ["\n\n"], "max_gen_toks": 4, "do_sample": False})


# --- bad input: one line, exit 2, at spec load ----------------------------------------------------------


SPEC = """
base_model: tiny
train: {{tasks: [pefteval_quick_sentiment]}}
finetunes:
  ft: {finetune}
evaluate: {{tasks: [pefteval_quick_sentiment]}}
"""

BAD = [
    ("{method: lorra}", "finetunes.ft.method: unknown fine-tuning method 'lorra'"),
    ("{method: ia3, config: {r: 8}}", "finetunes.ft.config: IA3Config: got an unexpected keyword argument 'r'"),
    ("{method: prompt_tuning, config: {target_modules: all-linear}}", "unexpected keyword argument 'target_modules'"),
    ("{method: lora, config: {r: 0}}", "finetunes.ft.config: LoraConfig: r: expected an integer >= 1, got 0"),
    ("{method: dora, config: {r: -4}}", "LoraConfig: r: expected an integer >= 1, got -4"),
    ("{method: loha, config: {r: 0}}", "LoHaConfig: r: expected an integer >= 1, got 0"),
    ("{method: vera, config: {r: 0}}", "VeraConfig: r: expected an integer >= 1, got 0"),
    ("{method: adalora, config: {target_r: 0}}", "AdaLoraConfig: target_r: expected an integer >= 1, got 0"),
    ("{method: prefix_tuning, config: {num_virtual_tokens: 0}}", "num_virtual_tokens: expected an integer >= 1"),
    ("{method: c3a, config: {block_size: 0}}", "C3AConfig: block_size: expected an integer >= 1, got 0"),
    ("{method: lora, config: {r: 4.5}}", "LoraConfig: r: Input should be a valid integer, got 4.5"),
    ("{method: lora, config: {r: true}}", "LoraConfig: r: Input should be a valid integer, got True"),
    ("{method: lora, config: {use_rslora: 'yes'}}", "LoraConfig: use_rslora: Input should be a valid boolean"),
    ("{method: oft, config: {oft_block_size: 0}}", "OFTConfig: Either `r` or `oft_block_size` must be non-zero"),
    ("{method: lora, config: {init_lora_weights: eva}}", "init_lora_weights: expected true, false, gaussian"),
    ("{method: lora, config: {init_lora_weights: pissa_niter_x}}", "LoraConfig: init_lora_weights: Input should be"),
    ("{method: full, config: {r: 8}}", "finetunes.ft.config: full fine-tuning takes no peft config"),
]


@pytest.mark.parametrize("finetune, message", BAD)
def test_bad_method_configs_are_one_line_and_exit_2_at_spec_load(tmp_path, capsys, finetune, message):
    spec = tmp_path / "spec.yaml"
    spec.write_text(textwrap.dedent(SPEC.format(finetune=finetune)))
    code = main(["plan", str(spec)])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("pefteval: error: ") and f"{spec.name}: " in err, err
    assert message in err, err


def test_lora_options_resolve():
    lora = FINETUNE_METHODS["lora"]
    for options in ({"use_rslora": True}, {"init_lora_weights": "mica"}, {"init_lora_weights": "orthogonal"}):
        assert lora.resolve_params(options) == {**lora.defaults, **options}


def test_every_method_resolves_its_defaults_and_says_what_it_is():
    for name, method in FINETUNE_METHODS.items():
        assert method.resolve_params({}) == method.defaults, name
        described = method.describe()
        assert {"prompt_learning", "mergeable"} <= described.keys()
        if method.produces == "adapter":
            # derived from peft's own config class, never from the method's name
            assert method.prompt_learning == method.peft_config(method.defaults, 10).is_prompt_learning
    assert {"prompt_tuning", "p_tuning", "prefix_tuning"} <= set(PROMPT_LEARNING)
    assert not FINETUNE_METHODS["lora"].prompt_learning and FINETUNE_METHODS["lora"].merges_into_base


def test_only_base_rewriting_initialisations_are_converted_at_save():
    lora = FINETUNE_METHODS["lora"]
    assert lora.rewrites_base({"init_lora_weights": "pissa"}) and lora.rewrites_base({"init_lora_weights": "olora"})
    assert lora.rewrites_base({"init_lora_weights": "pissa_niter_4"})
    assert not lora.rewrites_base({}) and not lora.rewrites_base({"init_lora_weights": "mica"})


# --- each method trained, saved, loaded by lm-eval, scored ----------------------------------------------


def _train_spec(tiny_model_dir, method: str, config: dict) -> dict:
    return {
        "base_model": str(tiny_model_dir),
        "train": {
            "tasks": ["pefteval_quick_sentiment"],
            "max_steps": 3,
            "batch_size": 4,
            "limit": 12,
            # high enough that 3 steps move no-op initialisations (LoRA's B = 0, IA3's ones, OFT's identity)
            "learning_rate": 0.03,
            "lr_scheduler": "constant",
        },
        "finetunes": {"ft": {"method": method, "config": config}},
        "evaluate": {"tasks": ["pefteval_quick_sentiment"], "include_base": False},
    }


@pytest.fixture(scope="module")
def trainer(tiny_model_dir, tmp_path_factory):
    """Trains a fine-tune on first use (in this process, as a Ray worker with the default 1 CPU would: one
    thread, which a model this small runs fastest on) and keeps its result."""
    import os

    from pefteval_harness.jobs import run_batch
    from pefteval_harness.plan import build_plan
    from pefteval_harness.spec import Spec
    from pefteval_harness.store import Store

    store_root = tmp_path_factory.mktemp("methods")
    done: dict[str, tuple] = {}
    env, threads = dict(os.environ), torch.get_num_threads()
    deterministic = torch.are_deterministic_algorithms_enabled()

    def train(case: str):
        if case not in done:
            method, _, _ = case.partition("+")
            spec = Spec.model_validate(_train_spec(tiny_model_dir, method, LORA_OPTIONS.get(case, {})))
            (job,) = [j for j in build_plan(spec).jobs if j.kind == "train"]
            outcome = run_batch([job.model_dump(mode="json")], str(store_root), threads=1)[job.id]
            assert outcome["state"] == "done", outcome
            store = Store(store_root)
            done[case] = (store.artifact(job.id), store.result(job.id), job)
        return done[case]

    yield train
    os.environ.clear()  # run_batch pinned this process's numerics: undo it for later test modules
    os.environ.update(env)
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(deterministic)


@pytest.fixture(scope="module")
def base_scores(tiny_model_dir):
    from pefteval_harness.jobs.evaluate import load_lm

    return _loglikelihoods(load_lm(pretrained=str(tiny_model_dir), device="cpu", batch_size=4))


def _loglikelihoods(lm) -> list[float]:
    from lm_eval.api.instance import Instance

    requests = [Instance("loglikelihood", {}, r, i) for i, r in enumerate(REQUESTS)]
    return [ll for ll, _ in lm.loglikelihood(requests, disable_tqdm=True)]


def _direct_loglikelihood(lm, model, context: str, continuation: str) -> float:
    """The continuation's log-probability from one forward pass of `model` on context + continuation,
    tokenised as lm-eval does; logits for virtual tokens (in front of the input) are left out."""
    whole = lm.tok_encode(context + continuation)
    n_context = len(lm.tok_encode(context))
    ids = torch.tensor([whole])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, -len(whole) :]  # the real tokens' positions only
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    return sum(logprobs[i - 1, whole[i]].item() for i in range(n_context, len(whole)))


def _direct_greedy(lm, model, context: str, steps: int) -> str:
    """Greedy decoding by full forward passes (no KV cache), stopped at EOS."""
    ids = lm.tok_encode(context)
    start = len(ids)
    for _ in range(steps):
        with torch.no_grad():
            token = int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
        if token == lm.tokenizer.eos_token_id:
            break
        ids.append(token)
    return lm.tokenizer.decode(ids[start:])


def _peft_lm(tiny_model_dir, adapter):
    from pefteval_harness.jobs.evaluate import load_lm

    return load_lm(pretrained=str(tiny_model_dir), peft=str(adapter), device="cpu", batch_size=4)


@pytest.mark.slow
@pytest.mark.parametrize("case", ADAPTERS)  # LoRA's options: checked at spec load, PiSSA/OLoRA below
def test_method_trains_saves_a_peft_adapter_that_lm_eval_scores(case, trainer, base_scores, tiny_model_dir):
    from lm_eval.api.instance import Instance
    from peft import PeftConfig

    method = FINETUNE_METHODS[case.partition("+")[0]]
    adapter, result, job = trainer(case)

    # a standard peft adapter, and the costs of training it
    assert (adapter / "adapter_config.json").is_file() and (adapter / "adapter_model.safetensors").is_file()
    assert PeftConfig.from_pretrained(str(adapter)).is_prompt_learning == method.prompt_learning
    assert result["steps"] == 3 and 0 < result["trainable_params"] < result["total_params"]
    assert result["trained_tokens"] > 0 and result["tokens_per_second"] > 0
    assert result["peak_accelerator_mb"] is None  # no GPU here
    assert 0 < result["adapter_bytes"] <= result["artifact_bytes"]
    assert result["adapter_bytes"] >= (adapter / "adapter_model.safetensors").stat().st_size

    # lm-eval's peft= path: scores that training changed, and that are the PeftModel's own
    lm = _peft_lm(tiny_model_dir, adapter)
    scores = _loglikelihoods(lm)
    assert all(math.isfinite(s) for s in scores), scores
    assert max(abs(a - b) for a, b in zip(scores, base_scores, strict=True)) > 1e-3, (scores, base_scores)
    model = lm.model.eval()
    direct = [_direct_loglikelihood(lm, model, c, x) for c, x in REQUESTS]
    assert scores == pytest.approx(direct, abs=1e-3)

    # generation follows the adapter too
    (generated,) = lm.generate_until([Instance("generate_until", {}, GENERATE, 0)], disable_tqdm=True)
    assert generated == _direct_greedy(lm, model, GENERATE[0], GENERATE[1]["max_gen_toks"])

    # merged into the base where peft can, with the same outputs; refused where the registry says it cannot
    ids = torch.tensor([lm.tok_encode(REQUESTS[0][0] + REQUESTS[0][1])])
    with torch.no_grad():
        unmerged = model(input_ids=ids).logits[0, -ids.shape[1] :]
    if method.merges_into_base:
        merged = model.merge_and_unload()
        with torch.no_grad():
            assert torch.allclose(merged(input_ids=ids).logits[0], unmerged, atol=1e-4)
    else:
        with pytest.raises((AttributeError, NotImplementedError, ValueError)):
            model.merge_and_unload()


@pytest.mark.slow
def test_adalora_gets_the_runs_own_step_count(trainer):
    """AdaLoRA's rank schedule needs the number of optimiser steps: the train job sets it from the run."""
    from peft import PeftConfig

    adapter, result, _ = trainer("adalora")
    config = PeftConfig.from_pretrained(str(adapter))
    assert config.peft_type.value == "ADALORA" and config.total_step == result["steps"] == 3


@pytest.mark.slow
@pytest.mark.parametrize("case", ["lora+pissa", "lora+olora"])
def test_base_rewriting_initialisations_are_saved_as_plain_lora_of_the_original_base(case, trainer):
    import json

    adapter, _, job = trainer(case)
    saved = json.loads((adapter / "adapter_config.json").read_text())
    # converted by peft: a no-op-initialised LoRA of twice the rank, relative to the untouched base
    assert saved["init_lora_weights"] is True and saved["r"] == 2 * job.config.peft["r"]
    assert not (adapter / "initial_adapter").exists()


@pytest.mark.slow
@pytest.mark.parametrize("name", PROMPT_LEARNING)
def test_prompt_learning_scores_line_up_with_the_real_tokens(name, trainer, tiny_model_dir):
    """The PeftModel returns logits for its virtual tokens too; lm-eval must score the real tokens only."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapter, _, _ = trainer(name)
    lm = _peft_lm(tiny_model_dir, adapter)
    whole = lm.tok_encode(REQUESTS[0][0] + REQUESTS[0][1])
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(adapter)).eval()
    with torch.no_grad():
        n_logits = model(input_ids=torch.tensor([whole])).logits.shape[1]
    # prompt tuning and P-tuning return logits for the virtual tokens; prefix tuning serves them as keys/values
    n_virtual = n_logits - len(whole)
    assert n_virtual in (0, model.active_peft_config.num_virtual_tokens)
    scores = _loglikelihoods(lm)
    direct = [_direct_loglikelihood(lm, model, c, x) for c, x in REQUESTS]
    assert scores == pytest.approx(direct, abs=1e-4)
    if n_virtual:  # the slice matters: the leading logits would give other numbers
        ids = torch.tensor([whole])
        with torch.no_grad():
            unsliced = torch.log_softmax(model(input_ids=ids).logits[0, : len(whole)], dim=-1)
        n_context = len(lm.tok_encode(REQUESTS[0][0]))
        wrong = sum(unsliced[i - 1, whole[i]].item() for i in range(n_context, len(whole)))
        assert abs(wrong - scores[0]) > 1e-3
