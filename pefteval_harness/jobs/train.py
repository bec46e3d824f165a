"""Train job: full fine-tuning through DeepSpeed, or a `peft` method, with the HuggingFace Trainer.

The examples are the training splits of the job's tasks rendered by their own lm-eval configs
(`tasks/rendering.py`); the loss covers the answer tokens only. A sequence longer than `max_length` loses
the start of its prompt, never its answer; examples left with no answer token are dropped and counted.
The job records its costs next to the artifact (`train()`'s result): trainable and total parameters,
optimiser steps, training time, non-padding tokens trained on and their rate, peak host and accelerator
memory, the size of the weights (`adapter_bytes`) and of the whole artifact folder (`artifact_bytes`), and
a digest of the trained weights (`weights_sha256`, which the saved artifact must match).

One body (`train_rank`) trains a job in one process or as one rank of a Ray Train gang: a job with
`resources.workers > 1` runs on N ranks (`jobs/gang.py`: DeepSpeed ZeRO for full fine-tuning, DDP for peft).
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import random
import resource
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

from pefteval_harness.errors import BadInput
from pefteval_harness.finetuning import get_method
from pefteval_harness.jobs import load_kwargs, model_path, prefer_safetensors
from pefteval_harness.jobs.types import DeepSpeedSettings, Job
from pefteval_harness.store import Store
from pefteval_harness.tasks import manager_for
from pefteval_harness.tasks.rendering import training_examples

log = logging.getLogger(__name__)


def deepspeed_config(settings: DeepSpeedSettings) -> dict:
    """A DeepSpeed config for the Trainer: "auto" lets the Trainer fill in what it already knows."""
    zero: dict = {"stage": settings.zero_stage}
    if settings.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu"}
    if settings.zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    optimizer_params = {"lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": "auto"}
    if not settings.offload_optimizer:
        optimizer_params["torch_adam"] = True  # skips a long JIT build of DeepSpeed's fused CPU Adam
    return {
        "train_batch_size": "auto",
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "zero_optimization": zero,
        "optimizer": {"type": "AdamW", "params": optimizer_params},
        "zero_allow_untested_optimizer": True,
        **settings.config,
    }


def _without_shared_memory_collectives() -> None:
    """DeepSpeed's communication backend, starting on a CPU, JIT-compiles its shared-memory collectives (a C++
    op: over a minute on 2 cores, again whenever the Python environment moves) for `inference_all_reduce`, which
    training never calls. Marked unavailable (the dict DeepSpeed keeps for this), it is never built; training's
    collectives are torch.distributed's (gloo on a CPU) either way."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


# torch builds DeepSpeed's C++ ops (CPU Adam, with `offload_optimizer`) in a folder under a lock file,
# which it takes even to check a finished build. A process killed holding it (SIGKILL, a lost node) leaves
# the file, and every later DeepSpeed job on the machine waits for it forever (seen in bench/chaos.py). A
# build of these ops takes well under a minute here: a lock older than this belongs to a dead process.
STALE_BUILD_LOCK_SECONDS = 300.0


@cache
def _sweep_dead_build_locks(every_seconds: float = 10.0) -> None:
    """Delete torch's extension-build locks older than STALE_BUILD_LOCK_SECONDS while this process lives."""
    from torch.utils.cpp_extension import get_default_build_root

    # Where torch builds: $TORCH_EXTENSIONS_DIR/<op>, else <its cache>/py311_cpu/<op> (python and CUDA versions).
    chosen = os.environ.get("TORCH_EXTENSIONS_DIR")
    root, pattern = (Path(chosen), "*/lock") if chosen else (Path(get_default_build_root()), "*/*/lock")

    def sweep() -> None:
        while True:
            for lock in root.glob(pattern):
                try:
                    if time.time() - lock.stat().st_mtime > STALE_BUILD_LOCK_SECONDS:
                        lock.unlink()
                        log.warning("removed %s: a build lock left by a process that was killed", lock)
                except FileNotFoundError:
                    pass
            time.sleep(every_seconds)

    threading.Thread(target=sweep, name="build-lock-sweeper", daemon=True).start()


def _single_process_group() -> None:
    """DeepSpeed wants a process group even for one process; a launcher would have set these."""
    if "MASTER_PORT" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])
    for key, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1"}.items():
        os.environ.setdefault(key, value)


@dataclass
class Tokenized:
    rows: list[dict] = field(default_factory=list)
    truncated_prompts: int = 0  # examples whose prompt lost its start to fit max_length
    without_answer: int = 0  # examples with no answer token (empty answers): dropped, they teach nothing


