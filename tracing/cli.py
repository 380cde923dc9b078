"""`trace`: run an MoE model over text and record its routing, layer by layer.

    trace --out traces/demo-train                       # demo model on the demo corpus's train split
    trace --model Qwen/Qwen3-30B-A3B --device auto --dataset data.jsonl --max-tokens 200000 \\
          --layers 0-7 --out traces/qwen3 --resume
    trace inspect traces/qwen3 --verify                 # what a trace holds, checksums checked

Settings come from configs/trace.yaml (tracing.config.TraceConfig); flags override it.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from specmoe.corpus import describe_dataset, load_text_dataset
from specmoe.errors import SpecmoeError, cli_errors, first_line
from specmoe.models import DTYPES, load_config, load_moe_model, resolve_model_id
from specmoe.paths import display_path

from .config import COMPUTE_DTYPES, STORE_DTYPE_CHOICES, TraceConfig, load_trace_config
from .trace_format import (MANIFEST, estimate_trace_bytes, human_bytes, read_manifest, trace_files_in)
from .trace_reader import TraceReader
from .trace_recovery import mismatch_error, settings_mismatch
from .text_table import format_table
from .trace_writer import TraceWriter, check_disk_space


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
    if shard_tokens is None:
        token_bytes = estimate_trace_bytes(1, layers=layers, hidden_size=spec.hidden_size,
                                           num_experts=spec.num_experts, top_k=spec.top_k,
                                           store_dtype=store_dtype, headers=False)
        shard_tokens = SHARD_BYTES // max(1, token_bytes)
    if shard_tokens < 1:
        raise SpecmoeError("--shard-tokens must be positive")
    return max(batch_size, shard_tokens // seq_len // batch_size * batch_size)


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



# ------------------------------------------------------------------------------------------ options

# what a setting left at None means, for --help
_NONE_MEANS = {"model": "the bundled demo model", "revision": "the main branch", "dataset": "the bundled demo corpus",
               "max_tokens": "the whole split", "layers": "all MoE layers",
               "shard_tokens": "about 256 MB of trace per shard", "out": None}


def _default_config() -> TraceConfig:
    """What a run without flags uses: configs/trace.yaml, or the built-in defaults where it is unreadable."""
    try:
        return load_trace_config()
    except SpecmoeError:
        return TraceConfig()


def build_parser(defaults: TraceConfig | None = None) -> argparse.ArgumentParser:
    """Every flag defaults to None (not given), so that the settings file fills it in; --help
    shows the value that a run without the flag uses (`defaults`: configs/trace.yaml's)."""
    d = defaults or _default_config()

    def shown(key: str) -> str:
        value = getattr(d, key)
        if isinstance(value, bool):
            value = "on" if value else "off"
        return f"(default: {_NONE_MEANS[key] if value is None else value})"

    p = argparse.ArgumentParser(
        prog="trace", description="Record residuals, router logits and routing of an MoE model.",
        epilog="Also: `trace inspect DIR [--verify]` shows what a trace holds and checks it.")
    add = p.add_argument
    add("--config", type=Path, metavar="PATH", help="settings file (default: configs/trace.yaml)")
    add("--model", metavar="ID_OR_DIR", help=f"hub id or local model directory {shown('model')}")
    add("--revision", metavar="REV", help=f"model revision, for hub models {shown('revision')}")
    add("--dataset", metavar="PATH_OR_NAME", help=f"text/jsonl/parquet/csv file, dataset directory, saved dataset or hub name "
                          f"{shown('dataset')}")
    add("--split", metavar="NAME", help=f"dataset split {shown('split')}")
    add("--text-field", metavar="NAME", help=f"column that holds the text {shown('text_field')}")
    add("--max-tokens", metavar="N", type=int, help=f"stop after this many tokens {shown('max_tokens')}")
    add("--seq-len", metavar="N", type=int, help=f"tokens per row {shown('seq_len')}")
    add("--batch-size", metavar="N", type=int, help=f"rows per forward pass {shown('batch_size')}")
    add("--dtype", choices=COMPUTE_DTYPES,
        help=f"compute dtype; auto: fp32 on cpu, the checkpoint's dtype on GPU {shown('dtype')}")
    add("--device", metavar="DEVICE", help=f"cpu, cuda, cuda:N, or auto (shard over all GPUs) {shown('device')}")
    add("--layers", metavar="LIST", help=f"MoE layers to record, e.g. 0-3,8 {shown('layers')}")
    add("--store-dtype", choices=STORE_DTYPE_CHOICES, help=f"dtype of stored residuals and logits {shown('store_dtype')}")
    add("--shard-tokens", metavar="N", type=int, help=f"tokens per shard, rounded to whole batches {shown('shard_tokens')}")
    add("--default-vector-every", metavar="N", type=int,
        help=f"compute default vectors from every N-th token {shown('default_vector_every')}")
    add("--writer-threads", metavar="N", type=int,
        help=f"shards written to disk at once; 0: write in the tracing thread {shown('writer_threads')}")
    add("--fsync", action=argparse.BooleanOptionalAction,
        help=f"force each shard to disk; --no-fsync is faster, a killed process still loses nothing, a power cut "
             f"may damage the last shards (their checksums catch it) {shown('fsync')}")
    add("--out", type=Path, metavar="DIR", help="trace directory (required)")
    add("--resume", action=argparse.BooleanOptionalAction,
        help=f"continue an interrupted trace in --out, or grow a complete one to a larger --max-tokens "
             f"{shown('resume')}")
    return p


def config_from_args(args: argparse.Namespace) -> TraceConfig:
    """The settings file (--config, else configs/trace.yaml) with the flags given on top."""
    flags = {k: v for k, v in vars(args).items() if k != "config"}
    return load_trace_config(args.config, **flags)


# ------------------------------------------------------------------------------------------ checks

def check_out_dir(out: Path, resume: bool) -> dict | None:
    """Refuse an --out that cannot take the trace; return the manifest of the trace there, if any."""
    if out.exists() and not out.is_dir():
        raise SpecmoeError(f"--out {out} is a file; the trace needs a directory (a new or empty one)")
    probe = out
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise SpecmoeError(f"--out {out}: {probe} is a file, not a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise SpecmoeError(f"--out {out}: {probe} is not writable")
    if not out.is_dir():
        return None
    if (out / MANIFEST).exists():
        manifest = read_manifest(out)
        if not resume:
            how = "complete" if manifest.get("complete") else "interrupted"
            tokens = sum(int(e["tokens"]) for e in manifest["shards"])
            raise SpecmoeError(f"{out} already holds a trace ({how}, {tokens:,} tokens); add --resume to continue "
                               "it or grow it to a larger --max-tokens, or choose another --out")
        return manifest
    stray = trace_files_in(out)
    if stray:
        raise SpecmoeError(f"{out} holds trace files ({', '.join(stray[:3])}...) but no {MANIFEST}; "
                           "refusing to overwrite them; use another --out")
    others = sorted(p.name for p in out.iterdir())
    if others:
        more = ", ..." if len(others) > 3 else ""
        raise SpecmoeError(f"--out {out} is a directory that holds other files ({', '.join(others[:3])}{more}), "
                           "not a trace; choose a new or empty directory")
    return None


def _load_tokenizer(model_id: str | None, revision: str | None):
    from transformers import AutoTokenizer

    model_id = resolve_model_id(model_id)
    try:
        return AutoTokenizer.from_pretrained(model_id, revision=revision)
    except (OSError, ValueError, KeyError) as err:
        first = first_line(err)
        raise SpecmoeError(f"cannot load the tokenizer of {model_id}: {first}") from None


def _shrink_error(out: Path, have: int, want: int, seq_len: int) -> SpecmoeError:
    return SpecmoeError(f"the trace in {out} holds {have * seq_len:,} tokens, more than the {want * seq_len:,} "
                        "asked for now (--max-tokens, or the whole split); a trace does not shrink: "
                        "choose another --out")


# ------------------------------------------------------------------------------------------ running

def run_trace(config: TraceConfig) -> dict:
    """Trace as `config` says. Every option, the output directory, the model's config and the
    dataset are checked before the model is loaded; a complete trace asked for again is left
    as it is, and one asked for with more tokens grows (its shards stay as they are)."""
    from specmoe.families import detect_family, router_fingerprint
    from specmoe.paths import DEMO_MODEL_DIR
    from specmoe.tokens import pack_rows

    from .recorder import TraceRecorder

    cfg = config.validate()
    t0 = time.time()
    out = cfg.out
    existing = check_out_dir(out, cfg.resume)
    model_config = load_config(cfg.model, cfg.revision)
    family = detect_family(model_config)
    spec = family.spec(model_config)
    if cfg.seq_len > spec.max_position_embeddings:
        raise SpecmoeError(f"--seq-len {cfg.seq_len} exceeds the model's context of {spec.max_position_embeddings} tokens")
    layers = parse_layers(cfg.layers, spec.moe_layers)
    seqs_per_shard = sequences_per_shard(spec, layers, cfg.store_dtype, cfg.seq_len, cfg.batch_size, cfg.shard_tokens)
    if existing is not None and cfg.shard_tokens is None:  # go on with the trace's own shard size
        seqs_per_shard = existing["sequences_per_shard"]
    model_meta = {"id": display_path(cfg.model if cfg.model is not None else DEMO_MODEL_DIR), "revision": cfg.revision,
                  "family": spec.family, "model_type": spec.model_type, "num_layers": spec.num_layers,
                  "moe_layers": list(spec.moe_layers), "num_experts": spec.num_experts, "top_k": spec.top_k,
                  "hidden_size": spec.hidden_size}
    dataset_meta = {"spec": describe_dataset(cfg.dataset), "split": cfg.split, "text_field": cfg.text_field,
                    "max_tokens": cfg.max_tokens}
    if existing is not None:
        problems = settings_mismatch(existing, model=model_meta, dataset=dataset_meta, layers=layers,
                                     seq_len=cfg.seq_len, store_dtype=cfg.store_dtype,
                                     sequences_per_shard=seqs_per_shard)
        every = existing.get("default_vector_every")
        if every is not None and every != cfg.default_vector_every:
            problems.append(f"default_vector_every {every!r} vs {cfg.default_vector_every!r}")
        if problems:
            raise mismatch_error(out, problems)

    dataset = load_text_dataset(cfg.dataset, cfg.split, cfg.text_field)
    rows = pack_rows(dataset, _load_tokenizer(cfg.model, cfg.revision), cfg.text_field, cfg.seq_len, cfg.max_tokens)
    n_rows = len(rows)
    if existing is not None:
        listed = sum(int(e["sequences"]) for e in existing["shards"])
        if n_rows < listed:
            raise _shrink_error(out, listed, n_rows, cfg.seq_len)
        if existing.get("complete") and n_rows == listed:
            reader = TraceReader(out, verify=True)
            return {"already_complete": True, "tokens": reader.num_tokens, "new_tokens": 0,
                    "bytes": trace_bytes(reader), "seconds": time.time() - t0, "layers": reader.layers,
                    "counts": reader.expert_counts(), "spec": spec, "out": out}

    expected = estimate_trace_bytes(n_rows * cfg.seq_len, layers=layers, hidden_size=spec.hidden_size,
                                    num_experts=spec.num_experts, top_k=spec.top_k, store_dtype=cfg.store_dtype)
    written = 0 if existing is None else sum(int(e["bytes"]) for e in existing["shards"])
    check_disk_space(out, expected - written)

    loaded = load_moe_model(cfg.model, dtype=cfg.dtype, device=cfg.device, revision=cfg.revision)
    meta = {
        "model": {**model_meta,
                  "compute_dtype": str(next(loaded.model.parameters()).dtype).removeprefix("torch."),
                  "fingerprint": router_fingerprint(loaded.model, family)},
        "dataset": dataset_meta,
        "default_vector_every": cfg.default_vector_every,
    }
    writer = TraceWriter(out, meta, layers, cfg.seq_len, seqs_per_shard, cfg.store_dtype, resume=cfg.resume,
                         expected_bytes=expected, fsync=cfg.fsync, workers=cfg.writer_threads)
    if writer.sequences_done > n_rows:  # sequences kept beyond the listed shards
        writer.stop()
        raise _shrink_error(out, writer.sequences_done, n_rows, cfg.seq_len)
    start = writer.sequences_done
    writer.grow()  # a complete trace asked for more tokens (a no-op otherwise)
    bytes_before = writer.bytes_written

    recorder = TraceRecorder(loaded, layers, DTYPES[cfg.store_dtype], cfg.default_vector_every)
    if writer.state is not None:
        recorder.load_state(writer.state)
    record_rows(recorder, writer, rows, cfg.batch_size, desc=f"trace {spec.family}")
    writer.close(recorder.default_vectors())
    recorder.close()
    return {"tokens": n_rows * cfg.seq_len, "new_tokens": (n_rows - start) * cfg.seq_len,
            "bytes": writer.bytes_written - bytes_before, "seconds": time.time() - t0,
            "layers": layers, "counts": recorder.counts, "spec": spec, "out": out,
            "default_vectors_from": recorder.mode}


def trace_bytes(reader: TraceReader) -> int:
    """Bytes of a trace's shards and default vectors, as its manifest lists them."""
    total = sum(int(e["bytes"]) for e in reader.manifest["shards"])
    dv = reader.manifest.get("default_vectors")
    return total + (int(dv["bytes"]) if dv else 0)


def load_table(layers: list[int], counts: dict[int, torch.Tensor], num_experts: int) -> list[str]:
    """Per layer: the smallest and largest share of routing assignments an expert takes,
    the largest against an even load, and the experts never chosen."""
    uniform = 1.0 / num_experts
    rows = []
    for layer in layers:
        c = counts[layer].double()
        share = c / c.sum().clamp(min=1)
        rows.append([str(layer), f"{share.min().item():.4f}", f"{share.max().item():.4f}",
                     f"{share.max().item() / uniform:.2f}", str(int((c == 0).sum()))])
    return format_table(["layer", "min load", "max load", "max/even", "unused"], rows)


def print_summary(result: dict, file=None) -> None:
    file = file or sys.stdout  # looked up now: redirections of sys.stdout apply
    spec = result["spec"]
    n_layers = len(result["layers"])
    if result.get("already_complete"):
        print(f"{result['out']} already holds the complete trace: {result['tokens']:,} tokens x {n_layers} layers "
              f"of {spec.family}, {human_bytes(result['bytes'])}, checksums verified; nothing traced "
              "(a larger --max-tokens with --resume grows it)", file=file)
    else:
        new, total = result["new_tokens"], result["tokens"]
        grown = f" ({total:,} in the trace now)" if new != total else ""
        print(f"traced {new:,} {'more ' if grown else ''}tokens x {n_layers} layers of {spec.family} in "
              f"{result['seconds']:.1f}s{grown}; wrote {human_bytes(result['bytes'])} "
              f"({result['bytes'] / max(1, new):.0f} B/token) to {result['out']}", file=file)
        how = {"sorted": "the experts' own pass (grouped)", "original": "the experts' own pass (batched)",
               "second pass": "a second pass over the experts"}.get(result.get("default_vectors_from"))
        if how:
            print(f"default vectors from {how}", file=file)
    for line in load_table(result["layers"], result["counts"], spec.num_experts):
        print(line, file=file)


@cli_errors("trace", " (rerun with --resume)")
def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["inspect"]:
        from .inspect_trace import main as inspect_main

        return inspect_main(argv[1:])
    args = build_parser().parse_args(argv)
    print_summary(run_trace(config_from_args(args)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
