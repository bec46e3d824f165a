"""Merge recipes in mergekit's YAML format, both ways, and the model card written next to a merge.

mergekit (arcee-ai/mergekit) describes a merge as `merge_method`, `base_model`, `models: [{model, parameters}]`
and global `parameters`. `from_mergekit` turns such a mapping into our recipe format (`MergeRecipe`, which
`load_recipe` then validates), `to_mergekit` turns a merge record (the engine's merge_config.json) into one,
and `model_card` writes a HF model card that carries the recipe. Only what both tools mean the same way is
translated; anything else is refused with one line (reading) or gives `None` (writing).

What a mergekit file may hold, and what we do with it:
- `merge_method`: one of the methods both tools have (`MERGEKIT_METHODS`); mergekit's own extras are refused.
- `models[i].model`: a model folder, or `model+adapter` (mergekit's LoRA syntax: a peft adapter over a model,
  merged in space delta_w; then every model must be an adapter over the same model, which is our base, and
  `base_model`, if given, must be that model).
- `models[i].parameters` and global `parameters`: plain numbers and booleans only (mergekit's gradients and
  per-tensor filters are refused). `weight` is per expert; every other parameter must be the same for all
  experts, since ours apply to the whole merge. Names are mapped (`lambda` -> `scaling`, ...); a mergekit
  switch we do not have as a parameter (`normalize`, `rescale`, `int8_mask`) is accepted only at the value
  that our method's fixed behaviour equals.
- `dtype`: accepted and ignored: we always compute in float32 and write the base model's dtype.
  `out_dtype`: refused (we write the base's dtype).
- `tokenizer_source`: only `base` (or the base model's own path) is accepted: that is what we copy. A union
  or another model's tokenizer would need a tokenizer merge, which we do not do.
- `slices`: refused (layer-wise recipes have no counterpart here).
- Defaults: a parameter a mergekit file leaves out gets mergekit's default (density 1.0, not our 0.7).
- slerp: mergekit's `base_model` is the first of its two models (t = 0 gives it); ours takes them as
  experts[0] and experts[1] with no base. Methods on raw weights (linear, nuslerp, karcher) take no base
  (mergekit's nuslerp with a base interpolates task vectors, which ours does not offer).
- weight: slerp, model_stock, sce and karcher take none in mergekit; ours ignore it too, except karcher,
  so a mergekit karcher file with unequal weights is refused (mergekit would silently weigh equally).
Relative paths resolve against the YAML file's folder, as in our own format.

Writing (`to_mergekit`): every parameter is written out, with mergekit's `normalize`/`rescale` switches that
make its result ours; `dtype: float32` (mergekit then computes and writes float32; we compute in float32 and
write the base's dtype, so for a bf16 base the two differ by that final rounding only).
"""

from __future__ import annotations

import typing
from collections.abc import Mapping
from typing import Any

from pefteval_harness.errors import BadInput
from pefteval_harness.merging.methods import MERGE_METHODS, get_method

# Our registry name -> mergekit's merge_method name (the methods both have).
MERGEKIT_METHODS: dict[str, str] = {
    name: name
    for name in (
        "linear",
        "task_arithmetic",
        "ties",
        "dare_linear",
        "dare_ties",
        "breadcrumbs",
        "breadcrumbs_ties",
        "della",
        "della_linear",
        "sce",
        "model_stock",
        "slerp",
        "nuslerp",
        "karcher",
    )
}
_FROM_MERGEKIT = {v: k for k, v in MERGEKIT_METHODS.items()}