def tokenize(examples, tokenizer, max_length: int) -> Tokenized:
    """Encode prompt + continuation the way lm-eval scores them; mask the prompt out of the loss.

    Too long a sequence keeps its end: the prompt is cut from the left (as a model reads the most recent
    context), and the answer (+ EOS) is cut only if it alone is longer than max_length.
    """
    out = Tokenized()
    for ex in examples:
        prompt, continuation = ex.prompt, ex.continuation
        # lm-eval moves the prompt's trailing whitespace into the continuation before encoding.
        stripped = prompt.rstrip()
        prompt, continuation = stripped, prompt[len(stripped) :] + continuation
        whole = tokenizer(prompt + continuation, add_special_tokens=False)["input_ids"]
        n_prompt = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
        prompt_ids, answer_ids = whole[:n_prompt], whole[n_prompt:]
        if not answer_ids:
            out.without_answer += 1
            continue
        answer_ids = (answer_ids + [tokenizer.eos_token_id])[:max_length]
        keep = max_length - len(answer_ids)
        if len(prompt_ids) > keep:
            out.truncated_prompts += 1
            prompt_ids = prompt_ids[len(prompt_ids) - keep :] if keep else []
        ids = prompt_ids + answer_ids
        out.rows.append({"input_ids": ids, "labels": [-100] * len(prompt_ids) + answer_ids})
    return out


class PadCollator:
    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, rows: list[dict]) -> dict:
        import torch

        width = max(len(r["input_ids"]) for r in rows)

        def pad(values, fill):
            return torch.tensor([v + [fill] * (width - len(v)) for v in values])

        ids = [r["input_ids"] for r in rows]
        return {
            "input_ids": pad(ids, self.pad_id),
            "attention_mask": pad([[1] * len(v) for v in ids], 0),
            "labels": pad([r["labels"] for r in rows], -100),
        }


def _directory_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


# What serving the fine-tune needs besides the base model and its tokenizer: the weights and their config.
_WEIGHT_FILES = ("*.safetensors", "*.safetensors.index.json", "adapter_config.json", "config.json")


def weights_bytes(path: Path) -> int:
    """Bytes of the adapter (or, for full fine-tuning, the model): weights and config, no tokenizer."""
    return sum(p.stat().st_size for pattern in _WEIGHT_FILES for p in path.glob(pattern) if p.is_file())


def total_optimizer_steps(n_examples: int, settings) -> int:
    """The Trainer's own count: max_steps if set, else epochs × optimiser steps per epoch."""
    if settings.max_steps > 0:
        return settings.max_steps
    per_epoch = max(1, math.ceil(n_examples / settings.batch_size) // settings.gradient_accumulation_steps)
    return max(1, math.ceil(settings.epochs * per_epoch))


def _share(examples: list, fraction: float, seed: int) -> list:
    """A seeded `fraction` of one task's examples (at least one), in their original order."""
    if fraction >= 1:
        return examples
    keep = max(1, round(len(examples) * fraction))
    chosen = sorted(random.Random(seed).sample(range(len(examples)), keep))
    return [examples[i] for i in chosen]


@dataclass
class Rank:
    """This process's place in its job: the only process, or one rank of a Ray Train gang (`jobs/gang.py`)."""

    rank: int = 0
    world: int = 1
    resume_from: str | None = None  # a Trainer checkpoint folder to resume from (a gang restarted)
    checkpoints: int = 0  # about this many Trainer checkpoints per run; 0: none (nothing could resume them)
    callbacks: list = field(default_factory=list)  # the gang's: report checkpoints to Ray Train
    tokens: int = 0  # non-padding tokens this rank trained on so far (a restarted rank: from its checkpoint)

    @property
    def writes(self) -> bool:
        """Rank 0 writes the artifact; the others only join the collective calls (ZeRO-3's gather)."""
        return self.rank == 0


@dataclass
class Trained:
    """One rank's outcome: the job's result (complete on rank 0) and what this rank itself did."""

    result: dict
    tokens: int  # this rank's non-padding tokens (a gang sums them)
    seconds: float  # this attempt's training time


def train(job: Job, store: Store) -> dict:
    """The train job: one process, or a Ray Train gang of `job.resources.workers` ranks (`jobs/gang.py`)."""
    if job.resources.workers > 1:
        from pefteval_harness.jobs.gang import train_gang

        return train_gang(job, store)
    trained = train_rank(job, store, Rank())
    return {**trained.result, "workers": 1}


@contextmanager
def _artifact_folder(job: Job, store: Store, rank: Rank) -> Iterator[Path]:
    """Rank 0 writes the job's artifact; another rank's Trainer writes nothing into the folder it gets."""
    if rank.writes:
        with store.staging(job.id) as out:
            yield out
    else:
        with tempfile.TemporaryDirectory(prefix=f"pefteval-rank{rank.rank}-") as out:
            yield Path(out)


@cache
def _counting_trainer():
    """The Trainer, counting the non-padding tokens each rank trains on (transformers' own count is
    already summed over the ranks)."""
    from transformers import Trainer

    class CountingTrainer(Trainer):
        def __init__(self, *args, rank: Rank, **kwargs):
            super().__init__(*args, **kwargs)
            self.rank = rank

        def training_step(self, model, inputs, num_items_in_batch=None):
            self.rank.tokens += int(inputs["attention_mask"].sum())
            return super().training_step(model, inputs, num_items_in_batch)

    return CountingTrainer


def _gathered(model, zero3: bool):
    """Every parameter whole on every rank while inside (ZeRO-3 partitions them; a collective call)."""
    if not zero3:
        return nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None)


