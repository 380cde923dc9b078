"""Training and evaluation data for the estimators, read from trace directories.

Memory-light: a trace is read shard by shard (TraceReader.layer(..., shards=[i])),
a few shards at a time (`buffer_mb`), only the fields each layer is needed for:

    source layers  residual, topk_ids, topk_weights   (r_l and the routing that builds d_l)
    target layers  router_logits, topk_ids, topk_weights   (distillation target, metrics)

Train / validation split: by WHOLE sequences, deterministic in (seed, trace index,
number of sequences): a seeded permutation of the sequence ids, the first
ceil(val_fraction * S) of them held out.

Batches are dicts of tensors, pair axis second (pairs in the estimator's order):

    residual      [B, P, H]   store dtype (bf16 by default)
    src_ids       [B, P, k]   long
    src_weights   [B, P, k]   float32
    tgt_logits    [B, P, E]   store dtype
    tgt_ids       [B, P, k]   long
    tgt_weights   [B, P, k]   float32
    prev_ids, prev_weights [B, P, k], has_prev [B]   (with_previous only: the target's
                  routing of the previous token of the same sequence; has_prev is False
                  for the first token of a sequence)

Distribution: the datasets are IterableDatasets that split their batches over
DDP ranks and DataLoader workers themselves ("streams"). Training batches are
shuffled (shard order and tokens within a group of shards, seeded by seed and
epoch) and every stream gets the same number of batches (a group whose batch
count does not divide evenly re-uses its first batches), which DDP requires.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from specmoe.errors import MismatchError, SpecmoeError
from tracing import TraceReader

__all__ = [
    "Source", "PairBatches", "open_traces", "check_same_model", "check_trace_against_model",
    "split_sequences", "merged_default_vectors", "batch_source_state", "make_loader",
]

SRC_FIELDS = ("residual", "topk_ids", "topk_weights")
TGT_FIELDS = ("router_logits", "topk_ids", "topk_weights")
_MODEL_KEYS = ("family", "num_experts", "top_k", "hidden_size")


# ------------------------------------------------------------------------ opening


def open_traces(paths: Sequence[str | Path], verify: bool = False) -> list[TraceReader]:
    """TraceReaders of complete, non-empty traces (SpecmoeError, one line, otherwise)."""
    readers = []
    for p in paths:
        path = Path(p)
        if not path.is_dir():
            raise SpecmoeError(f"trace directory {path} does not exist")
        reader = TraceReader(path, verify=verify)
        if not reader.complete:
            raise SpecmoeError(f"the trace at {path} is incomplete (its tracer did not finish); "
                               "finish it with `trace --resume` first")
        if reader.num_tokens == 0:
            raise SpecmoeError(f"the trace at {path} holds no tokens")
        readers.append(reader)
    if not readers:
        raise SpecmoeError("no trace directories given")
    return readers


def _model_of(reader: TraceReader) -> dict:
    return dict(reader.manifest.get("model") or {})


def check_same_model(readers: Sequence[TraceReader]) -> dict:
    """The manifest model description all `readers` share (MismatchError if they differ).

    The router fingerprint decides: traces whose manifests record the same fingerprint are
    of the same model whatever its id says (a copy in another directory, a hub id against a
    local snapshot). Only where a manifest lacks the fingerprint do the id and revision
    have to agree."""
    first = _model_of(readers[0])
    for r in readers[1:]:
        other = _model_of(r)
        fingerprinted = first.get("fingerprint") is not None and other.get("fingerprint") is not None
        keys = ("fingerprint", *_MODEL_KEYS, "moe_layers") if fingerprinted else \
            ("id", "revision", *_MODEL_KEYS, "moe_layers")
        for key in keys:
            a, b = first.get(key), other.get(key)
            if a is not None and b is not None and a != b:
                what = f"router fingerprint {str(a)[:12]}... vs {str(b)[:12]}..." if key == "fingerprint" \
                    else f"model {key} {a!r} vs {b!r}"
                raise MismatchError(f"traces {readers[0].path} and {r.path} come from different models ({what})")
    return first


def check_trace_against_model(reader: TraceReader, model, family, spec, fingerprint: str | None = None,
                              layers: Sequence[int] | None = None, tokens: int = 256,
                              tolerance: float = 0.1) -> None:
    """MismatchError (one line) unless the trace was made with this model.

    Compares the manifest's family and sizes (and router fingerprint, where the
    manifest records one) with the model's, then recomputes router logits from the
    traced residuals of a few tokens and compares them with the traced logits: a
    trace of another model with the same shapes fails there (relative error near 1
    or above; bf16 storage of the same model stays near 0.01)."""
    m = _model_of(reader)
    where = f"the trace at {reader.path}"
    theirs = {"family": m.get("family"), "num_experts": m.get("num_experts"), "top_k": m.get("top_k"),
              "hidden_size": m.get("hidden_size")}
    mine = {"family": spec.family, "num_experts": spec.num_experts, "top_k": spec.top_k,
            "hidden_size": spec.hidden_size}
    for key, value in theirs.items():
        if value is not None and value != mine[key]:
            raise MismatchError(f"{where} is of another model ({key} {value!r}; this model has {mine[key]!r})")
    if m.get("moe_layers") is not None and list(m["moe_layers"]) != list(spec.moe_layers):
        raise MismatchError(f"{where} is of another model (MoE layers {m['moe_layers']} vs {list(spec.moe_layers)})")
    bad_layers = sorted(set(reader.layers) - set(spec.moe_layers))
    if bad_layers:
        raise MismatchError(f"{where} holds layers {bad_layers} that are not MoE layers of this model")
    if fingerprint is not None and m.get("fingerprint") not in (None, fingerprint):
        raise MismatchError(f"{where} is of another model (router fingerprint {str(m['fingerprint'])[:12]}... "
                            f"vs {fingerprint[:12]}...)")
    _check_logits(reader, model, family, layers, tokens, tolerance, where)


@torch.no_grad()
def _check_logits(reader, model, family, layers, tokens, tolerance, where) -> None:
    from .predictors import _frozen_fp32
    from .quasi import moe_input

    candidates = sorted(set(layers if layers is not None else reader.layers) & set(reader.layers))
    if not candidates:
        return
    picked = sorted({candidates[0], candidates[len(candidates) // 2], candidates[-1]})
    for l in picked:
        data = reader.layer(l, ("residual", "router_logits"), shards=[0])
        r, z = data["residual"][:tokens], data["router_logits"][:tokens].float()
        norm = _frozen_fp32(family.moe_norm(model, l))
        router = _frozen_fp32(family.router(model, l))
        mine = family.router_logits(router, moe_input(norm, r)).float()
        err = float((mine - z).abs().mean() / z.abs().mean().clamp_min(1e-6))
        if not math.isfinite(err) or err > tolerance:
            raise MismatchError(
                f"{where} was not made with this model: router logits recomputed from its residuals "
                f"differ by {err:.2f} (relative) at layer {l}; trace the model you train for, or pass its --model")


def split_sequences(num_sequences: int, val_fraction: float, seed: int, salt: int = 0) -> torch.Tensor:
    """Bool [num_sequences]: True for validation sequences (deterministic)."""
    if num_sequences < 2:
        raise SpecmoeError(f"a trace needs at least 2 sequences to hold some out for validation "
                           f"(it has {num_sequences}); trace more text")
    n_val = min(num_sequences - 1, max(1, math.ceil(val_fraction * num_sequences)))
    gen = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(salt))
    perm = torch.randperm(num_sequences, generator=gen)
    mask = torch.zeros(num_sequences, dtype=torch.bool)
    mask[perm[:n_val]] = True
    return mask


def merged_default_vectors(readers: Sequence[TraceReader], layers: Sequence[int]) -> dict[int, torch.Tensor]:
    """D_l per layer, averaged over traces weighted by the tokens each trace computed it from."""
    sums: dict[int, torch.Tensor] = {}
    counts: dict[int, torch.Tensor] = {}
    for r in readers:
        dv, n = r.default_vectors(), r.default_vector_tokens()
        for l in layers:
            w = n[l].double().unsqueeze(1)
            sums[l] = sums.get(l, 0) + dv[l].double() * w
            counts[l] = counts.get(l, 0) + w
    return {l: (sums[l] / counts[l].clamp(min=1)).float() for l in layers}


# ------------------------------------------------------------------------ datasets


@dataclass(frozen=True)
class Source:
    """One trace and which of its sequences to use (None: all)."""

    path: str
    sequences: torch.Tensor | None = None   # bool [num_sequences]


def _rank_world(distributed: bool = True) -> tuple[int, int]:
    if distributed and torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _streams(distributed: bool = True) -> tuple[int, int]:
    """(this stream's index, number of streams) over DDP ranks x DataLoader workers."""
    rank, world = _rank_world(distributed)
    info = get_worker_info()
    wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
    return rank * nw + wid, world * nw


class PairBatches(IterableDataset):
    """Batches of (source, target) pair data; see the module docstring."""

    def __init__(self, sources: Sequence[Source], pairs: Sequence[tuple[int, int]], batch_size: int, *,
                 shuffle: bool = False, seed: int = 0, epoch: int = 0, with_previous: bool = False,
                 even: bool = False, buffer_mb: int = 512, num_workers: int = 0, distributed: bool = True):
        super().__init__()
        self.sources = list(sources)
        self.pairs = [(int(s), int(t)) for s, t in pairs]
        self.batch_size = int(batch_size)
        self.shuffle, self.seed, self.epoch = shuffle, int(seed), int(epoch)
        self.with_previous, self.even = with_previous, even
        self.buffer_bytes = int(buffer_mb) << 20
        self.num_workers = max(0, int(num_workers))
        self.distributed = distributed   # False: ignore DDP ranks (one process reads everything)
        self._readers: dict[str, TraceReader] = {}
        first = self._reader(0)
        self.hidden, self.experts, self.k = first.hidden_size, first.num_experts, first.top_k
        self.item = 2 if first.store_dtype in ("bf16", "fp16") else 4

    # -- bookkeeping (cheap: manifests only)

    def _reader(self, i: int) -> TraceReader:
        path = self.sources[i].path
        if path not in self._readers:
            self._readers[path] = TraceReader(path)
        return self._readers[path]

    def _token_mask(self, i: int, shard: int) -> torch.Tensor | None:
        seqs = self.sources[i].sequences
        if seqs is None:
            return None
        r = self._reader(i)
        rng = r.shard_sequences(shard)
        return seqs[rng.start:rng.stop].repeat_interleave(r.seq_len)

    def _units(self) -> list[tuple[int, int, int]]:
        units = []
        for i in range(len(self.sources)):
            r = self._reader(i)
            for shard in range(r.num_shards):
                mask = self._token_mask(i, shard)
                rng = r.shard_sequences(shard)
                n = len(rng) * r.seq_len if mask is None else int(mask.sum())
                if n:
                    units.append((i, shard, n))
        return units

    def _bytes_per_token(self) -> int:
        p = len(self.pairs)
        per = p * ((self.hidden + self.experts) * self.item + 4 * self.k * 12)
        return per * (2 if self.shuffle else 1)   # the permuted batch copy

    def _groups(self) -> list[list[tuple[int, int, int]]]:
        units = self._units()
        if self.shuffle:
            gen = torch.Generator().manual_seed(self.seed * 7919 + self.epoch)
            units = [units[j] for j in torch.randperm(len(units), generator=gen).tolist()]
        budget = max(1, self.buffer_bytes // self._bytes_per_token())
        groups, cur, size = [], [], 0
        for u in units:
            if cur and size + u[2] > budget:
                groups.append(cur)
                cur, size = [], 0
            cur.append(u)
            size += u[2]
        if cur:
            groups.append(cur)
        return groups

    def _stream_slices(self, n: int, stream: int, streams: int) -> list[tuple[int, int]]:
        """(start, stop) positions, in a group's token order, of the batches of one stream.

        even (training): whole batches dealt round-robin, wrapping around so that every
        stream gets ceil(batches / streams) of them. Otherwise (evaluation): each stream
        takes a contiguous 1/streams of the tokens, cut into batches (every token once)."""
        B = self.batch_size
        if self.even:
            nb = math.ceil(n / B)
            per = math.ceil(nb / streams)
            picks = [(stream + j * streams) % nb for j in range(per)]
            return [(b * B, min(n, (b + 1) * B)) for b in picks]
        lo, hi = stream * n // streams, (stream + 1) * n // streams
        return [(a, min(hi, a + B)) for a in range(lo, hi, B)]

    def __len__(self) -> int:
        rank, world = _rank_world(self.distributed)
        return self.batches_for(rank, world)

    def batches_for(self, rank: int = 0, world: int = 1) -> int:
        """Batches DDP rank `rank` of `world` gets in one pass (over all its workers)."""
        nw = max(1, self.num_workers)
        total = 0
        for g in self._groups():
            n = sum(u[2] for u in g)
            for wid in range(nw):
                total += len(self._stream_slices(n, rank * nw + wid, world * nw))
        return total

    # -- reading

    def _load_unit(self, i: int, shard: int) -> dict[str, torch.Tensor]:
        r = self._reader(i)
        sources = {s for s, _ in self.pairs}
        targets = {t for _, t in self.pairs}
        out: dict[str, torch.Tensor] = {}
        for l in sorted(sources | targets):
            fields = tuple(dict.fromkeys((SRC_FIELDS if l in sources else ()) + (TGT_FIELDS if l in targets else ())))
            data = r.layer(l, fields, shards=[shard])
            for f, t in data.items():
                out[f"{l}.{f}"] = t
        n = next(iter(out.values())).shape[0]
        if self.with_previous:
            pos = torch.arange(n) % r.seq_len
            out["has_prev"] = pos > 0
            for t in targets:
                for f, key in (("topk_ids", "prev_ids"), ("topk_weights", "prev_weights")):
                    cur = out[f"{t}.{f}"]
                    out[f"{t}.{key}"] = torch.cat([cur[:1], cur[:-1]])   # row 0 is masked by has_prev
        mask = self._token_mask(i, shard)
        if mask is not None:
            out = {k: v[mask] for k, v in out.items()}
        return out

    def _assemble(self, group: dict[str, torch.Tensor], idx: torch.Tensor) -> dict[str, torch.Tensor]:
        def stack(layers, field):
            return torch.stack([group[f"{l}.{field}"][idx] for l in layers], dim=1)

        src = [s for s, _ in self.pairs]
        tgt = [t for _, t in self.pairs]
        batch = {
            "residual": stack(src, "residual"),
            "src_ids": stack(src, "topk_ids").long(),
            "src_weights": stack(src, "topk_weights").float(),
            "tgt_logits": stack(tgt, "router_logits"),
            "tgt_ids": stack(tgt, "topk_ids").long(),
            "tgt_weights": stack(tgt, "topk_weights").float(),
        }
        if self.with_previous:
            batch["prev_ids"] = stack(tgt, "prev_ids").long()
            batch["prev_weights"] = stack(tgt, "prev_weights").float()
            batch["has_prev"] = group["has_prev"][idx]
        return batch

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        stream, streams = _streams(self.distributed)
        for gi, group in enumerate(self._groups()):
            n = sum(u[2] for u in group)
            mine = self._stream_slices(n, stream, streams)
            if not mine:
                continue
            parts = [self._load_unit(i, shard) for i, shard, _ in group]
            data = {k: torch.cat([p[k] for p in parts]) for k in parts[0]} if len(parts) > 1 else parts[0]
            del parts
            if self.shuffle:
                gen = torch.Generator().manual_seed((self.seed * 7919 + self.epoch) * 104_729 + gi)
                order = torch.randperm(n, generator=gen)
            else:
                order = torch.arange(n)
            for a, b in mine:
                yield self._assemble(data, order[a:b])


def make_loader(dataset: PairBatches, pin_memory: bool = False) -> DataLoader:
    return DataLoader(dataset, batch_size=None, num_workers=dataset.num_workers, pin_memory=pin_memory,
                      persistent_workers=False)


def batch_source_state(batch: dict[str, torch.Tensor], p: int, device: torch.device | None = None):
    """The SourceState of pair `p` of a batch (on `device`)."""
    from .predictors import SourceState

    def get(key):
        t = batch.get(key)
        if t is None:
            return None
        t = t[:, p] if t.dim() > 1 else t
        return t.to(device, non_blocking=True) if device is not None else t

    return SourceState(residual=get("residual"), ids=get("src_ids"), weights=get("src_weights"),
                       previous_ids=get("prev_ids"), previous_weights=get("prev_weights"))

