"""Weight-update analysis: metrics on hand-made matrices, ΔW of adapters and full models on the tiny model,
the comparison with a reference update, and the analyze job end to end."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from pefteval_harness.analysis import (
    METRICS,
    Spectrum,
    analyze_update,
    as_matrix,
    effective_rank,
    module_name,
    numerical_rank,
    principal_angles,
    singular_decomposition,
    subspace_overlap,
    weight_updates,
)
from pefteval_harness.errors import BadInput
from pefteval_harness.jobs.types import AnalysisSettings

# --- metrics on hand-made matrices -----------------------------------------------------------------------


def _orthonormal(m: int, k: int, seed: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(m, k, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q


@pytest.mark.parametrize("r", [1, 3, 7])
def test_a_rank_r_matrix_has_rank_r(r):
    g = torch.Generator().manual_seed(r)
    delta = torch.randn(40, r, generator=g) @ torch.randn(r, 30, generator=g)
    s = torch.linalg.svdvals(delta)
    assert numerical_rank(s, 1e-3) == r == np.linalg.matrix_rank(delta.numpy(), tol=1e-3 * float(s[0]))
    assert numerical_rank(torch.zeros(5), 1e-3) == 0


def test_effective_rank_is_exp_of_the_entropy_of_the_normalised_spectrum():
    assert effective_rank(torch.full((5,), 2.0)) == pytest.approx(5.0)  # equal singular values: their count
    assert effective_rank(torch.tensor([4.0, 0.0, 0.0])) == pytest.approx(1.0)  # 0·log 0 counts as 0
    p = np.array([3.0, 1.0]) / 4.0
    assert effective_rank(torch.tensor([3.0, 1.0])) == pytest.approx(math.exp(-(p * np.log(p)).sum()))


def test_norm_metrics_match_numpy():
    g = torch.Generator().manual_seed(0)
    delta, base = torch.randn(20, 10, generator=g), torch.randn(20, 10, generator=g)
    spec = Spectrum(torch.linalg.svdvals(delta), float(torch.linalg.norm(base)), 1e-3)
    frob = np.linalg.norm(delta.numpy())
    assert METRICS["frobenius"].fn(spec) == pytest.approx(frob, rel=1e-6)
    assert METRICS["relative_frobenius"].fn(spec) == pytest.approx(frob / np.linalg.norm(base.numpy()), rel=1e-6)
    assert METRICS["relative_frobenius"].fn(Spectrum(spec.singular_values, 0.0, 1e-3)) is None  # undefined


def test_principal_angles_match_scipy_and_the_hand_cases():
    a, b = _orthonormal(30, 4, 1), _orthonormal(30, 4, 2)
    ours = principal_angles(a, b).numpy()
    assert np.all(np.diff(ours) >= 0)  # ascending
    try:
        from scipy.linalg import subspace_angles
    except ImportError:
        pass
    else:
        np.testing.assert_allclose(ours, np.sort(subspace_angles(a.numpy(), b.numpy())), atol=1e-10)
    rotated = a @ _orthonormal(4, 4, 3)  # another basis of the same subspace
    assert principal_angles(a, rotated).abs().max() < 1e-7
    assert subspace_overlap(principal_angles(a, rotated)) == pytest.approx(1.0)
    eye = torch.eye(6, dtype=torch.float64)
    orthogonal = principal_angles(eye[:, :2], eye[:, 2:4])
    assert torch.allclose(torch.rad2deg(orthogonal), torch.full((2,), 90.0, dtype=torch.float64))
    assert subspace_overlap(orthogonal) == pytest.approx(0.0)
    half = principal_angles(eye[:, :2], eye[:, [0, 2]])  # share one direction out of two
    assert torch.allclose(torch.rad2deg(half), torch.tensor([0.0, 90.0], dtype=torch.float64))


def test_one_dimensional_parameters_become_matrices():
    gain = torch.tensor([1.0, -2.0, 0.0])
    assert torch.equal(as_matrix("model.norm.weight", gain), torch.diag(gain))  # a gain multiplies: diag
    assert as_matrix("q_proj.bias", gain).shape == (3, 1)  # a bias adds: a column
    assert module_name("model.norm.weight") == "model.norm" and module_name("q_proj.bias") == "q_proj.bias"
    s, left, right = singular_decomposition(torch.diag(gain), 2)  # the direct route for diagonal matrices
    torch.testing.assert_close(s, torch.linalg.svdvals(torch.diag(gain)))
    torch.testing.assert_close(left @ torch.diag(s[:2]) @ right.T, torch.diag(gain))  # its rank is 2


# --- ΔW of adapters and full models on the tiny model ------------------------------------------------------


def _make_adapter(base: Path, out: Path, config, seed: int = 0) -> Path:
    """An adapter with non-trivial weights: peft's init, then every trainable parameter moved at random."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), config)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(out)
    return out


