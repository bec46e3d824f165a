"""README's "Extending" examples, run as written: a new fine-tuning method and a new merge method, each
added with one registry entry, then used through the spec, the plan and the jobs."""

from __future__ import annotations

import json
import re

import pytest
import torch

from pefteval_harness import finetuning
from pefteval_harness.merging import methods as merge_methods
from tests.conftest import REPO


def readme_block(name: str) -> str:
    """The python block after `<!-- extending:NAME -->` in README.md."""
    text = (REPO / "README.md").read_text()
    match = re.search(rf"<!-- extending:{name} -->\s*```python\n(.*?)```", text, re.S)
    assert match, f"README.md has no extending:{name} example"
    return match.group(1)


def register_entry(module, registry: dict, block: str, monkeypatch) -> object:
    """Run the README block in the registry's module (as if pasted there); register its last expression."""
    namespace = dict(vars(module))
    *statements, entry = block.strip().rsplit("\n\n", 1)
    exec("\n\n".join(statements), namespace)
    method = eval(entry.strip().rstrip(","), namespace)
    monkeypatch.setitem(registry, method.name, method)
    return method


@pytest.fixture
def new_method(monkeypatch):
    return register_entry(finetuning, finetuning.FINETUNE_METHODS, readme_block("finetune"), monkeypatch)


@pytest.fixture
def median(monkeypatch):
    return register_entry(merge_methods, merge_methods.MERGE_METHODS, readme_block("merge"), monkeypatch)


def test_a_new_finetuning_method_trains_and_is_evaluated(new_method, tmp_path, tiny_model_dir, isolated_process_state):
    from pefteval_harness.jobs import run_batch
    from pefteval_harness.plan import build_plan
    from pefteval_harness.spec import Spec

    spec = Spec.model_validate(
        {
            "base_model": str(tiny_model_dir),
            "train": {"tasks": ["pefteval_quick_sentiment"], "max_steps": 2, "batch_size": 4},
            "finetunes": {"mine": {"method": new_method.name}},
            "evaluate": {"tasks": ["pefteval_quick_sentiment"], "limit": 4, "include_base": False},
        }
    )
    plan = build_plan(spec)
    assert [j.kind for j in plan.jobs] == ["train", "evaluate"]
    for job in plan.jobs:  # in this process, without Ray: the same worker body the runner uses
        outcome = run_batch([job.model_dump(mode="json")], str(tmp_path))
        assert outcome[job.id]["state"] == "done", outcome
    adapter = tmp_path / "jobs" / plan.jobs[0].id / "artifact"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert (
        config["peft_type"] == "LORA"
        and config["use_rslora"]
        and sorted(config["target_modules"]) == ["k_proj", "o_proj", "q_proj", "v_proj"]
    )


def test_a_new_merge_method_merges_and_is_listed(median):
    tensors = [torch.tensor([1.0, -2.0, 5.0]), torch.tensor([3.0, 0.0, -1.0]), torch.tensor([2.0, 4.0, 0.0])]
    assert torch.equal(median(tensors, scaling=2.0), torch.tensor([4.0, 0.0, 0.0]))
    described = {d["name"]: d for d in merge_methods.describe_methods()}
    assert [p["name"] for p in described[median.name]["parameters"]] == ["scaling"]


def test_methods_command_lists_every_registered_method(capsys):
    """`pefteval methods` in this process (its CLI entry point): a subprocess costs seconds of imports."""
    from pefteval_harness.cli import main

    assert main(["methods"]) == 0
    listed = capsys.readouterr().out
    for name in [*finetuning.FINETUNE_METHODS, *merge_methods.MERGE_METHODS]:
        assert f"| {name} " in listed
    assert "density: float in (0, 1] = 0.7" in listed  # ties' and rht's typed parameter and default
    assert main(["methods", "merge"]) == 0
    only = capsys.readouterr().out
    assert "Fine-tuning methods" not in only and "| rht " in only


def test_models_load_from_safetensors_never_from_a_pickle_beside_them(tmp_path, tiny_model_dir):
    import shutil

    from lm_eval.models.huggingface import HFLM

    from pefteval_harness.jobs import prefer_safetensors

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    (model / "pytorch_model.bin").write_bytes(b"not a pickle: loading it would fail")
    assert prefer_safetensors(str(model)) == {"use_safetensors": True}
    HFLM(pretrained=str(model), device="cpu", **prefer_safetensors(str(model)))  # loads the safetensors
