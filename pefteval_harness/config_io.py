"""Reading user YAML files into pydantic models, with one-line errors that name the file and key path.

Shared by the experiment spec and `pefteval merge` configs, so both report problems the same way.
"""

from __future__ import annotations

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
    err = error.errors()[0]
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


def load_mapping(path: Path, what: str) -> dict[str, Any]:
    """A YAML file whose top level is a mapping; BadInput naming the file (and line) otherwise."""
    if not path.is_file():
        raise BadInput(f"{path}: no such {what} file")
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError) as e:
        raise BadInput(f"{path}: cannot read ({getattr(e, 'strerror', None) or e})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}" if mark else ""
        raise BadInput(f"{path}{where}: not valid YAML ({getattr(e, 'problem', None) or e})") from None
    if not isinstance(raw, dict):
        raise BadInput(f"{path}: expected a mapping of keys at the top level, got {type(raw).__name__}")
    return raw


def validate(model: type[M], data: Any, path: Path | str, context: dict | None = None) -> M:
    """`model.model_validate(data)`, any problem as BadInput `path: key.path: message`."""
    try:
        return model.model_validate(data, context=context)
    except ValidationError as e:
        where, msg = error_message(e)
        raise BadInput(f"{path}: {where}: {msg}" if where else f"{path}: {msg}") from None
