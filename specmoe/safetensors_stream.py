"""safetensors files written fast and atomically.

A trace shard is one large block of memory laid out like the file's data. It is
streamed to disk with writev straight from that memory (no serialised copy of
the file is ever built) while another thread hashes the same bytes, and it is
written under a temporary name and renamed into place when complete. The bytes
equal what `safetensors.torch.save` writes for the same tensors.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import torch
from safetensors.torch import save

TMP_SUFFIX = ".tmp"
_HASH_CHUNK = 8 << 20


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            chunk = f.read(_HASH_CHUNK)
            if not chunk:
                break
            h.update(chunk)
    return h.hexdigest()


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # not supported on every platform
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# one hashing thread per shard being written (shards are written concurrently)
_HASHER = ThreadPoolExecutor(max_workers=8, thread_name_prefix="trace-sha256")

# torch dtype -> (safetensors dtype name, rank).  safetensors lays tensors out by
# descending rank, then by name; the rank follows the order of its `Dtype` enum
# (increasing alignment: BOOL < U8 < I8 < I16 < F16 < BF16 < I32 < F32 < F64 < I64).
# Dtypes missing here are written by safetensors itself (see save_tensors).
_ST_DTYPES: dict[torch.dtype, tuple[str, int]] = {
    torch.bool: ("BOOL", 0),
    torch.uint8: ("U8", 4),
    torch.int8: ("I8", 5),
    torch.int16: ("I16", 11),
    torch.float16: ("F16", 13),
    torch.bfloat16: ("BF16", 14),
    torch.int32: ("I32", 15),
    torch.float32: ("F32", 17),
    torch.float64: ("F64", 19),
    torch.int64: ("I64", 20),
}
_IOV_MAX = 1024  # POSIX minimum for writev(); Linux allows exactly this many


def safetensors_order(specs: Iterable[tuple[str, torch.dtype]]) -> list[str]:
    """Names in the order safetensors stores them: descending dtype rank, then name
    (Python's str order equals Rust's byte order of the UTF-8 names)."""
    return [name for name, dt in sorted(specs, key=lambda s: (-_ST_DTYPES[s[1]][1], s[0]))]


def safetensors_header(entries: Sequence[tuple[str, torch.dtype, Sequence[int], int, int]],
               metadata: Mapping[str, str] | None) -> bytes:
    """The 8-byte length prefix and the JSON header of a safetensors file, byte for byte
    as safetensors writes them: compact JSON (serde_json spelling: no spaces, non-ASCII
    kept as UTF-8), "__metadata__" first, then each tensor's dtype/shape/data_offsets in
    file order, padded with spaces to a multiple of 8 bytes.  safetensors emits several
    metadata keys in hash-map order (varies between runs); we sort them."""
    parts = []
    if metadata is not None:
        for k, v in metadata.items():
            if not isinstance(k, str) or not isinstance(v, str):
                raise TypeError(f"safetensors metadata must map str to str, got {k!r}: {v!r}")
        parts.append('"__metadata__":' + json.dumps(dict(metadata), ensure_ascii=False,
                                                    separators=(",", ":"), sort_keys=True))
    for name, dtype, shape, begin, stop in entries:
        dims = ",".join(str(int(d)) for d in shape)
        parts.append(f'{json.dumps(name, ensure_ascii=False)}:{{"dtype":"{_ST_DTYPES[dtype][0]}",'
                     f'"shape":[{dims}],"data_offsets":[{begin},{stop}]}}')
    header = ("{" + ",".join(parts) + "}").encode("utf-8")
    header += b" " * (-len(header) % 8)
    return struct.pack("<Q", len(header)) + header


def byte_ranges(tensors: Sequence[torch.Tensor]) -> list[memoryview]:
    """Zero-copy byte views of `tensors` in order, merging neighbours that are adjacent
    in the same storage (a full shard buffer becomes a single view)."""
    runs: list[list] = []  # [storage, first byte, end byte]
    for t in tensors:
        n = t.numel() * t.element_size()
        if n == 0:
            continue
        storage = t.untyped_storage()
        first = t.storage_offset() * t.element_size()
        if runs and runs[-1][0].data_ptr() == storage.data_ptr() and runs[-1][2] == first:
            runs[-1][2] = first + n
        else:
            runs.append([storage, first, first + n])
    views = []
    for storage, first, stop in runs:
        flat = torch.empty(0, dtype=torch.uint8).set_(storage, first, (stop - first,))
        views.append(memoryview(flat.numpy()))  # the view keeps the array, the array the storage
    return views


def _write_all(fd: int, views: Sequence[memoryview]) -> None:
    """writev() the views completely (the GIL is released during each call)."""
    pending = [v for v in views if v.nbytes]
    while pending:
        group = pending[:_IOV_MAX]
        n = os.writev(fd, group)
        if n <= 0:
            raise OSError(f"writev wrote {n} bytes")
        i = 0
        while i < len(group) and n >= group[i].nbytes:
            n -= group[i].nbytes
            i += 1
        pending = pending[i:]
        if n:
            pending[0] = pending[0][n:]


def _sha256_views(views: Sequence[memoryview]) -> str:
    h = hashlib.sha256()
    for v in views:
        h.update(v)  # releases the GIL for large buffers
    return h.hexdigest()


def _can_stream(tensors: Mapping[str, torch.Tensor]) -> bool:
    return sys.byteorder == "little" and all(
        t.dtype in _ST_DTYPES and t.device.type == "cpu" and t.is_contiguous() for t in tensors.values()
    )


def save_tensors(path: Path, tensors: Mapping[str, torch.Tensor], metadata: dict[str, str] | None,
                         fsync: bool = True) -> tuple[str, int]:
    """Write tensors in safetensors format under a temporary name, then rename; return
    (sha256, bytes).

    The file is streamed: our own header, then the tensors' bytes written straight from
    their memory with writev (no serialised copy of the file is ever built), while another
    thread hashes the same bytes; both release the GIL.  The bytes equal what
    safetensors.torch.save gives for the same tensors and metadata (metadata with more
    than one key aside: safetensors orders those arbitrarily, we sort them).  Without fsync
    the file is safe against a killed process but not a power cut; the checksums in the
    manifest catch a file damaged either way."""
    tmp = path.with_name(path.name + TMP_SUFFIX)
    if not _can_stream(tensors):  # unusual dtypes or memory: let safetensors serialise
        data = save(dict(tensors), metadata=metadata)
        views = [memoryview(data)]
    else:
        order = safetensors_order((name, t.dtype) for name, t in tensors.items())
        entries, offset = [], 0
        for name in order:
            t = tensors[name]
            n = t.numel() * t.element_size()
            entries.append((name, t.dtype, t.shape, offset, offset + n))
            offset += n
        views = [memoryview(safetensors_header(entries, metadata))] + byte_ranges([tensors[name] for name in order])
    digest = _HASHER.submit(_sha256_views, views)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0), 0o666)
        try:
            _write_all(fd, views)
            if fsync:
                os.fsync(fd)  # overlaps with the hashing still under way
        finally:
            os.close(fd)
    finally:
        sha = digest.result()  # never leave the hasher reading memory the caller may reuse
    os.replace(tmp, path)
    if fsync:
        fsync_dir(path.parent)
    return sha, sum(v.nbytes for v in views)


def write_text(path: Path, text: str, fsync: bool = True) -> None:
    tmp = path.with_name(path.name + TMP_SUFFIX)
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        if fsync:
            os.fsync(f.fileno())
    os.replace(tmp, path)
    if fsync:
        fsync_dir(path.parent)
