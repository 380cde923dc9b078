"""Tracing throughput against a plain forward pass over the same batches (GPU).

    python benchmarks/trace_overhead.py            # writes benchmarks/results/trace_overhead.{json,md}

Two models: the bundled demo model, and a model of Qwen3-30B-A3B's shape (hidden
2048, 128 experts, top-8, expert hidden 768, 32/4 heads) with random weights and
4 layers. Per model and mode, the same batches run `--repeats` times; we quote the
median tokens/s. Modes: the plain forward of the decoder (no LM head, as the
tracer runs it); tracing without writing (hooks, default vectors, host copies);
and full tracing to disk. The floor of the full trace is its bytes per token over
the disk's measured write bandwidth (write + fsync).
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
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tracing.cli import record_rows  # noqa: E402
from tracing.corpus import load_text_dataset  # noqa: E402
from tracing.families import detect_family  # noqa: E402
from tracing.models import LoadedModel, load_moe_model  # noqa: E402
from tracing.paths import DEMO_MODEL_DIR, REPO_ROOT  # noqa: E402
from tracing.recorder import TraceRecorder, wait_host  # noqa: E402
from tracing.store import TraceWriter  # noqa: E402
from tracing.tokens import pack_rows  # noqa: E402

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


def disk_write_bandwidth(directory: Path, nbytes: int = 1 << 30) -> float:
    block = os.urandom(64 << 20)
    path = directory / "bandwidth.probe"
    start = time.perf_counter()
    with open(path, "wb") as f:
        for _ in range(nbytes // len(block)):
            f.write(block)
        f.flush()
        os.fsync(f.fileno())
    seconds = time.perf_counter() - start
    path.unlink()
    return nbytes / seconds


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
def time_record_only(loaded, batches, every: int) -> float:
    recorder = TraceRecorder(loaded, list(loaded.spec.moe_layers), torch.bfloat16, every)
    torch.cuda.synchronize()
    start = time.perf_counter()
    pending = []
    for batch in batches:
        pending.append(recorder.run_batch(batch))
        if len(pending) > 2:
            wait_host(pending.pop(0))
    for p in pending:
        wait_host(p)
    seconds = time.perf_counter() - start
    recorder.close()
    return seconds


def time_trace(loaded, rows, batch_size, every: int, out: Path, shard_tokens: int, fsync: bool) -> tuple[float, int]:
    if out.exists():
        shutil.rmtree(out)
    seq_len = rows.shape[1]
    seqs_per_shard = max(batch_size, shard_tokens // seq_len // batch_size * batch_size)
    layers = list(loaded.spec.moe_layers)
    writer = TraceWriter(out, {"model": {"id": loaded.model_id, "family": loaded.spec.family}, "dataset": {}},
                         layers, seq_len, seqs_per_shard, "bf16", fsync=fsync)
    recorder = TraceRecorder(loaded, layers, torch.bfloat16, every)
    torch.cuda.synchronize()
    start = time.perf_counter()
    record_rows(recorder, writer, rows, batch_size, seqs_per_shard, desc=None)
    writer.close(recorder.default_vectors())
    seconds = time.perf_counter() - start
    recorder.close()
    return seconds, writer.bytes_written


def bench_model(name, loaded, rows, batch_size, repeats, workdir: Path, bandwidth: float, shard_tokens: int) -> dict:
    device = loaded.input_device
    batches = [rows[i:i + batch_size].to(device) for i in range(0, len(rows), batch_size)]
    tokens = rows.numel()
    # warm-up: kernels, allocator, pinned host pool
    time_plain(loaded, batches[:2])
    time_record_only(loaded, batches[:2], 1)
    modes: dict[str, list[float]] = {"plain forward": [], "record, no write (D every token)": [],
                                     "record, no write (D every 4th token)": [],
                                     "trace to disk, fsync per shard (D every token)": [],
                                     "trace to disk, no fsync (D every token)": [],
                                     "trace to disk, no fsync (D every 4th token)": []}
    written = 0
    for _ in range(repeats):  # interleaved, so drift in the machine hits every mode alike
        modes["plain forward"].append(time_plain(loaded, batches))
        modes["record, no write (D every token)"].append(time_record_only(loaded, batches, 1))
        modes["record, no write (D every 4th token)"].append(time_record_only(loaded, batches, 4))
        t, written = time_trace(loaded, rows, batch_size, 1, workdir / "t1", shard_tokens, fsync=True)
        modes["trace to disk, fsync per shard (D every token)"].append(t)
        t, written = time_trace(loaded, rows, batch_size, 1, workdir / "t2", shard_tokens, fsync=False)
        modes["trace to disk, no fsync (D every token)"].append(t)
        t, written = time_trace(loaded, rows, batch_size, 4, workdir / "t3", shard_tokens, fsync=False)
        modes["trace to disk, no fsync (D every 4th token)"].append(t)
    plain = statistics.median(modes["plain forward"])
    bytes_per_token = written / tokens
    result = {"model": name, "tokens": tokens, "batch": list(rows[:batch_size].shape), "repeats": repeats,
              "bytes_per_token": bytes_per_token, "disk_floor_s": written / bandwidth, "modes": {}}
    for mode, times in modes.items():
        med = statistics.median(times)
        result["modes"][mode] = {"median_s": med, "tokens_per_s": tokens / med, "overhead": med / plain - 1.0,
                                 "all_s": times}
    return result


def to_markdown(results: list[dict], bandwidth: float, command: str, device: str) -> str:
    lines = ["# Tracing overhead", "", f"`{command}` on {device}; torch {torch.__version__}.", "",
             f"Disk write bandwidth measured in the same run (1 GiB, write + fsync): {bandwidth / 1e9:.2f} GB/s.",
             "Overhead is against the plain forward of the same batches; medians of the repeats.", ""]
    for r in results:
        lines += [f"## {r['model']}", "",
                  f"{r['tokens']:,} tokens in batches of {r['batch'][0]} x {r['batch'][1]}; "
                  f"{r['bytes_per_token']:,.0f} bytes written per token; disk floor for the whole trace "
                  f"{r['disk_floor_s']:.3f} s.", "",
                  "| mode | median time | tokens/s | overhead |", "|---|---|---|---|"]
        for mode, m in r["modes"].items():
            lines.append(f"| {mode} | {m['median_s']:.3f} s | {m['tokens_per_s']:,.0f} | {100 * m['overhead']:+.1f}% |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=1 << 18, help="tokens per run and model")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=None, help="where traces are written (default: a temp dir)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("this benchmark needs a CUDA GPU")
    workdir = Path(tempfile.mkdtemp(dir=args.workdir))
    bandwidth = disk_write_bandwidth(workdir)
    demo = load_moe_model(None, device="cuda")
    rows = pack_rows(load_text_dataset(None, "train"), demo.tokenizer, "text", args.seq_len, args.tokens)
    results = [bench_model("demo-moe (12 layers, 32 experts, top-4, hidden 128, bf16)", demo, rows, 64,
                           args.repeats, workdir, bandwidth, 1 << 16)]
    del demo
    big = qwen3_30b_shaped()
    results.append(bench_model("Qwen3-30B-A3B shape, 4 layers, random weights (bf16)", big, rows[: max(16, len(rows) // 4)],
                               16, args.repeats, workdir, bandwidth, 1 << 14))
    shutil.rmtree(workdir, ignore_errors=True)
    command = "python benchmarks/trace_overhead.py " + " ".join(sys.argv[1:])
    device = torch.cuda.get_device_name()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "trace_overhead.json").write_text(json.dumps(
        {"command": command.strip(), "device": device, "torch": torch.__version__, "disk_write_bytes_per_s": bandwidth,
         "results": results}, indent=2) + "\n")
    md = to_markdown(results, bandwidth, command.strip(), device)
    (args.out / "trace_overhead.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
