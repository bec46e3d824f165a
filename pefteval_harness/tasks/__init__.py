"""The plugin's lm-eval tasks: where their YAMLs are, and a TaskManager that sees them."""

from __future__ import annotations

from importlib import resources
from pathlib import Path


def task_configs_path() -> Path:
    """The folder of task YAMLs: `task_configs/` in a checkout, `pefteval_harness/task_configs` in a wheel.

    Both resolve through the import system (an editable install maps the package to the checkout). A
    source tree imported without any install (a Ray job's uploaded working_dir) has the folder beside
    the package.
    """
    try:
        return Path(str(resources.files("pefteval_harness.task_configs")))
    except ModuleNotFoundError:
        return Path(__file__).resolve().parents[2] / "task_configs"


def task_manager(include_paths: list[str | Path] = (), include_defaults: bool = False):
    """An lm-eval TaskManager over the plugin's tasks and the user's folders.

    lm-eval's built-in tasks are indexed only when asked for: indexing them takes seconds.
    """
    from lm_eval.tasks import TaskManager

    paths = [str(task_configs_path()), *map(str, include_paths)]
    return TaskManager(include_path=paths, include_defaults=include_defaults)


def resolve_tasks(patterns: list[str], include_paths: list[str | Path] = ()):
    """Expand names and globs to leaf task names; returns (names, the TaskManager that knows them).

    A pattern that matches no plugin task is looked up in lm-eval's built-in tasks too (indexing them
    takes seconds, so only then); one that matches nothing anywhere raises KeyError naming it. Group and
    tag names expand to their leaf tasks.
    """
    manager, with_defaults = task_manager(include_paths), False
    names: list[str] = []
    for pattern in patterns:
        matched = _leaves(manager, pattern)
        if not matched and not with_defaults:
            manager, with_defaults = task_manager(include_paths, include_defaults=True), True
            matched = _leaves(manager, pattern)
        if not matched:
            raise KeyError(pattern)
        names += [n for n in matched if n not in names]
    return names, manager


def _leaves(manager, pattern: str) -> list[str]:
    import fnmatch

    leaves = fnmatch.filter(manager.all_subtasks, pattern)
    if leaves or pattern not in manager.all_tasks:
        return sorted(leaves)
    return sorted(manager.load([pattern])["tasks"])  # a group or tag: its leaf tasks


def task_version(manager, name: str) -> str:
    """A hash of the files that define a task (its folder's YAMLs and hooks): part of job ids."""
    import hashlib

    entry = manager.task_index[name]
    digest = hashlib.sha256(name.encode())
    if entry.yaml_path is not None:
        for path in sorted(Path(entry.yaml_path).parent.iterdir()):
            if path.suffix in (".yaml", ".yml", ".py"):
                digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()[:16]


def manager_for(names: list[str], include_paths: list[str | Path] = ()):
    """A TaskManager that knows `names`, indexing lm-eval's built-ins only if one of them needs it."""
    manager = task_manager(include_paths)
    if all(name in manager.task_index for name in names):
        return manager
    return task_manager(include_paths, include_defaults=True)
