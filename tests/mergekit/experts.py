"""Small deterministic Llama-shaped models for the mergekit equality tests: a base, three experts, two LoRAs.

Shared by `make_fixtures.py` (run under mergekit's own venv) and `tests/test_mergekit_equality.py`, so both
sides merge byte-identical inputs. Pure torch: every tensor is drawn from a generator seeded by its name, and
the config is written as JSON, so the same files come out whatever transformers or mergekit is installed.

Each expert is base + τ_i, τ_i = scale_i·(N(0,1) + shift_i) with its own scale and a signed shift, so the
experts disagree in sign on many entries (sign election matters) and differ in magnitude (trimming picks
different entries per expert). Continuous draws make equal magnitudes (ties at a trim threshold) have
probability ~0, which keeps tie rules out of the equality checks. The LoRA adapters (q, v and down
projections, rank 2) are peft-format folders over the base, for LoRA merges in space delta_w.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

HIDDEN, INTERMEDIATE, LAYERS, HEADS, KV_HEADS, VOCAB = 16, 32, 2, 4, 2, 32
HEAD_DIM = HIDDEN // HEADS
# (scale, shift) of each expert's τ: varied sizes, opposite-leaning signs
EXPERT_PERTURBATIONS = ((0.02, 0.3), (0.05, -0.5), (0.01, 0.1))
CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": HIDDEN,
    "intermediate_size": INTERMEDIATE,
    "num_hidden_layers": LAYERS,
    "num_attention_heads": HEADS,
    "num_key_value_heads": KV_HEADS,
    "head_dim": HEAD_DIM,
    "vocab_size": VOCAB,
    "max_position_embeddings": 64,
    "rms_norm_eps": 1e-6,
    "hidden_act": "silu",
    "tie_word_embeddings": False,
    "attention_bias": False,
    "mlp_bias": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "dtype": "float32",
}


def tensor_shapes() -> dict[str, tuple[int, ...]]:
    """The state dict names and shapes of `LlamaForCausalLM(CONFIG)` (checked against transformers there)."""
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (VOCAB, HIDDEN)}
    for i in range(LAYERS):
        p = f"model.layers.{i}"
        shapes |= {
            f"{p}.self_attn.q_proj.weight": (HEADS * HEAD_DIM, HIDDEN),
            f"{p}.self_attn.k_proj.weight": (KV_HEADS * HEAD_DIM, HIDDEN),
            f"{p}.self_attn.v_proj.weight": (KV_HEADS * HEAD_DIM, HIDDEN),
            f"{p}.self_attn.o_proj.weight": (HIDDEN, HEADS * HEAD_DIM),
            f"{p}.mlp.gate_proj.weight": (INTERMEDIATE, HIDDEN),
            f"{p}.mlp.up_proj.weight": (INTERMEDIATE, HIDDEN),
            f"{p}.mlp.down_proj.weight": (HIDDEN, INTERMEDIATE),
            f"{p}.input_layernorm.weight": (HIDDEN,),
            f"{p}.post_attention_layernorm.weight": (HIDDEN,),
        }
    shapes |= {"model.norm.weight": (HIDDEN,), "lm_head.weight": (VOCAB, HIDDEN)}
    return shapes


def _generator(*parts: object) -> torch.Generator:
    digest = hashlib.sha256("\0".join(map(str, parts)).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "big") >> 1)


def base_tensors() -> dict[str, torch.Tensor]:
    """The base: norms near 1, matrices N(0, 0.1²)."""
    out = {}
    for name, shape in tensor_shapes().items():
        draw = torch.randn(shape, generator=_generator("base", name), dtype=torch.float32)
        out[name] = 1.0 + 0.1 * draw if len(shape) == 1 else 0.1 * draw
    return out


def task_vector(index: int, name: str, shape: tuple[int, ...]) -> torch.Tensor:
    scale, shift = EXPERT_PERTURBATIONS[index]
    draw = torch.randn(shape, generator=_generator("expert", index, name), dtype=torch.float32)
    return scale * (draw + shift)


def expert_tensors(index: int) -> dict[str, torch.Tensor]:
    """Expert `index` (0, 1 or 2): base + τ_index, rounded to float32 once, as saved."""
    return {name: b + task_vector(index, name, tuple(b.shape)) for name, b in base_tensors().items()}


def _save(folder: Path, tensors: dict[str, torch.Tensor]) -> Path:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "model.safetensors"), {"format": "pt"})
    (folder / "config.json").write_text(json.dumps(CONFIG, indent=2) + "\n")
    return folder


def build_models(root: Path) -> dict[str, Path]:
    """Write base, expert0..2 (HF model folders) and lora0, lora1 (peft adapters over base) under `root`."""
    root = Path(root)
    models = {"base": _save(root / "base", base_tensors())}
    for i in range(len(EXPERT_PERTURBATIONS)):
        models[f"expert{i}"] = _save(root / f"expert{i}", expert_tensors(i))
    return models | build_lora_adapters(root, models["base"])


LORA_RANK, LORA_ALPHA, LORA_TARGETS = 2, 4, ("q_proj", "v_proj", "down_proj")


def lora_tensors(index: int) -> dict[str, torch.Tensor]:
    """LoRA adapter `index` over the base, as peft saves it: lora_A (r, in) and lora_B (out, r), both nonzero."""
    out = {}
    for name, shape in tensor_shapes().items():
        module = name.removesuffix(".weight")
        if module.rsplit(".", 1)[-1] not in LORA_TARGETS:
            continue
        key = f"base_model.model.{module}"
        a = torch.randn((LORA_RANK, shape[1]), generator=_generator("lora_A", index, name), dtype=torch.float32)
        b = torch.randn((shape[0], LORA_RANK), generator=_generator("lora_B", index, name), dtype=torch.float32)
        out[f"{key}.lora_A.weight"], out[f"{key}.lora_B.weight"] = 0.3 * a, 0.05 * (b + 0.5 * (-1) ** index)
    return out


def build_lora_adapters(root: Path, base: Path, count: int = 2) -> dict[str, Path]:
    """Write `count` peft LoRA adapter folders (lora0, lora1, ...) over `base` under `root`."""
    from safetensors.torch import save_file

    folders = {}
    for i in range(count):
        folder = Path(root) / f"lora{i}"
        folder.mkdir(parents=True, exist_ok=True)
        save_file(lora_tensors(i), str(folder / "adapter_model.safetensors"), {"format": "pt"})
        config = {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": str(base),
            "r": LORA_RANK,
            "lora_alpha": LORA_ALPHA,
            "target_modules": list(LORA_TARGETS),
            "lora_dropout": 0.0,
            "bias": "none",
            "fan_in_fan_out": False,
            "use_rslora": False,
            "use_dora": False,
            "inference_mode": True,
        }
        (folder / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
        folders[f"lora{i}"] = folder
    return folders
