"""The merge engine and its methods: numbers against hand-worked and in-memory references, peft round trips,
typed parameters, per-tensor seeding, sharded output, every bad input, atomic output, YAML recipes and the
shared adapter rules. Models are a tiny Llama built here; no mocks, no network."""

from __future__ import annotations

import json
import math
import os
import pickle
import re
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from pefteval_harness.errors import BadInput
from pefteval_harness.merging import (
    ADAPTER_FAMILIES,
    MERGE_METHODS,
    MergeMethod,
    MergeSettings,
    check_adapters,
    describe_methods,
    load_recipe,
    merge_from_config,
    merge_models,
    tensor_generator,
)
from tests.conftest import PEFTEVAL

LORA = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], "init_lora_weights": False}


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
    )
    return LlamaForCausalLM(config)


def _load(folder: Path):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(folder)


def _lora_expert(base: Path, out: Path, seed: int, **overrides) -> Path:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    get_peft_model(_load(base), LoraConfig(**{**LORA, **overrides})).save_pretrained(out)
    return out


def _folder(path: Path, tensors: dict[str, torch.Tensor], adapter: bool = False) -> Path:
    """A hand-made model (or adapter) folder: fast, and free to hold odd tensors."""
    path.mkdir(parents=True)
    if adapter:
        (path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", **LORA}))
        save_file(tensors, str(path / "adapter_model.safetensors"))
    else:
        (path / "config.json").write_text("{}")
        save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    return path


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("merging")


@pytest.fixture(scope="module")
def base(root) -> Path:
    torch.manual_seed(0)
    _llama().save_pretrained(root / "base")
    (root / "base" / "tokenizer_config.json").write_text('{"model_max_length": 64}')  # a side file to copy
    return root / "base"


@pytest.fixture(scope="module")
def full_experts(root, base) -> list[Path]:
    experts = []
    for i in range(3):
        model = _load(base)
        gen = torch.Generator().manual_seed(100 + i)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=gen))
        out = root / f"full{i}"
        model.save_pretrained(out, max_shard_size="100KB" if i == 2 else "1GB")  # expert 2 is sharded
        experts.append(out)
    assert (experts[2] / "model.safetensors.index.json").is_file()
    return experts


@pytest.fixture(scope="module")
def lora_experts(root, base) -> list[Path]:
    return [_lora_expert(base, root / f"lora{i}", seed=10 + i) for i in range(2)]


def _state(folder: Path) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in _load(folder).state_dict().items()}


# --- methods ---------------------------------------------------------------------------------------------


def test_rht_hand_worked_example():
    # ρ = 0.5 keeps 2 of 4 entries, then ×2:  τ̂1 = [8,0,0,-6]  τ̂2 = [6,0,-10,0]  τ̂3 = [0,0,-8,-4]
    # Σ = [14, 0, -18, -10] -> s = [+, + (0 counts as +), -, -];  w̃ = [.25, .25, .5]
    # [ (.25·8 + .25·6)/2, 0/max(1,0), (.25·-10 + .5·-8)/2, (.25·-6 + .5·-4)/2 ]
    taus = [torch.tensor([4.0, -1, 2, -3]), torch.tensor([3.0, 1, -5, 0.5]), torch.tensor([1.0, 0.5, -4, -2])]
    merged = MERGE_METHODS["rht"](taus, [1, 1, 2], density=0.5)
    assert torch.allclose(merged, torch.tensor([1.75, 0.0, -3.25, -1.75]))
    # A sum of exactly 0 elects +: only the positive expert counts. w̃ = [.5, .5]
    merged = MERGE_METHODS["rht"]([torch.tensor([2.0, -1]), torch.tensor([-2.0, 3])], density=1.0)
    assert torch.allclose(merged, torch.tensor([1.0, 1.5]))


def _rht_reference(taus: list[torch.Tensor], weights: list[float], rho: float) -> torch.Tensor:
    """RHT's definition written out entry by entry."""
    w = [x / sum(weights) for x in weights]
    trimmed = []
    for t in taus:
        flat = t.flatten().tolist()
        k = math.floor(rho * len(flat))
        keep = set(sorted(range(len(flat)), key=lambda j: -abs(flat[j]))[:k])
        trimmed.append([v / rho if j in keep else 0.0 for j, v in enumerate(flat)])
    out = []
    for j in range(taus[0].numel()):
        s = 1.0 if sum(t[j] for t in trimmed) >= 0 else -1.0
        agree = [i for i, t in enumerate(trimmed) if t[j] != 0 and math.copysign(1.0, t[j]) == s]
        out.append(sum(w[i] * trimmed[i][j] for i in agree) / max(1, len(agree)))
    return torch.tensor(out).view(taus[0].shape)


