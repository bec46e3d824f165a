"""The plugin's lm-eval tasks: where their YAMLs are, a TaskManager that sees them, and what a plan needs
to know about a task without building it.

Planning reads lm-eval's task index and the YAML files only: no task is built and no dataset is loaded
or generated until a job runs.
"""

from __future__ import annotations

import fnmatch
import hashlib
import importlib.util
import inspect
import json
import os
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

# The per-task settings a spec may set, passed by name to lm_eval.simple_evaluate.
EVALUATE_ARGUMENTS: tuple[str, ...] = (
    "num_fewshot",
    "gen_kwargs",
    "apply_chat_template",
    "system_instruction",
    "fewshot_as_multiturn",
    "confirm_run_unsafe_code",
    "limit",
    "bootstrap_iters",
)

# Keys lm-eval drops from a task's config before building it (structure, not behaviour).
_STRUCTURAL_KEYS = ("tag", "group", "task_list")
# Keys a group may set on a member that only change how it is displayed.
_DISPLAY_KEYS = {"task", "task_alias", "group_alias"}


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


def manager_for(names: list[str], include_paths: list[str | Path] = ()):
    """A TaskManager that knows `names`, indexing lm-eval's built-ins only if one of them needs it."""
    manager = task_manager(include_paths)
    if all(name in manager.task_index for name in names):
        return manager
    return task_manager(include_paths, include_defaults=True)


# ---------------------------------------------------------------------------------------- selection


@dataclass(frozen=True)
class GroupInfo:
    """A group as its YAML defines it: its leaf tasks (nested groups flattened, as lm-eval aggregates
    them) and its aggregate_metric_list, each item {"metric", "aggregation", "weight_by_size",
    "filter_list"}; filter_list None means lm-eval aggregates every filter the leaves report."""

    tasks: list[str]
    aggregate: list[dict]


@dataclass(frozen=True)
class TaskSelection:
    names: list[str]  # leaf tasks, in the order the patterns name them, each once
    groups: dict[str, GroupInfo]  # every group named or reached, nested ones included
    manager: Any = field(repr=False, compare=False)  # the lm-eval TaskManager that knows every name

    def groups_json(self) -> dict[str, dict]:
        return {name: {"tasks": g.tasks, "aggregate": g.aggregate} for name, g in self.groups.items()}


class UnsupportedGroup(ValueError):
    """A group that changes a member task's settings: pefteval scores each leaf alone, from its own YAML."""


def resolve_tasks(
    patterns: list[str], include_paths: list[str | Path] = (), managers: dict[bool, Any] | None = None
) -> TaskSelection:
    """Expand task names, globs, groups and tags to leaf tasks, from the task index alone.

    A glob matches leaf task names; a group or tag name expands to its leaves. A pattern that matches no
    plugin task is looked up in lm-eval's built-in tasks too (indexing them takes seconds, so only
    then); one that matches nothing anywhere raises KeyError naming it. A group that overrides a
    member's settings (other than its display alias) raises UnsupportedGroup. `managers` (include_defaults
    -> TaskManager over these include_paths) lets several resolutions share the indexes they build.
    """
    managers = {} if managers is None else managers

    def indexed(include_defaults: bool):
        if include_defaults not in managers:
            managers[include_defaults] = task_manager(include_paths, include_defaults=include_defaults)
        return managers[include_defaults]

    plugin = indexed(False)
    defaults = None
    names: list[str] = []
    groups: dict[str, GroupInfo] = {}
    for pattern in patterns:
        try:
            leaves, reached = _expand(plugin.task_index, plugin.all_subtasks, pattern)
        except KeyError as missing:
            if not _named_in_builtin_yamls(pattern):  # a typo fails in a second, not after the index's seconds
                raise KeyError(missing.args[0]) from None
            defaults = indexed(True)
            try:
                leaves, reached = _expand(defaults.task_index, defaults.all_subtasks, pattern)
            except KeyError as err:
                raise KeyError(err.args[0]) from None  # the pattern, or the group member nowhere found
        names += [n for n in leaves if n not in names]
        groups.update(reached)
    return TaskSelection(names=names, groups=groups, manager=defaults or plugin)


