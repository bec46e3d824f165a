"""mergekit-style recipes (`load_recipe` on a mergekit YAML, `to_mergekit`) and the model card of a merge."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from pefteval_harness.errors import BadInput
from pefteval_harness.merging import get_method, load_recipe, merge_from_config, merge_models
from pefteval_harness.merging.recipes import MERGEKIT_METHODS, from_mergekit, model_card, to_mergekit
from tests.conftest import PEFTEVAL

HERE = Path(__file__).resolve().parent / "mergekit"
sys.path.insert(0, str(HERE))
import experts  # noqa: E402  (tests/mergekit/experts.py)

CASES = json.loads((HERE / "fixtures" / "cases.json").read_text())["cases"]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    return experts.build_models(tmp_path_factory.mktemp("recipe-models"))


def _write(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _same_tensors(a: Path, b: Path) -> bool:
    x, y = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    return x.keys() == y.keys() and all(x[k].equal(y[k]) for k in x)


def test_mergekit_yaml_merges_like_our_recipe(models, tmp_path):
    """The same TIES merge written both ways (relative paths, per-model density, lambda) gives the same model."""
    root = models["base"].parent
    mergekit = {
        "merge_method": "ties",
        "base_model": "base",
        "models": [
            {"model": "expert0", "parameters": {"weight": 1.0, "density": 0.5}},
            {"model": "expert1", "parameters": {"weight": 0.5, "density": 0.5}},
            {"model": "base"},  # mergekit allows the base among the models; it is no expert
        ],
        "parameters": {"lambda": 0.9, "normalize": True, "int8_mask": True},
        "dtype": "float32",
        "tokenizer_source": "base",
    }
    ours = {
        "method": "ties",
        "base_model": "base",
        "experts": [{"path": "expert0", "weight": 1.0}, {"path": "expert1", "weight": 0.5}],
        "parameters": {"density": 0.5, "scaling": 0.9},
    }
    a, b = _write(root / "mergekit.yaml", mergekit), _write(root / "ours.yaml", ours)
    recipe = load_recipe(a)
    assert recipe == load_recipe(b)
    assert recipe.base_model == str(models["base"]) and recipe.expert_paths == [models["expert0"], models["expert1"]]
    assert _same_tensors(merge_from_config(a, tmp_path / "a"), merge_from_config(b, tmp_path / "b"))


def test_mergekit_slerp_base_is_the_first_expert(models):
    recipe = from_mergekit(
        {
            "merge_method": "slerp",
            "base_model": "A",
            "models": [{"model": "B"}, {"model": "A"}],
            "parameters": {"t": 0.3},
        },
        "x.yaml",
    )
    assert recipe == {
        "method": "slerp",
        "parameters": {"t": 0.3},
        "experts": [{"path": "A", "weight": 1.0}, {"path": "B", "weight": 1.0}],
    }


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            {"merge_method": "passthrough"},
            "merge_method: 'passthrough' is not supported (supported: linear, task_arithmetic",
        ),
        ({"slices": [{"sources": []}]}, "slices: layer-wise mergekit recipes are not supported"),
        ({"tokenizer_source": "union"}, "tokenizer_source: only 'base' is supported"),
        ({"out_dtype": "bfloat16"}, "out_dtype: not supported"),
        ({"chat_template": "chatml"}, "chat_template: mergekit key not supported here"),
        ({"parameters": {"normalize": False}}, "parameters.normalize: ties here always behaves as normalize=True"),
        ({"parameters": {"density": [0.1, 0.9]}}, "parameters.density: [0.1, 0.9] is not a plain number"),
        ({"parameters": {"epsilon": 0.1}}, "parameters.epsilon: not a parameter of ties here"),
    ],
)
def test_mergekit_yaml_refusals_are_one_line(change, message):
    raw = {
        "merge_method": "ties",
        "base_model": "base",
        "models": [{"model": "e0", "parameters": {"weight": 1.0}}, {"model": "e1", "parameters": {"weight": 1.0}}],
        **change,
    }
    with pytest.raises(BadInput) as info:
        from_mergekit(raw, "m.yaml")
    assert message in str(info.value) and "\n" not in str(info.value)


def test_per_model_parameters_other_than_weight_must_agree():
    raw = {
        "merge_method": "ties",
        "base_model": "base",
        "models": [
            {"model": "e0", "parameters": {"weight": 1.0, "density": 0.5}},
            {"model": "e1", "parameters": {"weight": 2.0, "density": 0.7}},
        ],
    }
    with pytest.raises(BadInput, match=r"models\[1\]\.parameters\.density: 0\.7 differs from m\.yaml: models\[0\]"):
        from_mergekit(raw, "m.yaml")
    raw["models"][1]["parameters"] = {"weight": 2.0}  # density given for one model only
    with pytest.raises(BadInput, match=r"models\[1\]\.parameters\.density: 'missing' differs"):
        from_mergekit(raw, "m.yaml")
    raw["models"][1]["parameters"] = {"weight": 2.0, "density": 0.5}
    assert from_mergekit(raw, "m.yaml")["parameters"] == {"density": 0.5, "scaling": 1.0}  # lambda: mergekit's 1


def test_karcher_weights_mergekit_would_ignore_are_refused():
    """mergekit's karcher weighs models equally whatever `weight` says; ours would not, so say so."""
    models = [{"model": "e0", "parameters": {"weight": 2.0}}, {"model": "e1", "parameters": {"weight": 1.0}}]
    with pytest.raises(BadInput, match="mergekit's karcher ignores weight"):
        from_mergekit({"merge_method": "karcher", "models": models}, "k.yaml")
    record = {"method": "karcher", "parameters": {}, "weights": [2.0, 1.0], "experts": ["/a", "/b"], "base": None}
    assert to_mergekit(record) is None
    assert to_mergekit({**record, "weights": [1.0, 1.0]})["models"] == [{"model": "/a"}, {"model": "/b"}]