@pytest.mark.parametrize("rho", [0.3, 0.7, 1.0])
def test_rht_matches_reference_on_random_tensors(rho):
    gen = torch.Generator().manual_seed(7)
    taus = [torch.randn(6, 5, generator=gen) for _ in range(4)]
    weights = [0.5, 1.0, 2.0, 0.25]
    assert torch.allclose(
        MERGE_METHODS["rht"](taus, weights, density=rho), _rht_reference(taus, weights, rho), atol=1e-6
    )


def test_rht_one_expert_is_trimmed_and_rescaled():
    tau = torch.randn(7, 3, generator=torch.Generator().manual_seed(1))
    merged = MERGE_METHODS["rht"]([tau], [5.0], density=0.7)
    kept = merged != 0
    assert kept.sum() == math.floor(0.7 * 21)
    assert torch.allclose(merged[kept], tau[kept] / 0.7)
    assert tau[kept].abs().min() >= tau[~kept].abs().max()


def test_ties_properties():
    ties = MERGE_METHODS["ties"]
    # No trimming and agreeing signs: the weighted mean, times λ.
    a, b = torch.tensor([1.0, 2.0, -3.0]), torch.tensor([3.0, 4.0, -1.0])
    assert torch.allclose(ties([a, b], [1, 3], density=1.0, scaling=2.0), 2 * (a + 3 * b) / 4)
    # Sign elected on the weighted sum; only agreeing experts enter the weighted mean.
    x, y = torch.tensor([2.0]), torch.tensor([-3.0])
    assert torch.allclose(ties([x, y], [1, 1], density=1.0), torch.tensor([-3.0]))
    assert torch.allclose(ties([x, y], [2, 1], density=1.0), torch.tensor([2.0]))
    # Trimming keeps ⌊density·numel⌋ entries, the largest, unscaled.
    tau = torch.randn(10, 4, generator=torch.Generator().manual_seed(3))
    merged = ties([tau], [1.0], density=0.25)
    kept = merged != 0
    assert kept.sum() == 10 and torch.allclose(merged[kept], tau[kept])
    assert tau[kept].abs().min() >= tau[~kept].abs().max()
    # Defaults documented: density 0.7, scaling 1.
    assert ties.validate_params({}).model_dump() == {"density": 0.7, "scaling": 1.0}
    assert torch.equal(ties([tau, -tau * 0.5]), ties([tau, -tau * 0.5], density=0.7, scaling=1.0))


def test_linear_and_task_arithmetic_methods():
    a, b = torch.tensor([1.0, -2.0]), torch.tensor([3.0, 6.0])
    assert torch.allclose(MERGE_METHODS["linear"]([a, b], [1, 3]), (a + 3 * b) / 4)
    assert torch.allclose(MERGE_METHODS["task_arithmetic"]([a, b], [1, 3], scaling=0.5), 0.5 * (a + 3 * b))
    assert not MERGE_METHODS["linear"].needs_base and MERGE_METHODS["rht"].needs_base


@pytest.mark.parametrize(
    "call, expected",
    [
        (lambda: merge_models(method="dare", experts=[Path("x")], out_dir=Path("y")), "'dare'.*known: linear"),
        (lambda: MERGE_METHODS["ties"]([torch.ones(2)], lambda_=1), "unknown parameter 'lambda_'.*density, scaling"),
        (lambda: MERGE_METHODS["rht"]([torch.ones(2)], density="high"), "parameter 'density': .* valid number"),
        (lambda: MERGE_METHODS["rht"]([torch.ones(2)], density=True), "parameter 'density': .* valid number"),
        (lambda: MERGE_METHODS["rht"]([torch.ones(2)], density=math.nan), "parameter 'density': .* finite number"),
        (
            lambda: MERGE_METHODS["ties"]([torch.ones(2)], density=1.5),
            "^merge method 'ties': parameter 'density': Input should be less than or equal to 1$",
        ),
        (lambda: MERGE_METHODS["ties"]([torch.ones(2)], scaling=math.inf), "parameter 'scaling': .* finite"),
        (lambda: MERGE_METHODS["linear"]([torch.ones(2)] * 2, [1, -1]), "sum to 0"),
    ],
)
def test_method_errors(call, expected):
    with pytest.raises(BadInput, match=expected):
        call()


# --- full models -----------------------------------------------------------------------------------------


def test_task_arithmetic_full_models_equals_in_memory(root, base, full_experts):
    weights, lam = [1.0, 0.5, -0.25], 0.8
    out = merge_models(
        method="task_arithmetic",
        experts=full_experts,
        base=base,
        out_dir=root / "out_ta",
        weights=weights,
        params={"scaling": lam},
    )
    b, experts = _state(base), [_state(e) for e in full_experts]
    merged = _state(out)
    assert merged.keys() == b.keys()
    for name, w0 in b.items():
        expected = w0 + lam * sum(w * (e[name] - w0) for w, e in zip(weights, experts, strict=True))
        assert torch.allclose(merged[name], expected, atol=1e-6), name
    assert (out / "tokenizer_config.json").read_text() == '{"model_max_length": 64}'
    assert json.loads((out / "config.json").read_text()) == json.loads((base / "config.json").read_text())
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt"}
    record = json.loads((out / "merge_config.json").read_text())
    assert record["method"] == "task_arithmetic" and record["parameters"] == {"scaling": lam}
    assert record["weights"] == weights and record["space"] == "delta_w"
    assert record["experts"] == [str(e) for e in full_experts]


