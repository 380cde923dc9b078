"""Picking up a trace where a run stopped: after Ctrl-C, a kill or a power cut, or to grow it.

Every file of a trace is written under a ``.tmp`` name, fsynced and renamed into
place.  When the writer completes one or more shards it writes, in this order, the
shard files, then ``state.safetensors``, then ``manifest.json``.  The state file
records (in its metadata) the full list of shards it goes with, and also carries
the sequences that were added after the last complete shard (a batch may straddle
a shard boundary; the caller's accumulators already include them, so they must be
kept for the state to stay exact).  A kill at any point therefore leaves either

* manifest and state describing the same shards (an unlisted newer shard file, if
  any, is a leftover and gets rewritten), or
* a state one step ahead of the manifest, whose extra shards are already in place
  under their final names; recovery checks their sha256 against the state's record
  and adopts them.

`recover` reads all of that back; the writer (tracing.trace_writer) goes on from it.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from safetensors import safe_open

from specmoe import safetensors_stream as st
from specmoe.errors import CorruptFileError, MismatchError
from specmoe.paths import display_path
from specmoe.safetensors_stream import TMP_SUFFIX

from .trace_format import (DEFAULT_VECTORS_FILE, GROWABLE_DATASET_KEYS, MANIFEST, PENDING_PREFIX, SHARD_RE,
                           STATE_FILE, STATE_META_PENDING, STATE_META_SHARDS, check_sha, shard_keys)


@dataclasses.dataclass
class RecoveredTrace:
    """What an interrupted (or complete) trace holds, as far as the writer needs it."""

    shards: list[dict]                    # complete shards, in order (manifest entries)
    state_entry: dict | None              # the manifest's entry for state.safetensors
    default_vectors_entry: dict | None
    complete: bool
    state: dict[str, torch.Tensor] | None  # the caller's accumulators after `shards` + the pending sequences
    pending: dict[str, torch.Tensor]       # shard tensors of the sequences added beyond `shards`
    pending_sequences: int
    adopted: bool                          # shards were adopted from a state ahead of the manifest


def settings_mismatch(manifest: dict, *, model: dict, dataset: dict, layers: list[int], seq_len: int,
                      store_dtype: str, sequences_per_shard: int) -> list[str]:
    """How the trace on disk differs from what a run would now write ("on disk vs now"), or []."""
    problems = []
    old_model = manifest.get("model", {}) or {}
    for key in ("id", "family", "revision", "hidden_size", "num_experts", "top_k", "moe_layers"):
        a, b = old_model.get(key), model.get(key)
        if a is not None and b is not None and a != b:
            problems.append(f"model {key} {a!r} vs {b!r}")
    old_ds = dict(manifest.get("dataset", {}) or {})
    if isinstance(old_ds.get("spec"), str):  # written as an absolute path by earlier versions
        old_ds["spec"] = display_path(old_ds["spec"])
    same_data = {k: v for k, v in old_ds.items() if k not in GROWABLE_DATASET_KEYS}
    new_data = {k: v for k, v in dataset.items() if k not in GROWABLE_DATASET_KEYS}
    if same_data != new_data:
        problems.append(f"dataset {same_data!r} vs {new_data!r}")
    for key, mine in (("layers", layers), ("seq_len", seq_len), ("store_dtype", store_dtype),
                      ("sequences_per_shard", sequences_per_shard)):
        theirs = manifest.get(key)
        if key == "layers" and isinstance(theirs, list):
            theirs = sorted(theirs)
        if theirs != mine:
            problems.append(f"{key} {theirs!r} vs {mine!r}")
    return problems


def mismatch_error(directory: Path, problems: list[str]) -> MismatchError:
    return MismatchError(f"cannot resume the trace in {directory}: it was made with different settings "
                         f"(on disk vs now: {'; '.join(problems)}); use another --out")


def remove_half_written(directory: Path) -> None:
    """Delete the ``*.tmp`` files of trace files an interrupted write leaves behind."""
    for p in directory.iterdir():
        base = p.name[: -len(TMP_SUFFIX)]
        if p.name.endswith(TMP_SUFFIX) and p.is_file() and (
                SHARD_RE.match(base) or base in (MANIFEST, STATE_FILE, DEFAULT_VECTORS_FILE)):
            p.unlink()


def remove_unlisted_shards(directory: Path, listed: int) -> None:
    """Delete shard files beyond the `listed` ones: leftovers of an interrupted write, which
    would be rewritten under the same names anyway."""
    for p in directory.iterdir():
        m = SHARD_RE.match(p.name)
        if m and int(m.group(1)) >= listed and p.is_file():
            p.unlink()


def recover(directory: Path, manifest: dict, layers: list[int], seq_len: int) -> RecoveredTrace:
    """Check every listed shard, clean up an interrupted write and read the state back."""
    d = Path(directory)
    shards = [dict(e) for e in manifest["shards"]]
    state_entry = manifest.get("state")
    for entry in shards:
        check_sha(d, entry)
    remove_half_written(d)

    state_path = d / STATE_FILE
    state, pending, pending_sequences, adopted = None, {}, 0, False
    if state_path.exists():
        try:
            with safe_open(str(state_path), framework="pt") as f:
                meta = f.metadata() or {}
                raw = {k: f.get_tensor(k) for k in f.keys()}
            state_shards = json.loads(meta[STATE_META_SHARDS])
            pending_sequences = int(meta[STATE_META_PENDING])
        except Exception as err:  # noqa: BLE001 - any parse failure means a damaged file
            raise CorruptFileError(f"{state_path} cannot be read ({err}); the trace state is damaged") from None
        n_listed = len(shards)
        if not isinstance(state_shards, list) or state_shards[:n_listed] != shards:
            raise CorruptFileError(f"{state_path} does not belong with the shards listed in {MANIFEST}")
        if len(state_shards) == n_listed:
            if state_entry is not None and st.sha256_file(state_path) != state_entry.get("sha256"):
                raise CorruptFileError(f"{state_path} does not match its sha256 in {MANIFEST} (file is damaged)")
        else:
            # killed after the state was written but before the manifest: adopt the shards
            # the state already covers (they were renamed into place first)
            for entry in state_shards[n_listed:]:
                check_sha(d, entry)
            shards = state_shards
            state_entry = {
                "file": STATE_FILE, "sha256": st.sha256_file(state_path),
                "bytes": state_path.stat().st_size, "shards": len(state_shards),
                "pending_sequences": pending_sequences,
            }
            adopted = True
        state = {k: v for k, v in raw.items() if not k.startswith(PENDING_PREFIX)} or None
        pending = {k[len(PENDING_PREFIX):]: v for k, v in raw.items() if k.startswith(PENDING_PREFIX)}
        if pending_sequences:
            tokens = pending_sequences * seq_len
            if set(pending) != shard_keys(layers) or any(t.shape[0] != tokens for t in pending.values()):
                raise CorruptFileError(f"{state_path} holds an inconsistent set of pending sequences")
    elif shards:
        raise CorruptFileError(f"{state_path} is missing; the trace cannot be resumed")

    remove_unlisted_shards(d, len(shards))
    return RecoveredTrace(shards=shards, state_entry=state_entry,
                          default_vectors_entry=manifest.get("default_vectors"),
                          complete=bool(manifest.get("complete", False)), state=state,
                          pending=pending if pending_sequences else {}, pending_sequences=pending_sequences,
                          adopted=adopted)