def _merged_minus_base(base: Path, adapter: Path) -> dict[str, torch.Tensor]:
    """ΔW the way a user would get it: peft's merge_and_unload(), minus the base's weights."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), adapter)
    merged = model.merge_and_unload().state_dict()
    stored = load_file(base / "model.safetensors")
    deltas = {}
    for name, tensor in stored.items():
        if not torch.equal(merged[name], tensor):
            deltas[module_name(name)] = as_matrix(name, merged[name].double() - tensor.double()).float()
    return deltas


def _configs():
    import peft

    targets = ["q_proj", "v_proj", "down_proj"]
    fast = {
        "lora": lambda: peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False),
        "ia3": lambda: peft.IA3Config(
            target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"], init_ia3_weights=False
        ),
        "loha": lambda: peft.LoHaConfig(r=4, target_modules=targets, init_weights=False),
        "oft": lambda: peft.OFTConfig(r=0, oft_block_size=8, target_modules=targets, init_weights=False),
    }
    slow = {
        "dora": lambda: peft.LoraConfig(r=4, target_modules=targets, use_dora=True, init_lora_weights=False),
        "adalora": lambda: peft.AdaLoraConfig(init_r=4, target_modules=targets, total_step=10, init_lora_weights=False),
        "lokr": lambda: peft.LoKrConfig(r=4, target_modules=targets, init_weights=False),
        "boft": lambda: peft.BOFTConfig(boft_block_size=8, target_modules=targets, init_weights=False),
        "vera": lambda: peft.VeraConfig(r=8, target_modules=["q_proj", "v_proj"], init_weights=False),
        "fourierft": lambda: peft.FourierFTConfig(n_frequency=50, target_modules=targets, init_weights=False),
        "hra": lambda: peft.HRAConfig(r=4, target_modules=targets, init_weights=False),
        "ln_tuning": lambda: peft.LNTuningConfig(target_modules=["input_layernorm", "norm"]),
        "lora_modules_to_save": lambda: peft.LoraConfig(
            r=4, target_modules=targets, modules_to_save=["lm_head"], init_lora_weights=False
        ),
    }
    return fast, slow


_FAST, _SLOW = _configs()
_CASES = [*_FAST, *(pytest.param(name, marks=pytest.mark.slow) for name in _SLOW)]


@pytest.fixture(scope="module")
def adapters(tiny_model_dir, tmp_path_factory):
    """Adapters built on demand, once per module: method name -> folder."""
    root, built = tmp_path_factory.mktemp("adapters"), {}

    def get(name: str) -> Path:
        if name not in built:
            built[name] = _make_adapter(tiny_model_dir, root / name, {**_FAST, **_SLOW}[name]())
        return built[name]

    return get


def test_lora_update_is_scaled_b_times_a_with_rank_at_most_r(tiny_model_dir, adapters):
    adapter = adapters("lora")
    factors = load_file(adapter / "adapter_model.safetensors")
    config = json.loads((adapter / "adapter_config.json").read_text())
    scaling = config["lora_alpha"] / config["r"]
    updates = {u.module: u for u in weight_updates(tiny_model_dir, adapter=adapter)}
    assert len(updates) == 2 * 3  # two layers, three targets
    for module, update in updates.items():
        prefix = f"base_model.model.{module}"
        expected = factors[f"{prefix}.lora_B.weight"] @ factors[f"{prefix}.lora_A.weight"] * scaling
        torch.testing.assert_close(update.delta, expected, rtol=1e-5, atol=1e-6)
        assert numerical_rank(torch.linalg.svdvals(update.delta), 1e-3) <= config["r"]


def test_ia3_update_is_a_scaling_of_the_base_weight(tiny_model_dir, adapters):
    adapter = adapters("ia3")
    vectors = load_file(adapter / "adapter_model.safetensors")
    stored = load_file(tiny_model_dir / "model.safetensors")
    for update in weight_updates(tiny_model_dir, adapter=adapter):
        w, scale = stored[f"{update.module}.weight"], vectors[f"base_model.model.{update.module}.ia3_l"]
        # feed-forward modules scale their input (columns), the others their output (rows)
        expected = w * scale - w if update.module.endswith("down_proj") else w * scale.reshape(-1, 1) - w
        torch.testing.assert_close(update.delta, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", _CASES)
def test_adapter_update_equals_merge_and_unload_minus_base(tiny_model_dir, adapters, method):
    adapter = adapters(method)
    expected = _merged_minus_base(tiny_model_dir, adapter)
    updates = {u.module: u.delta for u in weight_updates(tiny_model_dir, adapter=adapter)}
    assert expected and updates.keys() == expected.keys()
    for module, delta in updates.items():
        # merge_and_unload merges in float32: its ΔW carries rounding of ~1e-7 relative to the weights
        torch.testing.assert_close(delta, expected[module], rtol=1e-4, atol=1e-6)


def _perturbed_model(base: Path, out: Path, scale: float = 0.01, shards: int = 1) -> Path:
    """A 'fully fine-tuned' model: every weight of the base moved at random, written as safetensors
    (in `shards` shards plus an index when more than one, as large models are)."""
    out.mkdir(parents=True)
    for path in base.iterdir():
        if path.is_file() and not path.name.startswith("model."):
            shutil.copy2(path, out / path.name)
    g = torch.Generator().manual_seed(7)
    tensors = {
        k: v + scale * torch.randn(v.shape, generator=g) for k, v in load_file(base / "model.safetensors").items()
    }
    if shards == 1:
        save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
        return out
    names, weight_map = sorted(tensors), {}
    for i in range(shards):
        part = names[i::shards]
        file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file({k: tensors[k] for k in part}, out / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, file))
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return out


def test_full_model_update_is_read_from_sharded_files_and_matches_itself(tiny_model_dir, tmp_path):
    tuned = _perturbed_model(tiny_model_dir, tmp_path / "fft", shards=3)
    base_tensors, tuned_tensors = load_file(tiny_model_dir / "model.safetensors"), {}
    for file in tuned.glob("*.safetensors"):
        tuned_tensors.update(load_file(file))
    updates = list(weight_updates(tiny_model_dir, tuned))
    assert {u.module for u in updates} == {module_name(k) for k in base_tensors}  # every weight moved
    for u in updates:
        name = f"{u.module}.weight"
        torch.testing.assert_close(u.delta, as_matrix(name, tuned_tensors[name] - base_tensors[name]))

    result = analyze_update(tiny_model_dir, tuned, reference=tuned, settings=AnalysisSettings(top_k=4), method="full")
    assert result["weight_update"] and result["reference"] and result["reason"] is None
    for module in result["modules"]:
        assert module["subspace_overlap"] == pytest.approx(1.0) and module["right_subspace_overlap"] == pytest.approx(
            1.0
        )
        assert len(module["principal_angles_deg"]) == 4 and max(module["principal_angles_deg"]) < 1e-3
    norms = {m["module"]: m for m in result["modules"]}
    q = norms["model.layers.1.self_attn.q_proj"]
    assert (q["layer"], q["kind"], q["shape"]) == (1, "q_proj", [64, 64])
    assert q["rank"] == 64  # dense noise: full rank
    final_norm = norms["model.norm"]  # a gain: diag(Δg)
    assert (final_norm["layer"], final_norm["kind"], final_norm["shape"]) == (None, "norm", [64, 64])
    assert result["summary"]["modules"] == len(result["modules"])
    assert result["summary"]["frobenius"] == pytest.approx(
        math.sqrt(sum(m["frobenius"] ** 2 for m in result["modules"]))
    )


def test_adapter_against_a_full_model_with_the_same_update_overlaps_fully(tiny_model_dir, adapters, tmp_path):
    """The two routes (adapter merged by peft, full model from files) see the same subspaces."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapter = adapters("lora")
    merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), adapter)
    merged.merge_and_unload().save_pretrained(tmp_path / "merged")
    result = analyze_update(tiny_model_dir, adapter=adapter, reference=tmp_path / "merged", method="lora")
    assert len(result["modules"]) == 6
    for module in result["modules"]:
        assert module["rank"] == 4 and len(module["principal_angles_deg"]) == 4  # k = min(top_k, ranks)
        assert module["subspace_overlap"] == pytest.approx(1.0, abs=1e-5)
    assert result["summary"]["rank"] == 4 and result["summary"]["subspace_overlap"] == pytest.approx(1.0, abs=1e-5)


