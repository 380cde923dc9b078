"""`trace`: run an MoE model over text and record its routing, layer by layer.

    trace --out traces/demo-train                       # demo model on the demo corpus's train split
    trace --model Qwen/Qwen3-30B-A3B --device auto --dataset data.jsonl --max-tokens 200000 \\
          --layers 0-7 --out traces/qwen3 --resume
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from specmoe.corpus import describe_dataset, load_text_dataset
from specmoe.errors import SpecmoeError, cli_errors
from specmoe.models import DTYPES, load_config, load_moe_model
from specmoe.paths import DEMO_MODEL_DIR, display_path


def parse_layers(text: str | None, moe_layers: tuple[int, ...]) -> list[int]:
    if not text:
        return list(moe_layers)
    chosen: set[int] = set()
    try:
        for part in text.split(","):
            lo, _, hi = part.partition("-")
            chosen.update(range(int(lo), int(hi or lo) + 1))
    except ValueError:
        raise SpecmoeError(f"--layers {text!r}: use indices and ranges such as 0-3,8") from None
    bad = sorted(chosen - set(moe_layers))
    if bad:
        raise SpecmoeError(f"--layers {text!r}: layers {bad} are not MoE layers of this model "
                           f"(MoE layers: {moe_layers[0]}-{moe_layers[-1]}, {len(moe_layers)} in all)")
    return sorted(chosen)


SHARD_BYTES = 256 << 20


def sequences_per_shard(spec, layers: list[int], store_dtype: str, seq_len: int, batch_size: int,
                        shard_tokens: int | None = None) -> int:
    """Whole batches per shard: `shard_tokens` if given, else about SHARD_BYTES of trace.

    A shard is held in memory while it is filled and written, and it is the unit a
    reader loads, so its size in bytes matters more than its token count."""
    from .trace_format import estimate_trace_bytes

    if shard_tokens is None:
        token_bytes = estimate_trace_bytes(1, layers=layers, hidden_size=spec.hidden_size,
                                           num_experts=spec.num_experts, top_k=spec.top_k,
                                           store_dtype=store_dtype, headers=False)
        shard_tokens = SHARD_BYTES // max(1, token_bytes)
    if shard_tokens < 1:
        raise SpecmoeError("--shard-tokens must be positive")
    return max(batch_size, shard_tokens // seq_len // batch_size * batch_size)


def _existing_shard_sequences(out: Path) -> int | None:
    """sequences_per_shard of the trace in `out`, if there is a readable one (the writer
    reports a damaged manifest itself)."""
    from .trace_format import read_manifest

    try:
        return read_manifest(out)["sequences_per_shard"]
    except SpecmoeError:
        return None


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.1f} TB"


def to_device(rows: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Token ids to the model's device without stalling it: a copy from pageable memory would
    wait for the GPU to finish all queued work first, so it goes through pinned memory."""
    if device.type != "cuda":
        return rows.to(device)
    staged = torch.empty(rows.shape, dtype=rows.dtype, pin_memory=True)
    staged.copy_(rows)
    return staged.to(device, non_blocking=True)


def record_rows(recorder, writer, rows: torch.Tensor, batch_size: int, desc: str | None = "trace") -> None:
    """Run rows[writer.sequences_done:] through the model in batches and hand them to the writer.

    The writer copies each batch off the GPU and writes full shards on its own threads,
    so the GPU goes on with the next batch; it only waits when the disk falls behind."""
    n_rows, seq_len = rows.shape
    start_row = writer.sequences_done
    device = recorder.model.get_input_embeddings().weight.device
    bar = tqdm(total=n_rows * seq_len, initial=start_row * seq_len, unit="tok", unit_scale=True, desc=desc,
               dynamic_ncols=True, disable=desc is None)
    try:
        for i in range(start_row, n_rows, batch_size):
            batch = recorder.run_batch(to_device(rows[i:i + batch_size], device))
            writer.add(batch, state=recorder.state)  # called by the writer when a shard is complete
            bar.update((min(i + batch_size, n_rows) - i) * seq_len)
    except BaseException:
        writer.stop()  # shards already being written are finished and listed
        raise
    finally:
        bar.close()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="trace", description="Record residuals, router logits and routing of an MoE model.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=str(DEMO_MODEL_DIR), help="hub id or local model directory")
    p.add_argument("--revision", help="model revision (hub models)")
    p.add_argument("--dataset", help="text/jsonl/parquet/csv file, dataset directory, saved dataset or hub name "
                                     "(default: the bundled demo corpus)")
    p.add_argument("--split", default="train")
    p.add_argument("--text-field", default="text")
    p.add_argument("--max-tokens", type=int, help="stop after this many tokens (default: the whole split)")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass")
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32"],
                   help="compute dtype (auto: fp32 on cpu, the checkpoint's dtype on GPU)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N, or auto (shard over all GPUs)")
    p.add_argument("--layers", help="MoE layers to record, e.g. 0-3,8 (default: all)")
    p.add_argument("--store-dtype", default="bf16", choices=["bf16", "fp16", "fp32"],
                   help="dtype of stored residuals and logits")
    p.add_argument("--shard-tokens", type=int, default=None,
                   help="tokens per shard, rounded to whole batches (default: about 256 MB per shard)")
    p.add_argument("--default-vector-every", type=int, default=1,
                   help="compute default vectors from every N-th token (1: all tokens)")
    p.add_argument("--writer-threads", type=int, default=6,
                   help="shards written to disk at once (0: write in the tracing thread)")
    p.add_argument("--no-fsync", action="store_true",
                   help="do not force each shard to disk: faster; a killed process still loses nothing, "
                        "a power cut may damage the last shards (their checksums catch it)")
    p.add_argument("--out", type=Path, required=True, help="trace directory")
    p.add_argument("--resume", action="store_true", help="continue an interrupted trace in --out")
    return p


