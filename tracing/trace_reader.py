"""Reading a trace lazily: only the shards and tensors asked for (the format: tracing.trace_format)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import torch
from safetensors import safe_open

from specmoe.errors import CorruptFileError, SpecmoeError

from .trace_format import FIELDS, FIXED_DTYPES, STORE_DTYPES, check_sha, check_size, layer_key, read_manifest


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
            check_size(self.path, entry)
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
            check_sha(self.path, entry)
        dv = self.manifest.get("default_vectors")
        if dv is not None:
            check_sha(self.path, dv)

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
        dtype = FIXED_DTYPES.get(field, STORE_DTYPES.get(self.store_dtype, torch.float32))
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
        path = check_size(self.path, entry)
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
