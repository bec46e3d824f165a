"""The trust rules: what a run may execute or unpickle besides pefteval's own code, checked before it starts.

- Model code: a model folder or hub model that ships its own code (`auto_map` in its config.json or
  tokenizer_config.json) is refused at plan time unless the spec sets `trust_remote_code: true`; every
  loader (lm-eval's HFLM, training, the judge, the analysis) gets the spec's flag and nothing else, so
  transformers refuses such code too. With the flag on, the run says which models it trusts.
- Task code: the task YAMLs under the spec's `include_paths` that run code when their task is built
  (`tasks.code_hooks`) are listed before the run; pefteval does not check that code.
- Model-written code: a task that executes it (`unsafe_code: true` in its YAML, MBPP) is refused at plan
  time unless its evaluate settings say `confirm_run_unsafe_code: true`; it then runs in
  `code_execution`'s sandbox (a separate process, a time limit, no network, a scratch folder).
- Pickles: weights load from safetensors wherever a folder has them (`jobs.prefer_safetensors`); what
  streams safetensors (merges, the analysis) refuses a folder that has only pickles, at plan time when
  the folder is known.

`notes(plan)` is what `pefteval plan` and `pefteval run` print about these before anything runs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pefteval_harness.errors import BadInput

if TYPE_CHECKING:
    from pefteval_harness.jobs.types import EvaluateSettings
    from pefteval_harness.plan import Plan

# Files whose `auto_map` makes transformers import the folder's own modules.
_CODE_MAPS = ("config.json", "tokenizer_config.json")
# Weight files that are Python pickles: unpickling one can run any code.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


def shipped_code(folder: Path) -> list[str]:
    """The modules a model folder's `auto_map`s name (`modeling_x.py`, `other/repo--tokenization_y.py`)."""
    modules: list[str] = []
    for name in _CODE_MAPS:
        path = folder / name
        try:
            config = json.loads(path.read_text()) if path.is_file() else {}
        except (OSError, ValueError):
            continue  # not ours to judge: the loader reports an unreadable config
        code_map = config.get("auto_map") if isinstance(config, dict) else None
        if not isinstance(code_map, dict):
            continue
        for value in code_map.values():
            for reference in value if isinstance(value, list) else [value]:
                if isinstance(reference, str) and "." in reference:  # module.Class (a tokenizer pair may hold None)
                    module = reference.rpartition(".")[0] + ".py"
                    modules += [module] if module not in modules else []
    return modules


def check_model_code(folder: Path | None, trusted: bool, where: str, name: str | None = None) -> None:
    """BadInput when a model folder (a hub model's: its cached config files, `name` its repo id) ships code
    (see `shipped_code`) and the spec does not trust it."""
    modules = shipped_code(folder) if folder else []
    if modules and not trusted:
        raise BadInput(
            f"{where}: {name or folder} ships its own code ({', '.join(modules)}, named by auto_map); pefteval runs it"
            " only when the spec sets trust_remote_code: true"
        )


def has_safetensors(folder: Path) -> bool:
    """Whether a folder holds safetensors weights (a single file or an index of shards)."""
    return folder.is_dir() and (any(folder.glob("*.safetensors")) or any(folder.glob("*.safetensors.index.json")))


def pickle_weights(folder: Path) -> list[str]:
    """The pickle weight files of a folder that has no safetensors (empty when it has safetensors)."""
    if not folder.is_dir() or has_safetensors(folder):
        return []
    return sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES and p.is_file())


def refuse_pickles(folder: Path, where: str = "") -> None:
    """BadInput naming the folder when its weights are pickles only (merges and the analysis stream safetensors)."""
    if pickles := pickle_weights(folder):
        raise BadInput(
            f"{where}{': ' if where else ''}{folder}: {pickles[0]} is a pickle file; only safetensors are loaded,"
            " never pickles (convert it: save_pretrained(..., safe_serialization=True))"
        )


def check_unsafe_code(task: str, config: dict[str, Any], settings: EvaluateSettings) -> None:
    """BadInput when a task runs model-written code (`unsafe_code: true`) and its settings do not allow it."""
    if config.get("unsafe_code") and not settings.confirm_run_unsafe_code:
        raise BadInput(
            f"evaluate.tasks: {task} runs model-written code (unsafe_code: true in its YAML); allow it with"
            f" evaluate.confirm_run_unsafe_code: true (or evaluate.per_task.{task}.confirm_run_unsafe_code)"
        )


def task_code_notes(include_paths) -> list[str]:
    """The task files under these folders that run code when their task is built, listed (none: no line)."""
    from pefteval_harness.tasks.code_hooks import task_code

    found = [entry for folder in include_paths for entry in task_code(Path(folder))]
    if not found:
        return []
    lines = [f"trust: {len(found)} task file(s) under include_paths run code when their task is built:"]
    return lines + [f"  {path}: {'; '.join(what)}" for path, what in found]


def notes(plan: Plan) -> list[str]:
    """One line per thing the run trusts beyond pefteval's own code: models whose code may run, task files
    under include_paths that run code, tasks that execute model-written code."""
    from pefteval_harness.code_execution import DEFAULT_TIMEOUT

    spec = plan.spec
    lines = []
    if spec.trust_remote_code:
        models = [spec.base_model] + ([spec.evaluate.judge.model] if spec.evaluate.judge else [])
        for model in dict.fromkeys(models):
            lines.append(f"trust: remote code is trusted for {model} (trust_remote_code: true): code it ships may run")
    lines += task_code_notes(spec.include_paths)
    confirmed = {
        job.config.task
        for job in plan.jobs
        if job.kind == "evaluate"
        and job.config.settings.confirm_run_unsafe_code
        and plan.task_configs.get(job.config.task, {}).get("unsafe_code")
    }
    for task in sorted(confirmed):
        lines.append(
            f"trust: {task} runs model-written code (confirm_run_unsafe_code: true): each program in a separate"
            f" process, {DEFAULT_TIMEOUT:g} s, no network, a scratch folder (pefteval_harness/code_execution.py)"
        )
    return lines