# mergekit parameter name -> ours, where they differ (`lambda` is a Python keyword).
_PARAM_NAMES = {"lambda": "scaling", "nuslerp_flatten": "flatten", "nuslerp_row_wise": "row_wise"}
_MERGEKIT_NAMES = {ours: mk for mk, ours in _PARAM_NAMES.items()}
# mergekit's parameters of each shared method and their defaults there (weight aside; slerp's t has none).
# A mergekit file that leaves one out means mergekit's default, which is not always ours (our density
# methods default to 0.7, mergekit's to 1.0), so the translation fills it in. A mergekit parameter our method
# lacks (ties' normalize, say) is fixed in ours at mergekit's default, so only that value is accepted.
_GTA_DEFAULTS = {"lambda": 1.0, "density": 1.0, "int8_mask": False}
_MERGEKIT_DEFAULTS: dict[str, dict[str, Any]] = {
    "linear": {"normalize": True},
    "task_arithmetic": {**_GTA_DEFAULTS, "normalize": False, "rescale": False},
    "ties": {**_GTA_DEFAULTS, "normalize": True, "rescale": False},
    "dare_ties": {**_GTA_DEFAULTS, "normalize": False, "rescale": True},
    "dare_linear": {**_GTA_DEFAULTS, "normalize": False, "rescale": True},
    "breadcrumbs": {**_GTA_DEFAULTS, "normalize": False, "rescale": False, "gamma": 0.01},
    "breadcrumbs_ties": {**_GTA_DEFAULTS, "normalize": False, "rescale": False, "gamma": 0.01},
    "della": {**_GTA_DEFAULTS, "normalize": True, "rescale": True, "epsilon": 0.15},
    "della_linear": {**_GTA_DEFAULTS, "normalize": False, "rescale": True, "epsilon": 0.15},
    "sce": {"select_topk": 1.0, "int8_mask": False},
    "model_stock": {"filter_wise": False},
    "slerp": {},
    "nuslerp": {"nuslerp_flatten": True, "nuslerp_row_wise": False},
    "karcher": {"max_iter": 10, "tol": 1e-5},
}
_REQUIRED = {"slerp": ("t",)}
# Switches written out in to_mergekit even when our method has no such parameter: they are what makes
# mergekit's result ours, and their defaults differ between mergekit's methods.
_SWITCHES = ("normalize", "rescale")
_ANY_VALUE = {"int8_mask"}  # changes only the mask's storage type in mergekit
# Methods whose mergekit version takes no per-model weight (it ignores one if given). Ours ignore them too,
# except karcher, which mergekit always averages with equal weights.
_UNWEIGHTED = {"slerp", "model_stock", "karcher", "sce"}
_WEIGHTED_HERE_ONLY = {"karcher"}
_TOP_KEYS = {"merge_method", "base_model", "models", "parameters", "dtype", "out_dtype", "tokenizer_source", "slices"}


def is_mergekit(raw: Mapping[str, Any]) -> bool:
    """A recipe mapping in mergekit's format (it has `merge_method`), rather than ours (`method`)."""
    return "merge_method" in raw


# --- names and values between the two tools --------------------------------------------------------------


def _our_name(method: str, mk_name: str) -> str | None:
    """Our parameter name for mergekit's `mk_name` in `method`, or None if our method has no such parameter."""
    name = _PARAM_NAMES.get(mk_name, mk_name)
    return name if name in get_method(method).params.model_fields else None


def _choices(method: str, our: str) -> tuple[Any, ...]:
    """The allowed values of our parameter when it is a Literal (e.g. a rescale rule), else ()."""
    annotation = get_method(method).params.model_fields[our].annotation
    return typing.get_args(annotation) if typing.get_origin(annotation) is typing.Literal else ()


def _value_to_ours(method: str, our: str, value: Any) -> Any:
    """mergekit's boolean `rescale` as our rescale rule, where ours is a choice: true is 'l1', false 'none'."""
    if _choices(method, our) and isinstance(value, bool):
        return "l1" if value else "none"
    return value


_NOT_EXPRESSIBLE = object()
_MISSING = object()


def _value_to_mergekit(method: str, our: str, value: Any) -> Any:
    """The inverse of `_value_to_ours`; a rule mergekit lacks (DARE's 1/probability) is `_NOT_EXPRESSIBLE`."""
    if _choices(method, our):
        return {"l1": True, "none": False}.get(value, _NOT_EXPRESSIBLE)
    return value


# --- mergekit YAML -> our recipe --------------------------------------------------------------------------


def _plain_number(value: Any, where: str) -> Any:
    if isinstance(value, bool | int | float):
        return value
    raise BadInput(
        f"{where}: {value!r} is not a plain number or boolean (mergekit gradients and filters are not supported)"
    )