def _named_in_builtin_yamls(pattern: str) -> bool:
    """Whether some YAML of lm-eval's built-in tasks holds the pattern's longest literal part. Every task,
    group and tag name of their index is written in one of them, so a pattern that none holds matches
    nothing there, and their index need not be built to know it (a text scan is several times faster)."""
    import lm_eval.tasks

    literal = max(re.split(r"[*?]", re.sub(r"\[[^]]*\]", "*", pattern)), key=len).encode()
    if not literal:
        return True
    for folder, _, files in os.walk(Path(lm_eval.tasks.__file__).parent):  # os.walk: rglob is slower here
        for name in files:
            if name.endswith((".yaml", ".yml")) and literal in Path(folder, name).read_bytes():
                return True
    return False


def _expand(index: dict, leaf_names: list[str], pattern: str) -> tuple[list[str], dict[str, GroupInfo]]:
    """The leaves of one pattern and the groups it reaches; KeyError(name) for anything unknown."""
    groups: dict[str, GroupInfo] = {}
    if pattern in index:
        return _members_of(index, pattern, groups), groups
    leaves = fnmatch.filter(leaf_names, pattern)  # the index's leaf names are sorted
    if not leaves:
        raise KeyError(pattern)
    return leaves, groups


def _members_of(index: dict, name: str, groups: dict[str, GroupInfo], within: tuple[str, ...] = ()) -> list[str]:
    from lm_eval.tasks._index import Kind

    entry = index.get(name)
    if entry is None:
        raise KeyError(name)
    if entry.kind == Kind.TAG:
        return sorted(t for t in entry.tags if t in index)  # lm-eval builds a tag's tasks sorted
    if entry.kind == Kind.GROUP:
        return _group_leaves(index, name, entry.cfg or {}, groups, within)
    return [name]


def _group_leaves(
    index: dict, name: str, cfg: dict, groups: dict[str, GroupInfo], within: tuple[str, ...] = ()
) -> list[str]:
    """A group's leaves, in its `task:` order, read from its config (as the index parsed it)."""
    from lm_eval.config.group import GroupConfig

    if name in within:
        raise UnsupportedGroup(f"group {name!r} contains itself (via {' -> '.join(within)})")
    within = (*within, name)
    group_fields = set(GroupConfig.__dataclass_fields__)
    overrides = set(cfg) - group_fields - set(_STRUCTURAL_KEYS)
    if overrides:
        raise UnsupportedGroup(f"group {name!r} sets {sorted(overrides)} on its tasks")
    members = cfg.get("task") or []
    leaves: list[str] = []
    for item in members if isinstance(members, list) else [members]:
        if isinstance(item, str):
            found = _members_of(index, item, groups, within)
        elif isinstance(item, dict) and "group" in item:
            if item["group"] in index:  # a registered group, referenced
                _check_display_only(name, item["group"], item, {"group", "group_alias"})
                found = _members_of(index, item["group"], groups, within)
            else:  # an inline group: lm-eval names it parent::child
                found = _group_leaves(index, f"{name}::{item['group']}", item, groups, within)
        elif isinstance(item, dict) and "task" in item:
            if not isinstance(item["task"], str) or item["task"] not in index:
                raise UnsupportedGroup(f"group {name!r} defines task {item['task']!r} inline")
            _check_display_only(name, item["task"], item, _DISPLAY_KEYS)
            found = _members_of(index, item["task"], groups, within)
        else:
            raise UnsupportedGroup(f"group {name!r}: member {item!r} is not a task, group or tag")
        leaves += [n for n in found if n not in leaves]
    groups[name] = GroupInfo(tasks=leaves, aggregate=_aggregate(cfg))
    return leaves


def _check_display_only(group: str, member: str, item: dict, allowed: set[str]) -> None:
    changed = set(item) - allowed
    if changed:
        raise UnsupportedGroup(f"group {group!r} sets {sorted(changed)} on {member!r}")


