"""Where the bundled demo model and corpus live.

They are files of this repository, so the defaults work offline right after
`make demo`; every command also takes explicit paths or hub ids."""

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
DEMO_MODEL_DIR = REPO_ROOT / "checkpoints" / "demo-moe"
DEMO_CORPUS_DIR = REPO_ROOT / "data" / "demo-corpus"
CONFIGS_DIR = REPO_ROOT / "configs"


def display_path(path_or_id: str | Path | None) -> str:
    """A model or data path as people should read it: relative to the repository when inside it."""
    text = str(path_or_id or "")
    try:
        return str(Path(text).resolve().relative_to(REPO_ROOT)) if Path(text).is_absolute() else text
    except ValueError:
        return text
