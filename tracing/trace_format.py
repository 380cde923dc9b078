"""The trace format (version 1): file names, tensor keys, the manifest and its checks.

A trace directory holds

    manifest.json                     what is in the trace; lists only complete shards
    shard-00000.safetensors, ...      whole sequences, in order (see below)
    state.safetensors                 the tracer's accumulators after the last listed shard,
                                      plus the sequences already added beyond it
    default_vectors.safetensors       written when the trace is complete

Shard tensors: ``token_ids`` int32 [N] and, per traced decoder layer ``l``,
``layers.{l}.residual`` [N,H] and ``layers.{l}.router_logits`` [N,E] in the store
dtype, ``layers.{l}.topk_ids`` int32 [N,k], ``layers.{l}.topk_weights`` float32 [N,k],
with N = sequences * seq_len (sequences are packed fixed-length rows).  Every shard
holds ``sequences_per_shard`` sequences except the last one of a run: a trace that was
completed and later grown keeps that short shard as it was, and goes on after it.

The writer is tracing.trace_writer, resuming is tracing.trace_recovery, the reader
is tracing.trace_reader.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from specmoe import safetensors_stream as st
from specmoe.errors import CorruptFileError, SpecmoeError
from specmoe.format_json import read_format_json

FORMAT_NAME = "specmoe-trace"
FORMAT_VERSION = 1

MANIFEST = "manifest.json"
STATE_FILE = "state.safetensors"
DEFAULT_VECTORS_FILE = "default_vectors.safetensors"
SHARD_RE = re.compile(r"^shard-(\d{5,})\.safetensors$")

FIELDS = ("residual", "router_logits", "topk_ids", "topk_weights")
DEFAULT_VECTOR_FIELDS = ("default_vectors", "expert_counts", "default_vector_tokens")

STORE_DTYPES = {
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
    "fp32": torch.float32,
}
_DTYPE_ALIASES = {
    "bf16": "bf16", "bfloat16": "bf16",
    "fp16": "fp16", "float16": "fp16", "half": "fp16",
    "fp32": "fp32", "float32": "fp32", "float": "fp32",
}
FIXED_DTYPES = {"topk_ids": torch.int32, "topk_weights": torch.float32}

# safetensors header metadata: fixed, so that shard bytes never depend on time or place.
# Exactly one key: safetensors keeps metadata in a hash map whose order varies between
# processes, so a second key would make the header bytes non-deterministic.
SHARD_METADATA = {"format": "pt"}

# state.safetensors: the sequences added beyond the last listed shard are stored under this
# prefix, and its metadata names the shards the state goes with
PENDING_PREFIX = "__pending__."
STATE_META_SHARDS = "specmoe_shards"
STATE_META_PENDING = "specmoe_pending_sequences"

# Keys of the manifest the writer owns; caller metadata may not override them.
RESERVED_KEYS = frozenset(
    {"format", "format_version", "seq_len", "store_dtype", "layers", "sequences_per_shard",
     "shards", "complete", "state", "default_vectors"}
)
# Keys of the manifest's "dataset" entry that may change when a trace is resumed: a trace
# grows (or goes on) to a new token limit and stays the same trace otherwise.
GROWABLE_DATASET_KEYS = frozenset({"max_tokens"})


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.safetensors"


def layer_key(layer: int, field: str) -> str:
    return f"layers.{layer}.{field}"


def shard_keys(layers: Sequence[int]) -> set[str]:
    """The tensor names every shard of a trace of `layers` holds."""
    return {"token_ids"} | {layer_key(l, f) for l in layers for f in FIELDS}


def key_dtype(key: str, store_dtype: str) -> torch.dtype:
    """The dtype a shard tensor is stored in."""
    if key == "token_ids":
        return torch.int32
    return FIXED_DTYPES.get(key.rsplit(".", 1)[1], STORE_DTYPES[store_dtype])


def normalize_store_dtype(name: str) -> str:
    key = str(name).lower().replace("torch.", "")
    if key not in _DTYPE_ALIASES:
        raise SpecmoeError(f"unknown store dtype {name!r}; choose one of bf16, fp16, fp32")
    return _DTYPE_ALIASES[key]


def human_bytes(n: float) -> str:
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def estimate_trace_bytes(
    num_tokens: int,
    *,
    layers: int | Sequence[int],
    hidden_size: int,
    num_experts: int,
    top_k: int,
    store_dtype: str = "bf16",
    headers: bool = True,
) -> int:
    """Bytes a trace of `num_tokens` tokens takes on disk (shards + default vectors),
    slightly rounded up for headers and the manifest (headers=False: the shard data only)."""
    n_layers = layers if isinstance(layers, int) else len(list(layers))
    item = STORE_DTYPES[normalize_store_dtype(store_dtype)].itemsize
    per_token = 4 + n_layers * ((hidden_size + num_experts) * item + top_k * (4 + 4))
    default_vectors = n_layers * num_experts * (hidden_size * 4 + 8 + 8)
    overhead = 64 * 1024
    if not headers:
        return int(num_tokens) * per_token
    return int(num_tokens) * per_token + default_vectors + overhead


def read_manifest(directory: Path) -> dict:
    """manifest.json of the trace in `directory`, format-checked (SpecmoeError when missing or damaged)."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise SpecmoeError(f"no trace at {directory}: {MANIFEST} is missing")
    manifest = read_format_json(path, FORMAT_NAME, FORMAT_VERSION, "trace manifest",
                                "; the trace manifest is damaged",
                                " (re-trace, or use the specmoe release that wrote it)")
    for key, kind in (("seq_len", int), ("store_dtype", str), ("layers", list),
                      ("sequences_per_shard", int), ("shards", list)):
        if not isinstance(manifest.get(key), kind):
            raise SpecmoeError(f"{path} is damaged: field {key!r} is missing or of the wrong type")
    for entry in manifest["shards"]:
        if not isinstance(entry, dict) or not all(k in entry for k in ("file", "sequences", "tokens", "sha256", "bytes")):
            raise SpecmoeError(f"{path} is damaged: a shard entry lacks file/sequences/tokens/sha256/bytes")
    return manifest


def trace_files_in(directory: Path) -> list[str]:
    """Names of trace data files (shards, state, default vectors) in `directory`."""
    if not Path(directory).is_dir():
        return []
    return sorted(p.name for p in Path(directory).iterdir()
                  if SHARD_RE.match(p.name) or p.name in (STATE_FILE, DEFAULT_VECTORS_FILE))


def check_size(directory: Path, entry: Mapping[str, Any]) -> Path:
    """The listed file, after checking it exists with the size the manifest promises."""
    path = Path(directory) / entry["file"]
    if not path.is_file():
        raise CorruptFileError(f"{path} is missing (listed in {MANIFEST})")
    size = path.stat().st_size
    if size != entry["bytes"]:
        raise CorruptFileError(
            f"{path} is {size} bytes but {MANIFEST} promises {entry['bytes']} (truncated or damaged)"
        )
    return path


def check_sha(directory: Path, entry: Mapping[str, Any]) -> None:
    """check_size, then the file's sha256 against the manifest's."""
    path = check_size(directory, entry)
    if st.sha256_file(path) != entry["sha256"]:
        raise CorruptFileError(f"{path} does not match its sha256 in {MANIFEST} (file is damaged)")
