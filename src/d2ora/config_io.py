"""Config files for every command: a YAML file, then ``--set key=value`` overrides, into a pydantic model.

``load_config(TrainConfig, "run.yaml", ["optim.lr=1e-4", "adapter.target_modules=[query,value]"])``:

- the YAML file is read with a safe loader (no Python objects) and must be a mapping;
- each override is ``key=value`` with a dotted key for nested models (``adapter.r=4``); the value is
  parsed as YAML, so ``1e-4`` is a float, ``[query,value]`` a list, ``null`` None, ``true`` a bool;
- every problem becomes one :class:`ConfigError` naming the key (and where it came from); unknown
  keys are rejected (models should set ``extra="forbid"``) with a close-spelling hint; a model with
  a ``moved_problems(data)`` class method (d2ora.recipes.sections.SectionedConfig) names the new
  place of each key of an older format instead.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

M = TypeVar("M", bound=BaseModel)


class ConfigError(ValueError):
    """A config that cannot be read or does not validate; the message names each bad key."""

    def __init__(self, message: str, problems: list[str] | None = None) -> None:
        super().__init__(message)
        self.problems = problems or [message]


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads ``1e-4`` as a float (YAML 1.1 wants ``1.0e-4``, which surprises people)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def parse_value(text: str) -> Any:
    """A YAML scalar / flow value: ``3`` -> 3, ``1e-4`` -> 0.0001, ``[a,b]`` -> list, ``''`` -> None."""
    return yaml.load(text, Loader=_Loader)  # _Loader is a SafeLoader


def read_yaml(path: str | Path) -> dict[str, Any]:
    """The mapping in a YAML file (an empty file is ``{}``)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_Loader)
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        line = f" (line {where.line + 1})" if where is not None else ""
        raise ConfigError(f"config file {path} is not valid YAML{line}: {getattr(exc, 'problem', exc)}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of key: value, not a {type(data).__name__}")
    return data


def parse_override(text: str) -> tuple[str, Any]:
    """``"a.b=1"`` -> ``("a.b", 1)``."""
    key, sep, value = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"--set '{text}' must look like key=value")
    try:
        return key, parse_value(value)
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {key}: value '{value}' is not valid YAML ({getattr(exc, 'problem', exc)})") from exc


def set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    """``data[a][b] = value`` for key ``a.b``, creating nested mappings as needed."""
    parts = key.split(".")
    if any(not p for p in parts):
        raise ConfigError(f"--set key '{key}' has an empty part")
    node = data
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif not isinstance(child, dict):
            raise ConfigError(f"--set {key}: '{'.'.join(parts[: i + 1])}' is a value, not a section")
        node = child
    node[parts[-1]] = value


def _model_at(model_cls: type[BaseModel], loc: Sequence[Any]) -> type[BaseModel] | None:
    """The (nested) model class that owns the field at ``loc``, for spelling hints."""
    current: type[BaseModel] | None = model_cls
    for part in loc:
        if current is None or not isinstance(part, str) or part not in current.model_fields:
            return None
        annotation = current.model_fields[part].annotation
        current = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
    return current


def _describe(error: Mapping[str, Any], model_cls: type[BaseModel], from_set: set[str]) -> str:
    loc = [p for p in error["loc"] if not (isinstance(p, str) and p.startswith("function-"))]
    key = ".".join(str(p) for p in loc) or "(config)"
    set_here = key in from_set or any(k.startswith(key + ".") for k in from_set)
    origin = " (from the command line)" if set_here else ""
    if error["type"] == "extra_forbidden":
        owner = _model_at(model_cls, loc[:-1])
        close = difflib.get_close_matches(str(loc[-1]), list(owner.model_fields), n=1) if owner else []
        hint = f"; did you mean '{close[0]}'?" if close else ""
        return f"unknown key '{key}'{origin}{hint}"
    message = error["msg"]
    if error["type"] != "missing":
        given = error.get("input")
        message += f" (got {given!r})"
    return f"{key}{origin}: {message}"


def validation_problems(exc: ValidationError, model_cls: type[BaseModel], from_set: set[str] = frozenset()) -> list[str]:
    """One readable line per invalid or unknown key."""
    return [_describe(e, model_cls, set(from_set)) for e in exc.errors()]


def load_config(
    model_cls: type[M],
    yaml_path: str | Path | None = None,
    overrides: Sequence[str] = (),
    *,
    updates: Mapping[str, Any] | None = None,
) -> M:
    """Defaults <- YAML file <- ``--set`` overrides <- ``updates`` (already-typed values, dotted keys).

    Raises :class:`ConfigError` for a missing or malformed file, a malformed override, an unknown
    key or an invalid value; the message names every bad key, ``"; "``-separated.
    """
    data = read_yaml(yaml_path) if yaml_path is not None else {}
    from_set: set[str] = set()
    for text in overrides:
        key, value = parse_override(text)
        set_dotted(data, key, value)
        from_set.add(key)
    for key, value in (updates or {}).items():
        set_dotted(data, key, value)
        from_set.add(key)
    source = f" ({yaml_path})" if yaml_path is not None else ""
    moved = getattr(model_cls, "moved_problems", None)  # sectioned configs: keys of the old flat format
    if moved is not None:
        lines = [f"{line} (from the command line)" if key in from_set else line for key, line in moved(data).items()]
        if lines:
            raise ConfigError(f"invalid config{source}: " + "; ".join(lines), lines)
    try:
        return model_cls.model_validate(data)
    except ValidationError as exc:
        problems = validation_problems(exc, model_cls, from_set)
        raise ConfigError(f"invalid config{source}: " + "; ".join(problems), problems) from None


def to_yaml(config: BaseModel) -> str:
    """The config as YAML that :func:`load_config` reads back to an equal model."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False, allow_unicode=True)
