"""Text inputs for every stage, loaded through `datasets` whatever their form."""

from __future__ import annotations

import os
from pathlib import Path

from .errors import SpecmoeError, first_line
from .hub import hub_offline, offline_hint, require_hub
from .paths import DEMO_CORPUS_DIR, display_path

# datasets builder for each local file suffix (compressed variants are handled by datasets)
_BUILDERS = {".txt": "text", ".text": "text", ".jsonl": "json", ".json": "json",
             ".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}


def _builder_for(path: Path) -> str | None:
    suffixes = [s for s in path.suffixes if s not in (".gz", ".bz2", ".xz", ".zst")]
    return _BUILDERS.get(suffixes[-1]) if suffixes else None


def describe_dataset(spec: str | os.PathLike | None) -> str:
    """How a trace's manifest names its dataset: paths inside the repository relative to it,
    so that a trace made in one checkout can be resumed in another."""
    return display_path(spec if spec is not None else DEMO_CORPUS_DIR)


def load_text_dataset(spec: str | os.PathLike | None = None, split: str = "train", text_field: str = "text"):
    """Load one split of a text dataset and check that it has usable text.

    `spec` is a local file (.txt/.jsonl/.json/.parquet/.csv, optionally compressed),
    a directory of such files (split names taken from file names, as `datasets`
    does), a directory written by `Dataset.save_to_disk`, or a hub name. None
    means the bundled demo corpus.
    """
    import datasets

    spec = DEMO_CORPUS_DIR if spec is None else spec
    path = Path(spec).expanduser()
    datasets.disable_progress_bars()
    try:
        if path.is_file():
            builder = _builder_for(path)
            if builder is None:
                raise SpecmoeError(f"cannot tell the format of {path}; use .txt, .jsonl, .json, .parquet or .csv")
            loaded = datasets.load_dataset(builder, data_files={split: str(path)})
        elif path.is_dir() and ((path / "dataset_dict.json").exists() or (path / "state.json").exists()):
            loaded = datasets.load_from_disk(str(path))
        elif path.is_dir():
            loaded = datasets.load_dataset(str(path))
        elif _builder_for(path) is not None:  # a data file's name, not a hub name
            raise SpecmoeError(f"dataset file {spec} does not exist")
        elif _looks_like_hub_id(str(spec)):
            require_hub("dataset", str(spec), repo_type="dataset", cached_file=None)
            try:
                loaded = datasets.load_dataset(str(spec))
            except Exception as err:
                if hub_offline() and ("OfflineModeIsEnabled" in str(err) or isinstance(err, ConnectionError)):
                    raise SpecmoeError(offline_hint("dataset", spec)) from None
                raise
        else:
            raise SpecmoeError(f"dataset path {spec} does not exist")
    except SpecmoeError:
        raise
    except FileNotFoundError as err:
        raise SpecmoeError(f"cannot load dataset {spec}: {err}") from None
    except Exception as err:  # datasets raises many types; the user needs the message, not the stack
        first = first_line(err)
        raise SpecmoeError(f"cannot load dataset {spec}: {first}") from None
    finally:
        datasets.enable_progress_bars()

    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise SpecmoeError(f"dataset {spec} has no split {split!r}; it has {', '.join(loaded)}")
        loaded = loaded[split]
    if text_field not in loaded.column_names:
        raise SpecmoeError(
            f"dataset {spec} has no text field {text_field!r}; its columns are {', '.join(loaded.column_names)} "
            f"(choose one with --text-field)")
    if len(loaded) == 0:
        raise SpecmoeError(f"dataset {spec} split {split!r} is empty")
    return loaded


def _looks_like_hub_id(spec: str) -> bool:
    parts = spec.split("/")
    return len(parts) <= 2 and all(parts) and not spec.startswith((".", "/", "~")) and "." not in parts[-1][:1]
