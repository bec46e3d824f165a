"""The merge engine's streaming: row-chunked merges equal whole-tensor ones, the streamed (and sharded) output
loads in transformers, the observer sees every task vector, mismatched experts are refused before anything is
written, and what the engine holds does not grow with the number of experts. Tiny models, real files, no
mocks on the paths under test."""

from __future__ import annotations

import json
import weakref
from contextlib import ExitStack
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from pefteval_harness.errors import BadInput
from pefteval_harness.merging import MERGE_METHODS, MergeMethod, engine, merge_models, tensors
from pefteval_harness.merging.tensors import SafetensorsReader, SafetensorsWriter


def _llama(vocab_size: int = 128):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=vocab_size,
    )
    return LlamaForCausalLM(config)


def _folder(path: Path, weights: dict[str, torch.Tensor], config: dict | None = None) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(config or {}))
    save_file(weights, str(path / "model.safetensors"), metadata={"format": "pt"})
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> tuple[Path, list[Path]]:
    """A tiny Llama base and four experts (base + seeded noise of different scales)."""
    root = tmp_path_factory.mktemp("engine")
    torch.manual_seed(0)
    base = _llama()
    base.save_pretrained(root / "base")
    experts = []
    for i in range(4):
        gen = torch.Generator().manual_seed(10 + i)
        state = {k: v + 0.02 * (i + 1) * torch.randn(v.shape, generator=gen) for k, v in base.state_dict().items()}
        experts.append(_folder(root / f"e{i}", state, json.loads((root / "base" / "config.json").read_text())))
    return root / "base", experts


def _clip_stats(tau: torch.Tensor, params) -> float:
    return float(tau.abs().max()) / 2


def _clipped_sum(tensors, weights, params, ctx):
    """Σ w_i·clamp(τ_i, ±s_i), s_i half of the whole τ_i's largest magnitude: wrong if stats came per chunk."""
    assert ctx.stats is not None and len(ctx.stats) == len(tensors)
    _clipped_sum.calls.append(tuple(tensors[0].shape))
    return sum(w * t.clamp(-s, s) for t, w, s in zip(tensors, weights, ctx.stats, strict=True))


_clipped_sum.calls = []


@pytest.fixture
def clip_method(monkeypatch):
    method = MergeMethod("clip", _clipped_sum, description="clipped sum", elementwise=True, stats=_clip_stats)
    monkeypatch.setitem(MERGE_METHODS, "clip", method)
    _clipped_sum.calls.clear()
    return "clip"


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    with ExitStack() as stack:
        reader = SafetensorsReader(folder, "model", stack)
        return {name: reader.get(name) for name in reader.names()}


def test_chunked_merge_equals_whole_tensor_merge(tmp_path, models, clip_method, monkeypatch):
    base, experts = models
    whole = _tensors(merge_models(method=clip_method, experts=experts, base=base, out_dir=tmp_path / "whole"))
    assert all(len(shape) != 2 or shape[0] > 1 for shape in _clipped_sum.calls)
    whole_calls = len(_clipped_sum.calls)
    monkeypatch.setattr(engine, "CHUNK_ELEMENTS", 512)  # 4 experts × 32 columns: 4 rows per chunk
    _clipped_sum.calls.clear()
    chunked = _tensors(merge_models(method=clip_method, experts=experts, base=base, out_dir=tmp_path / "chunked"))
    assert len(_clipped_sum.calls) > 3 * whole_calls  # the big weights did come in chunks
    assert max(s[0] * 4 * (s[1] if len(s) > 1 else 1) for s in _clipped_sum.calls) <= 512 * 4
    assert whole.keys() == chunked.keys() and all(torch.equal(whole[k], chunked[k]) for k in whole)
    # By hand, whole tensors: base + Σ clamp(τ_i, ±max|τ_i|/2).
    b, xs = _tensors(base), [_tensors(e) for e in experts]
    for name, w0 in b.items():
        taus = [x[name] - w0 for x in xs]
        expected = w0 + sum(t.clamp(-t.abs().max() / 2, t.abs().max() / 2) for t in taus)
        assert torch.allclose(chunked[name], expected, atol=1e-6), name


