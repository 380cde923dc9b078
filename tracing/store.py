"""On-disk trace format (version 1): writer and reader.

A trace directory holds

    manifest.json                     what is in the trace; lists only complete shards
    shard-00000.safetensors, ...      fixed number of whole sequences per shard (last may be short)
    state.safetensors                 caller's accumulator state after the last complete shard,
                                      plus the sequences already added beyond it (see below)
    default_vectors.safetensors       written by close()

Shard tensors: ``token_ids`` int32 [N] and, per traced decoder layer ``l``,
``layers.{l}.residual`` [N,H] and ``layers.{l}.router_logits`` [N,E] in the store
dtype, ``layers.{l}.topk_ids`` int32 [N,k], ``layers.{l}.topk_weights`` float32 [N,k],
with N = sequences * seq_len (sequences are packed fixed-length rows).

Crash safety.  Every file is written under a ``.tmp`` name, fsynced and renamed
into place.  When add() completes one or more shards it writes, in this order:
the shard files, then ``state.safetensors``, then ``manifest.json``.  The state
file records (in its metadata) the full list of shards it goes with, and also
carries the sequences that were added after the last complete shard (a batch may
straddle a shard boundary; the caller's accumulators already include them, so
they must be kept for the state to stay exact).  A kill at any point therefore
leaves either

* manifest and state describing the same shards (an unlisted newer shard file,
  if any, is a leftover and gets rewritten), or
* a state one step ahead of the manifest, whose extra shards are already in
  place under their final names; resume checks their sha256 against the
  state's record and adopts them.

Shard bytes are deterministic: the same inputs give byte-identical files, the ones
safetensors' own save() makes (the writer builds the header itself and streams the
tensor bytes from its buffer; see specmoe/safetensors_stream.py).
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch
from safetensors import safe_open

from specmoe import safetensors_stream as st
from specmoe.errors import CorruptFileError, MismatchError, SpecmoeError
from specmoe.format_json import read_format_json
from tracing.host_copies import copy_to_host, pinned_empty, snapshot_to_host, wait
from specmoe.paths import display_path
from specmoe.safetensors_stream import TMP_SUFFIX

FORMAT_NAME = "specmoe-trace"
FORMAT_VERSION = 1

MANIFEST = "manifest.json"
STATE_FILE = "state.safetensors"
DEFAULT_VECTORS_FILE = "default_vectors.safetensors"
SHARD_RE = re.compile(r"^shard-(\d{5,})\.safetensors$")

FIELDS = ("residual", "router_logits", "topk_ids", "topk_weights")
DEFAULT_VECTOR_FIELDS = ("default_vectors", "expert_counts", "default_vector_tokens")

_STORE_DTYPES = {
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
    "fp32": torch.float32,
}
_DTYPE_ALIASES = {
    "bf16": "bf16", "bfloat16": "bf16",
    "fp16": "fp16", "float16": "fp16", "half": "fp16",
    "fp32": "fp32", "float32": "fp32", "float": "fp32",
}
_FIXED_DTYPES = {"topk_ids": torch.int32, "topk_weights": torch.float32}

# safetensors header metadata: fixed, so that shard bytes never depend on time or place.
# Exactly one key: safetensors keeps metadata in a hash map whose order varies between
# processes, so a second key would make the header bytes non-deterministic.
_SHARD_METADATA = {"format": "pt"}
_PENDING_PREFIX = "__pending__."
_STATE_META_SHARDS = "specmoe_shards"
_STATE_META_PENDING = "specmoe_pending_sequences"

# Keys of the manifest the writer owns; caller metadata may not override them.
_RESERVED_KEYS = frozenset(
    {"format", "format_version", "seq_len", "store_dtype", "layers", "sequences_per_shard",
     "shards", "complete", "state", "default_vectors"}
)


# --------------------------------------------------------------------------- helpers


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.safetensors"


def layer_key(layer: int, field: str) -> str:
    return f"layers.{layer}.{field}"


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
    item = _STORE_DTYPES[normalize_store_dtype(store_dtype)].itemsize
    per_token = 4 + n_layers * ((hidden_size + num_experts) * item + top_k * (4 + 4))
    default_vectors = n_layers * num_experts * (hidden_size * 4 + 8 + 8)
    overhead = 64 * 1024
    if not headers:
        return int(num_tokens) * per_token
    return int(num_tokens) * per_token + default_vectors + overhead


def _json_roundtrip(obj: Any, what: str) -> Any:
    try:
        return json.loads(json.dumps(obj))
    except (TypeError, ValueError) as err:
        raise SpecmoeError(f"{what} is not JSON-serialisable: {err}") from None


def read_manifest(directory: Path) -> dict:
    """manifest.json of the trace in `directory`, format-checked (SpecmoeError when missing or damaged)."""
    path = directory / MANIFEST
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


def _check_size(directory: Path, entry: Mapping[str, Any]) -> Path:
    path = directory / entry["file"]
    if not path.is_file():
        raise CorruptFileError(f"{path} is missing (listed in {MANIFEST})")
    size = path.stat().st_size
    if size != entry["bytes"]:
        raise CorruptFileError(
            f"{path} is {size} bytes but {MANIFEST} promises {entry['bytes']} (truncated or damaged)"
        )
    return path


def _check_sha(directory: Path, entry: Mapping[str, Any]) -> None:
    path = _check_size(directory, entry)
    if st.sha256_file(path) != entry["sha256"]:
        raise CorruptFileError(f"{path} does not match its sha256 in {MANIFEST} (file is damaged)")


_NUMPY_VIEW = {torch.bfloat16: torch.int16}  # dtypes numpy lacks, seen as same-size ints


def _as_numpy(t: torch.Tensor) -> np.ndarray:
    """A numpy view of a CPU tensor's memory (bf16 seen as int16)."""
    return (t.view(_NUMPY_VIEW[t.dtype]) if t.dtype in _NUMPY_VIEW else t).numpy()


