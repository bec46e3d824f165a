"""Which task YAMLs in a folder run code when lm-eval builds their task: listed before a run (trust.notes).

A task YAML runs Python through `!function` values (custom_dataset, process_docs, doc_to_text,
process_results, filter functions, task classes...), through a dataset loading script (`dataset_path` to
a local .py, or a folder with one; `dataset_kwargs.trust_remote_code`), and executes what the model
writes when it says `unsafe_code: true`. Included YAMLs (`include:`) count for the files that include
them. The files are read as text, with a YAML loader that only records the tags: nothing is imported.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml


class _Function(str):
    """A `!function module.name` value."""


class _Loader(yaml.SafeLoader):
    pass


_Loader.add_constructor("!function", lambda loader, node: _Function(loader.construct_scalar(node)))
_Loader.add_multi_constructor("", lambda loader, suffix, node: None)  # other tags are not code


def task_code(folder: Path) -> list[tuple[Path, list[str]]]:
    """(YAML file, what in it runs code) for each task file under `folder` that runs code, by path."""
    found = []
    for path in sorted({*folder.rglob("*.yaml"), *folder.rglob("*.yml")}):
        what = _code_of(path, set())
        if what:
            found.append((path, what))
    return found


def _code_of(path: Path, seen: set[Path]) -> list[str]:
    path = path.resolve()
    if path in seen:
        return []
    seen.add(path)
    try:
        config = yaml.load(path.read_text(encoding="utf-8"), Loader=_Loader)  # noqa: S506 - a safe loader's subclass
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        return [f"not readable as YAML ({type(e).__name__}): not checked"]
    if not isinstance(config, dict):
        return []
    what = [f"{key}: !function {value}" for key, value in _functions(config, "")]
    if config.get("unsafe_code") is True:
        what.append("unsafe_code: true (executes model-written code)")
    script = _loading_script(config.get("dataset_path"), path.parent)
    if script:
        what.append(f"dataset_path: {script} (a dataset loading script)")
    kwargs = config.get("dataset_kwargs")
    if isinstance(kwargs, dict) and kwargs.get("trust_remote_code"):
        what.append("dataset_kwargs.trust_remote_code: true (the dataset's loading script)")
    includes = config.get("include") or []
    for include in includes if isinstance(includes, list) else [includes]:
        if isinstance(include, str) and (included := path.parent / include).is_file():
            what += [f"{item} (from {include})" for item in _code_of(included, seen)]
    return what


def _functions(value: Any, where: str):
    """(key path, function) of every `!function` value, nested ones included (filter_list[0].filter[0].function)."""
    if isinstance(value, _Function):
        yield where, str(value)
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _functions(item, f"{where}.{key}" if where else str(key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from _functions(item, f"{where}[{i}]")


def _loading_script(dataset_path: Any, yaml_folder: Path) -> str | None:
    """A local loading script a `dataset_path` names: a .py file, or a folder holding one (as `datasets`
    looks them up: relative to the working directory; relative to the YAML too, to be safe)."""
    if not isinstance(dataset_path, str):
        return None
    if dataset_path.endswith(".py"):
        return dataset_path
    for base in (Path.cwd(), yaml_folder):
        folder = base / dataset_path
        if folder.is_dir() and any(folder.glob("*.py")):
            return str(folder)
    return None