@pytest.mark.parametrize("name", sorted(n for n, m in MERGE_METHODS.items() if m.elementwise))
def test_registered_elementwise_methods_chunked(tmp_path, models, monkeypatch, name):
    """Deterministic methods: chunked equals whole. Random ones draw chunk after chunk from the tensor's one
    generator: the result is repeatable but not the whole-tensor draw (stated here so a change shows)."""
    base, experts = models
    method = MERGE_METHODS[name]
    experts = experts[: method.n_experts or 2]
    kwargs = {"method": name, "experts": experts, "base": base if method.needs_base else None}
    whole = _tensors(merge_models(**kwargs, out_dir=tmp_path / "whole"))
    other_seed = _tensors(merge_models(**kwargs, seed=1, out_dir=tmp_path / "seed1"))
    random = any(not torch.equal(whole[k], other_seed[k]) for k in whole)
    monkeypatch.setattr(engine, "CHUNK_ELEMENTS", 256)
    chunked = _tensors(merge_models(**kwargs, out_dir=tmp_path / "chunked"))
    same = all(torch.equal(whole[k], chunked[k]) for k in whole)
    if random:
        again = _tensors(merge_models(**kwargs, out_dir=tmp_path / "again"))
        assert all(torch.equal(chunked[k], again[k]) for k in chunked) and not same
    else:
        assert same


def test_streamed_output_loads_in_transformers_and_is_sharded_with_an_index(tmp_path, models, monkeypatch):
    from transformers import AutoModelForCausalLM

    base, experts = models
    monkeypatch.setattr(engine, "CHUNK_ELEMENTS", 1000)
    weights = [1.0, -0.5, 0.25]
    args = {"method": "task_arithmetic", "experts": experts[:3], "base": base, "weights": weights}
    single = merge_models(**args, out_dir=tmp_path / "single")
    sharded = merge_models(**args, out_dir=tmp_path / "sharded", max_shard_bytes=10_000)
    b, xs = _tensors(base), [_tensors(e) for e in experts[:3]]
    expected = {n: w0 + sum(w * (x[n] - w0) for w, x in zip(weights, xs, strict=True)) for n, w0 in b.items()}
    for out in (single, sharded):
        state = AutoModelForCausalLM.from_pretrained(out).state_dict()
        assert state.keys() == expected.keys()
        assert all(torch.allclose(state[k], expected[k], atol=1e-6) for k in state), out
    assert {"README.md", "config.json", "merge_config.json", "model.safetensors"} <= {p.name for p in single.iterdir()}
    shards = sorted(p.name for p in sharded.glob("*.safetensors"))
    assert len(shards) > 3 and shards[-1] == f"model-{len(shards):05d}-of-{len(shards):05d}.safetensors"
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert sorted(index["weight_map"]) == sorted(expected) and set(index["weight_map"].values()) == set(shards)
    assert index["metadata"]["total_size"] == sum(t.numel() * 4 for t in expected.values())
    for shard in shards:  # over the limit only when one tensor is larger than the limit
        got = load_file(str(sharded / shard))
        assert len(got) == 1 or sum(t.numel() * 4 for t in got.values()) <= 10_000
    assert "task_arithmetic" in (single / "README.md").read_text()