def from_mergekit(raw: Mapping[str, Any], where: str) -> dict[str, Any]:
    """A mergekit recipe mapping as one in our format (to validate as `MergeRecipe`); BadInput naming the key.

    `where` names the file in messages. Paths are left as written (the caller resolves them).
    """
    unknown = sorted(set(raw) - _TOP_KEYS)
    if unknown:
        raise BadInput(
            f"{where}: {unknown[0]}: mergekit key not supported here"
            f" (supported: {', '.join(sorted(_TOP_KEYS - {'slices', 'out_dtype'}))})"
        )
    if raw.get("slices") is not None:
        raise BadInput(f"{where}: slices: layer-wise mergekit recipes are not supported; give models instead")
    if raw.get("out_dtype") is not None:
        raise BadInput(f"{where}: out_dtype: not supported (the merge is written in the base model's dtype)")
    mk_method = raw.get("merge_method")
    if mk_method not in _FROM_MERGEKIT:
        raise BadInput(
            f"{where}: merge_method: {mk_method!r} is not supported (supported: {', '.join(_FROM_MERGEKIT)})"
        )
    method = _FROM_MERGEKIT[mk_method]
    base = raw.get("base_model")
    if base is not None and not isinstance(base, str):
        raise BadInput(f"{where}: base_model: expected a path, got {base!r}")
    tokenizer = raw.get("tokenizer_source")
    if tokenizer is not None and tokenizer not in ("base", base):
        raise BadInput(f"{where}: tokenizer_source: only 'base' is supported (the base model's tokenizer is copied)")
    models = raw.get("models")
    if not isinstance(models, list) or not models:
        raise BadInput(f"{where}: models: expected a non-empty list of {{model: path, parameters: ...}}")

    global_params = raw.get("parameters") or {}
    if not isinstance(global_params, Mapping):
        raise BadInput(f"{where}: parameters: expected a mapping")
    entries: list[tuple[str, dict[str, Any], str]] = []  # mergekit model reference, its parameters, where
    for i, entry in enumerate(models):
        at_i = f"{where}: models[{i}]"
        if isinstance(entry, str):
            entry = {"model": entry}
        if not isinstance(entry, Mapping) or not isinstance(entry.get("model"), str):
            raise BadInput(f"{at_i}: expected {{model: path, parameters: ...}}")
        if extra := sorted(set(entry) - {"model", "parameters"}):
            raise BadInput(f"{at_i}.{extra[0]}: unknown key")
        params = entry.get("parameters") or {}
        if not isinstance(params, Mapping):
            raise BadInput(f"{at_i}.parameters: expected a mapping")
        merged = {k: _plain_number(v, f"{where}: parameters.{k}") for k, v in global_params.items()}
        merged.update({k: _plain_number(v, f"{at_i}.parameters.{k}") for k, v in params.items()})
        entries.append((entry["model"], merged, at_i))

    if method == "slerp":  # mergekit's base is one of its two models, the t = 0 end: our experts[0]
        others = [e for e in entries if e[0] != base]
        if base is None or len(others) != 1:
            raise BadInput(f"{where}: models: slerp needs base_model plus exactly one other model")
        entries = [(base, others[0][1], others[0][2]), others[0]]
        base = None
    else:  # mergekit lets base_model appear among models; it is never an expert of its own
        entries = [e for e in entries if e[0] != base]
        if not entries:
            raise BadInput(f"{where}: models: no model other than base_model to merge")
    # LoRA references `model+adapter`: the adapters are our experts, the model under them our base
    split = [ref.split("+", 1) for ref, _, _ in entries]
    under = {parts[0] for parts in split if len(parts) == 2}
    if under:
        if any(len(parts) == 1 for parts in split):
            raise BadInput(f"{where}: models: mix of LoRA references (model+adapter) and full models")
        if len(under) > 1:
            raise BadInput(f"{where}: models: LoRA adapters over different models ({', '.join(sorted(under))})")
        lora_base = under.pop()
        if base is not None and base != lora_base:
            raise BadInput(f"{where}: base_model: {base!r} is not the model the adapters apply to ({lora_base!r})")
        base, paths = lora_base, [parts[1] for parts in split]
    else:
        paths = [parts[0] for parts in split]
        if base is not None and not get_method(method).needs_base:
            raise BadInput(
                f"{where}: base_model: {mk_method} with a base model is not supported here"
                f" (ours merges the models' own weights; leave base_model out)"
            )

    weights: list[float] = []
    for _, params, at_i in entries:
        weight = params.get("weight", 1.0)
        if isinstance(weight, bool):
            raise BadInput(f"{at_i}.parameters.weight: expected a number, got {weight!r}")
        weights.append(float(weight))
    if method in _WEIGHTED_HERE_ONLY and len(set(weights)) > 1:
        raise BadInput(
            f"{where}: models: mergekit's {mk_method} ignores weight (it weighs the models equally);"
            " give equal weights here, or use our recipe format for a weighted mean"
        )
    # ours apply to the whole merge: every per-model parameter but weight must agree across the models
    first_at = entries[0][2]
    parameters = {k: v for k, v in entries[0][1].items() if k != "weight"}
    for _, params, at_i in entries[1:]:
        these = {k: v for k, v in params.items() if k != "weight"}
        for key in sorted(set(parameters) | set(these)):
            if parameters.get(key, _MISSING) != these.get(key, _MISSING):
                raise BadInput(
                    f"{at_i}.parameters.{key}: {these.get(key, 'missing')!r} differs from {first_at}"
                    f" ({parameters.get(key, 'missing')!r}); per-model parameters other than weight must be"
                    " the same for every model"
                )

    defaults = _MERGEKIT_DEFAULTS[method]
    for mk in _REQUIRED.get(method, ()):
        if mk not in parameters:
            raise BadInput(f"{where}: parameters.{mk}: {mk_method} needs it (mergekit has no default)")
    ours: dict[str, Any] = {}
    for mk, value in {**defaults, **parameters}.items():
        name = _our_name(method, mk)
        if name is not None:
            ours[name] = _value_to_ours(method, name, value)
        elif mk in _ANY_VALUE and mk in defaults:
            continue
        elif mk in defaults:
            if value != defaults[mk]:
                raise BadInput(
                    f"{where}: parameters.{mk}: {method} here always behaves as {mk}={defaults[mk]};"
                    f" {value!r} is not supported"
                )
        else:
            known = ", ".join(_MERGEKIT_NAMES.get(f, f) for f in get_method(method).params.model_fields) or "none"
            raise BadInput(f"{where}: parameters.{mk}: not a parameter of {method} here (known: {known}, weight)")

    recipe: dict[str, Any] = {
        "method": method,
        "parameters": ours,
        "experts": [{"path": path, "weight": w} for path, w in zip(paths, weights, strict=True)],
    }
    if base is not None:
        recipe["base_model"] = base
    return recipe


