"""`trace inspect DIR [--verify]`: what a trace holds, and whether it is intact.

    trace inspect runs/demo/trace-train             # model, data, layers, tokens, shards, sizes, expert load
    trace inspect runs/demo/trace-train --verify    # also the sha256 of every file
    python -m tracing.inspect_trace DIR --json      # the same as JSON

Opening a trace checks its manifest and every listed file's size; --verify adds the
checksums. A directory that is no trace, or a damaged one, is one line and exit 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from specmoe.errors import SpecmoeError, cli_errors

from .trace_format import human_bytes
from .trace_reader import TraceReader


def compact_ranges(values: list[int]) -> str:
    """[0, 1, 2, 3, 8] -> "0-3,8"."""
    parts, i = [], 0
    while i < len(values):
        j = i
        while j + 1 < len(values) and values[j + 1] == values[j] + 1:
            j += 1
        parts.append(str(values[i]) if i == j else f"{values[i]}-{values[j]}")
        i = j + 1
    return ",".join(parts)


def expert_load(reader: TraceReader) -> tuple[dict[int, torch.Tensor], str]:
    """Routing assignments per expert and layer: the stored counts of a complete trace,
    else counted from the top-k ids of the shards written so far."""
    if reader.manifest.get("default_vectors") is not None:
        return reader.expert_counts(), "all traced tokens"
    counts = {l: torch.zeros(reader.num_experts or 0, dtype=torch.long) for l in reader.layers}
    for _, data in reader.iter_shards(fields=("topk_ids",)):
        for l in reader.layers:
            ids = data[f"layers.{l}.topk_ids"].long().flatten()
            counts[l] += torch.bincount(ids, minlength=len(counts[l]))
    return counts, "the shards written so far"


def summarize(path: Path, verify: bool = False) -> dict:
    if not path.exists():
        raise SpecmoeError(f"{path} does not exist")
    reader = TraceReader(path, verify=verify)
    m = reader.manifest
    model, data = m.get("model", {}) or {}, m.get("dataset", {}) or {}
    shard_bytes = [int(e["bytes"]) for e in m["shards"]]
    dv = m.get("default_vectors")
    counts, counted_over = expert_load(reader) if reader.num_shards else ({}, "nothing")
    return {
        "path": str(path), "complete": reader.complete, "format_version": m["format_version"],
        "model": model, "dataset": data, "layers": reader.layers, "seq_len": reader.seq_len,
        "sequences": reader.num_sequences, "tokens": reader.num_tokens, "store_dtype": reader.store_dtype,
        "shards": reader.num_shards, "sequences_per_shard": reader.sequences_per_shard,
        "shard_bytes": sum(shard_bytes), "default_vectors_bytes": int(dv["bytes"]) if dv else None,
        "default_vector_every": m.get("default_vector_every"),
        "checksums": "verified" if verify else "not checked (sizes only)",
        "expert_load_over": counted_over,
        "expert_counts": {str(l): c.tolist() for l, c in counts.items()},
    }


def format_summary(s: dict) -> str:
    from .cli import load_table

    model, data = s["model"], s["dataset"]
    moe = model.get("moe_layers") or []
    lines = [f"trace {s['path']}: {'complete' if s['complete'] else 'incomplete (trace --resume goes on)'}, "
             f"format version {s['format_version']}"]
    lines.append(f"model        {model.get('id', '?')} ({model.get('family', '?')}, {model.get('num_experts', '?')} "
                 f"experts, top-{model.get('top_k', '?')}, hidden {model.get('hidden_size', '?')}"
                 + (f", compute {model['compute_dtype']}" if model.get("compute_dtype") else "") + ")")
    limit = data.get("max_tokens")
    lines.append(f"dataset      {data.get('spec', '?')}, split {data.get('split', '?')}, field "
                 f"{data.get('text_field', '?')}, " + (f"up to {limit:,} tokens" if limit else "whole split"))
    lines.append(f"layers       {compact_ranges(s['layers'])} ({len(s['layers'])} of {len(moe) or '?'} MoE layers)")
    lines.append(f"tokens       {s['tokens']:,} in {s['sequences']:,} sequences of {s['seq_len']}")
    lines.append(f"shards       {s['shards']}, {human_bytes(s['shard_bytes'])} "
                 f"({s['sequences_per_shard']:,} sequences each), {s['store_dtype']} residuals and logits")
    dv = s["default_vectors_bytes"]
    every = s["default_vector_every"]
    lines.append("default vec. " + (f"{human_bytes(dv)}" + (f", from every {every}-th token" if every and every > 1 else "")
                                    if dv is not None else "not yet (written when the trace completes)"))
    lines.append(f"checksums    {s['checksums']}" + ("" if s["checksums"] == "verified" else "; --verify checks them"))
    if s["expert_counts"]:
        lines.append(f"expert load per layer, over {s['expert_load_over']}:")
        counts = {int(l): torch.tensor(c) for l, c in s["expert_counts"].items()}
        lines += load_table(sorted(counts), counts, len(next(iter(counts.values()))))
    return "\n".join(lines)


def build_parser(prog: str = "trace inspect") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Show what a trace holds and check that it is intact.")
    p.add_argument("trace", type=Path, metavar="DIR", help="trace directory")
    p.add_argument("--verify", action="store_true", help="also check the sha256 of every file (default: sizes only)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON (default: a table)")
    return p


@cli_errors("trace inspect")
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    summary = summarize(args.trace, verify=args.verify)
    print(json.dumps(summary, indent=2) if args.json else format_summary(summary), file=sys.stdout)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
