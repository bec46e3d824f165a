"""The bad-input corpus: every file under tests/bad_inputs/ must fail with one line, exit 2, nothing written.

Layout (add a case by adding one file):
- `tests/bad_inputs/run/<name>.*` is given to `pefteval run FILE --output OUT`, `tests/bad_inputs/merge/<name>.*`
  to `pefteval merge FILE --out OUT`.
- The file starts with header comments: `# expect: <fragment>` (required: what the error line must
  contain), `# args: <more CLI arguments>` (optional; `{world}` is the case's folder) and `# setup: <name>`
  (optional, one of `SETUP` below: what the file's copy becomes first, e.g. a FIFO). Binary cases keep the
  header as their first line.
- Each case runs in a fresh folder holding its copy and the folders `make_world` builds (an empty folder, a
  folder with junk, mergeable model folders, a pickle-only one...): relative paths resolve against it.

Each case must exit 2 with exactly one stderr line `pefteval: error: ...` holding its fragment, no traceback,
no OUT, no file of the folder changed, within `SECONDS_EACH`. They run in this process through
`cli.main` (the imports are paid once); `test_process_level_contract` runs a few as real processes.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from pefteval_harness.cli import main
from tests.conftest import PEFTEVAL, REPO

CORPUS = REPO / "tests" / "bad_inputs"
CASES = sorted(p for p in CORPUS.glob("*/*") if p.parent.name in ("run", "merge") and p.is_file())
# A case takes well under a second on this 2-core VM (2 s for an unknown task name, whose absence from
# lm-eval's 14,000 built-in task YAMLs is checked); the bound leaves room for a machine busy with other work.
SECONDS_EACH = 10.0


HEADER_KEYS = ("expect", "args", "setup")


def header(path: Path) -> dict[str, str]:
    """The `# expect|args|setup: value` lines among the comment lines the case file starts with."""
    found = {}
    for line in path.read_bytes().decode("utf-8", errors="replace").splitlines():
        if not line.startswith("#"):
            break
        key, colon, value = line.removeprefix("#").partition(":")
        if colon and key.strip() in HEADER_KEYS:
            found[key.strip()] = value.strip()
    return found


def _safetensors(folder: Path, config: dict, shape: tuple[int, ...] = (2, 2)) -> None:
    import numpy as np
    from safetensors.numpy import save_file

    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config))
    save_file({"model.w": np.zeros(shape, dtype=np.float32)}, str(folder / "model.safetensors"))


LLAMA = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 16}


def make_world(root: Path) -> None:
    """The folders cases refer to (relative to their copy)."""
    (root / "models" / "empty").mkdir(parents=True)
    junk = root / "models" / "junk"
    junk.mkdir()
    (junk / "config.json").write_text("{ this is not json")
    (junk / "notes.txt").write_text("not a model\n")
    no_weights = root / "models" / "no_weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text(json.dumps(LLAMA))
    for name in ("base", "a", "b"):
        _safetensors(root / "experts" / name, LLAMA)
    _safetensors(root / "experts" / "wide", LLAMA, shape=(2, 3))
    _safetensors(root / "experts" / "gpt2", {**LLAMA, "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]})
    pickled = root / "experts" / "pickle_only"
    pickled.mkdir()
    (pickled / "config.json").write_text(json.dumps(LLAMA))
    (pickled / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle, and never unpickled")
    (root / "a_file.txt").write_text("a file where a folder is expected\n")


def _unreadable(path: Path) -> None:
    if os.geteuid() == 0:
        pytest.skip("root reads files whatever their mode")
    path.chmod(0)


def _fifo(path: Path) -> None:  # reading it would wait for a writer forever
    path.unlink()
    os.mkfifo(path)


def _folder(path: Path) -> None:
    path.unlink()
    path.mkdir()


SETUP: dict[str, Callable[[Path], None]] = {"unreadable": _unreadable, "fifo": _fifo, "folder": _folder}


def snapshot(root: Path) -> dict[str, tuple]:
    """Every path below root with its kind, size, mode and modification time."""
    found = {}
    for path in sorted(root.rglob("*")):
        st = path.lstat()
        found[str(path.relative_to(root))] = (st.st_mode, st.st_size, st.st_mtime_ns)
    return found


def prepare(case: Path, tmp_path: Path) -> tuple[list[str], Path, dict[str, str]]:
    """The case's copy in a fresh world, and the CLI arguments that run it."""
    world = tmp_path / "world"
    make_world(world)
    copy = world / case.name
    copy.write_bytes(case.read_bytes())
    meta = header(case)
    assert "expect" in meta, f"{case}: no `# expect: <fragment>` header line"
    if meta.get("setup"):
        SETUP[meta["setup"]](copy)
    out = world / "out"
    command = (
        ["run", str(copy), "--output", str(out)]
        if case.parent.name == "run"
        else ["merge", str(copy), "--out", str(out)]
    )
    return command + shlex.split(meta.get("args", "").replace("{world}", str(world))), out, meta