def test_linear_full_models_without_base(root, full_experts):
    out = merge_models(method="linear", experts=full_experts[:2], out_dir=root / "out_linear", weights=[1, 3])
    e0, e1, merged = _state(full_experts[0]), _state(full_experts[1]), _state(out)
    for name in e0:
        assert torch.allclose(merged[name], 0.25 * e0[name] + 0.75 * e1[name], atol=1e-6), name
    assert (out / "config.json").is_file()


def test_int_buffers_are_copied_and_dtype_kept(tmp_path):
    def model(path, w, step):
        return _folder(tmp_path / path, {"w": w.to(torch.bfloat16), "step": torch.tensor([step], dtype=torch.int64)})

    base = model("base", torch.zeros(4), 7)
    experts = [model("e1", torch.full((4,), 1.0), 1), model("e2", torch.full((4,), 3.0), 2)]
    out = load_file(
        str(
            merge_models(method="task_arithmetic", experts=experts, base=base, out_dir=tmp_path / "o")
            / "model.safetensors"
        )
    )
    assert out["w"].dtype == torch.bfloat16 and torch.equal(out["w"].float(), torch.full((4,), 4.0))
    assert out["step"].dtype == torch.int64 and out["step"].tolist() == [7]  # the base's, not merged


# --- LoRA adapters ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "variant",
    [{}, {"use_rslora": True}, {"rank_pattern": {"q_proj": 2}, "alpha_pattern": {"v_proj": 3}}],
    ids=["plain", "rslora", "patterns"],
)
def test_lora_delta_w_one_expert_equals_peft_merge_and_unload(tmp_path, base, variant):
    from peft import PeftModel

    expert = _lora_expert(base, tmp_path / "expert", seed=20, **variant)
    out = merge_models(
        method="task_arithmetic",
        experts=[expert],
        base=base,
        out_dir=tmp_path / "out",
        params={"scaling": 1.0},
    )
    expected = PeftModel.from_pretrained(_load(base), expert).merge_and_unload().state_dict()
    merged, b = _state(out), _state(base)
    assert merged.keys() == expected.keys()
    changed = [n for n in merged if not torch.equal(merged[n], b[n])]
    assert len(changed) == 4 and all("q_proj" in n or "v_proj" in n for n in changed)
    for name, tensor in expected.items():
        assert torch.allclose(merged[name], tensor, atol=1e-6), name


