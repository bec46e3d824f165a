"""Reading user YAML files into pydantic models, with one-line errors that name the file and key path.

Shared by the experiment spec and `pefteval merge` configs, so both report problems the same way.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError, ValidationInfo
from pydantic_core import PydanticCustomError

from pefteval_harness.errors import BadInput

M = TypeVar("M", bound=BaseModel)


def key_path(loc: tuple) -> str:
    """pydantic's error location as a spec key path: `finetunes.lora.config.r`, `experts[0].path`."""
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif not str(part).startswith(("function-", "tagged-union")):  # pydantic's internal loc parts
            path += f".{part}" if path else str(part)
    return path or "(top level)"


def at(path: str, message: str) -> PydanticCustomError:
    """An error a validator raises about `path` below the model it validates (`config.r`, `experts[1]`)."""
    return PydanticCustomError("at_path", "{path}: {message}", {"path": path, "message": message})


def error_message(error: ValidationError) -> tuple[str, str]:
    """(key path, message) of the first problem pydantic found."""
    errors = error.errors()
    # An unknown key first: a misspelt key (`expert:`) also leaves its real one missing (`experts`).
    err = next((e for e in errors if e["type"] == "extra_forbidden"), errors[0])
    msg = err["msg"].removeprefix("Value error, ").removeprefix("Assertion failed, ")
    where = key_path(err["loc"]) if err["loc"] else ""
    if err["type"] == "extra_forbidden":
        msg = "unknown key"
    elif err["type"] == "at_path":
        sub, msg = err["ctx"]["path"], err["ctx"]["message"]
        where = sub if not where else where + (sub if sub.startswith("[") else f".{sub}")
    return where, msg


def resolve_path(path: str, info: ValidationInfo) -> Path:
    """A path from a YAML file: relative ones are relative to that file's folder (`root` in the context)."""
    p = Path(path).expanduser()
    root = (info.context or {}).get("root")
    return (p if p.is_absolute() or root is None else Path(root) / p).resolve()


# A spec or merge config is a few hundred values; aliases may repeat a block, but a file that expands to
# more than this (a "billion laughs" alias bomb) is refused before pydantic walks the expansion.
MAX_EXPANDED_VALUES = 100_000
# Deeper nesting is no config, and PyYAML's parser slows down quadratically with it ([[[[...]]]]).
MAX_DEPTH = 64
_MERGE_TAG = "tag:yaml.org,2002:merge"


class _Refused(yaml.MarkedYAMLError):
    """Valid YAML syntax this loader refuses (a duplicate key, deep nesting), with its line."""


