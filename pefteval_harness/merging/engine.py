"""The streaming merge engine: expert tensors are read from safetensors a weight, or a few rows of one, at a time.

Memory does not grow with the number of experts K, and the output is never held:
- Methods marked `elementwise` are applied to row chunks of a weight: pass 1 computes the method's
  per-expert summary (`MergeMethod.stats`, e.g. a trim threshold) from each expert's whole tensor, one
  expert in memory at a time; pass 2 reads only the next rows of every expert (at most `CHUNK_ELEMENTS`
  entries over the K experts together), merges them and writes them out. So a weight costs about a
  chunk's worth of memory per expert plus one whole tensor in pass 1, whatever K is.
- Other methods get the K whole tensors of one weight at a time.
- Merged tensors go straight to disk (`SafetensorsWriter`: headers known up front, bytes appended as
  produced), in HF's layout: one model.safetensors, or shards of at most `max_shard_bytes` plus an index.
Everything that can be checked from the files' headers and configs (settings, kinds, names, shapes,
architectures, vocabularies, adapter configs) is checked before anything is written; the output is built
in a temporary folder next to `out_dir` and renamed into place, so a failed merge leaves no `out_dir`.
Pickle files (`*.bin`) are refused, never loaded. Random methods get one generator per tensor, seeded from
the merge seed and the tensor's name.
"""

from __future__ import annotations

import filecmp
import json
import math
import os
import re
import shutil
import uuid
from collections.abc import Callable, Mapping, Sequence
from contextlib import ExitStack
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pefteval_harness.config_io import validate
from pefteval_harness.errors import BadInput
from pefteval_harness.merging.config import MergeSettings, check_adapters, load_recipe
from pefteval_harness.merging.methods import MergeContext, MergeMethod, get_method, tensor_generator
from pefteval_harness.merging.tensors import ADAPTER, MODEL, SafetensorsReader, SafetensorsWriter

if TYPE_CHECKING:
    import torch

# observer(name, taus, merged_tau): the K task vectors and the merged one of a tensor, or of its next rows.
Observer = Callable[..., None]

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".index.json")
DEFAULT_MAX_SHARD_BYTES = 4 * 1024**3
# Entries of the K experts' inputs merged at a time by an elementwise method (K·rows·row length <= this):
# 16 MiB of float32 over all experts, whatever K. Random elementwise methods draw chunk after chunk from
# the tensor's one generator, so their output depends on this number: changing it changes them.
CHUNK_ELEMENTS = 2**22
_LORA_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<factor>[AB])\.weight$")
# config.json fields that two experts of one architecture and vocabulary share (also under text_config).
_ARCHITECTURE_FIELDS = ("model_type", "architectures", "vocab_size")
# Tokenizer files that hold a vocabulary, the most telling first.
_VOCABULARY_FILES = ("tokenizer.json", "vocab.json", "vocab.txt", "tokenizer.model", "spiece.model")


def _kind(folder: Path) -> str:
    """'lora' for a peft adapter folder, 'full' for a HF model folder; BadInput for anything else."""
    if not folder.is_dir():
        raise BadInput(f"{folder}: no such folder")
    if (folder / "adapter_config.json").is_file():
        return "lora"
    if any((folder / f).is_file() for f in ("config.json", f"{MODEL}.safetensors", f"{MODEL}.safetensors.index.json")):
        return "full"
    raise BadInput(f"{folder}: neither a model folder (config.json) nor a peft adapter (adapter_config.json)")


