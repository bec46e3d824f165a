"""The streaming merge engine: expert tensors are read one weight at a time from safetensors.

Memory holds the K expert copies of the one weight being merged plus the output shard being filled: merged
tensors are written as they come into shards of at most `max_shard_bytes` (HF's sharded layout when there
is more than one), so neither the output nor the experts are ever held whole. Everything that can be
checked from the files' headers and configs (settings, kinds, names, shapes, adapter configs) is checked
before anything is written; the output is built in a temporary folder next to `out_dir` and renamed into
place, so a failed merge leaves no `out_dir`. Pickle files (`*.bin`) are refused, never loaded.
Random methods get a generator per tensor, seeded from the merge seed and the tensor's name.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import uuid
from collections.abc import Callable, Mapping, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pefteval_harness.config_io import validate
from pefteval_harness.errors import BadInput
from pefteval_harness.merging.config import MergeSettings, check_adapters, load_recipe
from pefteval_harness.merging.methods import MergeContext, MergeMethod, get_method, tensor_generator

if TYPE_CHECKING:
    import torch

MODEL, ADAPTER = "model", "adapter_model"  # file stems of a HF model folder and a peft adapter folder
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".index.json")
DEFAULT_MAX_SHARD_BYTES = 4 * 1024**3
_LORA_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<factor>[AB])\.weight$")


class _Tensors:
    """Lazy reader of a folder's safetensors (one file, or shards + index): headers now, tensors on demand."""

    def __init__(self, folder: Path, stem: str, stack: ExitStack):
        self.folder = folder
        single, index = folder / f"{stem}.safetensors", folder / f"{stem}.safetensors.index.json"
        if single.is_file():
            files = [single]
        elif index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError, TypeError) as e:
                raise BadInput(f"{index}: not a safetensors index ({e})") from None
            files = [folder / f for f in dict.fromkeys(weight_map.values())]
        else:
            pickles = sorted(p.name for p in folder.glob("*.bin"))
            if pickles:
                raise BadInput(f"{folder}: {pickles[0]} is a pickle file; only safetensors are loaded, never pickles")
            raise BadInput(f"{folder}: no {single.name} or {index.name}")
        from safetensors import safe_open

        self._file: dict[str, Any] = {}  # tensor name -> open safetensors handle
        for path in files:
            if not path.is_file():
                raise BadInput(f"{folder}: shard {path.name} named in the index is missing")
            try:
                handle = stack.enter_context(safe_open(str(path), framework="pt"))
            except Exception as e:  # a truncated or foreign file
                raise BadInput(f"{path}: not a readable safetensors file ({e})") from None
            self._file.update(dict.fromkeys(handle.keys(), handle))

    def names(self) -> list[str]:
        return list(self._file)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._file[name].get_slice(name).get_shape())

    def get(self, name: str) -> torch.Tensor:
        return self._file[name].get_tensor(name)


def _kind(folder: Path) -> str:
    """'lora' for a peft adapter folder, 'full' for a HF model folder; BadInput for anything else."""
    if not folder.is_dir():
        raise BadInput(f"{folder}: no such folder")
    if (folder / "adapter_config.json").is_file():
        return "lora"
    if any((folder / f).is_file() for f in ("config.json", f"{MODEL}.safetensors", f"{MODEL}.safetensors.index.json")):
        return "full"
    raise BadInput(f"{folder}: neither a model folder (config.json) nor a peft adapter (adapter_config.json)")