def _buffer_count(workers: int, shard_bytes: int) -> int:
    """Buffers for one shard being filled and up to `workers` being written, kept within a
    quarter of the machine's memory (but never fewer than two when writing concurrently)."""
    if workers == 0:
        return 1
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        ram = 0
    n = workers + 1
    while n > 2 and ram and n * shard_bytes > ram // 4:
        n -= 1
    return n


class _ShardBuffer:
    """One shard's data in one block of memory, laid out like the shard file: the
    tensors in safetensors order, back to back, so a full shard is written and hashed
    as a single buffer.  (The order sorts by descending item size, so every view is
    aligned.)  Pinned when a GPU is present: batches are copied straight in from the
    GPU, asynchronously; `events` say when they have arrived."""

    def __init__(self, shapes: Mapping[str, tuple[int, ...]], dtypes: Mapping[str, torch.dtype], pinned: bool):
        order = st.safetensors_order((key, dtypes[key]) for key in shapes)
        sizes = [math.prod(shapes[key]) * dtypes[key].itemsize for key in order]
        block = pinned_empty(sum(sizes)) if pinned else torch.empty(sum(sizes), dtype=torch.uint8)
        self.tensors: dict[str, torch.Tensor] = {}
        offset = 0
        for key, size in zip(order, sizes):
            self.tensors[key] = block[offset:offset + size].view(dtypes[key]).view(shapes[key])
            offset += size
        self.arrays = {key: _as_numpy(t) for key, t in self.tensors.items()}  # numpy views of the same memory
        self.events: list = []

    def fill(self, sources: Mapping[str, torch.Tensor | np.ndarray], lo: int, hi: int, a: int, b: int) -> None:
        """Rows [a, b) of the buffer <- rows [lo, hi) of each source."""
        to_copy = []
        for key, src in sources.items():
            if isinstance(src, np.ndarray):
                np.copyto(self.arrays[key][a:b], src[lo:hi], casting="no")
            elif src.device.type == "cuda":
                to_copy.append((self.tensors[key][a:b], src[lo:hi]))
            else:
                self.tensors[key][a:b].copy_(src[lo:hi])
        if to_copy:
            self.events += copy_to_host(to_copy)

    def wait(self) -> None:
        wait(self.events)
        self.events = []


# --------------------------------------------------------------------------- writer


