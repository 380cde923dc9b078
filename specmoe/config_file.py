"""Dataclass settings read from YAML, the same way for every command.

    cfg = load_dataclass(RuntimeConfig, "configs/infer.yaml", "infer config", prefetch="quasi")

Unknown keys and values of the wrong type are refused with one line, so a typo in
a YAML file never falls back to a default silently. Overrides whose value is None
are ignored (an option the user did not give).
"""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Any, TypeVar

from .errors import SpecmoeError

T = TypeVar("T")


def _coerce(what: str, name: str, value: Any, hint: Any) -> Any:
    allowed = typing.get_args(hint) or (hint,)
    if value is None and type(None) in allowed:
        return None
    for kind in allowed:
        if kind is bool and isinstance(value, bool):
            return value
        if kind is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if kind is str and isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    names = "/".join("null" if k is type(None) else getattr(k, "__name__", str(k)) for k in allowed)
    raise SpecmoeError(f"{what}: {name} must be {names}, got {value!r}")


def read_yaml_mapping(path: str | Path, what: str) -> dict:
    import yaml

    path = Path(path)
    if not path.is_file():
        raise SpecmoeError(f"{what} {path} does not exist")
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise SpecmoeError(f"{what} {path} is not valid YAML: {first}") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise SpecmoeError(f"{what} {path} must be a mapping of settings")
    return loaded


def load_dataclass(cls: type[T], path: str | Path | None, what: str, **overrides: Any) -> T:
    """`cls` built from the YAML file at `path` (None: defaults only), then `overrides`."""
    values: dict[str, Any] = {}
    if path is not None:
        values.update(read_yaml_mapping(path, what))
    values.update({k: v for k, v in overrides.items() if v is not None})
    hints = typing.get_type_hints(cls)
    types = {f.name: hints[f.name] for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(types))
    if unknown:
        raise SpecmoeError(f"{what}: unknown setting(s) {', '.join(unknown)}; known: {', '.join(types)}")
    obj = cls(**{name: _coerce(what, name, value, types[name]) for name, value in values.items()})
    check = getattr(obj, "validate", None)
    return check() if callable(check) else obj
