"""The embedded default model: a tiny Llama-style causal LM with a locally trained tokenizer.

Built deterministically (fixed seed, fixed corpus), offline, in seconds. `base_model: tiny` in a spec
selects it and `pefteval tiny-model --out DIR` writes it to a folder that `--model hf` loads.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from pefteval_harness.store import umask_mode

TINY_SEED = 0
TINY_CONFIG = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
    max_position_embeddings=256,
    tie_word_embeddings=False,
)
VOCAB_SIZE = 512
PRETRAIN = dict(epochs=2, batch_size=32, learning_rate=3e-3)
SPECIAL_TOKENS = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}


def build_tokenizer():
    """A byte-level BPE tokenizer trained on the quickstart corpus (deterministic)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from pefteval_harness.tasks import quickstart

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=list(SPECIAL_TOKENS.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(quickstart.corpus(), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, model_max_length=256, **SPECIAL_TOKENS)


def build(out_dir: str | Path) -> Path:
    """Write the tiny model and its tokenizer to `out_dir` (atomically: a temp folder, then a rename)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out_dir = Path(out_dir)
    tokenizer = build_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **TINY_CONFIG,
    )
    torch.manual_seed(TINY_SEED)
    model = LlamaForCausalLM(config)
    pretrain(model, tokenizer)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    tmp.chmod(umask_mode(0o755))  # mkdtemp makes 0700: the model is for everyone the umask allows
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def pretrain(model, tokenizer) -> None:
    """A few seconds of language modelling on the quickstart statements (seeded, one thread)."""
    import torch

    from pefteval_harness.tasks import quickstart

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread: the same float sums, so the same weights, run to run
    try:
        generator = torch.Generator().manual_seed(TINY_SEED)
        texts = quickstart.pretraining_texts()
        optimizer = torch.optim.AdamW(model.parameters(), lr=PRETRAIN["learning_rate"])
        model.train()
        for _ in range(PRETRAIN["epochs"]):
            order = torch.randperm(len(texts), generator=generator).tolist()
            for start in range(0, len(order), PRETRAIN["batch_size"]):
                batch = [texts[i] + tokenizer.eos_token for i in order[start : start + PRETRAIN["batch_size"]]]
                enc = tokenizer(batch, return_tensors="pt", padding=True)
                labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
                loss = model(**enc, labels=labels).loss
                loss.backward()
                optimizer.step()
                optimizer.zero_grad()
        model.eval()
    finally:
        torch.set_num_threads(threads)


def fingerprint() -> str:
    """Changes whenever what `build` writes could change (part of the base job's id)."""
    import hashlib
    import inspect

    from pefteval_harness.tasks import quickstart

    source = "".join(inspect.getsource(f) for f in (build_tokenizer, build, pretrain, quickstart))
    identity = repr((TINY_SEED, TINY_CONFIG, VOCAB_SIZE, SPECIAL_TOKENS, PRETRAIN, source))
    return hashlib.sha256(identity.encode()).hexdigest()[:16]