class TraceWriter:
    """Writes a trace directory shard by shard; see the module docstring.

    The `state` callable given to add() must return the caller's accumulators
    covering every sequence passed to add() so far, *including* the batch being
    added (update accumulators, then call add).  On resume, `state` holds exactly
    what the callable returned and `sequences_done` is the number of sequences it
    covers (those in complete shards plus those kept alongside the state); the
    tracer skips that many sequences and continues accumulating.
    """

    def __init__(
        self,
        out_dir: str | os.PathLike,
        meta: dict,
        layers: list[int],
        seq_len: int,
        sequences_per_shard: int,
        store_dtype: str,
        resume: bool = False,
        expected_bytes: int | None = None,
        fsync: bool = True,
        workers: int = 0,
    ) -> None:
        self.out_dir = Path(out_dir)
        self.fsync = bool(fsync)
        if int(workers) < 0:
            raise SpecmoeError("workers must be 0 (write in the caller's thread) or more")
        self.workers = int(workers)
        self.layers = self._check_layers(layers)
        if int(seq_len) <= 0 or int(sequences_per_shard) <= 0:
            raise SpecmoeError("seq_len and sequences_per_shard must be positive")
        self.seq_len = int(seq_len)
        self.sequences_per_shard = int(sequences_per_shard)
        self.store_dtype = normalize_store_dtype(store_dtype)
        self._torch_dtype = _STORE_DTYPES[self.store_dtype]

        meta = _json_roundtrip(dict(meta or {}), "trace metadata")
        self._check_reserved(meta)
        self._model: dict = dict(meta.pop("model", None) or {})
        self._dataset: dict = dict(meta.pop("dataset", None) or {})
        self._extra: dict = meta

        self._shards: list[dict] = []
        self._state_entry: dict | None = None
        self._default_vectors_entry: dict | None = None
        self.complete = False
        self.state: dict[str, torch.Tensor] | None = None

        # shard buffers: allocated once dims are known; one is filled while the others are written
        self._cur: _ShardBuffer | None = None
        self._buffered = 0  # sequences in the buffer being filled
        self._dims: dict[str, int] | None = None
        self._last_state_fn: Callable[[], dict[str, torch.Tensor]] | None = None
        self._closed_short = False  # last shard is short: only close() may follow
        # shards written by worker threads, committed (state + manifest) strictly in order
        self._executor = ThreadPoolExecutor(self.workers, thread_name_prefix="trace-shard") if self.workers else None
        self._jobs: list[Future] = []
        self._cond = threading.Condition()
        self._free: list[_ShardBuffer] = []
        self._n_buffers = 0
        self._submitted = 0  # shards handed to writing by this process
        self._listed_before = 0
        self._committed = 0
        self._failed: BaseException | None = None
        self._failed_index = 0  # the shard whose writing failed first

        manifest_path = self.out_dir / MANIFEST
        if manifest_path.exists():
            if not resume:
                raise SpecmoeError(
                    f"{self.out_dir} already holds a trace; use --resume or another --out"
                )
            self._resume()
        else:
            if self.out_dir.is_dir():
                stray = [p.name for p in self.out_dir.iterdir()
                         if SHARD_RE.match(p.name) or p.name in (STATE_FILE, DEFAULT_VECTORS_FILE)]
                if stray:
                    raise SpecmoeError(
                        f"{self.out_dir} holds trace files ({', '.join(sorted(stray)[:3])}...) but no "
                        f"{MANIFEST}; refusing to overwrite them; use another --out"
                    )
        self._check_disk(expected_bytes)
        if not manifest_path.exists():
            self.out_dir.mkdir(parents=True, exist_ok=True)
            self._write_manifest()

    # ---- public

    @property
    def sequences_done(self) -> int:
        """Sequences the trace already covers; the tracer skips that many."""
        return sum(e["sequences"] for e in self._shards) + self._buffered

    @property
    def num_shards(self) -> int:
        return len(self._shards)

    @property
    def bytes_written(self) -> int:
        """Bytes of the trace's data files (listed shards and default vectors)."""
        total = sum(e["bytes"] for e in self._shards)
        if self._default_vectors_entry is not None:
            total += self._default_vectors_entry["bytes"]
        return total

    def add(self, batch: Mapping[str, torch.Tensor],
            state: Callable[[], dict[str, torch.Tensor]] | None = None) -> None:
        """Append a batch of whole sequences (CPU or GPU tensors).  With workers > 0 it
        returns once the batch is queued for copying; full shards are written meanwhile."""
        self._raise_failure()
        if self.complete or self._closed_short:
            raise SpecmoeError(f"the trace at {self.out_dir} is already complete; it takes no more sequences")
        n_seq = self._check_batch(batch)
        if state is not None:
            self._last_state_fn = state
        if n_seq == 0:
            return
        sources = {key: self._source(key, t) for key, t in batch.items()}  # keys checked above
        straddled = False
        off = 0
        L = self.seq_len
        while off < n_seq:
            if self._cur is None:
                self._cur = self._acquire(pinned=any(isinstance(t, torch.Tensor) and t.is_cuda
                                                     for t in sources.values()))
            take = min(n_seq - off, self.sequences_per_shard - self._buffered)
            self._cur.fill(sources, off * L, (off + take) * L, self._buffered * L, (self._buffered + take) * L)
            self._buffered += take
            off += take
            if self._buffered == self.sequences_per_shard:
                # a shard ending inside the batch: the state must also carry the rows after it
                ends_inside = off < n_seq
                self._submit(with_state=not ends_inside)
                straddled |= ends_inside
        if straddled:
            self._drain()
            if self._cur is not None:
                self._cur.wait()
            self._write_state(self._take_state(), pending=self._cur)
            self._write_manifest()

    def close(self, default_vectors: Mapping[str, torch.Tensor]) -> None:
        """Flush the final partial shard, write default vectors, mark the trace complete."""
        if self.complete:
            return
        self._raise_failure()
        tensors = self._check_default_vectors(default_vectors)
        if self._buffered:
            self._submit(with_state=True)
        self._drain()
        path = self.out_dir / DEFAULT_VECTORS_FILE
        sha, nbytes = st.save_tensors(path, tensors, dict(_SHARD_METADATA))
        self._default_vectors_entry = {"file": DEFAULT_VECTORS_FILE, "sha256": sha, "bytes": nbytes}
        self.complete = True
        self._write_manifest()
        self._release_memory()

    def stop(self) -> None:
        """After an interruption: finish the shards being written (they are complete and
        get committed), drop the partial one, free the buffers.  --resume goes on from there."""
        try:
            self._drain(raise_failure=False)
        finally:
            self._release_memory()

    # ---- concurrent shard writing

    def _layout(self) -> tuple[dict[str, tuple[int, ...]], dict[str, torch.dtype]]:
        rows = self.sequences_per_shard * self.seq_len
        d = self._dims
        shapes: dict[str, tuple[int, ...]] = {"token_ids": (rows,)}
        for l in self.layers:
            shapes[layer_key(l, "residual")] = (rows, d["hidden_size"])
            shapes[layer_key(l, "router_logits")] = (rows, d["num_experts"])
            shapes[layer_key(l, "topk_ids")] = (rows, d["top_k"])
            shapes[layer_key(l, "topk_weights")] = (rows, d["top_k"])
        return shapes, {key: self._key_dtype(key) for key in shapes}

    def _acquire(self, pinned: bool) -> _ShardBuffer:
        """A free shard buffer; blocks while all are being written (the disk sets the pace)."""
        with self._cond:
            if not self._n_buffers:
                shapes, dtypes = self._layout()
                nbytes = sum(math.prod(shapes[k]) * dtypes[k].itemsize for k in shapes)
                self._n_buffers = _buffer_count(self.workers, nbytes)
            while True:
                if self._failed is not None:
                    raise self._failed
                if self._free:
                    return self._free.pop()
                if self._n_buffers > 0:
                    self._n_buffers -= 1  # counts buffers still to be made
                    break
                self._cond.wait(timeout=1.0)
        return _ShardBuffer(*self._layout(), pinned=pinned)

    def _submit(self, with_state: bool) -> None:
        """Hand the full (or final) buffer to writing; the commit adds it to the manifest."""
        buf, sequences = self._cur, self._buffered
        state = self._take_state() if with_state else None
        index = self._submitted
        if index == 0:
            self._listed_before = len(self._shards)  # shards of an earlier run, on --resume
        self._submitted += 1
        self._cur, self._buffered = None, 0
        if sequences < self.sequences_per_shard:
            self._closed_short = True
        if self._executor is None:
            self._write_and_commit(index, buf, sequences, state, with_state)
            self._raise_failure()
        else:
            self._jobs.append(self._executor.submit(self._write_and_commit, index, buf, sequences, state, with_state))

    def _take_state(self) -> tuple[dict[str, torch.Tensor], list] | None:
        """The caller's accumulators now, as host copies (GPU ones arrive asynchronously)."""
        if self._last_state_fn is None:
            return None
        tensors = {}
        for name, t in dict(self._last_state_fn()).items():
            if not isinstance(t, torch.Tensor):
                raise SpecmoeError(f"state()[{name!r}] is not a tensor")
            if name.startswith(_PENDING_PREFIX):
                raise SpecmoeError(f"state tensor names may not start with {_PENDING_PREFIX!r}")
            tensors[name] = t
        return snapshot_to_host(tensors)

    def _write_and_commit(self, index: int, buf: _ShardBuffer, sequences: int, state, with_state: bool) -> None:
        try:
            buf.wait()
            tokens = sequences * self.seq_len
            path = self.out_dir / shard_name(self._listed_before + index)
            sha, nbytes = st.save_tensors(path, {k: t[:tokens] for k, t in buf.tensors.items()},
                                               dict(_SHARD_METADATA), self.fsync)
            entry = {"file": path.name, "sequences": sequences, "tokens": tokens, "sha256": sha, "bytes": nbytes}
            with self._cond:
                # shards before a failed one are still committed; those after it never are
                while self._committed != index and not self._failed_before(index):
                    self._cond.wait()
                if self._failed_before(index):
                    return
                self._shards.append(entry)
                if with_state:
                    self._write_state(state)
                    self._write_manifest()
                self._committed += 1
                self._cond.notify_all()
        except BaseException as err:  # noqa: BLE001 - re-raised on the caller's thread
            with self._cond:
                if self._failed is None or index < self._failed_index:
                    self._failed, self._failed_index = err, index
                self._cond.notify_all()
        finally:
            with self._cond:
                self._free.append(buf)
                self._cond.notify_all()

    def _failed_before(self, index: int) -> bool:
        return self._failed is not None and self._failed_index < index

    def _drain(self, raise_failure: bool = True) -> None:
        for job in self._jobs:
            job.result()
        self._jobs = []
        if raise_failure:
            self._raise_failure()

    def _raise_failure(self) -> None:
        if self._failed is not None:
            raise self._failed

    def _release_memory(self) -> None:
        self._cur, self._free = None, []
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    # ---- checks

    @staticmethod
    def _check_layers(layers: Iterable[int]) -> list[int]:
        out = []
        for layer in layers:
            if isinstance(layer, bool) or not isinstance(layer, int) or layer < 0:
                raise SpecmoeError(f"traced layers must be non-negative ints, got {layer!r}")
            out.append(int(layer))
        if not out:
            raise SpecmoeError("no layers to trace")
        if len(set(out)) != len(out):
            raise SpecmoeError(f"traced layers contain duplicates: {out}")
        return sorted(out)

    def _check_reserved(self, meta: dict) -> None:
        own = {"seq_len": self.seq_len, "store_dtype": self.store_dtype, "layers": self.layers,
               "sequences_per_shard": self.sequences_per_shard}
        for key in list(meta):
            if key not in _RESERVED_KEYS:
                continue
            if key in own and (normalize_store_dtype(meta[key]) if key == "store_dtype" else meta[key]) == own[key]:
                del meta[key]  # harmless repetition of an argument
                continue
            raise SpecmoeError(f"trace metadata may not set {key!r}; the writer owns that field")

    def _check_disk(self, expected_bytes: int | None) -> None:
        if expected_bytes is None:
            return
        remaining = int(expected_bytes) - self.bytes_written
        if remaining <= 0:
            return
        probe = self.out_dir
        while not probe.exists() and probe != probe.parent:
            probe = probe.parent
        free = shutil.disk_usage(probe).free
        if free < remaining:
            raise SpecmoeError(
                f"not enough disk space for the trace in {self.out_dir}: it needs about "
                f"{human_bytes(remaining)} more but only {human_bytes(free)} is free "
                "(free space, pick another --out, trace fewer tokens, or use a smaller --store-dtype)"
            )

    def _check_batch(self, batch: Mapping[str, torch.Tensor]) -> int:
        if "token_ids" not in batch:
            raise SpecmoeError("trace batch lacks 'token_ids'")
        tok = batch["token_ids"]
        if tok.dim() != 1 or tok.shape[0] % self.seq_len:
            raise SpecmoeError(
                f"trace batch 'token_ids' must be 1-D with a multiple of seq_len={self.seq_len} "
                f"tokens, got shape {tuple(tok.shape)}"
            )
        n = tok.shape[0]
        expected = {"token_ids"} | {layer_key(l, f) for l in self.layers for f in FIELDS}
        missing = sorted(expected - set(batch))
        extra = sorted(set(batch) - expected)
        if missing or extra:
            raise SpecmoeError(
                f"trace batch keys do not match traced layers {self.layers}: "
                f"missing {missing[:4]}{'...' if len(missing) > 4 else ''}, "
                f"unexpected {extra[:4]}{'...' if len(extra) > 4 else ''}"
            )
        dims = dict(self._dims) if self._dims else {}
        for l in self.layers:
            for field, dim_name in (("residual", "hidden_size"), ("router_logits", "num_experts"),
                                    ("topk_ids", "top_k"), ("topk_weights", "top_k")):
                t = batch[layer_key(l, field)]
                if t.dim() != 2 or t.shape[0] != n:
                    raise SpecmoeError(
                        f"trace batch {layer_key(l, field)!r} must be [{n}, {dim_name}], got {tuple(t.shape)}"
                    )
                want = dims.get(dim_name, self._model.get(dim_name))
                if want is not None and t.shape[1] != want:
                    raise SpecmoeError(
                        f"trace batch {layer_key(l, field)!r} has {dim_name}={t.shape[1]}, expected {want}"
                    )
                dims[dim_name] = int(t.shape[1])
        if self._dims is None:
            self._dims = dims
            for key, value in dims.items():
                self._model.setdefault(key, value)  # make the manifest self-describing
        return n // self.seq_len

    def _check_default_vectors(self, dv: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        dv = dict(dv or {})
        E = self._model.get("num_experts")
        H = self._model.get("hidden_size")
        out: dict[str, torch.Tensor] = {}
        for l in self.layers:
            for field, dtype in zip(DEFAULT_VECTOR_FIELDS, (torch.float32, torch.int64, torch.int64)):
                key = layer_key(l, field)
                if key not in dv:
                    raise SpecmoeError(f"close() needs {key!r} for every traced layer")
                t = dv.pop(key).detach().to(device="cpu", dtype=dtype).contiguous().clone()
                want = (E, H) if field == "default_vectors" else (E,)
                if t.dim() != len(want) or any(w is not None and s != w for s, w in zip(t.shape, want)):
                    raise SpecmoeError(f"close(): {key!r} has shape {tuple(t.shape)}, expected {want}")
                out[key] = t
        if dv:
            raise SpecmoeError(f"close(): unexpected default-vector keys {sorted(dv)[:4]}")
        return out

    # ---- buffering and writing

    def _key_dtype(self, key: str) -> torch.dtype:
        if key == "token_ids":
            return torch.int32
        field = key.rsplit(".", 1)[1]
        return _FIXED_DTYPES.get(field, self._torch_dtype)

    def _source(self, key: str, t: torch.Tensor) -> torch.Tensor | np.ndarray:
        """What add() copies into the shard buffer.  A CPU tensor of the stored dtype (what
        the tracer hands over) becomes a numpy view, copied by np.copyto: one plain memcpy
        that releases the GIL.  torch's copy_ splits large copies over its intra-op
        threads, which on busy cores crawled (0.4 GB/s against 14 GB/s for np.copyto on a
        shared 2-core machine).  Anything else is converted on its own device first (halves
        a GPU->CPU copy for bf16) and copied by torch."""
        want = self._key_dtype(key)
        if t.dtype != want or t.requires_grad:
            t = t.detach().to(dtype=want)
        if t.device.type == "cpu":
            try:
                return _as_numpy(t)
            except (RuntimeError, TypeError):  # e.g. tensors numpy cannot view
                pass
        return t

    def _write_state(self, state, pending: _ShardBuffer | None = None) -> None:
        """state.safetensors: the caller's accumulators (a _take_state() snapshot) and the
        sequences added beyond the last listed shard (rows [0, self._buffered) of `pending`)."""
        tensors: dict[str, torch.Tensor] = {}
        if state is not None:
            host, events = state
            wait(events)
            tensors.update(host)
        pending_sequences = self._buffered if pending is not None else 0
        if pending_sequences:
            for key, t in pending.tensors.items():
                tensors[_PENDING_PREFIX + key] = t[:pending_sequences * self.seq_len]
        metadata = {
            "format": "pt",
            _STATE_META_SHARDS: json.dumps(self._shards, separators=(",", ":")),
            _STATE_META_PENDING: str(pending_sequences),
        }
        path = self.out_dir / STATE_FILE
        sha, nbytes = st.save_tensors(path, tensors, metadata, self.fsync)
        self._state_entry = {
            "file": STATE_FILE, "sha256": sha, "bytes": nbytes,
            "shards": len(self._shards), "pending_sequences": pending_sequences,
        }

    def _manifest(self) -> dict:
        manifest: dict[str, Any] = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "model": self._model,
            "dataset": self._dataset,
            "seq_len": self.seq_len,
            "store_dtype": self.store_dtype,
            "layers": self.layers,
            "sequences_per_shard": self.sequences_per_shard,
            "shards": self._shards,
            "complete": self.complete,
        }
        if self._state_entry is not None:
            manifest["state"] = self._state_entry
        if self._default_vectors_entry is not None:
            manifest["default_vectors"] = self._default_vectors_entry
        for key, value in self._extra.items():
            manifest.setdefault(key, value)
        return manifest

    def _write_manifest(self) -> None:
        # the complete trace's manifest is always forced to disk; per-shard ones follow --no-fsync
        st.write_text(self.out_dir / MANIFEST, json.dumps(self._manifest(), indent=2) + "\n",
                           fsync=self.fsync or self.complete)

    # ---- resume

    def _resume(self) -> None:
        d = self.out_dir
        manifest = read_manifest(d)
        self._check_matches(manifest)
        # keep the manifest's descriptive fields, let new extras override old ones
        self._model = {**manifest.get("model", {}), **self._model}
        self._dataset = manifest.get("dataset", {}) or self._dataset
        old_extra = {k: v for k, v in manifest.items()
                     if k not in _RESERVED_KEYS and k not in ("model", "dataset")}
        self._extra = {**old_extra, **self._extra}
        self._shards = [dict(e) for e in manifest["shards"]]
        self._state_entry = manifest.get("state")
        self._default_vectors_entry = manifest.get("default_vectors")
        self.complete = bool(manifest.get("complete", False))

        for entry in self._shards:
            _check_sha(d, entry)

        for p in d.iterdir():
            if p.name.endswith(TMP_SUFFIX) and p.is_file() and (
                SHARD_RE.match(p.name[: -len(TMP_SUFFIX)])
                or p.name[: -len(TMP_SUFFIX)] in (MANIFEST, STATE_FILE, DEFAULT_VECTORS_FILE)
            ):
                p.unlink()

        state_path = d / STATE_FILE
        adopted = False
        if state_path.exists():
            try:
                with safe_open(str(state_path), framework="pt") as f:
                    meta = f.metadata() or {}
                    raw = {k: f.get_tensor(k) for k in f.keys()}
                state_shards = json.loads(meta[_STATE_META_SHARDS])
                pending = int(meta[_STATE_META_PENDING])
            except Exception as err:  # noqa: BLE001 - any parse failure means a damaged file
                raise CorruptFileError(f"{state_path} cannot be read ({err}); the trace state is damaged") from None
            n_m = len(self._shards)
            if not isinstance(state_shards, list) or state_shards[:n_m] != self._shards:
                raise CorruptFileError(f"{state_path} does not belong with the shards listed in {MANIFEST}")
            if len(state_shards) == n_m:
                entry = self._state_entry
                if entry is not None and st.sha256_file(state_path) != entry.get("sha256"):
                    raise CorruptFileError(f"{state_path} does not match its sha256 in {MANIFEST} (file is damaged)")
            else:
                # killed after the state was written but before the manifest: adopt the
                # shards the state already covers (they were renamed into place first)
                for entry in state_shards[n_m:]:
                    _check_sha(d, entry)
                self._shards = state_shards
                self._state_entry = {
                    "file": STATE_FILE, "sha256": st.sha256_file(state_path),
                    "bytes": state_path.stat().st_size, "shards": len(state_shards),
                    "pending_sequences": pending,
                }
                adopted = True
            caller = {k: v for k, v in raw.items() if not k.startswith(_PENDING_PREFIX)}
            self.state = caller or None
            pend = {k[len(_PENDING_PREFIX):]: v for k, v in raw.items() if k.startswith(_PENDING_PREFIX)}
            if pending:
                self._restore_pending(pend, pending, state_path)
        elif self._shards:
            raise CorruptFileError(f"{state_path} is missing; the trace cannot be resumed")

        if self._shards and self._shards[-1]["sequences"] < self.sequences_per_shard:
            self._closed_short = True

        # unlisted shard files are leftovers of an interrupted write; they would be
        # rewritten with the same name anyway
        for p in d.iterdir():
            m = SHARD_RE.match(p.name)
            if m and int(m.group(1)) >= len(self._shards) and p.is_file():
                p.unlink()
        if adopted:
            self._write_manifest()

    def _restore_pending(self, pend: dict[str, torch.Tensor], sequences: int, path: Path) -> None:
        tokens = sequences * self.seq_len
        expected = {"token_ids"} | {layer_key(l, f) for l in self.layers for f in FIELDS}
        if set(pend) != expected or any(t.shape[0] != tokens for t in pend.values()):
            raise CorruptFileError(f"{path} holds an inconsistent set of pending sequences")
        self._dims = {
            "hidden_size": int(pend[layer_key(self.layers[0], "residual")].shape[1]),
            "num_experts": int(pend[layer_key(self.layers[0], "router_logits")].shape[1]),
            "top_k": int(pend[layer_key(self.layers[0], "topk_ids")].shape[1]),
        }
        self._cur = self._acquire(pinned=False)
        for key, t in pend.items():
            self._cur.tensors[key][:tokens].copy_(t)
        self._buffered = sequences

    def _check_matches(self, manifest: dict) -> None:
        problems = []
        old_model = manifest.get("model", {}) or {}
        for key in ("id", "family", "revision", "hidden_size", "num_experts", "top_k", "moe_layers"):
            a, b = old_model.get(key), self._model.get(key)
            if a is not None and b is not None and a != b:
                problems.append(f"model {key} {a!r} vs {b!r}")
        old_ds = dict(manifest.get("dataset", {}) or {})
        if isinstance(old_ds.get("spec"), str):  # written as an absolute path by earlier versions
            old_ds["spec"] = display_path(old_ds["spec"])
        if old_ds != self._dataset:
            problems.append(f"dataset {old_ds!r} vs {self._dataset!r}")
        for key, mine in (("layers", self.layers), ("seq_len", self.seq_len),
                          ("store_dtype", self.store_dtype),
                          ("sequences_per_shard", self.sequences_per_shard)):
            theirs = manifest.get(key)
            if key == "layers" and isinstance(theirs, list):
                theirs = sorted(theirs)
            if theirs != mine:
                problems.append(f"{key} {theirs!r} vs {mine!r}")
        if problems:
            raise MismatchError(
                f"cannot resume the trace in {self.out_dir}: it was made with different settings "
                f"(on disk vs now: {'; '.join(problems)}); use another --out"
            )