def test_lora_delta_w_fan_in_fan_out_gpt2(tmp_path):
    """GPT-2's Conv1D stores W transposed; peft marks its adapters fan_in_fan_out."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64, n_positions=32)).save_pretrained(
        tmp_path / "gpt2"
    )
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True, init_lora_weights=False)
    get_peft_model(GPT2LMHeadModel.from_pretrained(tmp_path / "gpt2"), config).save_pretrained(tmp_path / "lora")
    out = merge_models(
        method="task_arithmetic", experts=[tmp_path / "lora"], base=tmp_path / "gpt2", out_dir=tmp_path / "out"
    )
    expected = PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(tmp_path / "gpt2"), tmp_path / "lora")
    expected = expected.merge_and_unload().state_dict()
    merged = GPT2LMHeadModel.from_pretrained(out).state_dict()
    assert not torch.equal(
        merged["transformer.h.0.attn.c_attn.weight"],
        GPT2LMHeadModel.from_pretrained(tmp_path / "gpt2").state_dict()["transformer.h.0.attn.c_attn.weight"],
    )
    for name, tensor in expected.items():
        assert torch.allclose(merged[name], tensor, atol=1e-6), name


def test_lora_delta_w_rht_applies_the_method_to_delta_w(root, base, lora_experts):
    from peft import PeftModel

    out = merge_models(method="rht", experts=lora_experts, base=base, out_dir=root / "out_dw_rht", weights=[1, 2])
    b = _state(base)
    deltas = []
    for expert in lora_experts:
        unloaded = PeftModel.from_pretrained(_load(base), expert).merge_and_unload().state_dict()
        deltas.append({n: unloaded[n] - b[n] for n in b})
    merged = _state(out)
    for name in b:
        if "q_proj" in name or "v_proj" in name:
            expected = b[name] + MERGE_METHODS["rht"]([d[name] for d in deltas], [1, 2], density=0.7)
        else:
            expected = b[name]
        assert torch.allclose(merged[name], expected, atol=1e-5), name


def test_lora_factor_space_loads_in_peft_and_merges_factors(root, base, lora_experts):
    from peft import PeftModel
    from peft.utils import get_peft_model_state_dict

    out = merge_models(
        method="ties",
        experts=lora_experts,
        out_dir=root / "out_factor",
        weights=[1, 2],
        params={"density": 0.5},
        space="factor",
    )
    assert json.loads((out / "adapter_config.json").read_text()) == json.loads(
        (lora_experts[0] / "adapter_config.json").read_text()
    )
    loaded = get_peft_model_state_dict(PeftModel.from_pretrained(_load(base), out))
    factors = [load_file(str(e / "adapter_model.safetensors")) for e in lora_experts]
    assert loaded.keys() == factors[0].keys() and len(loaded) == 8
    for name, tensor in loaded.items():
        expected = MERGE_METHODS["ties"]([f[name] for f in factors], [1, 2], density=0.5, scaling=1.0)
        assert torch.allclose(tensor, expected), name
    assert json.loads((out / "merge_config.json").read_text())["space"] == "factor"


# --- bad inputs ------------------------------------------------------------------------------------------


def _bad(match: str, **kwargs) -> str:
    with pytest.raises(BadInput, match=match) as info:
        merge_models(**{"method": "task_arithmetic", **kwargs})
    message = str(info.value)
    assert "\n" not in message
    return message


def test_bad_expert_folders(tmp_path, base, full_experts, lora_experts):
    out = tmp_path / "out"
    _bad(
        f"{lora_experts[0]}: a lora expert mixed with full",
        experts=[full_experts[0], lora_experts[0]],
        base=base,
        out_dir=out,
    )
    _bad(f"{tmp_path / 'nope'}: no such folder", experts=[tmp_path / "nope"], base=base, out_dir=out)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text("{}")
    _bad(f"{empty}: no model.safetensors", experts=[empty], base=base, out_dir=out)
    _bad(r"3 weights for 2 experts", experts=full_experts[:2], base=base, weights=[1, 2, 3], out_dir=out)
    _bad("needs a base model", experts=full_experts[:2], out_dir=out)
    _bad("needs a base model", experts=lora_experts, out_dir=out)
    _bad(
        f"{lora_experts[0]}: the base must be a full model", experts=full_experts[:2], base=lora_experts[0], out_dir=out
    )
    _bad("space 'factor' applies to LoRA", experts=full_experts[:2], base=base, space="factor", out_dir=out)
    assert not out.exists()


def test_pickle_files_are_refused_and_never_loaded(tmp_path, base):
    marker = tmp_path / "unpickled"

    class Evil:  # loading this pickle would create `marker`
        def __reduce__(self):
            return (open, (str(marker), "w"))

    expert = tmp_path / "pickled"
    expert.mkdir()
    (expert / "config.json").write_text("{}")
    (expert / "pytorch_model.bin").write_bytes(pickle.dumps(Evil()))
    _bad(f"{expert}: pytorch_model.bin is a pickle file", experts=[expert], base=base, out_dir=tmp_path / "out")
    adapter = tmp_path / "pickled_adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", **LORA}))
    (adapter / "adapter_model.bin").write_bytes(pickle.dumps(Evil()))
    _bad("adapter_model.bin is a pickle file", experts=[adapter], base=base, out_dir=tmp_path / "out")
    assert not marker.exists()


def test_tensor_names_and_shapes_must_match(tmp_path):
    t = {"a.weight": torch.zeros(2, 3), "b.weight": torch.zeros(4)}
    base = _folder(tmp_path / "base", t)
    missing = _folder(tmp_path / "missing", {"a.weight": torch.zeros(2, 3)})
    extra = _folder(tmp_path / "extra", {**t, "c.weight": torch.zeros(1)})
    shape = _folder(tmp_path / "shape", {**t, "a.weight": torch.zeros(3, 2)})
    out = tmp_path / "out"
    _bad(f"{missing}: tensor b.weight of the base .* is missing", experts=[missing], base=base, out_dir=out)
    _bad(f"{extra}: tensor c.weight is not in the base", experts=[extra], base=base, out_dir=out)
    _bad(
        rf"{shape}: tensor a.weight has shape \[3, 2\], the base .* has \[2, 3\]",
        experts=[shape],
        base=base,
        out_dir=out,
    )
    # Without a base, the experts are checked against each other.
    with pytest.raises(BadInput, match=f"{shape}: tensor a.weight .* the first expert"):
        merge_models(method="linear", experts=[base, shape], out_dir=out)
    assert not out.exists()


def test_bad_lora_experts(tmp_path, base, lora_experts):
    out = tmp_path / "out"
    other_r = _lora_expert(base, tmp_path / "r8", seed=3, r=8)
    other_targets = _lora_expert(base, tmp_path / "k", seed=4, target_modules=["q_proj", "k_proj"])
    _bad(
        f"{other_r}: r=8 differs from {lora_experts[0]}",
        experts=[lora_experts[0], other_r],
        out_dir=out,
        space="factor",
    )
    _bad(
        f"{other_targets}: target_modules=.* differs",
        experts=[lora_experts[0], other_targets],
        out_dir=out,
        space="factor",
    )
    dora = _lora_expert(base, tmp_path / "dora", seed=5, use_dora=True)
    _bad(f"{dora}.*use_dora=True adapters are not supported .* yet", experts=[dora], base=base, out_dir=out)
    saved = _lora_expert(base, tmp_path / "mts", seed=6, modules_to_save=["lm_head"])
    _bad(f"{saved}.*modules_to_save=.* not supported .* yet", experts=[saved], base=base, out_dir=out)
    # A base without the adapted weight: named, with the adapter tensor.
    small = _folder(tmp_path / "small", {"lm_head.weight": torch.zeros(128, 32)})
    _bad(
        f"{lora_experts[0]}: tensor base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight adapts "
        "model.layers.0.self_attn.q_proj.weight, which the base",
        experts=lora_experts[:1],
        base=small,
        out_dir=out,
    )
    # Different ranks are fine in delta_w space (B·A has the base weight's shape).
    assert merge_models(method="task_arithmetic", experts=[lora_experts[0], other_r], base=base, out_dir=out) == out


def test_out_dir_must_be_empty_and_output_is_atomic(tmp_path, monkeypatch):
    t = {f"w{i}": torch.full((3,), float(i)) for i in range(5)}
    base = _folder(tmp_path / "m" / "base", t)
    expert = _folder(tmp_path / "m" / "expert", {k: v + 1 for k, v in t.items()})
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("x")
    _bad(f"{taken}: output folder exists and is not empty", experts=[expert], base=base, out_dir=taken)
    assert (taken / "keep.txt").read_text() == "x"

    calls = []

    def fails_on_third_tensor(tensors, weights, params, ctx):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("boom")
        return tensors[0]

    # A newcomer's method is one registry entry; this one fails halfway through the merge.
    monkeypatch.setitem(MERGE_METHODS, "halfway", MergeMethod("halfway", fails_on_third_tensor, description="fails"))
    parent = tmp_path / "outputs"
    parent.mkdir()
    with pytest.raises(RuntimeError, match="boom"):
        merge_models(method="halfway", experts=[expert], base=base, out_dir=parent / "merged")
    assert len(calls) == 3 and list(parent.iterdir()) == []  # neither out_dir nor the temporary folder
    # An existing empty out_dir is fine.
    (parent / "merged").mkdir()
    calls.clear()
    monkeypatch.setitem(
        MERGE_METHODS, "halfway", MergeMethod("halfway", lambda ts, ws, p, ctx: ts[0], description="copies")
    )
    merge_models(method="halfway", experts=[expert], base=base, out_dir=parent / "merged")
    assert sorted(p.name for p in parent.iterdir()) == ["merged"]
    assert torch.equal(load_file(str(parent / "merged" / "model.safetensors"))["w4"], torch.full((3,), 5.0))


# --- YAML configs ----------------------------------------------------------------------------------------


def test_merge_from_config_round_trip_with_relative_paths(tmp_path, monkeypatch):
    work = tmp_path / "project"
    t = {"a": torch.tensor([1.0, -2.0, 3.0]), "b": torch.ones(2, 2)}
    base = _folder(work / "models" / "base", t)
    e1 = _folder(work / "models" / "e1", {k: v * 2 for k, v in t.items()})
    e2 = _folder(work / "models" / "e2", {k: v - 1 for k, v in t.items()})
    (work / "configs").mkdir()
    config = work / "configs" / "merge.yaml"
    config.write_text(
        "method: ties\nbase_model: ../models/base\nparameters: {density: 1.0, scaling: 0.5}\n"
        "experts:\n  - path: ../models/e1\n    weight: 2\n  - path: ../models/e2\n"
    )
    monkeypatch.chdir(tmp_path)  # relative paths must not depend on the working directory
    out = merge_from_config(config, tmp_path / "out")
    direct = merge_models(
        method="ties",
        experts=[e1, e2],
        base=base,
        out_dir=tmp_path / "direct",
        weights=[2.0, 1.0],
        params={"density": 1.0, "scaling": 0.5},
    )
    got, want = load_file(str(out / "model.safetensors")), load_file(str(direct / "model.safetensors"))
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)
    record = json.loads((out / "merge_config.json").read_text())
    assert record["experts"] == [str(e1.resolve()), str(e2.resolve())]
    assert record["weights"] == [2.0, 1.0] and record["parameters"] == {"density": 1.0, "scaling": 0.5}


@pytest.mark.parametrize(
    "text, message",
    [
        ("method: [unclosed\n", r"merge.yaml:2: not valid YAML"),
        ("method: linear\nexperts: [{path: a}]\nsead: 3\n", "^merge.yaml: sead: unknown key$"),
        (
            "method: linear\nexperts:\n  - path: a\n  - path: b\n    weight: x\n",
            "^" + re.escape("merge.yaml: experts[1].weight: Input should be a valid number") + "$",
        ),
        ("method: linear\nexperts: [{path: a, weight: .inf}]\n", r"experts\[0\].weight: Input should be a finite"),
        ("method: linear\nexperts: [{path: a, wieght: 1}]\n", r"merge.yaml: experts\[0\].wieght: unknown key"),
        ("method: linear\nexperts: [{weight: 1}]\n", r"merge.yaml: experts\[0\].path: Field required"),
        ("method: linear\nexperts: a\n", "merge.yaml: experts: Input should be a valid list"),
        ("method: linear\nexperts: []\n", "merge.yaml: experts: List should have at least 1 item"),
        ("experts: [{path: a}]\n", "merge.yaml: method: Field required"),
        ("method: dare\nexperts: [{path: a}]\n", "merge.yaml: method: unknown merge method 'dare' .known: linear"),
        (
            "method: ties\nparameters: {k: 1}\nexperts: [{path: a}]\n",
            re.escape("merge.yaml: parameters: merge method 'ties': unknown parameter 'k' (known: density, scaling)"),
        ),
        (
            "method: ties\nparameters: {density: 0}\nexperts: [{path: a}]\n",
            "^merge.yaml: parameters: merge method 'ties': parameter 'density': Input should be greater than 0$",
        ),
        ("method: ties\nparameters: {scaling: .nan}\nexperts: [{path: a}]\n", "parameters.scaling: .* finite"),
        ("method: ties\nspace: weights\nexperts: [{path: a}]\n", "merge.yaml: space: Input should be 'delta_w' or"),
        ("method: linear\nweights: [1]\nexperts: [{path: a, weight: 2}]\n", "merge.yaml: weights: .* not both"),
        ("method: linear\nweights: [1, 2]\nexperts: [{path: a}]\n", "merge.yaml: weights: 2 weights for 1 experts"),
        ("method: linear\nexperts: [{path: a}, {path: b, weight: -1}]\n", "merge.yaml: experts: .* sum to 0"),
        ("method: linear\nseed: 1.5\nexperts: [{path: a}]\n", "merge.yaml: seed: Input should be a valid integer"),
        ("- method\n", "merge.yaml: expected a mapping"),
    ],
)
def test_merge_config_errors(tmp_path, monkeypatch, text, message):
    (tmp_path / "merge.yaml").write_text(text)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(BadInput, match=message) as info:
        merge_from_config(Path("merge.yaml"), tmp_path / "out")
    assert "\n" not in str(info.value) and not (tmp_path / "out").exists()


def test_missing_config_file(tmp_path):
    with pytest.raises(BadInput, match="nope.yaml: no such merge config file"):
        merge_from_config(tmp_path / "nope.yaml", tmp_path / "out")


def test_side_files_skip_weights(tmp_path):
    base = _folder(tmp_path / "base", {"w": torch.zeros(2)})
    (base / "pytorch_model.bin").write_bytes(b"not copied")
    (base / "tokenizer.json").write_text("{}")
    out = merge_models(method="task_arithmetic", experts=[base], base=base, out_dir=tmp_path / "out")
    assert sorted(p.name for p in out.iterdir()) == [
        "README.md",
        "config.json",
        "merge_config.json",
        "model.safetensors",
        "tokenizer.json",
    ]


def test_pefteval_merge_cli(tmp_path, tiny_model_dir):
    """`pefteval merge CONFIG --out DIR` as a user runs it: the merge of a model with itself is itself."""
    config = tmp_path / "merge.yaml"
    config.write_text(f"method: linear\nexperts:\n  - path: {tiny_model_dir}\n  - path: {tiny_model_dir}\n")
    out = subprocess.run(
        [*PEFTEVAL, "merge", str(config), "--out", str(tmp_path / "m")], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    merged = load_file(tmp_path / "m" / "model.safetensors")
    original = load_file(tiny_model_dir / "model.safetensors")
    assert merged.keys() == original.keys() and all(torch.allclose(merged[k], original[k]) for k in merged)
    assert (tmp_path / "m" / "tokenizer.json").is_file()

    config.write_text("method: linear\nexperts: nope\n")
    bad = subprocess.run(
        [*PEFTEVAL, "merge", str(config), "--out", str(tmp_path / "m2")], capture_output=True, text=True
    )
    assert bad.returncode == 2 and "merge.yaml: experts" in bad.stderr and "Traceback" not in bad.stderr
    assert not (tmp_path / "m2").exists()


# --- typed parameters, seeding, sharding, shared settings and adapter rules --------------------------------


def test_unknown_parameter_message_and_resolved_defaults():
    with pytest.raises(BadInput) as info:
        MERGE_METHODS["ties"].validate_params({"lambda_": 1})
    assert str(info.value) == "merge method 'ties': unknown parameter 'lambda_' (known: density, scaling)"
    with pytest.raises(BadInput, match=r"^merge method 'linear': unknown parameter 'scaling' \(known: none\)$"):
        MERGE_METHODS["linear"].validate_params({"scaling": 1})
    params = MERGE_METHODS["ties"].validate_params({"density": 1})  # an int is a number; stored as float
    assert params.density == 1.0 and isinstance(params.density, float) and params.scaling == 1.0


def test_describe_methods_lists_every_method_and_its_parameters():
    from typing import Literal

    from pydantic import Field

    from pefteval_harness.merging.methods import MethodParams

    described = {d["name"]: d for d in describe_methods()}
    assert list(described) == list(MERGE_METHODS)
    for name, method in MERGE_METHODS.items():
        d = described[name]
        assert d["description"] and d["version"] == method.version >= 1
        assert (d["needs_base"], d["normalise_weights"]) == (method.needs_base, method.normalise_weights)
        assert [p["name"] for p in d["parameters"]] == list(method.params.model_fields)
        assert all(p["description"] for p in d["parameters"])
    assert described["linear"]["parameters"] == []
    density = {p["name"]: p for p in described["ties"]["parameters"]}["density"]
    assert density["type"] == "float in (0, 1]" and density["default"] == 0.7

    class Params(MethodParams):
        rescale: bool = Field(True, description="b")
        mode: Literal["sum", "mean"] = Field("sum", description="m")
        k: int = Field(2, ge=1, description="k")

    custom = MergeMethod("custom", lambda ts, ws, p, ctx: ts[0], Params, "custom").describe()
    assert [(p["type"], p["default"]) for p in custom["parameters"]] == [
        ("bool", True),
        ("one of sum|mean", "sum"),
        ("int >= 1", 2),
    ]


def test_tensor_generator_depends_on_seed_and_name_only():
    names = ["model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"]

    def draws(order, seed=0):
        return {n: torch.rand(4, generator=tensor_generator(seed, n)) for n in order}

    forward, backward = draws(names), draws(names[::-1])
    assert all(torch.equal(forward[n], backward[n]) for n in names)
    assert not torch.equal(forward[names[0]], forward[names[1]])
    assert not torch.equal(forward[names[0]], draws(names, seed=1)[names[0]])
    # A stable hash, not Python's salted hash(): another process with another hash seed draws the same.
    code = (
        "import torch; from pefteval_harness.merging import tensor_generator as g;"
        " print(torch.rand(4, generator=g(0, 'lm_head.weight')).tolist())"
    )
    other = subprocess.run(
        [PEFTEVAL[0], "-c", code], capture_output=True, text=True, env={**os.environ, "PYTHONHASHSEED": "123"}
    )
    assert other.returncode == 0, other.stderr
    assert json.loads(other.stdout) == forward["lm_head.weight"].tolist()


def test_random_method_result_per_tensor_ignores_other_tensors(tmp_path, monkeypatch):
    def noise(tensors, weights, params, ctx):
        return torch.rand(tensors[0].shape, generator=ctx.generator)

    monkeypatch.setitem(MERGE_METHODS, "noise", MergeMethod("noise", noise, needs_base=False))
    both = _folder(tmp_path / "both", {"a": torch.zeros(3), "b": torch.zeros(5)})
    only_b = _folder(tmp_path / "only_b", {"b": torch.zeros(5)})

    def merged(expert, out, seed):
        return load_file(
            str(merge_models(method="noise", experts=[expert], out_dir=tmp_path / out, seed=seed) / "model.safetensors")
        )

    x, y, z = merged(both, "x", 5), merged(only_b, "y", 5), merged(both, "z", 6)
    assert torch.equal(x["b"], y["b"]) and not torch.equal(x["a"][:3], x["b"][:3])
    assert not torch.equal(x["b"], z["b"])
    assert json.loads((tmp_path / "x" / "merge_config.json").read_text())["seed"] == 5


def test_sharded_output_loads_and_equals_single_file(tmp_path, base, full_experts, lora_experts):
    from transformers import AutoModelForCausalLM

    for name, kwargs in {
        "full": {"experts": full_experts, "params": {"density": 0.5}},
        "lora": {"experts": lora_experts, "weights": [1, 2]},
    }.items():
        single = merge_models(method="ties", base=base, out_dir=tmp_path / f"{name}_single", **kwargs)
        sharded = merge_models(
            method="ties", base=base, out_dir=tmp_path / f"{name}_sharded", max_shard_bytes=20_000, **kwargs
        )
        shards = sorted(p.name for p in sharded.glob("*.safetensors"))
        assert len(shards) > 2 and not (sharded / "model.safetensors").exists()
        assert shards == [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
        index = json.loads((sharded / "model.safetensors.index.json").read_text())
        want = load_file(str(single / "model.safetensors"))
        assert sorted(index["weight_map"]) == sorted(want) and set(index["weight_map"].values()) == set(shards)
        assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in want.values())
        for shard in shards:  # a shard exceeds the limit only when it holds one tensor
            tensors = load_file(str(sharded / shard))
            assert len(tensors) == 1 or sum(t.numel() * t.element_size() for t in tensors.values()) <= 20_000
        got = AutoModelForCausalLM.from_pretrained(sharded).state_dict()
        expected = AutoModelForCausalLM.from_pretrained(single).state_dict()
        assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got), name
        assert not list(tmp_path.glob(".*partial*")) and not list(sharded.glob(".*"))
    with pytest.raises(BadInput, match="max_shard_bytes must be a positive integer"):
        merge_models(method="ties", base=base, experts=full_experts, out_dir=tmp_path / "x", max_shard_bytes=0)


def test_check_adapters_takes_saved_configs_and_peft_to_dict(lora_experts):
    from peft import AdaLoraConfig, LoraConfig

    assert ADAPTER_FAMILIES == ("lora",)
    saved = json.loads((lora_experts[0] / "adapter_config.json").read_text())
    planned = LoraConfig(**{**LORA, "target_modules": ["v_proj", "q_proj"]}).to_dict()  # a set, a PeftType
    assert isinstance(planned["target_modules"], set)
    check_adapters([saved, planned], "factor", ["saved", "planned"])
    everything = LoraConfig(**{**LORA, "target_modules": "all-linear"}).to_dict()
    check_adapters([saved, everything], "delta_w", ["saved", "all"])  # shapes may differ in delta_w space
    with pytest.raises(BadInput, match=r"^all: target_modules='all-linear' differs from saved \(\['q_proj', 'v_proj'"):
        check_adapters([saved, everything], "factor", ["saved", "all"])
    wider = LoraConfig(**{**LORA, "r": 8}).to_dict()
    with pytest.raises(BadInput, match="^wide: r=8 differs from saved .*use space delta_w"):
        check_adapters([saved, wider], "factor", ["saved", "wide"])
    dora = LoraConfig(**LORA, use_dora=True).to_dict()
    with pytest.raises(BadInput, match="^dora: use_dora=True adapters are not supported by the merge engine yet$"):
        check_adapters([saved, dora], "delta_w", ["saved", "dora"])
    adalora = AdaLoraConfig(target_modules=["q_proj"], total_step=10).to_dict()
    with pytest.raises(BadInput, match="^ada: peft_type 'ADALORA' cannot be merged"):
        check_adapters([adalora], "delta_w", ["ada"])


def test_merge_settings_embed_and_resolve():
    from pydantic import BaseModel, Field

    from pefteval_harness.config_io import validate

    settings = MergeSettings(method="rht", weights=[1, 2])
    assert settings.parameters == {"density": 0.7} and settings.space == "delta_w" and settings.seed is None
    with pytest.raises(Exception, match="frozen"):
        settings.method = "ties"

    class Embedded(MergeSettings):  # as the experiment spec embeds it
        experts: list[str] = Field(min_length=1)
        evaluate: bool = True

    class Spec(BaseModel):
        merges: dict[str, Embedded]

    spec = validate(Spec, {"merges": {"m": {"method": "ties", "experts": ["a"], "parameters": {"scaling": 2}}}}, "s")
    assert spec.merges["m"].parameters == {"density": 0.7, "scaling": 2.0}
    bad = {"merges": {"m": {"method": "ties", "experts": ["a"], "parameters": {"density": 2}}}}
    with pytest.raises(BadInput) as info:
        validate(Spec, bad, "spec.yaml")
    assert str(info.value) == (
        "spec.yaml: merges.m.parameters: merge method 'ties': parameter 'density':"
        " Input should be less than or equal to 1"
    )
    with pytest.raises(BadInput, match=r"^s: merges.m.weights\[1\]: Input should be a finite number$"):
        validate(Spec, {"merges": {"m": {"method": "ties", "experts": ["a"], "weights": [1, math.inf]}}}, "s")


def test_load_recipe_top_level_weights_seed_and_base(tmp_path):
    (tmp_path / "r.yaml").write_text(
        "method: linear\nbase_model: models/base\nweights: [1, 3]\nseed: 7\nexperts: [{path: a}, {path: /abs/b}]\n"
    )
    recipe = load_recipe(tmp_path / "r.yaml")
    assert recipe.expert_weights == [1.0, 3.0] and recipe.seed == 7 and recipe.parameters == {}
    assert recipe.base_model == str((tmp_path / "models" / "base").resolve())
    assert recipe.expert_paths == [(tmp_path / "a").resolve(), Path("/abs/b")]
