"""The trust rules (pefteval_harness/trust.py), each enforced where a run would break it: a model's own code
runs only with trust_remote_code, task files under include_paths that run code are listed before the run,
model-written code runs only when the spec allows it (in the sandbox), and merges never load pickles."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pefteval_harness.cli import main
from pefteval_harness.errors import failure_class
from tests.conftest import REPO

EVALUATE = {"tasks": ["pefteval_quick_sentiment"], "limit": 2}


def _spec(folder: Path, **fields) -> Path:
    path = folder / f"spec{len(list(folder.glob('spec*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump({"evaluate": EVALUATE, **fields}))
    return path


def _refused(capsys, *args) -> str:
    """`pefteval ARGS` fails as bad input: exit 2, one line, no traceback."""
    assert main([str(a) for a in args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("pefteval: error: ") and err.count("\n") == 1, err
    return err


def _plan_notes(capsys, spec: Path) -> list[str]:
    assert main(["plan", str(spec)]) == 0
    return [line for line in capsys.readouterr().out.splitlines() if line.startswith(("trust: ", "  /"))]


# ------------------------------------------------------------------------------------- a model's own code


def _model_with_code(tiny_model_dir: Path, folder: Path, marker: Path) -> Path:
    """The tiny model as an architecture of its own (auto_map): importing its module creates `marker`."""
    shutil.copytree(tiny_model_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(
        model_type="marker_llama",
        architectures=["MarkerForCausalLM"],
        auto_map={
            "AutoConfig": "modeling_marker.MarkerConfig",
            "AutoModelForCausalLM": "modeling_marker.MarkerForCausalLM",
        },
    )
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "modeling_marker.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n"
        "from transformers import LlamaConfig, LlamaForCausalLM\n"
        "class MarkerConfig(LlamaConfig):\n    model_type = 'marker_llama'\n"
        "class MarkerForCausalLM(LlamaForCausalLM):\n    config_class = MarkerConfig\n"
    )
    return folder


def test_a_model_that_ships_code_is_refused_unless_the_spec_trusts_it(tmp_path, tiny_model_dir, capsys):
    from pefteval_harness.jobs.evaluate import lm_eval_model_args, load_lm
    from pefteval_harness.plan import build_plan
    from pefteval_harness.spec import load_spec

    marker = tmp_path / "code_ran"
    model = _model_with_code(tiny_model_dir, tmp_path / "model", marker)
    untrusted = _spec(tmp_path, base_model=str(model))
    err = _refused(capsys, "plan", untrusted)
    assert f"base_model: {model} ships its own code (modeling_marker.py" in err and "trust_remote_code: true" in err
    _refused(capsys, "run", untrusted, "--output", tmp_path / "out")
    assert not (tmp_path / "out").exists()

    trusted = _spec(tmp_path, base_model=str(model), trust_remote_code=True)
    assert _plan_notes(capsys, trusted) == [
        f"trust: remote code is trusted for {model} (trust_remote_code: true): code it ships may run"
    ]
    # Every job that loads a model carries the spec's flag, and the loaders pass it on: lm-eval's model
    # arguments here; training, the judge and the analysis take job.config.trust_remote_code alike.
    plan = build_plan(load_spec(trusted)[0])
    loaders = [job for job in plan.jobs if hasattr(job.config, "trust_remote_code")]
    assert loaders and all(job.config.trust_remote_code for job in loaders)
    job = next(job for job in plan.jobs if job.kind == "evaluate")
    assert lm_eval_model_args(job, None)["trust_remote_code"] is True
    # A job whose flag is off (the plan refuses it; this is the loader's own guard) does not run the code.
    off = job.model_copy(update={"config": job.config.model_copy(update={"trust_remote_code": False})})
    with pytest.raises(ValueError, match="trust_remote_code=True") as refused:
        load_lm(**lm_eval_model_args(off, None), device="cpu")
    assert not marker.exists()
    assert failure_class(refused.value) == "bad_input"  # a job refused so is not retried


def test_a_hub_model_that_ships_code_is_refused_at_plan_time(tmp_path, tiny_model_dir, capsys, monkeypatch):
    """As a local folder is: its config files, from the HF cache (here one we fill), are read before the run."""
    import huggingface_hub

    snapshot = tmp_path / "hub" / "models--someone--coded" / "snapshots" / ("0" * 40)
    _model_with_code(tiny_model_dir, snapshot, tmp_path / "code_ran")
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    err = _refused(capsys, "plan", _spec(tmp_path, base_model="someone/coded"))
    assert "base_model: someone/coded ships its own code (modeling_marker.py" in err
    notes = _plan_notes(capsys, _spec(tmp_path, base_model="someone/coded", trust_remote_code=True))
    assert notes == ["trust: remote code is trusted for someone/coded (trust_remote_code: true): code it ships may run"]


@pytest.mark.slow  # a fresh interpreter (transformers keeps trusted code in its modules cache: a private one)
def test_trusted_model_code_does_run(tmp_path, tiny_model_dir):
    marker = tmp_path / "code_ran"
    model = _model_with_code(tiny_model_dir, tmp_path / "model", marker)
    load = (
        "from pefteval_harness.jobs.evaluate import load_lm\n"
        f"load_lm(pretrained={str(model)!r}, trust_remote_code=True, use_safetensors=True, device='cpu')\n"
    )
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules")}
    subprocess.run([sys.executable, "-c", load], check=True, capture_output=True, cwd=REPO, env=env, timeout=300)
    assert marker.read_text() == "ran"


# --------------------------------------------------------------------------------- task code in include_paths


def test_task_files_that_run_code_are_listed_before_the_run_and_not_imported(tmp_path, capsys):
    marker = tmp_path / "imported"
    tasks = tmp_path / "tasks"
    (tasks / "nested").mkdir(parents=True)
    (tasks / "utils.py").write_text(f"open({str(marker)!r}, 'w')\ndef process_docs(docs):\n    return docs\n")
    (tasks / "nested" / "coded.yaml").write_text(
        "task: my_coded_task\ndataset_path: json\nprocess_docs: !function utils.process_docs\n"
        "output_type: generate_until\ndoc_to_text: '{{q}}'\ndoc_to_target: a\nunsafe_code: true\n"
    )
    (tasks / "plain.yaml").write_text(
        "task: my_plain_task\ndataset_path: json\noutput_type: generate_until\ndoc_to_text: '{{q}}'\ndoc_to_target: a\n"
    )
    spec = _spec(tmp_path, include_paths=[str(tasks)])
    coded = tasks / "nested" / "coded.yaml"
    expected = [
        "trust: 1 task file(s) under include_paths run code when their task is built:",
        f"  {coded}: process_docs: !function utils.process_docs; unsafe_code: true (executes model-written code)",
    ]
    assert _plan_notes(capsys, spec) == expected
    assert main(["run", str(spec), "--output", str(tmp_path / "out"), "--dry-run"]) == 0
    assert capsys.readouterr().out.splitlines()[:2] == expected  # said before the run
    assert not marker.exists()
    # `data export` builds the tasks it is given: it says so first as well (the plain one reads no pefteval data).
    args = ["data", "export", "--include-path", str(tasks), "--tasks", "my_plain_task", "--out", str(tmp_path / "d")]
    assert main(args) == 2
    assert capsys.readouterr().out.splitlines() == expected


# ------------------------------------------------------------------------------------- model-written code


def test_a_task_that_runs_model_written_code_needs_the_specs_consent(tmp_path, capsys):
    mbpp = {"tasks": ["pefteval_merge_mbpp"], "limit": 2}
    spec = _spec(tmp_path, evaluate=mbpp)
    err = _refused(capsys, "plan", spec)
    assert "evaluate.tasks: pefteval_merge_mbpp runs model-written code (unsafe_code: true" in err
    assert "confirm_run_unsafe_code: true" in err
    _refused(capsys, "run", spec, "--output", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    sandbox = (
        "trust: pefteval_merge_mbpp runs model-written code (confirm_run_unsafe_code: true): each program in a"
        " separate process, 10 s, no network, a scratch folder (pefteval_harness/code_execution.py)"
    )
    for allowed in (
        {**mbpp, "confirm_run_unsafe_code": True},
        {**mbpp, "per_task": {"pefteval_merge_*": {"confirm_run_unsafe_code": True}}},
    ):
        assert _plan_notes(capsys, _spec(tmp_path, evaluate=allowed)) == [sandbox]


def test_mbpp_scores_run_the_code_in_the_sandbox():
    from pefteval_harness.metrics import mbpp_results

    doc = {"test_list": ["assert double(2) == 4", "assert os.getcwd().rsplit('/', 1)[-1].startswith('pefteval-code-')"]}
    answer = "```python\nimport os\ndef double(x):\n    return 2 * x\n```"
    assert mbpp_results(doc, [answer]) == {"pass_at_1": 1.0, "parsed": 1.0}  # run in a fresh scratch folder
    networked = answer.replace("import os", "import os, socket\nsocket.create_connection(('127.0.0.1', 9))")
    assert mbpp_results(doc, [networked]) == {"pass_at_1": 0.0, "parsed": 1.0}


# ---------------------------------------------------------------------------------------------------- pickles


class _Evil:  # unpickling this creates the file it names
    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_merges_refuse_pickle_only_folders_and_loaders_prefer_safetensors(tmp_path, tiny_model_dir, capsys):
    from pefteval_harness.jobs import prefer_safetensors
    from pefteval_harness.jobs.evaluate import lm_eval_model_args, load_lm
    from pefteval_harness.judge import _load as load_judge
    from pefteval_harness.plan import build_plan
    from pefteval_harness.spec import load_spec

    marker = tmp_path / "unpickled"
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(tiny_model_dir / "config.json", pickled)
    (pickled / "pytorch_model.bin").write_bytes(pickle.dumps(_Evil(marker)))
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 2}))
    (adapter / "adapter_model.bin").write_bytes(pickle.dumps(_Evil(marker)))

    # `pefteval merge`: an expert (a model or an adapter) or a base with only pickles, named at load.
    for key, recipe in (
        ("experts[1].path", {"experts": [{"path": str(tiny_model_dir)}, {"path": str(pickled)}]}),
        ("experts[0].path", {"base_model": str(tiny_model_dir), "experts": [{"path": str(adapter)}]}),
        ("base_model", {"base_model": str(pickled), "experts": [{"path": str(tiny_model_dir)}]}),
    ):
        config = tmp_path / "merge.yaml"
        config.write_text(yaml.safe_dump({"method": "linear", **recipe}))
        err = _refused(capsys, "merge", config, "--out", tmp_path / "merged")
        assert f"{config}: {key}: " in err and "is a pickle file; only safetensors are loaded, never pickles" in err
    assert not (tmp_path / "merged").exists()

    # A spec whose merges would stream a pickle-only base: refused at plan time.
    merging = {
        "base_model": str(pickled),
        "train": {"tasks": ["pefteval_quick_sentiment"]},
        "finetunes": {"ex": {"method": "lora", "per_task": True}},
        "merges": {"m": {"method": "linear", "experts": "ex"}},
    }
    err = _refused(capsys, "plan", _spec(tmp_path, **merging))
    assert f"base_model: {pickled}: pytorch_model.bin is a pickle file" in err
    assert not marker.exists()

    # Where a folder has safetensors, every loader reads them and never opens the pickle beside them.
    model = tmp_path / "both"
    shutil.copytree(tiny_model_dir, model)
    (model / "pytorch_model.bin").write_bytes(pickle.dumps(_Evil(marker)))
    plan = build_plan(load_spec(_spec(tmp_path, base_model=str(model)))[0])
    job = next(job for job in plan.jobs if job.kind == "evaluate")
    assert lm_eval_model_args(job, None)["use_safetensors"] is True
    load_lm(**lm_eval_model_args(job, None), device="cpu")
    load_judge({"pretrained": str(model), **prefer_safetensors(str(model))}, "cpu")
    assert not marker.exists()