# --------------------------------------------------------------------------- reader


class TraceReader:
    """Reads a trace directory lazily: only the shards and tensors asked for."""

    def __init__(self, path: str | os.PathLike, verify: bool = False) -> None:
        self.path = Path(path)
        self.manifest = read_manifest(self.path)
        m = self.manifest
        self.layers: list[int] = [int(l) for l in m["layers"]]
        self.seq_len: int = int(m["seq_len"])
        self.store_dtype: str = m["store_dtype"]
        self.sequences_per_shard: int = int(m["sequences_per_shard"])
        self.complete: bool = bool(m.get("complete", False))
        self._shards: list[dict] = m["shards"]
        self._first_seq: list[int] = []
        first = 0
        for entry in self._shards:
            _check_size(self.path, entry)
            self._first_seq.append(first)
            first += int(entry["sequences"])
        self.num_sequences: int = first
        self.num_tokens: int = sum(int(e["tokens"]) for e in self._shards)
        self.num_shards: int = len(self._shards)
        model = m.get("model", {}) or {}
        self.hidden_size: int = self._dim(model, "hidden_size", "residual")
        self.num_experts: int = self._dim(model, "num_experts", "router_logits")
        self.top_k: int = self._dim(model, "top_k", "topk_ids")
        if verify:
            self.verify()

    def __repr__(self) -> str:
        return (f"TraceReader({str(self.path)!r}, shards={self.num_shards}, tokens={self.num_tokens}, "
                f"layers={self.layers}, complete={self.complete})")

    def _dim(self, model: dict, key: str, field: str) -> int | None:
        if model.get(key) is not None:
            return int(model[key])
        if not self._shards:
            return None
        with safe_open(str(self.path / self._shards[0]["file"]), framework="pt") as f:
            return int(f.get_slice(layer_key(self.layers[0], field)).get_shape()[1])

    # ---- integrity

    def verify(self) -> None:
        """Full checksum pass over every shard (and the default vectors, if written)."""
        for entry in self._shards:
            _check_sha(self.path, entry)
        dv = self.manifest.get("default_vectors")
        if dv is not None:
            _check_sha(self.path, dv)

    # ---- shard bookkeeping

    def _shard_list(self, shards: Iterable[int] | None) -> list[int]:
        if shards is None:
            return list(range(self.num_shards))
        out = []
        for i in shards:
            i = int(i)
            if not 0 <= i < self.num_shards:
                raise SpecmoeError(f"shard {i} does not exist; the trace at {self.path} has {self.num_shards}")
            out.append(i)
        return out

    def shard_sequences(self, i: int) -> range:
        (i,) = self._shard_list([i])
        first = self._first_seq[i]
        return range(first, first + int(self._shards[i]["sequences"]))

    def _check_layer(self, layer: int) -> None:
        if layer not in self.layers:
            raise SpecmoeError(f"layer {layer} was not traced; the trace at {self.path} holds layers {self.layers}")

    @staticmethod
    def _fields(fields: str | Sequence[str]) -> tuple[str, ...]:
        fields = (fields,) if isinstance(fields, str) else tuple(fields)
        for f in fields:
            if f not in FIELDS:
                raise SpecmoeError(f"unknown trace field {f!r}; fields are {', '.join(FIELDS)}")
        return fields

    def _read(self, keys: Sequence[str], shards: list[int]) -> dict[str, torch.Tensor]:
        """Concatenate `keys` over `shards`, opening each shard once and reading only those tensors."""
        total = sum(int(self._shards[i]["tokens"]) for i in shards)
        out: dict[str, torch.Tensor] = {}
        row = 0
        for i in shards:
            n = int(self._shards[i]["tokens"])
            path = self.path / self._shards[i]["file"]
            try:
                with safe_open(str(path), framework="pt") as f:
                    for key in keys:
                        t = f.get_tensor(key)
                        if key not in out:
                            out[key] = torch.empty((total, *t.shape[1:]), dtype=t.dtype)
                        out[key][row:row + n].copy_(t)
            except SpecmoeError:
                raise
            except Exception as err:  # noqa: BLE001 - a shard safetensors cannot parse is damaged
                raise CorruptFileError(f"{path} cannot be read ({err})") from None
            row += n
        if not shards:
            for key in keys:
                out[key] = self._empty(key)
        return out

    def _empty(self, key: str) -> torch.Tensor:
        if key == "token_ids":
            return torch.empty(0, dtype=torch.int32)
        field = key.rsplit(".", 1)[1]
        width = {"residual": self.hidden_size, "router_logits": self.num_experts}.get(field, self.top_k) or 0
        dtype = _FIXED_DTYPES.get(field, _STORE_DTYPES.get(self.store_dtype, torch.float32))
        return torch.empty((0, width), dtype=dtype)

    # ---- data access

    def layer(self, l: int, fields: str | Sequence[str] = FIELDS,
              shards: Iterable[int] | None = None) -> dict[str, torch.Tensor]:
        self._check_layer(l)
        fields = self._fields(fields)
        data = self._read([layer_key(l, f) for f in fields], self._shard_list(shards))
        return {f: data[layer_key(l, f)] for f in fields}

    def pair(self, l: int, target: int,
             fields_src: str | Sequence[str] = ("residual",),
             fields_dst: str | Sequence[str] = ("topk_ids", "topk_weights"),
             shards: Iterable[int] | None = None) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Layer `l` and layer `target`, aligned token by token (row i of both is the same token)."""
        self._check_layer(l)
        self._check_layer(target)
        fields_src, fields_dst = self._fields(fields_src), self._fields(fields_dst)
        keys = list(dict.fromkeys([layer_key(l, f) for f in fields_src] + [layer_key(target, f) for f in fields_dst]))
        data = self._read(keys, self._shard_list(shards))
        return ({f: data[layer_key(l, f)] for f in fields_src},
                {f: data[layer_key(target, f)] for f in fields_dst})

    def token_ids(self, shards: Iterable[int] | None = None) -> torch.Tensor:
        return self._read(["token_ids"], self._shard_list(shards))["token_ids"]

    def sequence_ids(self, shards: Iterable[int] | None = None) -> torch.Tensor:
        parts = [
            self._first_seq[i] + torch.arange(int(self._shards[i]["tokens"]), dtype=torch.int64) // self.seq_len
            for i in self._shard_list(shards)
        ]
        return torch.cat(parts) if parts else torch.empty(0, dtype=torch.int64)

    def iter_shards(self, layers: Iterable[int] | None = None, fields: str | Sequence[str] = FIELDS,
                    shards: Iterable[int] | None = None) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
        layers = self.layers if layers is None else list(layers)
        for l in layers:
            self._check_layer(l)
        fields = self._fields(fields)
        keys = ["token_ids"] + [layer_key(l, f) for l in layers for f in fields]
        for i in self._shard_list(shards):
            yield i, self._read(keys, [i])

    # ---- default vectors

    def _default_vector_file(self) -> dict[str, torch.Tensor]:
        entry = self.manifest.get("default_vectors")
        if entry is None:
            raise SpecmoeError(
                f"the trace at {self.path} has no default vectors (the tracer did not finish; rerun it with --resume)"
            )
        path = _check_size(self.path, entry)
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}

    def _default_field(self, field: str) -> dict[int, torch.Tensor]:
        data = self._default_vector_file()
        return {l: data[layer_key(l, field)] for l in self.layers}

    def default_vectors(self) -> dict[int, torch.Tensor]:
        return self._default_field("default_vectors")

    def expert_counts(self) -> dict[int, torch.Tensor]:
        return self._default_field("expert_counts")

    def default_vector_tokens(self) -> dict[int, torch.Tensor]:
        return self._default_field("default_vector_tokens")


__all__ = [
    "FORMAT_NAME", "FORMAT_VERSION", "FIELDS", "TraceWriter", "TraceReader", "estimate_trace_bytes",
    "shard_name", "layer_key", "human_bytes", "normalize_store_dtype",
]