def test_prompt_tuning_has_no_weight_update(tiny_model_dir, tmp_path):
    from peft import PromptTuningConfig

    adapter = _make_adapter(
        tiny_model_dir, tmp_path / "prompt", PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)
    )
    result = analyze_update(tiny_model_dir, adapter=adapter, method="prompt_tuning")
    assert result["weight_update"] is False and "prompt learning" in result["reason"]
    assert result["modules"] == [] and result["summary"]["modules"] == 0 and result["summary"]["rank"] is None
    with pytest.raises(BadInput, match="no weight update"):
        next(weight_updates(tiny_model_dir, adapter=adapter))


def test_an_adapter_peft_cannot_merge_is_reported_not_failed(tiny_model_dir, tmp_path):
    from peft import LilyConfig

    adapter = _make_adapter(tiny_model_dir, tmp_path / "lily", LilyConfig(r=4, target_modules=["q_proj", "v_proj"]))
    result = analyze_update(tiny_model_dir, adapter=adapter, method="lily")
    assert result["weight_update"] is False and result["reason"].startswith("ΔW not measured: peft cannot merge")
    assert str(tmp_path) not in result["reason"] and result["modules"] == []


# --- the analyze job ---------------------------------------------------------------------------------------


_MODULE_KEYS = [
    "module", "layer", "kind", "shape", "rank", "effective_rank", "frobenius", "relative_frobenius",
    "subspace_overlap", "principal_angles_deg", "right_subspace_overlap",
]  # fmt: skip


