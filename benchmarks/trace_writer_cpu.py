"""Throughput of the trace writer alone (CPU): TraceWriter and BackgroundWriter, no model.

    python benchmarks/trace_writer_cpu.py                  # writes benchmarks/results/trace_writer_cpu.md
    python benchmarks/trace_writer_cpu.py --baseline HEAD~1 --gb 0.5 --repeats 3 --dir /mnt/fast

Synthetic trace batches of two shapes go through the writer: the demo model's
(12 layers, hidden 128, 32 experts, top-4, batches of 64 x 256 tokens, shards of
65,536 tokens) and Qwen3-30B-A3B's (4 layers, hidden 2048, 128 experts, top-8,
batches of 16 x 256, shards of 16,384 tokens), stored in bf16, about --gb GB of
whole shards per run. Modes:

* direct: the main thread calls TraceWriter.add in a loop; the writer alone.
* background: the tracer's BackgroundWriter thread does the writing while the main
  thread stands in for the model: per batch, a loop of small torch ops calibrated
  to take as long as the real forward + recording did on an H200
  (--forward-tok-s, from benchmarks/results/trace_overhead.md). Those ops hold the
  GIL between calls as a Python forward with hooks does. The busy work alone sets
  a ceiling, quoted with the results.

Each mode runs with fsync per shard and without. MB/s counts shard bytes
(10^6 bytes) over the time from the first add() to the last shard being in
place; medians of --repeats. The current writer is compared against a baseline
taken from git (--baseline REV, default HEAD) or from a folder holding store.py
and cli.py (--baseline-dir), loaded as modules next to the current ones and run
in the same process, interleaved run by run, so both see the same machine.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import tracing.cli as new_cli  # noqa: E402
import tracing.store as new_store  # noqa: E402
from benchmarks.trace_overhead import disk_write_bandwidth  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"

SHAPES = {
    "demo": dict(title="demo-moe shape: 12 layers, hidden 128, 32 experts, top-4, bf16",
                 layers=12, hidden=128, experts=32, top_k=4, seq_len=256, batch=64, shard_tokens=65536,
                 forward_tok_s=357_000),
    "qwen3": dict(title="Qwen3-30B-A3B shape: 4 layers, hidden 2048, 128 experts, top-8, bf16",
                  layers=4, hidden=2048, experts=128, top_k=8, seq_len=256, batch=16, shard_tokens=16384,
                  forward_tok_s=140_000),
}


# --------------------------------------------------------------------------- implementations


def load_baseline(rev: str | None, src_dir: Path | None) -> tuple[types.ModuleType, type, str]:
    """The writer of another revision, as modules `tracing._baseline_store` / `_baseline_cli`."""
    def source(name: str) -> str:
        if src_dir is not None:
            return (src_dir / name).read_text()
        return subprocess.run(["git", "-C", str(REPO), "show", f"{rev}:tracing/{name}"],
                              check=True, capture_output=True, text=True).stdout

    label = str(src_dir) if src_dir is not None else subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "--short", rev], check=True, capture_output=True, text=True
    ).stdout.strip()
    mods = []
    for name in ("store.py", "cli.py"):
        mod = types.ModuleType(f"tracing._baseline_{name[:-3]}")
        mod.__package__ = "tracing"  # relative imports resolve to the current package
        mod.__file__ = f"{label}:tracing/{name}"
        sys.modules[mod.__name__] = mod
        exec(compile(source(name), mod.__file__, "exec"), mod.__dict__)
        mods.append(mod)
    return mods[0], mods[1].BackgroundWriter, label


# --------------------------------------------------------------------------- synthetic data


def make_batch(s: dict, seed: int) -> dict[str, torch.Tensor]:
    """One trace batch as the recorder hands it over: bf16 residuals and logits, int32 ids,
    float32 weights."""
    g = torch.Generator().manual_seed(seed)
    n = s["batch"] * s["seq_len"]
    batch = {"token_ids": torch.randint(0, 150_000, (n,), generator=g, dtype=torch.int32)}
    for l in range(s["layers"]):
        logits = torch.randn(n, s["experts"], generator=g)
        top = logits.topk(s["top_k"], dim=-1)
        batch[f"layers.{l}.residual"] = torch.randn(n, s["hidden"], generator=g).to(torch.bfloat16)
        batch[f"layers.{l}.router_logits"] = logits.to(torch.bfloat16)
        batch[f"layers.{l}.topk_ids"] = top.indices.to(torch.int32)
        batch[f"layers.{l}.topk_weights"] = top.values.softmax(-1)
    return batch


def make_state(s: dict, step: int) -> dict[str, torch.Tensor]:
    """Accumulators shaped like TraceRecorder.state()."""
    state = {"token_offset": torch.tensor([step], dtype=torch.long)}
    for l in range(s["layers"]):
        state[f"layers.{l}.dv_sum"] = torch.full((s["experts"], s["hidden"]), float(step), dtype=torch.float64)
        state[f"layers.{l}.dv_tokens"] = torch.full((s["experts"],), step, dtype=torch.long)
        state[f"layers.{l}.counts"] = torch.full((s["experts"],), step, dtype=torch.long)
    return state


# --------------------------------------------------------------------------- main-thread stand-in


def busy(iters: int, x: torch.Tensor) -> torch.Tensor:
    """Small torch ops with Python between them, like a forward pass with hooks."""
    record = {}
    for i in range(iters):
        x = torch.tanh(x * 1.0001 + 0.001)
        record[i & 15] = x
    return x


def calibrate_busy() -> float:
    """Seconds per busy() iteration on this machine, alone (best of 5)."""
    x = torch.zeros(64)
    busy(500, x)
    best = min(_timed(lambda: busy(5000, x)) for _ in range(5))
    return best / 5000


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


# --------------------------------------------------------------------------- runs


def run_once(store_mod, background_cls, s: dict, batches: list, n_batches: int, fsync: bool, mode: str,
             busy_iters: int, workdir: Path) -> tuple[float, float, int]:
    """(wall seconds, CPU seconds of the whole process, shard bytes) of one run."""
    out = Path(tempfile.mkdtemp(dir=workdir)) / "trace"
    seqs_per_shard = s["shard_tokens"] // s["seq_len"]
    per_shard = seqs_per_shard // s["batch"]
    meta = {"model": {"id": "synthetic", "hidden_size": s["hidden"], "num_experts": s["experts"],
                      "top_k": s["top_k"]}, "dataset": {"id": "synthetic"}}
    writer = store_mod.TraceWriter(out, meta, list(range(s["layers"])), s["seq_len"], seqs_per_shard, "bf16",
                                   fsync=fsync)
    states = [make_state(s, i) for i in range(2)]
    x = torch.zeros(64)
    try:
        if mode == "direct":
            start, cpu = time.perf_counter(), time.process_time()
            for i in range(n_batches):
                state = states[i % 2]
                writer.add(batches[i % len(batches)], state=lambda st=state: st)
        else:
            bg = background_cls(writer)
            try:
                start, cpu = time.perf_counter(), time.process_time()
                for i in range(n_batches):
                    x = busy(busy_iters, x)
                    boundary = (i + 1) % per_shard == 0
                    bg.put(batches[i % len(batches)], states[i % 2] if boundary else None)
                bg.finish()
            finally:
                bg.stop()
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
        assert writer.num_shards == n_batches // per_shard, (writer.num_shards, n_batches, per_shard)
        return seconds, cpu, writer.bytes_written
    finally:
        shutil.rmtree(out.parent, ignore_errors=True)


def sha256_speed() -> float:
    import hashlib

    data = os.urandom(128 << 20)
    hashlib.sha256(data[: 1 << 20]).digest()
    return len(data) / min(_timed(lambda: hashlib.sha256(data).digest()) for _ in range(3))


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", default="demo,qwen3", help="comma-separated: " + ",".join(SHAPES))
    p.add_argument("--modes", default="direct,background")
    p.add_argument("--gb", type=float, default=0.8, help="GB of shards per run (rounded to whole shards)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--baseline", default="HEAD", help="git revision of the writer to compare against")
    p.add_argument("--baseline-dir", type=Path, help="folder with the baseline's store.py and cli.py (instead of git)")
    p.add_argument("--no-baseline", action="store_true")
    p.add_argument("--dir", type=Path, default=None, help="where shards are written (default: a temp dir)")
    p.add_argument("--no-disk-probe", action="store_true", help="skip the 1 GiB write + fsync bandwidth probe")
    p.add_argument("--out", type=Path, default=RESULTS / "trace_writer_cpu.md")
    args = p.parse_args()

    impls = {}
    baseline_label = None
    if not args.no_baseline:
        old_store, old_bg, baseline_label = load_baseline(args.baseline, args.baseline_dir)
        impls["baseline"] = (old_store, old_bg)
    impls["current"] = (new_store, new_cli.BackgroundWriter)
    modes = args.modes.split(",")

    workdir = Path(tempfile.mkdtemp(prefix="trace-writer-bench-", dir=args.dir))
    load_before = os.getloadavg()
    bandwidth = None if args.no_disk_probe else disk_write_bandwidth(workdir)
    sha_speed = sha256_speed()
    per_iter = calibrate_busy()
    print(f"disk {bandwidth / 1e6 if bandwidth else float('nan'):.0f} MB/s, sha256 {sha_speed / 1e6:.0f} MB/s, "
          f"busy iteration {per_iter * 1e6:.1f} us", flush=True)

    sections = []
    for shape in args.shapes.split(","):
        s = SHAPES[shape]
        batches = [make_batch(s, seed) for seed in range(2)]
        batch_tokens = s["batch"] * s["seq_len"]
        per_shard = s["shard_tokens"] // batch_tokens
        batch_bytes = sum(t.numel() * t.element_size() for t in batches[0].values())
        shards = max(1, round(args.gb * 1e9 / (batch_bytes * per_shard)))
        n_batches = shards * per_shard
        forward_s = batch_tokens / s["forward_tok_s"]
        busy_iters = max(1, round(forward_s / per_iter))
        x = torch.zeros(64)
        busy_alone = statistics.median(_timed(lambda: busy(busy_iters * n_batches, x)) for _ in range(3))
        busy_cpu = time.process_time()
        busy(busy_iters * n_batches, x)
        busy_cpu = time.process_time() - busy_cpu
        ceiling = batch_bytes * n_batches / busy_alone
        print(f"{shape}: {shards} shards of {batch_bytes * per_shard / 1e6:.0f} MB, {n_batches} batches; "
              f"busy work {busy_alone / n_batches * 1e3:.1f} ms per batch", flush=True)
        results: dict[tuple, list[float]] = {}
        cpu_per_gb: dict[tuple, list[float]] = {}
        nbytes = 0
        for impl in impls.values():  # warm-up: allocator, page cache, thread pools
            run_once(*impl, s, batches, per_shard, False, "direct", busy_iters, workdir)
        for rep in range(args.repeats):  # interleaved, so drift of the machine hits every variant alike
            for mode in modes:
                for fsync in (True, False):
                    for name, impl in impls.items():
                        seconds, cpu, nbytes = run_once(*impl, s, batches, n_batches, fsync, mode, busy_iters,
                                                        workdir)
                        results.setdefault((mode, fsync, name), []).append(nbytes / seconds / 1e6)
                        if mode == "background":
                            cpu -= busy_cpu  # the main thread's stand-in work, the same for every variant
                        cpu_per_gb.setdefault((mode, fsync, name), []).append(cpu / (nbytes / 1e9))
                        print(f"  rep {rep} {mode:10s} fsync={fsync!s:5s} {name:8s} {nbytes / seconds / 1e6:8.0f} MB/s "
                              f"{cpu_per_gb[(mode, fsync, name)][-1]:6.2f} CPU s/GB", flush=True)
        sections.append((shape, s, shards, n_batches, nbytes, busy_alone / n_batches, ceiling, results, cpu_per_gb))
        del batches

    shutil.rmtree(workdir, ignore_errors=True)
    load_after = os.getloadavg()
    command = "python benchmarks/trace_writer_cpu.py " + " ".join(sys.argv[1:])
    import safetensors

    lines = ["# Trace writer throughput (CPU only)", "",
             f"`{command.strip()}`", "",
             f"{cpu_name()}, {os.cpu_count()} logical CPUs; Python {platform.python_version()}, "
             f"torch {torch.__version__}, safetensors {safetensors.__version__}; "
             f"load average {load_before[0]:.1f} before, {load_after[0]:.1f} after.",
             "Disk write bandwidth (1 GiB, write + fsync): "
             + (f"{bandwidth / 1e6:,.0f} MB/s." if bandwidth else "not measured."),
             f"sha256 of one buffer on one thread: {sha_speed / 1e6:,.0f} MB/s.", ""]
    if baseline_label:
        lines += [f"baseline: the writer at `{baseline_label}` (tracing/store.py, BackgroundWriter of tracing/cli.py); "
                  "current: the working tree. Both run in the same process, interleaved.", ""]
    lines += ["MB/s = shard bytes (10^6) per second, median of the repeats (all repeats in brackets). "
              "CPU s/GB = CPU time of the whole process (all threads, user + system) per 10^9 shard bytes, "
              "median; in background mode less the CPU time of the main thread's busy work measured alone. "
              "On a shared machine CPU time is steadier than wall time.", ""]
    names = list(impls)
    for shape, s, shards, n_batches, nbytes, busy_per_batch, ceiling, results, cpu_per_gb in sections:
        lines += [f"## {s['title']}", "",
                  f"{n_batches} batches of {s['batch']} x {s['seq_len']} tokens, {shards} shards of "
                  f"{s['shard_tokens']:,} tokens; {nbytes / 1e6:,.0f} MB of shards per run. Background mode: "
                  f"{busy_per_batch * 1e3:.1f} ms of busy work per batch on the main thread (the H200's forward + "
                  f"recording at {s['forward_tok_s']:,} tokens/s), so the busy work alone caps it at "
                  f"{ceiling / 1e6:,.0f} MB/s.", ""]
        header = "| mode | fsync | " + " | ".join(f"{n} MB/s" for n in names)
        header += " | current / baseline |" if len(names) == 2 else " |"
        header += "".join(f" {n} CPU s/GB |" for n in names)
        lines += [header, "|" + "---|" * (2 * len(names) + 2 + (len(names) == 2))]
        for mode in modes:
            for fsync in (True, False):
                meds = [statistics.median(results[(mode, fsync, n)]) for n in names]
                cells = [f"{m:,.0f} [{', '.join(f'{v:.0f}' for v in results[(mode, fsync, n)])}]"
                         for m, n in zip(meds, names)]
                row = f"| {mode} | {'on' if fsync else 'off'} | " + " | ".join(cells)
                row += f" | {meds[1] / meds[0]:.2f}x |" if len(names) == 2 else " |"
                row += "".join(f" {statistics.median(cpu_per_gb[(mode, fsync, n)]):.2f} |" for n in names)
                lines.append(row)
        lines.append("")
    md = "\n".join(lines)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(md)
    print(md)


if __name__ == "__main__":
    main()