def test_cli_refuses_a_bad_mergekit_yaml_in_one_line(models, tmp_path):
    config = _write(
        tmp_path / "bad.yaml",
        {
            "merge_method": "ties",
            "base_model": str(models["base"]),
            "models": [
                {"model": str(models["expert0"]), "parameters": {"weight": 1.0, "density": 0.5}},
                {"model": str(models["expert1"]), "parameters": {"weight": 1.0, "density": 0.6}},
            ],
        },
    )
    out = tmp_path / "merged"
    run = subprocess.run([*PEFTEVAL, "merge", str(config), "--out", str(out)], capture_output=True, text=True)
    assert run.returncode == 2, run.stderr
    assert len(run.stderr.strip().splitlines()) == 1 and "parameters.density" in run.stderr
    assert not out.exists() and not any(p.name.startswith(".merged") for p in tmp_path.iterdir())


def _card_recipes(card: str) -> list[dict]:
    return [yaml.safe_load(block) for block in re.findall(r"```yaml\n(.*?)```", card, flags=re.S)]


@pytest.mark.parametrize(
    ("method", "params", "weights"),
    [
        ("ties", {"density": 0.4, "scaling": 1.1}, [1.0, -0.5]),
        ("rht", {"density": 0.6}, [2.0, 1.0]),
        ("dare_ties", {"density": 0.5}, [1.0, 0.5]),
    ],
)
def test_model_card_carries_a_recipe_that_round_trips(models, tmp_path, method, params, weights):
    """ties has a mergekit name (mergekit-format block), rht does not (our format): both load back the same.
    dare_ties draws: its mergekit block comes with our format too, whose seed redoes the very merge."""
    out = merge_models(
        method=method,
        experts=[models["expert0"], models["expert1"]],
        base=models["base"],
        weights=weights,
        params=params,
        out_dir=tmp_path / "m",
        seed=3,
    )
    record = json.loads((out / "merge_config.json").read_text())
    card = model_card(record)
    assert card.startswith("---\n") and "- merge\n- pefteval-harness\n" in card
    assert f"base_model: {models['base']}" in card and f"`{method}`" in card
    recipes = _card_recipes(card)
    assert len(recipes) == (2 if method == "dare_ties" else 1)
    assert ("merge_method" in recipes[0]) == (method in MERGEKIT_METHODS)
    if method in MERGEKIT_METHODS:
        assert recipes[0] == to_mergekit(record)
    if method == "dare_ties":
        assert load_recipe(_write(tmp_path / "mergekit.yaml", recipes[0])).method == method
        assert recipes[1]["seed"] == 3
    recipe = recipes[-1]
    loaded = load_recipe(_write(tmp_path / "recipe.yaml", recipe))
    assert loaded.method == method and loaded.parameters == record["parameters"]
    assert loaded.expert_weights == record["weights"] and [str(p) for p in loaded.expert_paths] == record["experts"]
    assert loaded.base_model == record["base"]
    assert _same_tensors(merge_from_config(tmp_path / "recipe.yaml", tmp_path / "again"), out)


def test_to_mergekit_lora_uses_base_plus_adapter_and_reads_back():
    record = {
        "method": "task_arithmetic",
        "parameters": {"scaling": 0.5},
        "weights": [1.0, 0.5],
        "experts": ["/a/lora0", "/a/lora1"],
        "base": "/a/base",
        "space": "delta_w",
        "expert_kind": "lora",
    }
    config = to_mergekit(record)
    assert [m["model"] for m in config["models"]] == ["/a/base+/a/lora0", "/a/base+/a/lora1"]
    assert config["base_model"] == "/a/base"  # task vectors are (base+adapter) − base
    back = from_mergekit(config, "x.yaml")
    assert back["experts"] == [{"path": "/a/lora0", "weight": 1.0}, {"path": "/a/lora1", "weight": 0.5}]
    assert back["base_model"] == "/a/base" and back["parameters"] == {"scaling": 0.5}
    linear = to_mergekit({**record, "method": "linear", "parameters": {}})
    assert "base_model" not in linear and linear["models"][0]["model"] == "/a/base+/a/lora0"  # raw weights: no base
    assert to_mergekit({**record, "space": "factor"}) is None
    assert to_mergekit({**record, "method": "rht"}) is None
    dare = {**record, "method": "dare_linear", "parameters": {"density": 0.5, "rescale": "l1"}}
    assert to_mergekit(dare)["parameters"]["rescale"] is True
    assert to_mergekit({**dare, "parameters": {"density": 0.5, "rescale": "inverse_probability"}}) is None


@pytest.mark.parametrize("case", [pytest.param(c, id=c["name"]) for c in CASES])
def test_fixture_configs_translate_to_our_settings(case):
    """Each mergekit config of the equality fixtures reads as the settings the equality test merges with."""
    if case["ours"]["method"] not in MERGEKIT_METHODS:  # magnitude_prune: mergekit has no such merge_method
        with pytest.raises(BadInput, match="is not supported"):
            from_mergekit(case["mergekit"], "cases.json")
        return
    recipe = from_mergekit(case["mergekit"], "cases.json")
    ours = case["ours"]
    assert recipe["method"] == ours["method"]
    assert [e["path"] for e in recipe["experts"]] == ours["experts"]
    assert [e["weight"] for e in recipe["experts"]] == (ours["weights"] or [1.0] * len(ours["experts"]))
    assert ("base_model" in recipe) == ours["base"]
    method = get_method(ours["method"])  # both with defaults filled in: mergekit's defaults are not all ours
    assert method.validate_params(recipe["parameters"]) == method.validate_params(ours["parameters"])