def test_analyze_job_end_to_end(tiny_model_dir, adapters, tmp_path):
    from pefteval_harness.jobs.analyze import analyze
    from pefteval_harness.jobs.types import AnalyzeConfig, ArtifactRef, Job, Lineage, LoadedModel
    from pefteval_harness.store import Store

    store = Store(tmp_path / "store")
    shutil.copytree(tiny_model_dir, store.artifact("base-0"))
    _perturbed_model(tiny_model_dir, store.artifact("train-fft"), scale=0.002)
    shutil.copytree(adapters("lora"), store.artifact("train-lora"))
    base = ArtifactRef(job="base-0")

    def job(model: LoadedModel, reference: LoadedModel | None, method: str) -> Job:
        config = AnalyzeConfig(
            method=method,
            base=base,
            model=model,
            reference=reference,
            settings=AnalysisSettings(rank_tolerance=1e-2, top_k=2),
            trust_remote_code=False,
        )
        return Job(
            id=f"analyze-{method}",
            label=method,
            lineage=Lineage(model=method, method=method, base="tiny"),
            config=config,
        )

    fft = LoadedModel(base=ArtifactRef(job="train-fft"))
    result = analyze(job(LoadedModel(base=base, adapter=ArtifactRef(job="train-lora")), fft, "lora"), store)
    json.dumps(result, allow_nan=False)  # a result.json as is
    assert list(result) == ["weight_update", "reason", "method", "reference", "settings", "modules", "summary"]
    assert result["method"] == "lora" and result["reference"] is True
    assert result["settings"] == {"rank_tolerance": 1e-2, "top_k": 2}
    assert [m["module"] for m in result["modules"]][:3] == [
        "model.layers.0.mlp.down_proj", "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"
    ]  # fmt: skip
    for module in result["modules"]:
        assert list(module) == _MODULE_KEYS
        assert 0.0 <= module["subspace_overlap"] <= 1.0 and len(module["principal_angles_deg"]) == 2
        assert module["rank"] <= 4 and 1.0 <= module["effective_rank"] <= module["rank"] + 1e-6
    summary = result["summary"]
    assert summary["modules"] == 6 and 0.0 < summary["subspace_overlap"] < 1.0

    fft_alone = analyze(job(fft, None, "full"), store)
    assert fft_alone["reference"] is False and fft_alone["summary"]["subspace_overlap"] is None
    assert len(fft_alone["modules"]) == len(load_file(tiny_model_dir / "model.safetensors"))

    elsewhere = LoadedModel(base=ArtifactRef(job="train-fft"), adapter=ArtifactRef(job="train-lora"))
    with pytest.raises(BadInput, match="not on the analysed base"):
        analyze(job(elsewhere, None, "lora"), store)