def tensors_sha256(tensors: Mapping) -> str:
    """A digest of named tensors: names sorted, each tensor's shape and values as float32."""
    import torch

    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().to("cpu", torch.float32).contiguous()
        digest.update(f"{name}:{tuple(tensor.shape)}\n".encode())
        digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()


def trained_weights(model, produces: str) -> Mapping:
    """What a train job saves: the whole state dict, or (peft) the adapter's weights as peft saves them."""
    if produces == "adapter":
        from peft import get_peft_model_state_dict

        return get_peft_model_state_dict(model)
    return model.state_dict()


def train_rank(job: Job, store: Store, rank: Rank) -> Trained:
    """The training body: the whole job in one process, or one rank of a gang (every rank trains).

    Rank 0 writes the artifact (through `store.staging`); every rank calls what is collective under ZeRO-3
    (the weights digest's gather, `save_model`'s gather). A device comes from LOCAL_RANK (set by Ray Train
    on a GPU node; written, untested on a GPU here); on CPU the Trainer runs with `use_cpu`.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainingArguments

    from pefteval_harness.progress import TrainProgress

    reset_peak_rss()  # this process may have run other jobs before
    config, settings = job.config, job.config.train
    method = get_method(config.method)
    base = model_path(config.base, store)
    trust = config.trust_remote_code
    load = {"trust_remote_code": trust, **load_kwargs(config.base)}

    tokenizer = AutoTokenizer.from_pretrained(base, **load)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    manager = manager_for(settings.tasks, config.include_paths)
    tasks = manager.load(settings.tasks)["tasks"]
    examples = [
        ex
        for name in settings.tasks
        for ex in _share(training_examples(tasks[name], settings.limit), settings.data_fraction, config.seed)
    ]
    random.Random(config.seed).shuffle(examples)
    tokenized = tokenize(examples, tokenizer, settings.max_length)
    rows = tokenized.rows
    if not rows:
        raise BadInput(f"no training example has an answer token ({tokenized.without_answer} examples)")

    torch.manual_seed(config.seed)  # every rank starts from the same weights
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32, **load, **prefer_safetensors(base))
    callbacks = [TrainProgress(store, job.id), *rank.callbacks]
    if method.produces == "adapter":
        from peft import get_peft_model

        model = get_peft_model(model, method.peft_config(config.peft, total_optimizer_steps(len(rows), settings)))
        callbacks += method.callbacks(model)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())

    if config.deepspeed:
        _without_shared_memory_collectives()
        _sweep_dead_build_locks()
    if config.deepspeed and rank.world == 1:
        _single_process_group()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    zero3 = bool(config.deepspeed) and config.deepspeed.zero_stage == 3
    with _artifact_folder(job, store, rank) as out:
        initial_adapter = None
        if method.produces == "adapter" and method.rewrites_base(config.peft):
            # PiSSA/OLoRA moved the base's top components into the adapter; saving the initial adapter lets
            # peft write the trained one as a plain LoRA (rank 2r) of the original base, which lm-eval's
            # peft= loading, the merge engine and merge_and_unload then all read correctly.
            initial_adapter = out / "trainer" / "initial_adapter"
            model.peft_config["default"].init_lora_weights = True  # peft's recipe: saved as a no-op LoRA init
            if rank.writes:
                model.save_pretrained(str(initial_adapter))
        args = TrainingArguments(
            output_dir=str(out / "trainer"),
            # A gang keeps the job's batch: `batch_size` examples per optimiser step over all ranks, so a
            # job trains alike on one worker or N (its id does not depend on them).
            per_device_train_batch_size=settings.batch_size // rank.world,
            gradient_accumulation_steps=settings.gradient_accumulation_steps,
            num_train_epochs=settings.epochs,
            max_steps=settings.max_steps,
            learning_rate=settings.learning_rate,
            lr_scheduler_type=settings.lr_scheduler,
            warmup_steps=settings.warmup,
            weight_decay=settings.weight_decay,
            logging_steps=10,
            **_checkpointing(rank, total_optimizer_steps(len(rows), settings)),
            report_to="none",
            seed=config.seed,
            use_cpu=not torch.cuda.is_available(),
            deepspeed=deepspeed_config(config.deepspeed) if config.deepspeed else None,
            disable_tqdm=True,
            remove_unused_columns=False,
            include_num_input_tokens_seen="non_padding",  # the attention mask's ones: no padding, no virtual tokens
        )
        trainer = _counting_trainer()(
            model=model,
            args=args,
            train_dataset=rows,
            data_collator=PadCollator(tokenizer.pad_token_id),
            callbacks=callbacks,
            rank=rank,
        )
        started = time.perf_counter()
        try:
            output = trainer.train(resume_from_checkpoint=rank.resume_from)
            seconds = time.perf_counter() - started
            with _gathered(model, zero3):  # every rank: a collective call under ZeRO-3
                digest = tensors_sha256(trained_weights(model, method.produces)) if rank.writes else None
            if initial_adapter is not None:
                if rank.writes:
                    model.save_pretrained(str(out), path_initial_model_for_weight_conversion=str(initial_adapter))
            else:
                trainer.save_model(str(out))  # the full model (ZeRO-3 gathers it), or only a peft adapter
        finally:
            # ZeRO-3 leaves a process-wide flag that changes how every later model loads.
            from transformers.integrations.deepspeed import unset_hf_deepspeed_config

            unset_hf_deepspeed_config()
        if rank.writes:
            tokenizer.save_pretrained(str(out))
        shutil.rmtree(out / "trainer", ignore_errors=True)
        artifact_bytes = _directory_bytes(out)
        adapter_bytes = weights_bytes(out)
    tokens = int(trainer.state.num_input_tokens_seen)  # summed over the ranks by transformers
    result = {
        "method": method.name,
        "tasks": settings.tasks,
        "examples": len(rows),
        "examples_without_answer": tokenized.without_answer,
        "truncated_prompts": tokenized.truncated_prompts,
        "steps": output.global_step,
        "train_loss": output.training_loss,
        "loss_history": [log["loss"] for log in trainer.state.log_history if "loss" in log],
        "trainable_params": trainable,
        "total_params": total,
        "train_seconds": seconds,
        "peak_rss_mb": peak_rss_mb(),  # since the job started (`reset_peak_rss`)
        "trained_tokens": tokens,  # non-padding input tokens of every optimiser step's batches (all epochs)
        "tokens_per_second": tokens / seconds if seconds > 0 else None,
        # Peak memory torch allocated on the GPU during training; None without one.
        "peak_accelerator_mb": peak_accelerator_mb(),
        # The weights and their config (adapter_model.safetensors + adapter_config.json, or the full model's
        # safetensors + config.json): what serving the fine-tune adds to the base and its tokenizer.
        "adapter_bytes": adapter_bytes,
        "artifact_bytes": artifact_bytes,  # the whole artifact folder: also the tokenizer and peft's README
        # The trained weights as rank 0 held them (gathered under ZeRO-3): the whole state dict, or the
        # adapter's weights as peft saves them (for PiSSA/OLoRA: before their conversion to a plain LoRA).
        "weights_sha256": digest,
    }
    return Trained(result=result, tokens=rank.tokens, seconds=seconds)


def _checkpointing(rank: Rank, total_steps: int) -> dict:
    """Trainer checkpoints only where something resumes from them (a gang's restart): `rank.checkpoints`
    per run, evenly spaced (a run shorter than that: one every optimiser step)."""
    if not rank.checkpoints:
        return {"save_strategy": "no"}
    return {"save_strategy": "steps", "save_steps": max(1, math.ceil(total_steps / rank.checkpoints))}


def reset_peak_rss() -> None:
    """Start this process's peak resident memory afresh (Linux), so that a job in a reused worker process
    records its own peak."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_rss_mb() -> float:
    """This process's peak resident memory since `reset_peak_rss` (VmHWM); without /proc, ru_maxrss: the
    peak over the process's life."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def peak_accelerator_mb() -> float | None:
    import torch

    return torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
