"""Where the bundled demo model and corpus live.

They are files of this repository, so the defaults work offline right after
`make demo`; every command also takes explicit paths or hub ids."""

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
DEMO_MODEL_DIR = REPO_ROOT / "checkpoints" / "demo-moe"
DEMO_CORPUS_DIR = REPO_ROOT / "data" / "demo-corpus"
CONFIGS_DIR = REPO_ROOT / "configs"