class _StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a key given twice in one mapping (PyYAML keeps the last one
    silently) and nesting deeper than `MAX_DEPTH` are errors naming the line."""

    depth = 0

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node:
        self.depth += 1
        try:
            if self.depth > MAX_DEPTH:
                raise _Refused(
                    problem=f"nested more than {MAX_DEPTH} levels deep", problem_mark=self.peek_event().start_mark
                )
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        first_line: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == _MERGE_TAG:  # `<<: *defaults` then overriding a key is what merges are for
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                seen = key in first_line
            except TypeError:  # an unhashable key: PyYAML's own error says so below
                continue
            if seen:
                raise _Refused(
                    problem=f"key {key!r} appears twice in one mapping (first on line {first_line[key] + 1})",
                    problem_mark=key_node.start_mark,
                )
            first_line[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def _expanded_size(value: Any, sizes: dict[int, int], open_: set[int]) -> int:
    """How many values `value` holds once every alias is expanded, without expanding: an aliased block is
    one shared object, counted once and reused. ValueError for a block that holds itself."""
    if not isinstance(value, dict | list):
        return 1
    key = id(value)
    if key in sizes:
        return sizes[key]
    if key in open_:
        raise ValueError("an alias refers to a block that holds it (a cycle)")
    open_.add(key)
    children = [*value.keys(), *value.values()] if isinstance(value, dict) else value
    sizes[key] = 1 + sum(_expanded_size(child, sizes, open_) for child in children)
    open_.discard(key)
    return sizes[key]


def _non_finite(value: Any, loc: tuple = (), seen: set[int] | None = None) -> tuple | None:
    """The location of the first float that is not finite (.inf, .nan, 1.0e+400), in free-form values
    (peft configs, gen_kwargs) too; an aliased block is looked at once."""
    seen = set() if seen is None else seen
    if isinstance(value, float):
        return None if math.isfinite(value) else loc
    if not isinstance(value, dict | list) or id(value) in seen:
        return None
    seen.add(id(value))
    items = value.items() if isinstance(value, dict) else enumerate(value)
    return next((found for k, v in items if (found := _non_finite(v, (*loc, k), seen)) is not None), None)


def read_text(path: Path, what: str) -> str:
    """A config file's text; BadInput naming the file unless it is a readable UTF-8 regular file."""
    if path.is_dir():
        raise BadInput(f"{path}: is a folder, not a {what} file")
    if not path.is_file():  # also a FIFO or a device: reading one could wait forever
        raise BadInput(f"{path}: no such {what} file" if not path.exists() else f"{path}: not a regular file")
    try:
        data = path.read_bytes()
        text = data.decode("utf-8")
    except OSError as e:
        raise BadInput(f"{path}: cannot read ({e.strerror or e})") from None
    except UnicodeDecodeError as e:
        kind = "a binary file" if b"\0" in data else f"byte {e.start}: {e.reason}"
        raise BadInput(f"{path}: not a UTF-8 text file ({kind})") from None
    return text


def load_mapping(path: Path, what: str, text: str | None = None) -> dict[str, Any]:
    """A YAML file (its `text` if already read) whose top level is a mapping; BadInput naming the file (and
    line) otherwise.

    Refused besides invalid YAML: a file that is not a readable UTF-8 text file, what `_StrictLoader`
    refuses, more than `MAX_EXPANDED_VALUES` values once aliases are expanded (or an alias cycle), and a
    number that is not finite."""
    if text is None:
        text = read_text(path, what)
    try:
        raw = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 (a SafeLoader)
    except _Refused as e:
        raise BadInput(f"{path}:{e.problem_mark.line + 1}: {e.problem}") from None
    except yaml.reader.ReaderError as e:  # a control character: a binary file, most likely
        raise BadInput(f"{path}: not a text file (character #x{e.character:04x} at position {e.position})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}" if mark else ""
        problem = " ".join(str(getattr(e, "problem", None) or e).split())  # one line
        raise BadInput(f"{path}{where}: not valid YAML ({problem})") from None
    except ValueError as e:  # PyYAML's int(): more digits than Python converts (4300 by default)
        raise BadInput(f"{path}: a number is too long to read ({str(e).split(':')[0]})") from None
    if raw is None:
        raise BadInput(f"{path}: the {what} file is empty")
    if not isinstance(raw, dict):
        raise BadInput(f"{path}: expected a mapping of keys at the top level, got {type(raw).__name__}")
    try:
        size = _expanded_size(raw, {}, set())
    except ValueError as e:
        raise BadInput(f"{path}: {e}") from None
    if size > MAX_EXPANDED_VALUES:
        raise BadInput(
            f"{path}: expands to {size:,} values through its aliases (at most {MAX_EXPANDED_VALUES:,}): an alias bomb?"
        )
    if (loc := _non_finite(raw)) is not None:  # pydantic's words, for the fields it checks too
        raise BadInput(f"{path}: {key_path(loc)}: Input should be a finite number")
    return raw


def validate(model: type[M], data: Any, path: Path | str, context: dict | None = None) -> M:
    """`model.model_validate(data)`, any problem as BadInput `path: key.path: message`."""
    try:
        return model.model_validate(data, context=context)
    except ValidationError as e:
        where, msg = error_message(e)
        raise BadInput(f"{path}: {where}: {msg}" if where else f"{path}: {msg}") from None