def check(code: int, err: str, meta: dict[str, str], world: Path, before: dict, out: Path) -> None:
    assert code == 2, err
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("pefteval: error: "), err
    assert meta["expect"] in lines[0]
    assert not out.exists()
    assert snapshot(world) == before, "the failed command changed files"


@pytest.fixture(scope="module", autouse=True)
def imported(tmp_path_factory):
    """What a run imports (peft, lm-eval, transformers), paid once here by planning a good spec: each
    case's time is then its own."""
    spec = tmp_path_factory.mktemp("good") / "good.yaml"
    spec.write_text(
        "train: {tasks: [pefteval_quick_sentiment]}\nfinetunes: {lora: {method: lora}}\n"
        "evaluate: {tasks: [pefteval_quick_sentiment]}\n"
    )
    assert main(["plan", str(spec)]) == 0


@pytest.fixture(autouse=True)
def no_ray(monkeypatch):
    """A bad input fails before Ray starts (a case that would run for real fails here, fast)."""
    from pefteval_harness import runner

    def refuse(*args, **kwargs):
        raise AssertionError("the bad input got as far as starting Ray")

    monkeypatch.setattr(runner, "init_ray", refuse)


def test_corpus_is_large_and_every_case_has_a_fragment():
    assert len(CASES) >= 40
    for case in CASES:
        assert header(case).get("expect"), f"{case}: no `# expect: <fragment>` header line"
        assert header(case).get("setup") in (None, *SETUP), f"{case}: unknown setup"


@pytest.mark.parametrize("case", CASES, ids=[f"{c.parent.name}/{c.name}" for c in CASES])
def test_bad_input_fails_with_one_line(case, tmp_path, capsys):
    argv, out, meta = prepare(case, tmp_path)
    world = tmp_path / "world"
    before = snapshot(world)
    capsys.readouterr()
    start = time.monotonic()
    code = main(argv)
    seconds = time.monotonic() - start
    err = capsys.readouterr().err
    check(code, err, meta, world, before, out)
    assert seconds < SECONDS_EACH, f"took {seconds:.1f} s"


# Through a real process: stderr is the process's, and nothing else (no library warning) reaches it.
PROCESS_CASES = ["run/duplicate_top_key.yaml", "run/alias_bomb.yaml", "merge/pickle_only_expert.yaml"]


@pytest.mark.parametrize("name", PROCESS_CASES)
def test_process_level_contract(name, tmp_path):
    argv, out, meta = prepare(CORPUS / name, tmp_path)
    world = tmp_path / "world"
    before = snapshot(world)
    done = subprocess.run([*PEFTEVAL, *argv], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    check(done.returncode, done.stderr, meta, world, before, out)
    assert done.stdout == ""


@pytest.mark.slow
def test_a_joined_ray_is_checked_not_this_machine(local_ray, tmp_path, capsys):
    """A process connected to Ray (as `--address` leaves it) checks that cluster's nodes before writing: here
    a memory request this machine has but the joined Ray does not offer."""
    import psutil

    offered = local_ray.cluster_resources()["memory"]
    between = (offered + psutil.virtual_memory().total) / 2 / 2**30
    spec = tmp_path / "spec.yaml"
    resources = f"resources: {{evaluate: {{memory_gb: {between:.3f}}}}}\n"
    spec.write_text("evaluate: {tasks: [pefteval_quick_sentiment]}\n" + resources)
    out = tmp_path / "out"
    assert main(["run", str(spec), "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert "resources.evaluate: evaluate job base asks for 1 CPU" in err and err.count("\n") == 1
    assert not out.exists()
