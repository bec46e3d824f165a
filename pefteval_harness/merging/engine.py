"""The streaming merge engine: expert tensors are read one weight at a time from safetensors.

Only the output model is held in memory, plus the K expert copies of the one weight being merged, so memory
does not grow with the number of experts beyond that. Everything that can be checked from the files'
headers (kinds, names, shapes, adapter configs) is checked before anything is written; the output is built
in a temporary folder next to `out_dir` and renamed into place, so a failed merge leaves no `out_dir`.
Pickle files (`*.bin`) are refused, never loaded.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import uuid
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from pefteval_harness.errors import BadInput
from pefteval_harness.merging.methods import MergeMethod, get_method

if TYPE_CHECKING:
    import torch

SPACES = ("delta_w", "factor")
MODEL, ADAPTER = "model", "adapter_model"  # file stems of a HF model folder and a peft adapter folder
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".index.json")
# peft features whose saved tensors are not plain lora_A / lora_B pairs, or whose forward is not W + s·B·A.
_UNSUPPORTED = (
    "use_dora",
    "modules_to_save",
    "lora_bias",
    "trainable_token_indices",
    "target_parameters",
    "layer_replication",
    "alora_invocation_tokens",
)
# Adapter fields that must agree for factors to be merged entry by entry.
_FACTOR_FIELDS = ("r", "lora_alpha", "target_modules", "use_rslora", "rank_pattern", "alpha_pattern", "fan_in_fan_out")
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
    if config.get("peft_type") != "LORA":
        raise BadInput(f"{path}: peft_type {config.get('peft_type')!r} cannot be merged (LoRA adapters only)")
    for key in _UNSUPPORTED:
        if config.get(key):
            raise BadInput(f"{path}: {key}={config[key]!r} adapters are not supported by the merge engine yet")
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


def _merge_tensor(m: MergeMethod, base: torch.Tensor, deltas: Sequence[torch.Tensor], weights, params) -> torch.Tensor:
    """base + method(τ) for task-vector methods, method(base + τ_i) for methods on raw weights (float32)."""
    b = base.float()
    if m.needs_base:
        return b + m.fn(list(deltas), weights, **params)
    return m.fn([b + d for d in deltas], weights, **params)


def _copy_side_files(src: Path, dst: Path) -> None:
    """Config, generation config and tokenizer files: every top-level file that holds no weights."""
    for path in src.iterdir():
        if path.is_file() and not path.name.endswith(_WEIGHT_SUFFIXES) and path.name != "merge_config.json":
            shutil.copy2(path, dst / path.name)


def _save(tensors: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata={"format": "pt"})


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
    params: dict[str, Any] | None = None,
    space: str = "delta_w",
) -> Path:
    """Merge full HF models or peft LoRA adapters with a registered method; returns `out_dir`.

    Full models: per base tensor, base + method(expert_i − base) (or method(expert_i) for methods on raw
    weights), cast back to the base dtype; non-float tensors are copied from the base. `base` may be left out
    only for methods on raw weights (the first expert then supplies config and tokenizer files).
    LoRA, space="delta_w": τ_i = scaling_i·B_i·A_i merged into `base`; the output is a full model.
    LoRA, space="factor": the A factors and the B factors are merged separately, no base; the output is an
    adapter with the first expert's adapter_config.json.
    Bad inputs raise BadInput naming the expert and tensor, before anything is written.
    """
    m = get_method(method)
    resolved = m.resolve_params(params)
    experts = [Path(e) for e in experts]
    if not experts:
        raise BadInput("merge: no experts given")
    if weights is not None and len(weights) != len(experts):
        raise BadInput(f"merge: {len(weights)} weights for {len(experts)} experts ({', '.join(map(str, experts))})")
    given = [1.0] * len(experts) if weights is None else [float(w) for w in weights]
    used = m.resolve_weights(given, len(experts))
    if space not in SPACES:
        raise BadInput(f"merge: unknown space {space!r} (known: {', '.join(SPACES)})")
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

    record = {
        "method": method,
        "parameters": resolved,
        "weights": given,
        "method_weights": used,
        "experts": [str(e) for e in experts],
        "base": None if base is None else str(base),
        "space": space,
        "expert_kind": kind,
    }
    with ExitStack() as stack:
        if kind == "full":
            build = _full_merge(m, resolved, used, experts, base, stack)
        elif space == "delta_w":
            build = _delta_w_merge(m, resolved, used, experts, base, stack)
        else:
            build = _factor_merge(m, resolved, used, experts, stack)

        def build_and_record(tmp: Path) -> None:
            build(tmp)
            (tmp / "merge_config.json").write_text(json.dumps(record, indent=2) + "\n")

        return _write_atomically(Path(out_dir), build_and_record)


def _full_merge(m, params, weights, experts, base, stack) -> Callable[[Path], None]:
    readers = [_Tensors(e, MODEL, stack) for e in experts]
    reference = _Tensors(base, MODEL, stack) if base is not None else readers[0]
    what = f"the base {base}" if base is not None else f"the first expert {experts[0]}"
    for reader in readers:
        _check_same_tensors(reference, reader, what)

    def build(tmp: Path) -> None:
        out = {}
        for name in reference.names():  # one weight at a time
            b = reference.get(name)
            if not b.is_floating_point():  # integer buffers are not merged
                out[name] = b
                continue
            xs = [r.get(name).float() for r in readers]
            if m.needs_base:
                merged = b.float() + m.fn([x - b.float() for x in xs], weights, **params)
            else:
                merged = m.fn(xs, weights, **params)
            out[name] = merged.to(b.dtype).contiguous()
        _copy_side_files(base if base is not None else experts[0], tmp)
        _save(out, tmp / f"{MODEL}.safetensors")

    return build


def _delta_w_merge(m, params, weights, experts, base, stack) -> Callable[[Path], None]:
    base_t = _Tensors(base, MODEL, stack)
    base_shapes = {name: base_t.shape(name) for name in base_t.names()}
    # base weight name -> per expert: (A key, B key, scaling, fan_in_fan_out) or None if not adapted
    plan: dict[str, list[tuple[str, str, float, bool] | None]] = {}
    readers = []
    for i, expert in enumerate(experts):
        config = _adapter_config(expert)
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

        out = {}
        for name in base_t.names():
            b = base_t.get(name)
            if name not in plan:  # no expert adapts it: every expert equals the base here
                out[name] = b
                continue
            deltas = []
            for reader, entry in zip(readers, plan[name], strict=True):
                if entry is None:  # this expert does not adapt the weight: τ_i = 0
                    deltas.append(torch.zeros(b.shape, dtype=torch.float32))
                    continue
                a_key, b_key, scaling, fan_in_fan_out = entry
                delta = (reader.get(b_key).float() @ reader.get(a_key).float()) * scaling
                deltas.append(delta.T if fan_in_fan_out else delta)
            out[name] = _merge_tensor(m, b, deltas, weights, params).to(b.dtype).contiguous()
        _copy_side_files(base, tmp)
        _save(out, tmp / f"{MODEL}.safetensors")

    return build


def _canonical(value: Any) -> Any:
    """target_modules is a set that peft saves as a list in no fixed order."""
    return sorted(value) if isinstance(value, list) else value


def _factor_merge(m, params, weights, experts, stack) -> Callable[[Path], None]:
    configs = [_adapter_config(e) for e in experts]
    for expert, config in zip(experts[1:], configs[1:], strict=True):
        for key in _FACTOR_FIELDS:
            if _canonical(config.get(key)) != _canonical(configs[0].get(key)):
                raise BadInput(
                    f"{expert}: {key}={config.get(key)!r} differs from {experts[0]} ({configs[0].get(key)!r});"
                    " factor-space merging needs identical adapter shapes (use space delta_w)"
                )
    readers = [_Tensors(e, ADAPTER, stack) for e in experts]
    _lora_pairs(readers[0])  # only plain lora_A / lora_B factors
    for reader in readers[1:]:
        _check_same_tensors(readers[0], reader, f"the first expert {experts[0]}")

    def build(tmp: Path) -> None:
        out = {}
        for name in readers[0].names():
            first = readers[0].get(name)
            merged = m.fn([first.float(), *(r.get(name).float() for r in readers[1:])], weights, **params)
            out[name] = merged.to(first.dtype).contiguous()
        shutil.copy2(experts[0] / "adapter_config.json", tmp / "adapter_config.json")
        _save(out, tmp / f"{ADAPTER}.safetensors")

    return build


# --- YAML configs (`pefteval merge CONFIG --out DIR`) -------------------------------------------------------

_CONFIG_KEYS = ("method", "base_model", "space", "parameters", "experts")
_EXPERT_KEYS = ("path", "weight")


def _describe(value: Any) -> str:
    return "nothing" if value is None else repr(value)


def merge_from_config(config_path: Path, out_dir: Path) -> Path:
    """Merge as a YAML config says (README "Merge configs"); relative paths resolve against its folder."""
    config_path = Path(config_path)

    def bad(where: str, msg: str) -> BadInput:
        return BadInput(f"{config_path}: {where}: {msg}" if where else f"{config_path}: {msg}")

    try:
        data = yaml.safe_load(config_path.read_text())
    except OSError as e:
        raise bad("", f"cannot read ({e.strerror})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise bad("", f"malformed YAML: {getattr(e, 'problem', None) or e}{where}") from None
    if not isinstance(data, dict):
        raise bad("", f"expected a mapping with keys {', '.join(_CONFIG_KEYS)}, got {_describe(data)}")
    for key in data:
        if key not in _CONFIG_KEYS:
            raise bad(str(key), f"unknown key (known: {', '.join(_CONFIG_KEYS)})")

    def string(key: str, value: Any, required: bool = False) -> str | None:
        if value is None and not required:
            return None
        if not isinstance(value, str) or not value:
            raise bad(key, f"expected a string, got {_describe(value)}")
        return value

    def resolve(path: str) -> Path:
        p = Path(path).expanduser()
        return (p if p.is_absolute() else config_path.parent / p).resolve()

    method = string("method", data.get("method"), required=True)
    try:
        m = get_method(method)
    except BadInput as e:
        raise bad("method", str(e)) from None
    space = string("space", data.get("space")) or "delta_w"
    if space not in SPACES:
        raise bad("space", f"expected one of {', '.join(SPACES)}, got {space!r}")
    params = data.get("parameters") or {}
    if not isinstance(params, dict):
        raise bad("parameters", f"expected a mapping, got {_describe(params)}")
    try:
        m.resolve_params(params)
    except BadInput as e:
        raise bad("parameters", str(e)) from None
    base = string("base_model", data.get("base_model"))

    experts = data.get("experts")
    if not isinstance(experts, list) or not experts:
        raise bad("experts", f"expected a non-empty list, got {_describe(experts)}")
    paths, weights = [], []
    for i, item in enumerate(experts):
        where = f"experts[{i}]"
        if not isinstance(item, dict):
            raise bad(where, f"expected a mapping with keys path, weight, got {_describe(item)}")
        for key in item:
            if key not in _EXPERT_KEYS:
                raise bad(f"{where}.{key}", f"unknown key (known: {', '.join(_EXPERT_KEYS)})")
        paths.append(resolve(string(f"{where}.path", item.get("path"), required=True)))
        weight = item.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, int | float):
            raise bad(f"{where}.weight", f"expected a number, got {_describe(weight)}")
        weights.append(float(weight))

    return merge_models(
        method=method,
        experts=paths,
        out_dir=Path(out_dir),
        base=resolve(base) if base else None,
        weights=weights,
        params=params,
        space=space,
    )
