"""Tracing throughput against a plain forward pass over the same batches (GPU).

    python benchmarks/trace_overhead.py            # writes benchmarks/results/trace_overhead.{json,md}

Two models: the bundled demo model, and a model of Qwen3-30B-A3B's shape (hidden
2048, 128 experts, top-8, expert hidden 768, 32/4 heads) with random weights and
4 layers. Per model, the same batches run in every mode, `--repeats` times,
interleaved so that drift in the machine hits every mode alike; we quote the
median. Modes: the plain forward of the decoder (no LM head, as the tracer runs
it); recording on the GPU without host copies (hooks and default vectors, with
the experts' intermediates tapped, and with the second pass the tap replaces);
the whole trace written to memory (tmpfs: host copies, shard files, sha256,
manifest, but no disk); and the whole trace written to disk. The floor of a
trace is its bytes over the bandwidth the medium gives to the same number of
concurrent writers (write + fsync), measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tracing.cli import record_rows, sequences_per_shard  # noqa: E402
from specmoe.corpus import load_text_dataset  # noqa: E402
from specmoe.families import detect_family  # noqa: E402
from specmoe.models import LoadedModel, load_moe_model  # noqa: E402
from specmoe.paths import DEMO_MODEL_DIR, REPO_ROOT  # noqa: E402
from tracing.recorder import TraceRecorder  # noqa: E402
from tracing import TraceWriter  # noqa: E402
from specmoe.tokens import pack_rows  # noqa: E402

RESULTS = REPO_ROOT / "benchmarks" / "results"


def qwen3_30b_shaped(layers: int = 4) -> LoadedModel:
    from transformers import AutoTokenizer, Qwen3MoeConfig, Qwen3MoeForCausalLM

    config = Qwen3MoeConfig(vocab_size=151936, hidden_size=2048, num_hidden_layers=layers, num_attention_heads=32,
                            num_key_value_heads=4, head_dim=128, num_experts=128, num_experts_per_tok=8,
                            moe_intermediate_size=768, intermediate_size=6144, norm_topk_prob=True,
                            max_position_embeddings=4096, tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = Qwen3MoeForCausalLM(config).to(torch.bfloat16).eval()
    with torch.no_grad():  # stock init leaves routers at zero: give them a trained-like spread
        for layer in model.model.layers:
            layer.mlp.gate.weight.normal_(0, 0.02)
    family = detect_family(model)
    return LoadedModel(model=model, tokenizer=AutoTokenizer.from_pretrained(DEMO_MODEL_DIR), family=family,
                       spec=family.spec(model.config), model_id="qwen3-30b-a3b-shaped-4-layers (random)", revision=None)


def write_bandwidth(directory: Path, writers: int, nbytes: int = 2 << 30) -> float:
    """Bytes/s of `writers` threads each writing nbytes/writers to its own file and fsyncing it."""
    block = os.urandom(16 << 20)
    per_writer = nbytes // writers // len(block)

    def write(i: int) -> None:
        path = directory / f"bandwidth.probe{i}"
        with open(path, "wb", buffering=0) as f:
            for _ in range(per_writer):
                f.write(block)
            os.fsync(f.fileno())

    start = time.perf_counter()
    with ThreadPoolExecutor(writers) as pool:
        list(pool.map(write, range(writers)))
    seconds = time.perf_counter() - start
    for i in range(writers):
        (directory / f"bandwidth.probe{i}").unlink()
    return writers * per_writer * len(block) / seconds


@torch.no_grad()
def time_plain(loaded, batches) -> float:
    base = loaded.family.base_model(loaded.model)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for batch in batches:
        base(input_ids=batch, use_cache=False)
    torch.cuda.synchronize()
    return time.perf_counter() - start


@torch.no_grad()
def time_record_only(loaded, batches, tap: bool) -> tuple[float, str]:
    recorder = TraceRecorder(loaded, list(loaded.spec.moe_layers), torch.bfloat16, tap=tap)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for batch in batches:
        recorder.run_batch(batch)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    recorder.close()
    return seconds, recorder.mode


def time_trace(loaded, rows, batch_size, out: Path, fsync: bool, threads: int) -> tuple[float, float, int]:
    """(seconds in all, seconds of them spent after the last batch finishing the last shards, bytes)."""
    if out.exists():
        shutil.rmtree(out)
    seq_len = rows.shape[1]
    seqs_per_shard = sequences_per_shard(loaded.spec, list(loaded.spec.moe_layers), "bf16", seq_len, batch_size)
    layers = list(loaded.spec.moe_layers)
    writer = TraceWriter(out, {"model": {"id": loaded.model_id, "family": loaded.spec.family}, "dataset": {}},
                         layers, seq_len, seqs_per_shard, "bf16", fsync=fsync, workers=threads)
    recorder = TraceRecorder(loaded, layers, torch.bfloat16)
    torch.cuda.synchronize()
    start = time.perf_counter()
    record_rows(recorder, writer, rows, batch_size, desc=None)
    closing = time.perf_counter()
    writer.close(recorder.default_vectors())
    end = time.perf_counter()
    recorder.close()
    written = writer.bytes_written
    shutil.rmtree(out)
    return end - start, end - closing, written


def bench_model(name, loaded, rows, batch_size, repeats, places: dict[str, tuple[Path, bool]], threads: int) -> dict:
    device = loaded.input_device
    batches = [rows[i:i + batch_size].to(device) for i in range(0, len(rows), batch_size)]
    tokens = rows.numel()
    # warm-up: kernels, allocator, pinned host memory
    time_plain(loaded, batches[:2])
    time_record_only(loaded, batches[:2], True)
    time_trace(loaded, rows[:4 * batch_size], batch_size, next(iter(places.values()))[0] / "warmup", False, threads)
    modes: dict[str, list[float]] = {}
    tails: dict[str, list[float]] = {}
    tap_mode = ""
    written = 0
    for _ in range(repeats):
        modes.setdefault("plain forward", []).append(time_plain(loaded, batches))
        t, tap_mode = time_record_only(loaded, batches, True)
        modes.setdefault("record on the GPU, no host copies (default vectors tapped)", []).append(t)
        t, _ = time_record_only(loaded, batches, False)
        modes.setdefault("record on the GPU, no host copies (default vectors by a second pass)", []).append(t)
        for label, (where, fsync) in places.items():
            t, tail, written = time_trace(loaded, rows, batch_size, where / "trace", fsync, threads)
            modes.setdefault(f"trace to {label}", []).append(t)
            tails.setdefault(f"trace to {label}", []).append(tail)
    plain_runs = modes["plain forward"]
    result = {"model": name, "tokens": tokens, "batch": list(rows[:batch_size].shape), "repeats": repeats,
              "shard_tokens": sequences_per_shard(loaded.spec, list(loaded.spec.moe_layers), "bf16", rows.shape[1],
                                                  batch_size) * rows.shape[1],
              "writer_threads": threads, "tap_mode": tap_mode,
              "bytes_per_token": written / tokens, "bytes": written, "modes": {}}
    for mode, times in modes.items():
        med = statistics.median(times)
        # each repeat against the plain forward of the same repeat: drift in the machine cancels
        overhead = statistics.median([t / p for t, p in zip(times, plain_runs)]) - 1.0
        result["modes"][mode] = {"median_s": med, "tokens_per_s": tokens / med, "overhead": overhead,
                                 "all_s": times}
        if mode in tails:
            result["modes"][mode]["after_last_batch_s"] = statistics.median(tails[mode])
    return result


def to_markdown(results: list[dict], media: dict[str, dict], command: str, device: str) -> str:
    lines = ["# Tracing overhead", "", f"`{command}` on {device}; torch {torch.__version__}, "
             f"transformers {transformers.__version__}.", "",
             "Overhead: the median over repeats of (time / the same repeat's plain forward) - 1; times are medians "
             "of the repeats (all in the JSON).",
             "Write bandwidth of each medium, measured in the same run with as many concurrent writers as the "
             "trace writer uses (each writes its own file, then fsyncs it):", ""]
    for label, m in media.items():
        lines.append(f"- {label}: {m['bandwidth'] / 1e9:.2f} GB/s ({m['path']})")
    lines.append("")
    for r in results:
        lines += [f"## {r['model']}", "",
                  f"{r['tokens']:,} tokens in batches of {r['batch'][0]} x {r['batch'][1]}; shards of "
                  f"{r['shard_tokens']:,} tokens, {r['writer_threads']} written at once; "
                  f"{r['bytes_per_token']:,.0f} bytes written per token ({r['bytes'] / 1e9:.2f} GB per run). "
                  f"Default vectors tapped from the forward pass (rows {r['tap_mode']}).", "",
                  "| mode | median time | tokens/s | overhead | write floor (bytes / bandwidth), its overhead "
                  "| of the time, after the last batch |", "|---|---|---|---|---|---|"]
        plain = r["modes"]["plain forward"]["median_s"]
        for mode, m in r["modes"].items():
            floor = ""
            for label, medium in media.items():
                if mode.startswith(f"trace to {label}"):
                    f = r["bytes"] / medium["bandwidth"]  # writes overlap compute: the slower of the two
                    floor = f"{f:.3f} s, {100 * max(0.0, f / plain - 1):+.0f}%"
            tail = f"{m['after_last_batch_s']:.3f} s" if "after_last_batch_s" in m else ""
            lines.append(f"| {mode} | {m['median_s']:.3f} s | {m['tokens_per_s']:,.0f} | {100 * m['overhead']:+.1f}% "
                         f"| {floor} | {tail} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=1 << 22, help="tokens per run of the demo model "
                        "(a quarter of that for the 30B shape)")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--writer-threads", type=int, default=6)
    parser.add_argument("--disk", type=Path, default=None, help="directory on the disk to trace to (default: a temp dir)")
    parser.add_argument("--memory", type=Path, default=Path("/dev/shm"), help="a memory-backed directory (tmpfs)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("this benchmark needs a CUDA GPU")
    disk = Path(tempfile.mkdtemp(dir=args.disk))
    places = {"disk, fsync per shard": (disk, True)}
    media = {"disk, fsync per shard": {"path": str(disk), "bandwidth": write_bandwidth(disk, args.writer_threads)}}
    if args.memory.is_dir():
        memory = Path(tempfile.mkdtemp(dir=args.memory))
        places = {"memory (tmpfs)": (memory, False), **places}
        media = {"memory (tmpfs)": {"path": str(memory), "bandwidth": write_bandwidth(memory, args.writer_threads)},
                 **media}
    demo = load_moe_model(None, device="cuda")
    rows = pack_rows(load_text_dataset(None, "train"), demo.tokenizer, "text", args.seq_len, args.tokens)
    # large batches: the demo model is so small that at 64 rows its forward is bound by kernel launches
    results = [bench_model("demo-moe (12 layers, 32 experts, top-4, hidden 128, bf16)", demo, rows, 256,
                           args.repeats, places, args.writer_threads)]
    del demo
    torch.cuda.empty_cache()
    big = qwen3_30b_shaped()
    results.append(bench_model("Qwen3-30B-A3B shape, 4 layers, random weights (bf16)", big,
                               rows[: max(16, len(rows) // 4)], 16, args.repeats, places, args.writer_threads))
    for where, _ in places.values():
        shutil.rmtree(where, ignore_errors=True)
    command = "python benchmarks/trace_overhead.py " + " ".join(sys.argv[1:])
    device = torch.cuda.get_device_name()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "trace_overhead.json").write_text(json.dumps(
        {"command": command.strip(), "device": device, "torch": torch.__version__,
         "transformers": transformers.__version__, "media": media, "results": results}, indent=2) + "\n")
    md = to_markdown(results, media, command.strip(), device)
    (args.out / "trace_overhead.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
