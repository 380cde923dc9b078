"""Settings dataclasses read from YAML, checked the same way for every stage.

    cfg = load_dataclass_yaml(TraceConfig, "configs/trace.yaml", "trace config", max_tokens=65536)

Unknown keys and values of the wrong type are refused with a one-line SpecmoeError,
so a typo in a YAML file never silently falls back to a default; overrides (the
command line's flags) win over the file.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

from .errors import SpecmoeError, first_line

T = TypeVar("T")


def field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _allowed(hint: Any) -> tuple:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return typing.get_args(hint)
    return (hint,)


def _type_name(kind: Any) -> str:
    return "null" if kind is type(None) else getattr(kind, "__name__", str(kind))


def coerce(name: str, value: Any, hint: Any, what: str) -> Any:
    """`value` checked against its annotated type: ints pass as floats, strings as paths,
    nothing else is converted."""
    allowed = _allowed(hint)
    for kind in allowed:
        if kind is type(None):
            if value is None:
                return None
        elif kind is bool:
            if isinstance(value, bool):
                return value
        elif kind is int:
            if isinstance(value, int) and not isinstance(value, bool):
                return value
        elif kind is float:
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return float(value)
        elif kind is str:
            if isinstance(value, str):
                return value
        elif kind is Path:
            if isinstance(value, (str, Path)):
                return Path(value)
    names = "/".join(_type_name(k) for k in allowed)
    raise SpecmoeError(f"{what}: {name} must be {names}, got {value!r}")


def read_yaml_mapping(path: str | Path, what: str) -> dict[str, Any]:
    """The mapping in a YAML file (an empty file is an empty mapping)."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise SpecmoeError(f"{what} {path} does not exist")
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        first = first_line(err)
        raise SpecmoeError(f"{what} {path} is not valid YAML: {first}") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise SpecmoeError(f"{what} {path} must be a mapping of settings")
    return loaded


def load_dataclass_yaml(cls: type[T], path: str | Path | None, what: str, **overrides: Any) -> T:
    """`cls` from the YAML file at `path` (None: the defaults), then `overrides`
    (those whose value is None are left out: a flag not given)."""
    values: dict[str, Any] = read_yaml_mapping(path, what) if path is not None else {}
    values.update({k: v for k, v in overrides.items() if v is not None})
    known = field_types(cls)
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise SpecmoeError(f"{what}: unknown setting(s) {', '.join(map(str, unknown))}; "
                           f"known: {', '.join(known)}")
    return cls(**{name: coerce(name, value, known[name], what) for name, value in values.items()})