def _aggregate(cfg: dict) -> list[dict]:
    """aggregate_metric_list with lm-eval's defaults (AggMetricConfig) filled in. A custom aggregation
    (`!function`, which the index leaves unresolved as a path) is kept as `!function <module.name>`."""
    items = cfg.get("aggregate_metric_list") or []
    out = []
    for item in items if isinstance(items, list) else [items]:
        aggregation = str(item.get("aggregation", "mean"))
        if aggregation != "mean":
            aggregation = f"!function {Path(aggregation).name}"
        filters = item.get("filter_list")
        out.append(
            {
                "metric": item["metric"],
                "aggregation": aggregation,
                "weight_by_size": bool(item.get("weight_by_size", True)),
                "filter_list": [filters] if isinstance(filters, str) else filters,
            }
        )
    return out


# ----------------------------------------------------------------------------------------- identity


def task_config(manager, name: str) -> dict:
    """A leaf task's configuration as lm-eval resolves it: its YAML with `include:` files merged, the
    keys lm-eval drops before building removed, and every `!function` replaced by a stable text naming
    the function as written in the YAML and the sha256 of its module's source."""
    from lm_eval.tasks._index import Kind
    from lm_eval.tasks._yaml_loader import load_yaml

    entry = manager.task_index[name]
    if entry.kind in (Kind.GROUP, Kind.TAG):
        raise ValueError(f"{name!r} is a {entry.kind.name.lower()}, not a task")
    if entry.yaml_path is None:
        cfg = dict(entry.cfg or {"task": name})
        yaml_dirs: list[Path] = []
    else:
        cfg = load_yaml(entry.yaml_path, resolve_func=False, recursive=True)
        yaml_dirs = _yaml_dirs(Path(entry.yaml_path))
    for key in _STRUCTURAL_KEYS:
        cfg.pop(key, None)
    return _describe_functions(cfg, sorted(yaml_dirs, key=lambda d: -len(str(d))))


def build_task(manager, name: str, overrides: dict | None = None):
    """lm-eval's Task `name`, with the task-config fields `overrides` set. lm-eval takes overrides as a
    whole inline config (a dict with `task`), so the task's own YAML is read and the overrides laid on it."""
    if not overrides:
        return manager.load([name])["tasks"][name]
    from lm_eval.tasks._yaml_loader import load_yaml

    path = manager.task_index[name].yaml_path
    config = load_yaml(path, resolve_func=True, recursive=True)
    for key in _STRUCTURAL_KEYS:
        config.pop(key, None)
    return manager.load([{**config, **overrides, "task": name}])["tasks"][name]


def trained_by(manager, name: str) -> str:
    """The task whose training split teaches a model this task: `metadata.trained_by` (IFEval: Alpaca;
    MNLI mismatched: MNLI), else an adversarial task's `metadata.clean_partner`'s, else the task itself."""
    seen = [name]
    while True:
        metadata = task_config(manager, seen[-1]).get("metadata") or {}
        following = metadata.get("trained_by") or metadata.get("clean_partner")
        if not following or following in seen or following not in manager.task_index:
            return seen[-1]
        seen.append(following)