def _json_object(path: Path) -> dict[str, Any]:
    """A JSON file holding an object (a config); BadInput naming the file otherwise."""
    try:
        config = json.loads(path.read_text())
    except ValueError as e:
        raise BadInput(f"{path}: not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise BadInput(f"{path}: expected a JSON object, got {type(config).__name__}")
    return config


def _adapter_config(folder: Path) -> dict[str, Any]:
    return _json_object(folder / "adapter_config.json")


def _lora_pairs(tensors: SafetensorsReader) -> dict[str, tuple[str, str]]:
    """module name (as in the base model) -> (lora_A key, lora_B key), from peft's saved key names."""
    found: dict[str, dict[str, str]] = {}
    for name in tensors.names():
        match = _LORA_KEY.match(name)
        if not match:
            raise BadInput(f"{tensors.folder}: tensor {name} is not a LoRA A/B factor (not supported yet)")
        found.setdefault(match["module"], {})[match["factor"]] = name
    for module, pair in found.items():
        if len(pair) != 2:
            raise BadInput(f"{tensors.folder}: module {module} has lora_{''.join(pair)} but not both A and B")
    return {module: (pair["A"], pair["B"]) for module, pair in found.items()}


def _lora_scaling(config: dict[str, Any], module: str, r: int) -> float:
    """peft's scaling for `module`: lora_alpha / r (or / sqrt(r) with rsLoRA), alpha_pattern honoured."""
    from peft.utils.other import get_pattern_key

    patterns = config.get("alpha_pattern") or {}
    alpha = patterns.get(get_pattern_key(patterns.keys(), module), config["lora_alpha"])
    return alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r


def _check_same_tensors(reference: SafetensorsReader, other: SafetensorsReader, what: str) -> None:
    """Same names and shapes as `reference` (the base or the first expert); BadInput naming the tensor."""
    ref, names = set(reference.names()), set(other.names())
    if missing := sorted(ref - names):
        raise BadInput(f"{other.folder}: tensor {missing[0]} of {what} is missing ({len(missing)} missing)")
    if extra := sorted(names - ref):
        raise BadInput(f"{other.folder}: tensor {extra[0]} is not in {what} ({len(extra)} extra)")
    for name in reference.names():
        if reference.shape(name) != other.shape(name):
            raise BadInput(
                f"{other.folder}: tensor {name} has shape {list(other.shape(name))}, {what} has"
                f" {list(reference.shape(name))}"
            )


def _config_fields(folder: Path) -> dict[str, Any]:
    """The `_ARCHITECTURE_FIELDS` of a folder's config.json (and of its text_config), those it has."""
    path = folder / "config.json"
    if not path.is_file():
        return {}
    config = _json_object(path)
    fields = {key: config[key] for key in _ARCHITECTURE_FIELDS if config.get(key) is not None}
    text = config.get("text_config")
    if isinstance(text, dict):  # multimodal configs keep the language model's vocabulary here
        fields.update({f"text_config.{k}": text[k] for k in _ARCHITECTURE_FIELDS if text.get(k) is not None})
    return fields


def _vocabulary(path: Path) -> Any:
    """What a tokenizer file says the vocabulary is (token -> id, and the added tokens), or its bytes."""
    if path.suffix != ".json":
        return path.read_bytes() if path.name != "vocab.txt" else path.read_text().splitlines()
    try:
        data = json.loads(path.read_text())
    except ValueError as e:
        raise BadInput(f"{path}: not valid JSON ({e})") from None
    if path.name != "tokenizer.json" or not isinstance(data, dict):
        return data
    vocab = (data.get("model") or {}).get("vocab")
    if isinstance(vocab, list):  # Unigram: [piece, score] pairs; the scores are not the vocabulary
        vocab = [entry[0] if isinstance(entry, list) else entry for entry in vocab]
    added = sorted((t.get("id"), t.get("content")) for t in data.get("added_tokens") or [] if isinstance(t, dict))
    return vocab, added


def _check_same_model(reference: Path, other: Path, what: str) -> None:
    """Same architecture and vocabulary as `reference` (config.json fields, tokenizer vocabulary); BadInput
    naming both folders otherwise. A field or tokenizer file that one of them lacks is not compared."""
    ref, fields = _config_fields(reference), _config_fields(other)
    for key in ref:  # in `_ARCHITECTURE_FIELDS` order: model_type first
        if key in fields and ref[key] != fields[key]:
            raise BadInput(
                f"{other}: config.json {key}={fields[key]!r} differs from {what} {reference} ({ref[key]!r});"
                " experts must share one architecture and vocabulary"
            )
    for name in _VOCABULARY_FILES:
        a, b = reference / name, other / name
        if a.is_file() and b.is_file():
            if not filecmp.cmp(a, b, shallow=False) and _vocabulary(a) != _vocabulary(b):
                raise BadInput(
                    f"{other}: the tokenizer vocabulary ({name}) differs from {what} {reference};"
                    " experts must share one vocabulary"
                )
            return


def _float32(t: torch.Tensor) -> torch.Tensor:
    """float32 without a copy when it already is (every tensor the reader returns is fresh)."""
    import torch

    return t if t.dtype == torch.float32 else t.float()


def _read(reader: SafetensorsReader, name: str, span: tuple[int, int] | None) -> torch.Tensor:
    return reader.get(name) if span is None else reader.rows(name, *span)


class _ModelSource:
    """One weight of full-model experts (or of adapters' factors, with no base), whole or by rows.

    `input(i)` is what the method takes: τ_i = expert_i − base when `adds_base` (the method's output is a
    task vector to add to the base), else expert_i's own weight. `base` is None without a base reader.
    """

    def __init__(
        self,
        name: str,
        readers: list[SafetensorsReader],
        base: SafetensorsReader | None,
        adds_base: bool,
        shape: tuple[int, ...],
        dtype: torch.dtype,
    ):
        self.name, self.readers, self.base_reader, self.adds_base = name, readers, base, adds_base
        self.shape, self.dtype, self.n_experts = shape, dtype, len(readers)

    def base(self, span: tuple[int, int] | None = None) -> torch.Tensor | None:
        return None if self.base_reader is None else _float32(_read(self.base_reader, self.name, span))

    def input(self, i: int, base: torch.Tensor | None, span: tuple[int, int] | None = None) -> torch.Tensor:
        x = _float32(_read(self.readers[i], self.name, span))
        return x.sub_(base) if self.adds_base else x  # in place: x is a fresh buffer


class _DeltaSource:
    """One base weight that LoRA experts adapt: τ_i = ΔW_i = scaling_i·B_i·A_i (0 for an expert that does
    not adapt it), whole or by rows; `input(i)` is τ_i, or base + τ_i for a method on raw weights."""

    def __init__(
        self,
        name: str,
        base: SafetensorsReader,
        readers: list[SafetensorsReader],
        entries: list[tuple[str, str, float, bool] | None],
        adds_base: bool,
    ):
        self.name, self.base_reader, self.readers, self.entries = name, base, readers, entries
        self.adds_base, self.n_experts = adds_base, len(readers)
        self.shape, self.dtype = base.shape(name), base.dtype(name)

    def base(self, span: tuple[int, int] | None = None) -> torch.Tensor:
        return _float32(_read(self.base_reader, self.name, span))

    def input(self, i: int, base: torch.Tensor, span: tuple[int, int] | None = None) -> torch.Tensor:
        delta = self._delta(i, span)
        return delta if self.adds_base else delta.add_(base)

    def _delta(self, i: int, span: tuple[int, int] | None) -> torch.Tensor:
        import torch

        if self.entries[i] is None:
            rows = self.shape[0] if span is None else span[1] - span[0]
            return torch.zeros((rows, *self.shape[1:]), dtype=torch.float32)
        a_key, b_key, scaling, fan_in_fan_out = self.entries[i]
        reader = self.readers[i]
        if fan_in_fan_out:  # the weight is stored as (B·A)ᵀ: its rows come from A's columns
            a = _float32(reader.get(a_key))
            a = a if span is None else a[:, span[0] : span[1]]
            return (a.T @ _float32(reader.get(b_key)).T).mul_(scaling)
        return (_float32(_read(reader, b_key, span)) @ _float32(reader.get(a_key))).mul_(scaling)


def _observer_trim_density(observer: Observer | None) -> float | None:
    """An observer (or the object whose bound method it is) with a `trim_density` also gets `thresholds=`."""
    owner = getattr(observer, "__self__", observer)
    density = getattr(owner, "trim_density", None)
    return None if density is None else float(density)


class _Run:
    """One merge's method, validated parameters, method weights, seed and observer: merges one tensor."""

    def __init__(
        self, method: MergeMethod, params: Any, weights: list[float], seed: int, observer: Observer | None = None
    ):
        self.method, self.params, self.weights, self.seed = method, params, weights, seed
        self.observer, self.trim_density = observer, _observer_trim_density(observer)
        self.chunk_elements = CHUNK_ELEMENTS  # read when the merge starts, so a test may lower it

    def _chunk_rows(self, shape: tuple[int, ...], k: int) -> int | None:
        """Rows per chunk for an elementwise method; None when the tensor is one chunk (or not chunkable)."""
        if not self.method.elementwise or not shape:
            return None
        rows = max(1, self.chunk_elements // max(1, k * math.prod(shape[1:])))
        return None if rows >= shape[0] else rows

    def tensor(self, source: _ModelSource | _DeltaSource, write: Callable[[torch.Tensor], None]) -> None:
        """Merge `source`'s weight and hand the output, whole or in row pieces in order, to `write`."""
        name, k = source.name, source.n_experts
        generator = tensor_generator(self.seed, name)  # one per tensor, consumed chunk after chunk
        chunk = self._chunk_rows(source.shape, k)
        if chunk is None:
            base = source.base()
            inputs = [source.input(i, base) for i in range(k)]
            stats = None if self.method.stats is None else tuple(self.method.stats(x, self.params) for x in inputs)
            write(self._merge(name, inputs, base, source, generator, stats, None))
            return
        # Pass 1: whatever needs a whole tensor, one expert at a time.
        stats, thresholds = [], []
        if self.method.stats is not None or self.trim_density is not None:
            from pefteval_harness.merging.theory import trim_threshold

            base = source.base()
            for i in range(k):
                x = source.input(i, base)
                if self.method.stats is not None:
                    stats.append(self.method.stats(x, self.params))
                if self.trim_density is not None:
                    tau = x if source.adds_base else x.sub_(base)
                    thresholds.append(trim_threshold(tau, self.trim_density))
                del x
            del base
        # Pass 2: the next rows of every expert.
        for start in range(0, source.shape[0], chunk):
            span = (start, min(source.shape[0], start + chunk))
            base = source.base(span)
            inputs = [source.input(i, base, span) for i in range(k)]
            piece = self._merge(name, inputs, base, source, generator, tuple(stats) or None, thresholds or None)
            del inputs
            write(piece)

    def _merge(self, name, inputs, base, source, generator, stats, thresholds) -> torch.Tensor:
        """The method on one tensor or chunk; the observer sees it; base added back; cast to the output dtype."""
        ctx = MergeContext(tensor_name=name, generator=generator, stats=stats)
        merged = self.method.fn(inputs, self.weights, self.params, ctx)
        if tuple(merged.shape) != tuple(inputs[0].shape):
            raise ValueError(
                f"merge method {self.method.name!r} returned shape {list(merged.shape)} for tensor {name} of"
                f" shape {list(inputs[0].shape)}"
            )
        merged = _float32(merged)
        if self.observer is not None:
            if source.adds_base:
                taus, merged_tau = inputs, merged
            else:  # the method merged raw weights: the observer gets task vectors all the same
                taus, merged_tau = [x - base for x in inputs], merged - base
            extra = {} if thresholds is None else {"thresholds": thresholds}
            self.observer(name, taus, merged_tau, **extra)
        if source.adds_base:
            merged = merged.add_(base) if merged.is_contiguous() else merged + base
        return merged.to(source.dtype)


def _copy(reader: SafetensorsReader, name: str, write: Callable[[torch.Tensor], None]) -> None:
    """A tensor copied as it is, in row chunks of at most `CHUNK_ELEMENTS` entries."""
    shape = reader.shape(name)
    rows = max(1, CHUNK_ELEMENTS // max(1, math.prod(shape[1:]))) if shape else None
    if rows is None or rows >= shape[0]:
        write(reader.get(name))
        return
    for start in range(0, shape[0], rows):
        write(reader.rows(name, start, min(shape[0], start + rows)))


def _write_model(
    folder: Path,
    stem: str,
    reference: SafetensorsReader,
    max_shard_bytes: int | None,
    produce: Callable[[str, Callable[[torch.Tensor], None]], None],
) -> None:
    """Every tensor of `reference` (names, shapes, dtypes), produced by `produce(name, write)`, to disk."""
    entries = [(name, reference.shape(name), reference.dtype(name)) for name in reference.names()]
    writer = SafetensorsWriter(folder, stem, entries, max_shard_bytes, metadata={"format": "pt"})
    try:
        for name in writer.order:
            produce(name, partial(writer.write, name))
        writer.close()
    except BaseException:
        writer.abort()
        raise


def _copy_side_files(src: Path, dst: Path) -> None:
    """Config, generation config and tokenizer files: every top-level file that holds no weights."""
    for path in src.iterdir():
        if path.is_file() and not path.name.endswith(_WEIGHT_SUFFIXES) and path.name != "merge_config.json":
            shutil.copy2(path, dst / path.name)


def _write_atomically(out_dir: Path, build: Callable[[Path], None]) -> Path:
    """Run `build(tmp)` in a fresh folder next to `out_dir`, then rename it into place (removed on failure)."""
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise BadInput(f"{out_dir}: output folder exists and is not empty")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.partial-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        build(tmp)
        if out_dir.exists():
            out_dir.rmdir()  # empty, checked above
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def merge_models(
    *,
    method: str,
    experts: Sequence[Path],
    out_dir: Path,
    base: Path | None = None,
    weights: Sequence[float] | None = None,
    params: Mapping[str, Any] | None = None,
    space: str = "delta_w",
    seed: int = 0,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    observer: Observer | None = None,
) -> Path:
    """Merge full HF models or peft LoRA adapters with a registered method; returns `out_dir`.

    Full models: per base tensor, base + method(expert_i − base) (or method(expert_i) for methods on raw
    weights), cast back to the base dtype; non-float tensors are copied from the base. `base` may be left out
    only for methods on raw weights (the first expert then supplies config and tokenizer files). The experts
    (and base) must share config.json's model_type, architectures and vocab_size and the tokenizer's
    vocabulary, where both folders say.
    LoRA, space="delta_w": τ_i = scaling_i·B_i·A_i merged into `base`; the output is a full model.
    LoRA, space="factor": the A and B factors are merged separately, no base; the output is an adapter
    (one file) with the first expert's adapter_config.json.
    Full-model outputs are written in shards of at most `max_shard_bytes`. `seed` seeds random methods,
    per tensor. Method, parameters, weights and space are validated as `MergeSettings`; bad inputs raise
    BadInput naming the setting, expert or tensor, before anything is read or written. The output folder
    also gets merge_config.json (what was merged, how) and a model card, README.md.

    `observer(name, taus, merged_tau)`, if given, is called for every merged tensor, or for each row chunk
    of it in order: the K task vectors τ_i = expert_i − base (float32, also for methods on raw weights; in
    delta_w space the ΔW_i) and merged − base (float32, before the cast back). Only tensors the method
    merges are observed (in delta_w space, the adapted weights). The tensors are reused after the call:
    copy what you keep. An observer (or its owner, for a bound method) with a `trim_density` attribute
    also gets `thresholds=`, per expert the trim threshold of the whole τ_i (`theory.trim_threshold`), for
    every chunk of a chunked tensor. It needs a base and is not available in factor space (ValueError).
    """
    settings = validate(
        MergeSettings,
        {
            "method": method,
            "parameters": {} if params is None else params,
            "weights": None if weights is None else list(weights),
            "space": space,
            "seed": seed,
        },
        "merge",
    )
    m = get_method(settings.method)
    typed_params = m.validate_params(settings.parameters)
    if isinstance(max_shard_bytes, bool) or not isinstance(max_shard_bytes, int) or max_shard_bytes < 1:
        raise BadInput(f"merge: max_shard_bytes must be a positive integer, got {max_shard_bytes!r}")
    experts = [Path(e) for e in experts]
    if not experts:
        raise BadInput("merge: no experts given")
    if weights is not None and len(weights) != len(experts):
        raise BadInput(f"merge: {len(weights)} weights for {len(experts)} experts ({', '.join(map(str, experts))})")
    if observer is not None and space == "factor":
        raise ValueError("merge_models: no observer in factor space (the A and B factors are not task vectors)")
    if observer is not None and base is None:
        raise ValueError("merge_models: an observer needs a base model (it sees task vectors expert − base)")
    given = [1.0] * len(experts) if settings.weights is None else list(settings.weights)
    run = _Run(m, typed_params, m.resolve_weights(given, len(experts)), seed, observer)
    kinds = {e: _kind(e) for e in experts}
    if len(set(kinds.values())) > 1:
        odd = next(e for e in experts if kinds[e] != kinds[experts[0]])
        raise BadInput(f"{odd}: a {kinds[odd]} expert mixed with {kinds[experts[0]]} experts ({experts[0]})")
    kind = kinds[experts[0]]
    base = Path(base) if base is not None else None
    if base is not None and (kind, space) != ("lora", "factor") and _kind(base) != "full":
        raise BadInput(f"{base}: the base must be a full model folder")
    if kind == "full" and space == "factor":
        raise BadInput("merge: space 'factor' applies to LoRA adapters only; these experts are full models")
    if base is None and (kind == "lora" and space == "delta_w" or kind == "full" and m.needs_base):
        raise BadInput(f"merge: method {method!r} on {kind} experts in space {space!r} needs a base model")
    configs = [_adapter_config(e) for e in experts] if kind == "lora" else []
    if configs:
        check_adapters(configs, space, [str(e) for e in experts])

    record = {
        "method": method,
        "method_version": m.version,
        "parameters": settings.parameters,
        "weights": given,
        "method_weights": run.weights,
        "seed": seed,
        "experts": [str(e) for e in experts],
        "base": None if base is None else str(base),
        "space": space,
        "expert_kind": kind,
    }
    with ExitStack() as stack:
        if kind == "full":
            build = _full_merge(run, experts, base, stack, max_shard_bytes)
        elif space == "delta_w":
            build = _delta_w_merge(run, experts, configs, base, stack, max_shard_bytes)
        else:
            build = _factor_merge(run, experts, stack)

        def build_and_record(tmp: Path) -> None:
            from pefteval_harness.merging.recipes import model_card

            build(tmp)
            (tmp / "merge_config.json").write_text(json.dumps(record, indent=2) + "\n")
            (tmp / "README.md").write_text(model_card(record))

        return _write_atomically(Path(out_dir), build_and_record)


def _full_merge(run: _Run, experts: list[Path], base: Path | None, stack: ExitStack, max_shard_bytes: int):
    readers = [SafetensorsReader(e, MODEL, stack) for e in experts]
    reference = SafetensorsReader(base, MODEL, stack) if base is not None else readers[0]
    what = "the base" if base is not None else "the first expert"
    for expert, reader in zip(experts, readers, strict=True):
        _check_same_tensors(reference, reader, f"{what} {reference.folder}")
        if expert != reference.folder:
            _check_same_model(reference.folder, expert, what)
    # The base is read when the method adds task vectors to it, or for the observer's task vectors.
    base_reader = reference if base is not None and (run.method.needs_base or run.observer is not None) else None

    def produce(name: str, write: Callable[[torch.Tensor], None]) -> None:
        dtype = reference.dtype(name)
        if not dtype.is_floating_point:  # integer buffers are not merged
            _copy(reference, name, write)
            return
        run.tensor(_ModelSource(name, readers, base_reader, run.method.needs_base, reference.shape(name), dtype), write)

    def build(tmp: Path) -> None:
        _write_model(tmp, MODEL, reference, max_shard_bytes, produce)
        _copy_side_files(reference.folder, tmp)

    return build


def _delta_w_merge(
    run: _Run, experts: list[Path], configs: list[dict], base: Path, stack: ExitStack, max_shard_bytes: int
):
    base_t = SafetensorsReader(base, MODEL, stack)
    base_shapes = {name: base_t.shape(name) for name in base_t.names()}
    # base weight name -> per expert: (A key, B key, scaling, fan_in_fan_out) or None if not adapted
    plan: dict[str, list[tuple[str, str, float, bool] | None]] = {}
    readers = []
    for i, (expert, config) in enumerate(zip(experts, configs, strict=True)):
        reader = SafetensorsReader(expert, ADAPTER, stack)
        readers.append(reader)
        for module, (a_key, b_key) in _lora_pairs(reader).items():
            target = f"{module}.weight"
            if target not in base_shapes:
                raise BadInput(f"{expert}: tensor {a_key} adapts {target}, which the base {base} does not have")
            a_shape, b_shape = reader.shape(a_key), reader.shape(b_key)
            fan_in_fan_out = bool(config.get("fan_in_fan_out"))
            delta_shape = (b_shape[0], a_shape[1]) if len(a_shape) == len(b_shape) == 2 else None
            if fan_in_fan_out and delta_shape:
                delta_shape = delta_shape[::-1]
            if delta_shape is None or b_shape[1] != a_shape[0] or delta_shape != base_shapes[target]:
                raise BadInput(
                    f"{expert}: tensors {a_key} {list(a_shape)} and {b_key} {list(b_shape)} do not fit"
                    f" {target} {list(base_shapes[target])} of the base"
                )
            entry = (a_key, b_key, _lora_scaling(config, module, a_shape[0]), fan_in_fan_out)
            plan.setdefault(target, [None] * len(experts))[i] = entry

    def produce(name: str, write: Callable[[torch.Tensor], None]) -> None:
        if name not in plan:  # no expert adapts it: every expert equals the base here
            _copy(base_t, name, write)
            return
        run.tensor(_DeltaSource(name, base_t, readers, plan[name], run.method.needs_base), write)

    def build(tmp: Path) -> None:
        _write_model(tmp, MODEL, base_t, max_shard_bytes, produce)
        _copy_side_files(base, tmp)

    return build


def _factor_merge(run: _Run, experts: list[Path], stack: ExitStack):
    # check_adapters has made sure the adapters' shapes agree
    readers = [SafetensorsReader(e, ADAPTER, stack) for e in experts]
    _lora_pairs(readers[0])  # only plain lora_A / lora_B factors
    for reader in readers[1:]:
        _check_same_tensors(readers[0], reader, f"the first expert {experts[0]}")

    def produce(name: str, write: Callable[[torch.Tensor], None]) -> None:
        first = readers[0]  # the factors themselves are the method's inputs; no base
        run.tensor(_ModelSource(name, readers, None, False, first.shape(name), first.dtype(name)), write)

    def build(tmp: Path) -> None:
        _write_model(tmp, ADAPTER, readers[0], None, produce)  # adapters are small, and peft loads one file
        shutil.copy2(experts[0] / "adapter_config.json", tmp / "adapter_config.json")

    return build


def merge_from_config(config_path: Path, out_dir: Path) -> Path:
    """Merge as a YAML recipe says (see `MergeRecipe`); relative paths resolve against its folder."""
    recipe = load_recipe(Path(config_path))
    return merge_models(
        method=recipe.method,
        experts=recipe.expert_paths,
        out_dir=Path(out_dir),
        base=None if recipe.base_model is None else Path(recipe.base_model),
        weights=recipe.expert_weights,
        params=recipe.parameters,
        space=recipe.space,
        seed=0 if recipe.seed is None else recipe.seed,
    )