# --- merge record -> mergekit YAML ------------------------------------------------------------------------


def to_mergekit(record: Mapping[str, Any]) -> dict[str, Any] | None:
    """The mergekit config that performs the merge `record` describes, or None when mergekit cannot say it.

    `record` is what the engine writes to merge_config.json (method, parameters, weights, experts, base, space,
    expert_kind, ...). None for: methods mergekit lacks, LoRA factor-space merges, parameter values mergekit
    has no switch for, and unequal weights for karcher (mergekit's weighs equally). Random methods give
    the same distribution in mergekit, not the same draws.
    """
    method = record.get("method")
    if method not in MERGEKIT_METHODS or method not in MERGE_METHODS:
        return None
    kind, space = record.get("expert_kind", "full"), record.get("space", "delta_w")
    if kind == "lora" and space != "delta_w":
        return None
    experts = [str(e) for e in record.get("experts") or []]
    weights = list(record.get("weights") or [1.0] * len(experts))
    base = record.get("base")
    if not experts or len(weights) != len(experts):
        return None
    if kind == "lora":
        if base is None:
            return None
        experts = [f"{base}+{e}" for e in experts]

    parameters: dict[str, Any] = {}
    for name, value in (record.get("parameters") or {}).items():
        if name not in get_method(method).params.model_fields:
            return None
        mk_value = _value_to_mergekit(method, name, value)
        if mk_value is _NOT_EXPRESSIBLE:
            return None
        parameters[_MERGEKIT_NAMES.get(name, name)] = mk_value
    for switch in _SWITCHES:
        if switch in _MERGEKIT_DEFAULTS[method]:
            parameters.setdefault(switch, _MERGEKIT_DEFAULTS[method][switch])

    config: dict[str, Any] = {"merge_method": MERGEKIT_METHODS[method]}
    if method == "slerp":
        if len(experts) != 2:
            return None
        config["base_model"] = experts[0]
        config["models"] = [{"model": experts[0]}, {"model": experts[1]}]
    else:
        if method in _WEIGHTED_HERE_ONLY and len(set(weights)) > 1:
            return None
        if get_method(method).needs_base:  # LoRA too: mergekit's task vectors are (base+adapter) − base
            if base is None:
                return None
            config["base_model"] = str(base)
        models = []
        for expert, weight in zip(experts, weights, strict=True):
            entry: dict[str, Any] = {"model": expert}
            if method not in _UNWEIGHTED:
                entry["parameters"] = {"weight": weight}
            models.append(entry)
        config["models"] = models
    if parameters:
        config["parameters"] = parameters
    config["dtype"] = "float32"
    return config