def task_identity(manager, name: str, config: dict | None = None) -> str:
    """A hash of the task's resolved configuration (see task_config): part of job ids.

    It changes with the task's YAML, its included files, the source of its `!function` modules and of
    the pefteval modules they import (metrics, answer parsing, data loading; not other packages), and
    with the data a catalogue task reads (`PEFTEVAL_DATA_DIR`'s files, or the hub dataset it names: see
    `data.source_identity`); not with a sibling task's YAML, nor with where the folder lives. `config`:
    its `task_config`, when the caller has it already.
    """
    from pefteval_harness.tasks.data import data_specs, source_identity

    config = task_config(manager, name) if config is None else config
    identities = [source_identity(spec) for spec in data_specs(config)]
    # One dataset is hashed as its identity alone (as before paired datasets existed: stored ids stay valid).
    data = identities[0] if len(identities) == 1 else identities or None
    text = json.dumps({"config": config, "data": data}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _yaml_dirs(path: Path) -> list[Path]:
    """The folders of a YAML and of every file it includes: where its `!function` specs are relative to."""
    from lm_eval.tasks._yaml_loader import load_yaml

    path = path.expanduser().resolve()
    dirs, todo, seen = [], [path], set()
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen.add(current)
        if current.parent not in dirs:
            dirs.append(current.parent)
        includes = load_yaml(current, resolve_func=False, recursive=False).get("include") or []
        for inc in includes if isinstance(includes, list) else [includes]:
            todo.append((current.parent / inc).resolve() if not Path(inc).is_absolute() else Path(inc))
    return dirs


def _describe_functions(value: Any, yaml_dirs: list[Path]) -> Any:
    # lm-eval's loader, not resolving functions, turns `!function spec` into str(yaml folder / spec).
    if isinstance(value, dict):
        return {k: _describe_functions(v, yaml_dirs) for k, v in value.items()}
    if isinstance(value, list):
        return [_describe_functions(v, yaml_dirs) for v in value]
    if isinstance(value, str):
        for folder in yaml_dirs:  # deepest first
            prefix = str(folder) + "/"
            if value.startswith(prefix) and "." in value[len(prefix) :]:
                return _function_text(folder, value[len(prefix) :])
    return value


def _function_text(folder: Path, spec: str) -> str:
    """`!function <spec> sha256:<module source hash>`, finding the module the way lm-eval imports it."""
    module, _, _ = spec.rpartition(".")
    source = (folder / f"{module.replace('.', '/')}.py").resolve()
    if not source.is_file():  # not beside the YAML: an importable module
        if not all(part.isidentifier() for part in module.split(".")):
            return f"!function {spec} sha256:missing"
        try:
            found = importlib.util.find_spec(module)
        except (ImportError, ValueError):
            found = None
        origin = found.origin if found is not None else None
        source = Path(origin) if origin and origin.endswith(".py") else None
    digest = _sources_digest(source) if source is not None else "missing"
    return f"!function {spec} sha256:{digest}"


def _sources_digest(source: Path) -> str:
    """A hash of a hook module's source and of every pefteval module it imports, transitively: the
    task folders' hooks re-export the package's metrics and loaders, which decide scores too."""
    import ast

    digest, todo, seen = hashlib.sha256(), [source], set()
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        text = path.read_bytes()
        digest.update(text)
        for node in ast.walk(ast.parse(text)):
            names = []
            if isinstance(node, ast.ImportFrom) and node.module and not node.level:  # the module, or its submodules
                names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            for name in names:
                if name.split(".")[0] == "pefteval_harness":
                    try:
                        found = importlib.util.find_spec(name)
                    except ImportError:  # `from pefteval_harness.x import function`: not a module
                        found = None
                    if found is not None and found.origin and found.origin.endswith(".py"):
                        todo.append(Path(found.origin))
    return digest.hexdigest()


# ------------------------------------------------------------------------------------------ metrics


def primary_metric(task_config: dict) -> tuple[str, str]:
    """(metric, filter) a task is ranked by: `metadata.primary_metric` (and `primary_filter`) if the
    YAML sets them, else the first metric of metric_list (lm-eval's default for the output type if
    there is none) under the first filter ("none" without filters). lm-eval reports it as
    results[task]["<metric>,<filter>"]."""
    metadata = task_config.get("metadata")
    metadata = metadata if isinstance(metadata, dict) else {}
    filters = task_config.get("filter_list") or []
    first_filter = filters[0]["name"] if isinstance(filters, list) and filters else "none"
    metric = metadata.get("primary_metric")
    if metric is None:
        metrics = task_config.get("metric_list")
        if metrics:
            metric = metrics[0]["metric"]
        else:
            from lm_eval.api.registry import DEFAULT_METRIC_REGISTRY

            metric = DEFAULT_METRIC_REGISTRY[task_config.get("output_type", "generate_until")][0]
    return str(metric), str(metadata.get("primary_filter", first_filter))


# ---------------------------------------------------------------------------------- evaluate arguments


def check_evaluate_arguments(names: tuple[str, ...] | list[str] = EVALUATE_ARGUMENTS) -> None:
    """Assert the installed lm-eval's simple_evaluate takes every one of `names` (a version mismatch
    otherwise, not a user error)."""
    import lm_eval

    parameters = inspect.signature(lm_eval.simple_evaluate).parameters
    for name in names:
        if name not in parameters:
            raise RuntimeError(
                f"lm_eval {getattr(lm_eval, '__version__', '?')}: simple_evaluate has no parameter {name!r}"
            )