def run_trace(args: argparse.Namespace) -> dict:
    from specmoe.families import detect_family, router_fingerprint
    from .trace_format import estimate_trace_bytes
    from .trace_writer import TraceWriter
    from specmoe.tokens import pack_rows

    t0 = time.time()
    if args.seq_len < 2 or args.batch_size < 1:
        raise SpecmoeError("--seq-len must be at least 2 and --batch-size at least 1")
    if args.writer_threads < 0:
        raise SpecmoeError("--writer-threads must be 0 (write in the tracing thread) or more")
    config = load_config(args.model, args.revision)
    family = detect_family(config)
    spec = family.spec(config)
    if args.seq_len > spec.max_position_embeddings:
        raise SpecmoeError(f"--seq-len {args.seq_len} exceeds the model's context of {spec.max_position_embeddings} tokens")
    layers = parse_layers(args.layers, spec.moe_layers)
    if (args.out / "manifest.json").exists() and not args.resume:
        raise SpecmoeError(f"{args.out} already holds a trace; add --resume to continue it, or choose another --out")
    dataset = load_text_dataset(args.dataset, args.split, args.text_field)

    loaded = load_moe_model(args.model, dtype=args.dtype, device=args.device, revision=args.revision)
    rows = pack_rows(dataset, loaded.tokenizer, args.text_field, args.seq_len, args.max_tokens)
    n_rows = len(rows)
    seqs_per_shard = sequences_per_shard(spec, layers, args.store_dtype, args.seq_len, args.batch_size,
                                         args.shard_tokens)
    if args.resume and args.shard_tokens is None:  # go on with the trace's own shard size
        seqs_per_shard = _existing_shard_sequences(args.out) or seqs_per_shard
    store_dtype = DTYPES[args.store_dtype]
    meta = {
        "model": {"id": display_path(args.model), "revision": args.revision, "family": spec.family,
                  "model_type": spec.model_type, "num_layers": spec.num_layers, "moe_layers": list(spec.moe_layers),
                  "num_experts": spec.num_experts, "top_k": spec.top_k, "hidden_size": spec.hidden_size,
                  "compute_dtype": str(next(loaded.model.parameters()).dtype).removeprefix("torch."),
                  "fingerprint": router_fingerprint(loaded.model, family)},
        "dataset": {"spec": describe_dataset(args.dataset), "split": args.split, "text_field": args.text_field,
                    "max_tokens": args.max_tokens},
        "default_vector_every": args.default_vector_every,
    }
    expected = estimate_trace_bytes(n_rows * args.seq_len, layers=layers, hidden_size=spec.hidden_size,
                                    num_experts=spec.num_experts, top_k=spec.top_k, store_dtype=args.store_dtype)
    writer = TraceWriter(args.out, meta, layers, args.seq_len, seqs_per_shard, args.store_dtype,
                         resume=args.resume, expected_bytes=expected, fsync=not args.no_fsync,
                         workers=args.writer_threads)

    from .recorder import TraceRecorder

    recorder = TraceRecorder(loaded, layers, store_dtype, args.default_vector_every)
    if writer.state is not None:
        recorder.load_state(writer.state)
    record_rows(recorder, writer, rows, args.batch_size, desc=f"trace {spec.family}")
    writer.close(recorder.default_vectors())
    recorder.close()
    return {"tokens": n_rows * args.seq_len, "bytes": writer.bytes_written, "seconds": time.time() - t0,
            "layers": layers, "counts": recorder.counts, "spec": spec, "out": args.out,
            "default_vectors_from": recorder.mode}


def print_summary(result: dict, file=None) -> None:
    file = file or sys.stdout  # looked up now: redirections of sys.stdout apply
    spec = result["spec"]
    print(f"traced {result['tokens']:,} tokens x {len(result['layers'])} layers of {spec.family} in "
          f"{result['seconds']:.1f}s; wrote {human_bytes(result['bytes'])} "
          f"({result['bytes'] / max(1, result['tokens']):.0f} B/token) to {result['out']}", file=file)
    how = {"sorted": "the experts' own pass (grouped)", "original": "the experts' own pass (batched)",
           "second pass": "a second pass over the experts"}.get(result.get("default_vectors_from"))
    if how:
        print(f"default vectors from {how}", file=file)
    uniform = 1.0 / spec.num_experts
    print(f"{'layer':>5} {'min load':>9} {'max load':>9} {'max/even':>8} {'unused':>6}", file=file)
    for layer in result["layers"]:
        c = result["counts"][layer].double()
        share = c / c.sum()
        print(f"{layer:>5} {share.min().item():>9.4f} {share.max().item():>9.4f} {share.max().item() / uniform:>8.2f} "
              f"{int((c == 0).sum()):>6}", file=file)


@cli_errors("trace", " (rerun with --resume)")
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    print_summary(run_trace(args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
