"""Writing a trace, shard by shard, while the model runs (the format: tracing.trace_format).

Batches are copied into one block of (pinned) memory per shard; full shards are written
and checksummed by worker threads and committed to the manifest strictly in order, so
the tracing thread only waits when the disk falls behind.  Resuming and growing a trace
go through tracing.trace_recovery.

Shard bytes are deterministic: the same inputs give byte-identical files, the ones
safetensors' own save() makes (the writer builds the header itself and streams the
tensor bytes from its buffer; see specmoe/safetensors_stream.py).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import numpy as np
import torch

from specmoe import safetensors_stream as st
from specmoe.errors import SpecmoeError
from .host_copies import copy_to_host, pinned_empty, snapshot_to_host, wait

from .trace_format import (DEFAULT_VECTOR_FIELDS, DEFAULT_VECTORS_FILE, FORMAT_NAME, FORMAT_VERSION,
                           MANIFEST, PENDING_PREFIX, RESERVED_KEYS, SHARD_METADATA, STATE_FILE, STATE_META_PENDING,
                           STATE_META_SHARDS, human_bytes, key_dtype, layer_key,
                           normalize_store_dtype, read_manifest, shard_keys, shard_name, trace_files_in)
from .trace_recovery import mismatch_error, recover, settings_mismatch


def _json_roundtrip(obj: Any, what: str) -> Any:
    try:
        return json.loads(json.dumps(obj))
    except (TypeError, ValueError) as err:
        raise SpecmoeError(f"{what} is not JSON-serialisable: {err}") from None


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


def check_disk_space(out_dir: Path, needed: int) -> None:
    """Refuse when the file system of `out_dir` (or of its nearest existing parent) has
    fewer than `needed` bytes free."""
    if needed <= 0:
        return
    probe = Path(out_dir)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < needed:
        raise SpecmoeError(
            f"not enough disk space for the trace in {out_dir}: it needs about "
            f"{human_bytes(needed)} more but only {human_bytes(free)} is free "
            "(free space, pick another --out, trace fewer tokens, or use a smaller --store-dtype)"
        )


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
        self._closed_short = False  # this run wrote a short shard: only close() may follow
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
            stray = trace_files_in(self.out_dir)
            if stray:
                raise SpecmoeError(
                    f"{self.out_dir} holds trace files ({', '.join(stray[:3])}...) but no "
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
        sha, nbytes = st.save_tensors(path, tensors, dict(SHARD_METADATA))
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
            if name.startswith(PENDING_PREFIX):
                raise SpecmoeError(f"state tensor names may not start with {PENDING_PREFIX!r}")
            tensors[name] = t
        return snapshot_to_host(tensors)

    def _write_and_commit(self, index: int, buf: _ShardBuffer, sequences: int, state, with_state: bool) -> None:
        try:
            buf.wait()
            tokens = sequences * self.seq_len
            path = self.out_dir / shard_name(self._listed_before + index)
            sha, nbytes = st.save_tensors(path, {k: t[:tokens] for k, t in buf.tensors.items()},
                                               dict(SHARD_METADATA), self.fsync)
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
            if key not in RESERVED_KEYS:
                continue
            if key in own and (normalize_store_dtype(meta[key]) if key == "store_dtype" else meta[key]) == own[key]:
                del meta[key]  # harmless repetition of an argument
                continue
            raise SpecmoeError(f"trace metadata may not set {key!r}; the writer owns that field")

    def _check_disk(self, expected_bytes: int | None) -> None:
        if expected_bytes is not None:
            check_disk_space(self.out_dir, int(expected_bytes) - self.bytes_written)

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
        expected = shard_keys(self.layers)
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
        return key_dtype(key, self.store_dtype)

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
                tensors[PENDING_PREFIX + key] = t[:pending_sequences * self.seq_len]
        metadata = {
            "format": "pt",
            STATE_META_SHARDS: json.dumps(self._shards, separators=(",", ":")),
            STATE_META_PENDING: str(pending_sequences),
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

    # ---- resume and grow

    def _resume(self) -> None:
        manifest = read_manifest(self.out_dir)
        problems = settings_mismatch(manifest, model=self._model, dataset=self._dataset, layers=self.layers,
                                     seq_len=self.seq_len, store_dtype=self.store_dtype,
                                     sequences_per_shard=self.sequences_per_shard)
        if problems:
            raise mismatch_error(self.out_dir, problems)
        # keep the manifest's descriptive fields, let new ones override old ones (the
        # dataset differs at most in its token limit)
        self._model = {**manifest.get("model", {}), **self._model}
        self._dataset = self._dataset or manifest.get("dataset", {})
        old_extra = {k: v for k, v in manifest.items() if k not in RESERVED_KEYS and k not in ("model", "dataset")}
        self._extra = {**old_extra, **self._extra}

        found = recover(self.out_dir, manifest, self.layers, self.seq_len)
        self._shards = found.shards
        self._state_entry = found.state_entry
        self._default_vectors_entry = found.default_vectors_entry
        self.complete = found.complete
        self.state = found.state
        if found.pending_sequences:
            self._restore_pending(found.pending, found.pending_sequences)
        # a short last shard of an earlier run (one that completed, or was killed while
        # completing) may be followed by more shards: the trace grows after it
        if found.adopted:
            self._write_manifest()

    def _restore_pending(self, pending: dict[str, torch.Tensor], sequences: int) -> None:
        first = self.layers[0]
        self._dims = {
            "hidden_size": int(pending[layer_key(first, "residual")].shape[1]),
            "num_experts": int(pending[layer_key(first, "router_logits")].shape[1]),
            "top_k": int(pending[layer_key(first, "topk_ids")].shape[1]),
        }
        self._cur = self._acquire(pinned=False)
        tokens = sequences * self.seq_len
        for key, t in pending.items():
            self._cur.tensors[key][:tokens].copy_(t)
        self._buffered = sequences

    def grow(self) -> None:
        """Reopen a complete trace for more sequences.  The shards it holds stay as they are
        (a short last shard too: the next shard follows it); its default vectors are replaced
        by close(), from the accumulators in `state`, which cover every listed sequence."""
        if not self.complete:
            return
        if self.state is None and self._shards:
            raise SpecmoeError(f"the trace at {self.out_dir} keeps no accumulator state; it cannot grow")
        self.complete = False
        self._default_vectors_entry = None
        self._write_manifest()  # no longer complete: an interrupted growth is resumed like any trace
        (self.out_dir / DEFAULT_VECTORS_FILE).unlink(missing_ok=True)