def _adapter_config(folder: Path) -> dict[str, Any]:
    path = folder / "adapter_config.json"
    try:
        config = json.loads(path.read_text())
    except ValueError as e:
        raise BadInput(f"{path}: not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise BadInput(f"{path}: expected a JSON object, got {type(config).__name__}")
    return config


def _lora_pairs(tensors: _Tensors) -> dict[str, tuple[str, str]]:
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


def _check_same_tensors(reference: _Tensors, other: _Tensors, what: str) -> None:
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


class _Run:
    """One merge's method, validated parameters, method weights and seed: applies the method to one tensor."""

    def __init__(self, method: MergeMethod, params: Any, weights: list[float], seed: int):
        self.method, self.params, self.weights, self.seed = method, params, weights, seed

    def apply(self, tensors: Sequence[torch.Tensor], name: str) -> torch.Tensor:
        ctx = MergeContext(tensor_name=name, generator=tensor_generator(self.seed, name))
        return self.method.fn(list(tensors), self.weights, self.params, ctx)


def _copy_side_files(src: Path, dst: Path) -> None:
    """Config, generation config and tokenizer files: every top-level file that holds no weights."""
    for path in src.iterdir():
        if path.is_file() and not path.name.endswith(_WEIGHT_SUFFIXES) and path.name != "merge_config.json":
            shutil.copy2(path, dst / path.name)


class _ShardWriter:
    """Writes tensors as they come into shards of at most `max_bytes` (a larger tensor gets a shard to itself).

    One shard is saved as `<stem>.safetensors`; several as HF names it, `<stem>-00001-of-0000N.safetensors`
    plus `<stem>.safetensors.index.json`, which `from_pretrained` loads. `max_bytes=None`: one file.
    """

    def __init__(self, folder: Path, stem: str, max_bytes: int | None):
        self.folder, self.stem, self.max_bytes = folder, stem, max_bytes
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._total_bytes = 0
        self._shards: list[tuple[Path, list[str]]] = []  # written so far, under temporary names

    def add(self, name: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self.max_bytes is not None and self._pending and self._pending_bytes + nbytes > self.max_bytes:
            self._flush()
        self._pending[name] = tensor
        self._pending_bytes += nbytes
        self._total_bytes += nbytes

    def _flush(self) -> None:
        from safetensors.torch import save_file

        path = self.folder / f".{self.stem}-part{len(self._shards)}.safetensors"
        save_file(self._pending, str(path), metadata={"format": "pt"})
        self._shards.append((path, list(self._pending)))
        self._pending, self._pending_bytes = {}, 0

    def close(self) -> None:
        if self._pending or not self._shards:
            self._flush()
        n = len(self._shards)
        if n == 1:
            self._shards[0][0].rename(self.folder / f"{self.stem}.safetensors")
            return
        weight_map = {}
        for i, (path, names) in enumerate(self._shards, 1):
            final = f"{self.stem}-{i:05d}-of-{n:05d}.safetensors"
            path.rename(self.folder / final)
            weight_map.update(dict.fromkeys(names, final))
        index = {"metadata": {"total_size": self._total_bytes}, "weight_map": weight_map}
        (self.folder / f"{self.stem}.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


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
) -> Path:
    """Merge full HF models or peft LoRA adapters with a registered method; returns `out_dir`.

    Full models: per base tensor, base + method(expert_i − base) (or method(expert_i) for methods on raw
    weights), cast back to the base dtype; non-float tensors are copied from the base. `base` may be left out
    only for methods on raw weights (the first expert then supplies config and tokenizer files).
    LoRA, space="delta_w": τ_i = scaling_i·B_i·A_i merged into `base`; the output is a full model.
    LoRA, space="factor": the A and B factors are merged separately, no base; the output is an adapter
    (one file) with the first expert's adapter_config.json.
    Full-model outputs are written in shards of at most `max_shard_bytes`. `seed` seeds random methods,
    per tensor. Method, parameters, weights and space are validated as `MergeSettings`; bad inputs raise
    BadInput naming the setting, expert or tensor, before anything is written.
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
    given = [1.0] * len(experts) if settings.weights is None else list(settings.weights)
    run = _Run(m, typed_params, m.resolve_weights(given, len(experts)), seed)
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
            build(tmp)
            (tmp / "merge_config.json").write_text(json.dumps(record, indent=2) + "\n")

        return _write_atomically(Path(out_dir), build_and_record)


def _full_merge(run: _Run, experts: list[Path], base: Path | None, stack: ExitStack, max_shard_bytes: int):
    readers = [_Tensors(e, MODEL, stack) for e in experts]
    reference = _Tensors(base, MODEL, stack) if base is not None else readers[0]
    what = f"the base {base}" if base is not None else f"the first expert {experts[0]}"
    for reader in readers:
        _check_same_tensors(reference, reader, what)

    def build(tmp: Path) -> None:
        out = _ShardWriter(tmp, MODEL, max_shard_bytes)
        for name in reference.names():  # one weight at a time
            b = reference.get(name)
            if not b.is_floating_point():  # integer buffers are not merged
                out.add(name, b)
                continue
            xs = [r.get(name).float() for r in readers]
            if run.method.needs_base:
                merged = b.float() + run.apply([x - b.float() for x in xs], name)
            else:
                merged = run.apply(xs, name)
            out.add(name, merged.to(b.dtype).contiguous())
        out.close()
        _copy_side_files(base if base is not None else experts[0], tmp)

    return build


def _delta_w_merge(
    run: _Run, experts: list[Path], configs: list[dict], base: Path, stack: ExitStack, max_shard_bytes: int
):
    base_t = _Tensors(base, MODEL, stack)
    base_shapes = {name: base_t.shape(name) for name in base_t.names()}
    # base weight name -> per expert: (A key, B key, scaling, fan_in_fan_out) or None if not adapted
    plan: dict[str, list[tuple[str, str, float, bool] | None]] = {}
    readers = []
    for i, (expert, config) in enumerate(zip(experts, configs, strict=True)):
        reader = _Tensors(expert, ADAPTER, stack)
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

    def build(tmp: Path) -> None:
        import torch

        out = _ShardWriter(tmp, MODEL, max_shard_bytes)
        for name in base_t.names():
            b = base_t.get(name)
            if name not in plan:  # no expert adapts it: every expert equals the base here
                out.add(name, b)
                continue
            deltas = []
            for reader, entry in zip(readers, plan[name], strict=True):
                if entry is None:  # this expert does not adapt the weight: τ_i = 0
                    deltas.append(torch.zeros(b.shape, dtype=torch.float32))
                    continue
                a_key, b_key, scaling, fan_in_fan_out = entry
                delta = (reader.get(b_key).float() @ reader.get(a_key).float()) * scaling
                deltas.append(delta.T if fan_in_fan_out else delta)
            b32 = b.float()
            if run.method.needs_base:  # base + method(τ)
                merged = b32 + run.apply(deltas, name)
            else:  # method(base + τ_i) for methods on raw weights
                merged = run.apply([b32 + d for d in deltas], name)
            out.add(name, merged.to(b.dtype).contiguous())
        out.close()
        _copy_side_files(base, tmp)

    return build


def _factor_merge(run: _Run, experts: list[Path], stack: ExitStack):
    # check_adapters has made sure the adapters' shapes agree
    readers = [_Tensors(e, ADAPTER, stack) for e in experts]
    _lora_pairs(readers[0])  # only plain lora_A / lora_B factors
    for reader in readers[1:]:
        _check_same_tensors(readers[0], reader, f"the first expert {experts[0]}")

    def build(tmp: Path) -> None:
        out = _ShardWriter(tmp, ADAPTER, None)  # adapters are small, and peft loads one file
        for name in readers[0].names():
            first = readers[0].get(name)
            merged = run.apply([first.float(), *(r.get(name).float() for r in readers[1:])], name)
            out.add(name, merged.to(first.dtype).contiguous())
        out.close()
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