def test_writer_orders_by_element_size_and_takes_row_pieces(tmp_path):
    weights = {
        "half": torch.arange(7, dtype=torch.float16),  # 14 bytes: the tensors after it would be misaligned
        "step": torch.tensor(3, dtype=torch.int64),
        "empty": torch.zeros(0, 4),
        "w": torch.randn(5, 3),
        "flag": torch.tensor([True, False]),
    }
    entries = [(n, tuple(t.shape), t.dtype) for n, t in weights.items()]
    writer = SafetensorsWriter(tmp_path, "model", entries, None, metadata={"format": "pt"})
    assert writer.order == ["step", "empty", "w", "half", "flag"]
    with pytest.raises(ValueError, match="got tensor w, expected step"):
        writer.write("w", weights["w"])
    for name in writer.order:
        if name == "w":
            for start in range(0, 5, 2):
                writer.write(name, weights["w"][start : start + 2])
        else:
            writer.write(name, weights[name])
    writer.close()
    got = load_file(str(tmp_path / "model.safetensors"))
    assert got.keys() == weights.keys() and all(torch.equal(got[k], weights[k]) for k in got)
    with ExitStack() as stack:
        reader = SafetensorsReader(tmp_path, "model", stack)
        assert torch.equal(reader.rows("w", 1, 4), weights["w"][1:4]) and reader.dtype("half") == torch.float16
        piece = reader.rows("w", 0, 2)
        piece.add_(1)  # a fresh buffer: the next read is unchanged
        assert torch.equal(reader.rows("w", 0, 2), weights["w"][:2])
    unfinished = SafetensorsWriter(tmp_path / "x", "model", entries, None)
    with pytest.raises(ValueError, match="step was not"):
        unfinished.close()


def test_observer_sees_every_task_vector(tmp_path, models, monkeypatch):
    base, experts = models
    b, xs = _tensors(base), [_tensors(e) for e in experts[:2]]

    class Recorder:
        def __init__(self):
            self.seen: dict[str, list] = {}

        def __call__(self, name, taus, merged_tau, **extra):
            assert all(t.dtype == torch.float32 for t in [*taus, merged_tau])
            self.seen.setdefault(name, []).append(([t.clone() for t in taus], merged_tau.clone(), extra))

        def whole(self, name):
            chunks = self.seen[name]
            taus = [torch.cat([c[0][i] for c in chunks]) for i in range(len(chunks[0][0]))]
            return taus, torch.cat([c[1] for c in chunks])

    for method, chunk in [("task_arithmetic", 300), ("linear", None)]:
        if chunk:
            monkeypatch.setattr(engine, "CHUNK_ELEMENTS", chunk)
        recorder = Recorder()
        out = merge_models(method=method, experts=experts[:2], base=base, out_dir=tmp_path / method, observer=recorder)
        merged = _tensors(out)
        assert sorted(recorder.seen) == sorted(b)  # every tensor is floating here
        if chunk:
            assert max(len(v) for v in recorder.seen.values()) > 1
        for name, w0 in b.items():
            taus, merged_tau = recorder.whole(name)
            assert all(torch.allclose(t, x[name] - w0, atol=1e-6) for t, x in zip(taus, xs, strict=True)), name
            assert torch.allclose(merged_tau, merged[name] - w0, atol=1e-6), name

    # An owner with trim_density gets each whole τ_i's threshold with every chunk.
    from pefteval_harness.merging.theory import TheoryAccumulator, trim_threshold

    monkeypatch.setattr(engine, "CHUNK_ELEMENTS", 300)
    recorder = Recorder()
    recorder.trim_density = 0.5
    merge_models(method="task_arithmetic", experts=experts[:2], base=base, out_dir=tmp_path / "t", observer=recorder)
    name = "model.embed_tokens.weight"
    assert len(recorder.seen[name]) > 1
    want = [trim_threshold(xs[i][name] - b[name], 0.5) for i in range(2)]
    assert all(extra["thresholds"] == pytest.approx(want) for _, _, extra in recorder.seen[name])
    accumulator = TheoryAccumulator(density=0.5)
    merge_models(
        method="task_arithmetic", experts=experts[:2], base=base, out_dir=tmp_path / "acc", observer=accumulator.observe
    )
    assert accumulator.result()["rht_approximate_tensors"] == 0

    with pytest.raises(ValueError, match="needs a base"):
        merge_models(method="linear", experts=experts[:2], out_dir=tmp_path / "x", observer=recorder)
    with pytest.raises(ValueError, match="factor space"):
        merge_models(method="linear", experts=experts[:2], out_dir=tmp_path / "x", observer=recorder, space="factor")
    assert not (tmp_path / "x").exists()