# --- model card -------------------------------------------------------------------------------------------


def _our_recipe(record: Mapping[str, Any]) -> dict[str, Any]:
    """The record in our `pefteval merge` format."""
    recipe: dict[str, Any] = {"method": record.get("method")}
    if record.get("base") is not None:
        recipe["base_model"] = str(record["base"])
    recipe["experts"] = [
        {"path": str(e), "weight": w}
        for e, w in zip(record.get("experts") or [], record.get("weights") or [], strict=False)
    ]
    if record.get("parameters"):
        recipe["parameters"] = dict(record["parameters"])
    recipe["space"] = record.get("space", "delta_w")
    if record.get("seed") is not None:
        recipe["seed"] = record["seed"]
    return recipe


def model_card(record: Mapping[str, Any]) -> str:
    """A HF model card (README.md) for a merge: YAML front matter, what was merged and how, and the recipe.

    The recipe is a mergekit config when mergekit has the method (`pefteval merge` reads it too), else our
    own recipe format. Both reproduce the merge with `pefteval merge RECIPE OUT`.
    """
    import yaml

    method = str(record.get("method"))
    front: dict[str, Any] = {"tags": ["merge", "pefteval-harness"]}
    if record.get("base") is not None:
        front["base_model"] = str(record["base"])
    front["library_name"] = (
        "peft" if record.get("expert_kind") == "lora" and record.get("space") == "factor" else "transformers"
    )

    experts = [str(e) for e in record.get("experts") or []]
    weights = list(record.get("weights") or [])
    method_weights = list(record.get("method_weights") or weights)
    lines = [
        "---",
        yaml.safe_dump(front, sort_keys=False).rstrip(),
        "---",
        "",
        f"# Merge: {method}",
        "",
        f"Made with pefteval-harness from {len(experts)} {record.get('expert_kind', 'full')} expert(s).",
        "",
        f"- method: `{method}` (version {record.get('method_version', '?')})",
        f"- space: `{record.get('space', 'delta_w')}`",
        f"- seed: {record.get('seed')}",
        f"- base model: `{record['base']}`" if record.get("base") is not None else "- base model: none",
        "- parameters: " + (", ".join(f"`{k}={v!r}`" for k, v in (record.get("parameters") or {}).items()) or "none"),
        "",
        "| expert | weight | weight as the method used it |",
        "| --- | --- | --- |",
    ]
    for i, expert in enumerate(experts):
        w = weights[i] if i < len(weights) else ""
        mw = method_weights[i] if i < len(method_weights) else ""
        lines.append(f"| `{expert}` | {w} | {mw} |")
    mergekit = to_mergekit(record)
    lines.append("")
    if mergekit is None:
        lines += ["## Recipe (pefteval-harness format)", "", "`pefteval merge recipe.yaml OUT` reads it.", ""]
        lines += _yaml_block(_our_recipe(record))
        return "\n".join(lines)
    lines += [
        "## Recipe (mergekit format)",
        "",
        "`pefteval merge recipe.yaml OUT` and mergekit's `mergekit-yaml recipe.yaml OUT` both read it.",
        "",
        *_yaml_block(mergekit),
    ]
    if _draws(record):  # a mergekit file has no seed: give ours too, which redoes these very draws
        lines += [
            f"The method is random and both tools draw differently; this merge used seed {record.get('seed')}."
            " To redo it exactly: `pefteval merge` with this recipe in our format.",
            "",
            *_yaml_block(_our_recipe(record)),
        ]
    return "\n".join(lines)


def _yaml_block(data: Mapping[str, Any]) -> list[str]:
    import yaml

    return ["```yaml", yaml.safe_dump(dict(data), sort_keys=False).rstrip(), "```", ""]


def _draws(record: Mapping[str, Any]) -> bool:
    """The merge drew random masks: DARE or DELLA below density 1 (at density 1 they keep everything)."""
    random = record.get("method") in ("dare_linear", "dare_ties", "della", "della_linear")
    return random and (record.get("parameters") or {}).get("density", 1.0) < 1
