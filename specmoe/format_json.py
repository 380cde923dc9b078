"""JSON files that name their own format and version (a trace's manifest, an
estimator's config): read and checked the same way, so every artefact fails alike."""

from __future__ import annotations

import json
from pathlib import Path

from .errors import CorruptFileError, SpecmoeError


def read_format_json(path: Path, format_name: str, version: int, kind: str, damaged: str,
                     version_hint: str = "") -> dict:
    """The object in `path`, after checking it is valid JSON (CorruptFileError otherwise, with
    `damaged` as the explanation), names `format_name` and has `version` (SpecmoeError)."""
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CorruptFileError(f"{path} is not valid JSON ({err}){damaged}") from None
    if not isinstance(obj, dict) or obj.get("format") != format_name:
        raise SpecmoeError(f"{path} is not a specmoe {kind} (format is not {format_name!r})")
    if obj.get("format_version") != version:
        raise SpecmoeError(f"{path} has {kind} format version {obj.get('format_version')!r}; "
                           f"this specmoe reads version {version}{version_hint}")
    return obj