def test_mismatched_architecture_or_vocabulary_is_refused(tmp_path, models):
    base, experts = models
    config = json.loads((base / "config.json").read_text())
    state = _tensors(experts[0])
    cases = {
        "arch": ({**config, "model_type": "mistral", "architectures": ["MistralForCausalLM"]}, None),
        "vocab": ({**config, "vocab_size": 256}, None),
        "tok": (config, {"model": {"type": "BPE", "vocab": {"a": 0, "b": 1}}, "added_tokens": []}),
    }
    messages = {
        "arch": r"config.json model_type='mistral' differs from the base .*base \('llama'\)",
        "vocab": r"config.json vocab_size=256 differs from the base",
        "tok": r"the tokenizer vocabulary \(tokenizer.json\) differs from the base",
    }
    base_tok = {"model": {"type": "BPE", "vocab": {"a": 0, "c": 1}}, "added_tokens": []}
    with_tokenizer = tmp_path / "base"
    with_tokenizer.mkdir()
    for f in base.iterdir():
        (with_tokenizer / f.name).write_bytes(f.read_bytes())
    (with_tokenizer / "tokenizer.json").write_text(json.dumps(base_tok))
    for key, (cfg, tok) in cases.items():
        odd = _folder(tmp_path / key, state, cfg)
        if tok is not None:
            (odd / "tokenizer.json").write_text(json.dumps(tok))
        with pytest.raises(BadInput, match=messages[key]) as info:
            merge_models(
                method="task_arithmetic", experts=[experts[1], odd], base=with_tokenizer, out_dir=tmp_path / "o"
            )
        assert "\n" not in str(info.value) and str(odd) in str(info.value)
    assert not (tmp_path / "o").exists() and not list(tmp_path.glob(".o.partial*"))
    # Same vocabulary written differently: accepted.
    same = _folder(tmp_path / "same", state, config)
    (same / "tokenizer.json").write_text(json.dumps(base_tok, indent=4))
    assert merge_models(method="linear", experts=[with_tokenizer, same], out_dir=tmp_path / "ok").is_dir()


def test_n_experts_is_checked_before_anything_is_read(tmp_path, monkeypatch):
    pair = MergeMethod("pair", lambda ts, ws, p, ctx: ts[0], description="two only", n_experts=2)
    monkeypatch.setitem(MERGE_METHODS, "pair", pair)
    with pytest.raises(BadInput, match="pair"):
        merge_models(method="pair", experts=[tmp_path / "a", tmp_path / "b", tmp_path / "c"], out_dir=tmp_path / "o")


def test_memory_held_does_not_grow_with_experts(tmp_path, models, clip_method, monkeypatch):
    """The bytes of every tensor the reader hands out and that is still alive, at their peak: a merge of 4
    experts holds no more than one of 2 (chunks are sized over all experts; pass 1 holds one expert)."""
    base, experts = models
    alive, peak = [0], [0]
    read = tensors._read

    def counting_read(*args):
        t = read(*args)
        nbytes = t.numel() * t.element_size()
        alive[0] += nbytes
        peak[0] = max(peak[0], alive[0])
        weakref.finalize(t, lambda: alive.__setitem__(0, alive[0] - nbytes))
        return t

    monkeypatch.setattr(tensors, "_read", counting_read)
    monkeypatch.setattr(engine, "CHUNK_ELEMENTS", 2048)
    peaks = {}
    for k in (2, 4):
        peak[0] = 0
        merge_models(method=clip_method, experts=experts[:k], base=base, out_dir=tmp_path / f"k{k}")
        peaks[k] = peak[0]
    largest = 128 * 32 * 4  # the embedding: pass 1 holds it for the base and one expert
    assert peaks[4] <= peaks[2] and peaks[2] <= 2 * largest + 2048 * 4 * 2
