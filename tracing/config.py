"""Settings of the trace stage, as one dataclass read from YAML.

    cfg = load_trace_config("configs/trace.yaml", out="runs/t", max_tokens=65536)  # overrides win
    run_trace(cfg)

Every setting is also a flag of `trace` (``max_tokens`` is ``--max-tokens``; ``fsync: false``
is ``--no-fsync``).  Unknown keys and values of the wrong type are refused with one line.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

from specmoe.config_yaml import load_dataclass_yaml
from specmoe.errors import SpecmoeError
from specmoe.paths import CONFIGS_DIR

DEFAULT_CONFIG_PATH = CONFIGS_DIR / "trace.yaml"

COMPUTE_DTYPES = ("auto", "bf16", "fp16", "fp32")
STORE_DTYPE_CHOICES = ("bf16", "fp16", "fp32")
_DEVICE_RE = re.compile(r"^(cpu|cuda|cuda:\d+|auto)$")


@dataclasses.dataclass
class TraceConfig:
    # --- the model and the text it runs over
    model: str | None = None          # hub id or local directory (None: the bundled demo model)
    revision: str | None = None       # hub revision (None: the main branch)
    dataset: str | None = None        # file, directory, saved dataset or hub name (None: the demo corpus)
    split: str = "train"
    text_field: str = "text"
    max_tokens: int | None = None     # stop after this many tokens (None: the whole split)
    seq_len: int = 256                # tokens per row; texts are joined with the end-of-text token
    batch_size: int = 8               # rows per forward pass
    dtype: str = "auto"               # compute dtype: auto (fp32 on cpu, the checkpoint's on GPU), bf16, fp16, fp32
    device: str = "cpu"               # cpu, cuda, cuda:N, or auto (shard over all GPUs)
    layers: str | int | None = None   # MoE layers to record, e.g. "0-3,8" (None: all)
    # --- what is written
    store_dtype: str = "bf16"         # dtype of stored residuals and logits
    shard_tokens: int | None = None   # tokens per shard, rounded to whole batches (None: about 256 MB per shard)
    default_vector_every: int = 1     # default vectors from every N-th token
    writer_threads: int = 6           # shards written at once (0: in the tracing thread)
    fsync: bool = True                # force each shard to disk
    out: Path | None = None           # the trace directory
    resume: bool = False              # continue (or grow) the trace in `out`

    def validate(self) -> "TraceConfig":
        """A checked copy, with paths and layer lists in one form; SpecmoeError names the flag."""
        cfg = dataclasses.replace(
            self,
            model=None if self.model is None else str(self.model),
            dataset=None if self.dataset is None else str(self.dataset),
            layers=None if self.layers is None else str(self.layers),
            out=None if self.out is None else Path(self.out),
        )
        if cfg.out is None:
            raise SpecmoeError("give --out DIR: the directory the trace is written to")
        if cfg.seq_len < 2:
            raise SpecmoeError(f"--seq-len must be at least 2 (got {cfg.seq_len})")
        if cfg.batch_size < 1:
            raise SpecmoeError(f"--batch-size must be at least 1 (got {cfg.batch_size})")
        if cfg.max_tokens is not None:
            if cfg.max_tokens < 1:
                raise SpecmoeError(f"--max-tokens must be positive (got {cfg.max_tokens}); "
                                   "leave it out to trace the whole split")
            if cfg.max_tokens < cfg.seq_len:
                raise SpecmoeError(f"--max-tokens {cfg.max_tokens} is less than one row of --seq-len "
                                   f"{cfg.seq_len} tokens; give at least {cfg.seq_len}")
        if cfg.writer_threads < 0:
            raise SpecmoeError("--writer-threads must be 0 (write in the tracing thread) or more")
        if cfg.default_vector_every < 1:
            raise SpecmoeError(f"--default-vector-every must be at least 1 (got {cfg.default_vector_every})")
        if cfg.shard_tokens is not None and cfg.shard_tokens < 1:
            raise SpecmoeError(f"--shard-tokens must be positive (got {cfg.shard_tokens})")
        if cfg.dtype not in COMPUTE_DTYPES:
            raise SpecmoeError(f"--dtype {cfg.dtype!r}: choose one of {', '.join(COMPUTE_DTYPES)}")
        if cfg.store_dtype not in STORE_DTYPE_CHOICES:
            raise SpecmoeError(f"--store-dtype {cfg.store_dtype!r}: choose one of {', '.join(STORE_DTYPE_CHOICES)}")
        if not _DEVICE_RE.match(cfg.device):
            raise SpecmoeError(f"--device {cfg.device!r}: use cpu, cuda, cuda:N or auto")
        return cfg

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["out"] = None if self.out is None else str(self.out)
        return d


def load_trace_config(path: str | Path | None = None, **overrides: Any) -> TraceConfig:
    """TraceConfig from a YAML file (None: configs/trace.yaml if present, else the defaults),
    then `overrides` (those whose value is None are left out). Not yet validated: run_trace
    does that, so that a file may leave out what the command line gives."""
    if path is None and DEFAULT_CONFIG_PATH.is_file():
        path = DEFAULT_CONFIG_PATH
    return load_dataclass_yaml(TraceConfig, path, "trace config", **overrides)
