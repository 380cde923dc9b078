"""Where a decode step's time goes: GPU time of its graphs, host time per layer, kernels.

    python benchmarks/profile_decode.py --layers 8

Model A's shape (benchmarks/runtime_decode.py) with fewer layers. For each mode it
measures, on the same forced tokens:

- wall time per decoded token (median), as `infer bench` does;
- the GPU time of the decode step alone: every captured graph of one step replayed
  back to back with no host decision between them, timed with CUDA events (what a
  token would cost if the host never stood in the way);
- the host's time per MoE layer inside the runtime's per-layer decisions;
- from the torch profiler over a few steps: kernels per step, their summed time, and
  the largest kernels.

Results: benchmarks/results/profile_decode.{json,md}.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.runtime_decode import EMBEDDING_STD, gpu_busy_ms, gpu_events, qwen3_30b_shape  # noqa: E402
from runtime.bench import record_exact  # noqa: E402
from runtime.build import configure, parts_random  # noqa: E402
from runtime.config import RuntimeConfig  # noqa: E402
from runtime.cuda_graphs import DecodeGraphs  # noqa: E402
from runtime.decode_attention import NAME as GROUPED_ATTENTION  # noqa: E402
from runtime.predict import router_predictor  # noqa: E402
from specmoe.paths import REPO_ROOT  # noqa: E402

RESULTS = REPO_ROOT / "benchmarks" / "results"


def _timed(obj, name: str, bucket: list) -> None:
    fn = getattr(obj, name)

    def wrapper(*a, **k):
        t0 = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            bucket.append(time.perf_counter() - t0)

    setattr(obj, name, wrapper)


def profile_mode(parts, config, prompt, tokens, warmup, recorded, host_profile: Path | None = None,
                 native_layers: bool = True, queue_ahead: int | None = None, chrome_trace: Path | None = None,
                 resident_steps: str = "1") -> dict:
    predictor, prefetch = None, config.resolved_prefetch()
    if config.prefetch == "quasi":   # model A's random weights: default vectors 0, as runtime_decode runs it
        predictor = router_predictor(parts.model, parts.family, parts.spec, "quasi", device=parts.device)
        config = dataclasses.replace(config, prefetch="current")
    engine = configure(parts, config, recorded=recorded if config.prefetch == "oracle" else None,
                       predictor=predictor)
    engine.use_graphs = True   # on the CPU (a dry run) too: the same host path, pieces called in turn
    native_default, DecodeGraphs.native_layers = DecodeGraphs.native_layers, native_layers
    ahead_default = DecodeGraphs.queue_ahead
    resident_default = DecodeGraphs.resident_steps, DecodeGraphs.resident_depth
    DecodeGraphs.resident_steps = resident_steps != "0"
    DecodeGraphs.resident_depth = 0 if resident_steps == "all" else resident_default[1]
    if queue_ahead is not None:
        DecodeGraphs.queue_ahead = queue_ahead
    try:
        moe = engine.moe
        host: dict[str, list] = {"graphed_layer": [], "after_graphed_compute": []}
        # finer: where the host's time per layer goes inside those two
        parts_timed = ("_prepare_layer", "_flush_table_ops", "_wait_pumping", "_graphed_misses", "_prefetch",
                       "_copy_many", "_read_all", "_copy_share_now", "_table_misses")
        host.update({name: [] for name in parts_timed if hasattr(moe, name)})
        cpu_calls: list = []
        engine.step(prompt)
        cuda = engine.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize()
        walls = []
        import cProfile
        import pstats

        profiler = cProfile.Profile()
        for i, tok in enumerate(tokens):
            if i == warmup:
                for name, bucket in host.items():
                    _timed(moe, name, bucket)
                if moe.cpu is not None:
                    _timed(moe.cpu, "compute", cpu_calls)
                for name in ("add_host", "_drive"):   # _drive: the host waiting for a queued step's CPU parts
                    host[name] = []
                    _timed(engine.decode_graphs, name, host[name])
                engine.telemetry.reset_counters()
            t0 = time.perf_counter()
            if i >= len(tokens) - 8 and host_profile is not None:
                profiler.enable()
            logits = engine.step(torch.tensor([tok]))
            int(torch.argmax(logits[-1]))
            profiler.disable()
            walls.append(time.perf_counter() - t0)
        # The host timings cover every step after the warm-up (the cProfiled ones too), taken
        # before the kernel profiler's steps add to them.
        timed_steps = len(walls) - warmup
        host_sums = {k: sum(v) for k, v in host.items()}
        cpu_calls = list(cpu_calls)
        summary = {k: v for k, v in engine.telemetry.summary().items() if k != "per_layer"}
        tel = engine.telemetry
        summary.update({"cpu_experts_per_step": tel.cpu_experts / timed_steps,
                        "mib_copied_per_step": tel.bytes_copied / timed_steps / 2**20,
                        "cpu_wait_ms_per_step": 1e3 * tel.cpu_wait_seconds / timed_steps,
                        "routing_wait_ms_per_step": 1e3 * tel.routing_wait_seconds / timed_steps,
                        "cpu_expert_ms_per_step": 1e3 * tel.cpu_expert_seconds / timed_steps,
                        "copy_wait_ms_per_step": 1e3 * summary["gpu_copy_wait_seconds"] / timed_steps})
        walls = walls[warmup:-8] if host_profile is not None else walls[warmup:]
        if host_profile is not None:
            with open(host_profile, "a") as f:
                f.write(f"\n===== {prefetch}+{config.on_miss} budget {config.gpu_expert_budget} "
                        f"table {config.device_table} compile {config.compile} (8 steps)\n")
                pstats.Stats(profiler, stream=f).sort_stats("tottime").print_stats(25)
        n_moe = len(parts.spec.moe_layers)
        host_us = {k: 1e6 * v / (timed_steps * n_moe) for k, v in host_sums.items()}
        graphs = engine.decode_graphs
        # the graphs alone, back to back: the device's own time for a step
        gpu_ms = graphs.device_ms() if cuda else float("nan")
        # Kernels of a few steps, from the profiler.
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
            for tok in tokens[:3]:
                logits = engine.step(torch.tensor([tok]))
                int(torch.argmax(logits[-1]))
            if cuda:
                torch.cuda.synchronize()
        if chrome_trace is not None:   # every kernel and copy of the 3 steps on its stream, for a timeline
            import gzip
            import shutil

            raw = chrome_trace.with_suffix("")
            prof.export_chrome_trace(str(raw))
            with open(raw, "rb") as src, gzip.open(chrome_trace, "wb") as dst:
                shutil.copyfileobj(src, dst)
            raw.unlink()
            events = read_trace(chrome_trace)
            chain = serial_chain(events) if graphs.run_ahead else None
            copies = copy_timeline(events, moe.store.layout.block_bytes, 3)
        else:
            chain = copies = None
        kernels = gpu_events(prof)
        # The host's side: which calls take the host's time (CUDA API calls included).
        host_ops = sorted(((a.key, a.self_cpu_time_total / 3, a.count / 3) for a in prof.key_averages()),
                          key=lambda item: -item[1])[:20]
        count = max(1, len(kernels)) / 3
        busy_ms = gpu_busy_ms(kernels, 3)
        top = Counter()
        for e in kernels:
            top[e.name[:80]] += e.device_time / 3
        return {
            "mode": f"{prefetch}+{config.on_miss}",
            "budget": config.gpu_expert_budget, "device_table": config.device_table,
            "compile": config.compile_mode if config.compile else False,
            "oracle_hit_rate": config.oracle_hit_rate,
            "wall_ms_median": 1e3 * statistics.median(walls),
            "graphs_only_ms_median": gpu_ms,
            "graphs_per_step": graphs.graph_count,
            "host_us_per_moe_layer": host_us,
            "kernels_per_step": count, "kernels_per_moe_layer": count / n_moe,
            "kernel_busy_ms_per_step": busy_ms,
            "top_kernels_us_per_step": {k: round(v, 1) for k, v in top.most_common(15)},
            "top_host_ops_us_per_step": {k[:80]: {"self_us": round(us, 1), "calls": round(n, 1)}
                                         for k, us, n in host_ops},
            "cache_hit_rate": summary.get("cache_hit_rate"),
            "cpu_compute_calls_per_step": len(cpu_calls) / timed_steps if cpu_calls else 0,
            "cpu_compute_us_per_call": 1e6 * statistics.median(cpu_calls) if cpu_calls else None,
            # A stalled parallel region shows in the mean and the tail, not in the median.
            "cpu_compute_us_mean_p90_max": [round(1e6 * v) for v in (statistics.fmean(cpu_calls),
                                            sorted(cpu_calls)[int(0.9 * (len(cpu_calls) - 1))], max(cpu_calls))]
            if cpu_calls else None,
            "wall_ms_mean_p90": [1e3 * statistics.fmean(walls), 1e3 * sorted(walls)[int(0.9 * (len(walls) - 1))]],
            "cpu_threads": moe.cpu.threads if moe.cpu is not None else torch.get_num_threads(),
            "cpu_demand_share": config.cpu_demand_share,
            "run_ahead": bool(graphs.run_ahead), "host_read_share": moe.host_read_share,
            "native_layers": graphs.cpu_parts_queued, "queue_ahead": DecodeGraphs.queue_ahead,
            "resident_steps": (("the whole step queued" if graphs.resident_depth == 0
                                else f"the host {graphs.resident_depth} layer ahead")
                               if graphs.resident_steps and graphs.all_resident() else None),
            "host_read_auto": config.host_read_share is None,
            "grouped_attention": engine.model.config._attn_implementation == GROUPED_ATTENTION,
            "telemetry": summary,
            "serial_chain_us": chain,
            "copy_timeline": copies,
            "prefetch_window": config.prefetch_window,
            "cpu_copy_share_at_end": moe.cpu_copy_share if moe.cpu is not None else None,
            "cpu_demand_share_at_end": moe.cpu_demand_share if moe.cpu is not None else None,
        }
    finally:
        DecodeGraphs.native_layers = native_default
        DecodeGraphs.queue_ahead = ahead_default
        DecodeGraphs.resident_steps, DecodeGraphs.resident_depth = resident_default
        engine.close()
        engine = graphs = moe = prof = None   # the frame's references: slots, graphs and their pools
        import gc

        gc.collect()   # the captured graphs and their pools go with the engine, before the next mode's slots
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def read_trace(trace: Path) -> list:
    """The events of a profiled trace written with --chrome-trace (gzipped JSON)."""
    import gzip

    with gzip.open(trace) as f:
        return json.load(f)["traceEvents"]


def serial_chain(events: list) -> dict | None:
    """Medians over a queued `cpu` step's layers, from a profiled trace (--chrome-trace), in us:
    a layer's period (the routing of one layer landing in pinned memory to the next one's), the
    longest gap within it (the GPU waiting at the gate for the CPU's part), then the next layer's
    graph from its first kernel to its first staging copy (attention and routing), and the
    staging copies through the last (the step's count). The serial part of a CPU layer is the
    last two. `events`: read_trace's. None where the trace has no staged routing."""
    gpu = sorted((e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")), key=lambda e: e["ts"])
    # The count: an 8-byte device-to-host copy, the last a layer stages.
    counts = [i for i, e in enumerate(gpu) if e["cat"] == "gpu_memcpy" and "DtoH" in e["name"]
              and e["args"].get("bytes") == 8]
    rows = []
    for a, b in zip(counts, counts[1:]):
        first_copy = b
        while first_copy - 1 > a and gpu[first_copy - 1]["cat"] == "gpu_memcpy" and "DtoH" in gpu[first_copy - 1]["name"]:
            first_copy -= 1
        ends = [e["ts"] + e["dur"] for e in gpu[a:first_copy]]
        gaps = [gpu[i + 1]["ts"] - ends[i - a] for i in range(a, first_copy - 1)]
        if not gaps:
            continue
        longest = max(range(len(gaps)), key=gaps.__getitem__)
        start = gpu[a + longest + 1]["ts"]
        landed = gpu[b]["ts"] + gpu[b]["dur"]
        rows.append((landed - (gpu[a]["ts"] + gpu[a]["dur"]), gaps[longest], gpu[first_copy]["ts"] - start,
                     landed - gpu[first_copy]["ts"]))
    if not rows:
        return None
    names = ("period", "gate_gap", "attention_and_routing", "staging")
    return {n: round(statistics.median(r[i] for r in rows), 1) for i, n in enumerate(names)} | {"layers": len(rows)}


def copy_timeline(events: list, expert_bytes: int, steps: int) -> dict | None:
    """Where the copy engine idles in a profiled trace (--chrome-trace) of `steps` steps: from the
    first expert copy to the last, the time some expert copy is running (streams overlapping
    counted once, per step), and the idle rest's gaps: the steps - 1 longest (the tokens' ends:
    the last layer, the logits and the next token's first layer before its first copy), short
    ones (under 20 us, a copy's own start) and longer ones (the copies running dry inside a
    step). The profiler slows the host's graph launches, so host-bound gaps read longer here
    than they are unprofiled. `events`: read_trace's. None where the trace has no expert copy."""
    copies = sorted(((e["ts"], e["ts"] + e["dur"]) for e in events if e.get("cat") == "gpu_memcpy"
                     and "HtoD" in e["name"] and e["args"].get("bytes") == expert_bytes))
    if not copies:
        return None
    spans, gaps = [], []   # union of the copies' intervals, and the gaps between them
    for a, b in copies:
        if spans and a <= spans[-1][1]:
            spans[-1][1] = max(spans[-1][1], b)
        else:
            if spans:
                gaps.append(a - spans[-1][1])
            spans.append([a, b])
    busy = sum(b - a for a, b in spans)
    gaps.sort()
    token_ends = gaps[-(steps - 1):] if steps > 1 and len(gaps) >= steps - 1 else []
    inner = gaps[:len(gaps) - len(token_ends)]
    short = [g for g in inner if g < 20]
    long = [g for g in inner if g >= 20]
    per = 1.0 / steps
    return {"copies_per_step": len(copies) * per, "busy_ms_per_step": 1e-3 * busy * per,
            "rate_while_busy_gb_s": len(copies) * expert_bytes / busy / 1e3,
            "idle_short_ms_per_step": 1e-3 * sum(short) * per, "short_gaps_per_step": len(short) * per,
            "idle_long_ms_per_step": 1e-3 * sum(long) * per, "long_gaps_per_step": len(long) * per,
            "long_gap_us_median": statistics.median(long) if long else 0.0,
            "token_end_us": [round(g, 1) for g in token_ends]}


def timeline(us: dict | None) -> str:
    return "-" if not us else ", ".join(f"{v:.0f}" for v in us.values())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=2048, help="hidden size (smaller for a dry run on the CPU)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--decode", type=int, default=40)
    p.add_argument("--warmup", type=int, default=8)
    p.add_argument("--out", default=str(RESULTS / "profile_decode"))
    p.add_argument("--host-profile", action="store_true", help="cProfile the last 8 steps of each mode")
    p.add_argument("--chrome-trace", action="store_true",
                   help="write the profiled steps' trace per run: <out>.<run>.trace.json.gz (chrome://tracing, Perfetto)")
    p.add_argument("--modes", default=None, help="indices of the modes to run, e.g. 1,3,6")
    p.add_argument("--threads", default="0", help="CPU expert threads, one run each: e.g. 16,15 (0: torch's default)")
    p.add_argument("--host-read-share", default="0",
                   help="exact table modes: shares of misses the GPU reads in host memory, one run each: e.g. 0,0.25")
    p.add_argument("--run-ahead", default="1", help="cpu modes: 1, 0 or both (1,0): queue a layer ahead behind a gate")
    p.add_argument("--native-layers", default="1",
                   help="run-ahead cpu modes: 1, 0 or both (1,0): the step queued whole, each layer's CPU part "
                        "a native call on a thread of its own that waits for the routing and opens the gate "
                        "(0: the Python path, a layer ahead)")
    p.add_argument("--queue-ahead", default=str(DecodeGraphs.queue_ahead),
                   help="queued steps: CPU parts the host submits ahead of the last one run, one run each: e.g. 2,0 "
                        "(0: no limit)")
    p.add_argument("--resident-steps", default="1",
                   help="a step with every expert on the GPU: 1 (its graphs queued with no host decision, the host "
                        "a layer ahead), all (the whole step queued at once), 0 (each layer's routing read, as "
                        "when experts may miss); several: one run each, e.g. 1,all,0")
    p.add_argument("--grouped-attention", default="1",
                   help="1, 0 or both (1,0): grouped-query decode attention (0: keys and values copied per query head)")
    p.add_argument("--demand-share", default="0",
                   help="cpu modes: shares of misses copied when the routing is read, one run each: e.g. 0,0.3,auto "
                        "(auto: measured, then adapted)")
    args = p.parse_args()
    base = RuntimeConfig(device=args.device, dtype="bf16", max_context=args.context + args.decode + 8, track_hits=True)
    parts = parts_random(qwen3_30b_shape(args.layers, args.hidden), base, progress=False, embedding_std=EMBEDDING_STD)
    gen = torch.Generator().manual_seed(0)
    vocab = parts.model.config.vocab_size
    prompt = torch.randint(0, vocab, (args.context,), generator=gen)
    # Forced random tokens: a random model's greedy output repeats one token, and so one routing.
    # The profiled steps follow the timed ones: the oracle needs their routing too.
    forced = torch.randint(0, vocab, (args.decode + 8,), generator=gen).tolist()
    _, recorded = record_exact(parts, base, prompt, args.decode + 8, forced=forced)
    rows = []
    # (prefetch, on_miss, budget, device table, oracle hit rate, compile)
    modes = [("none", "fetch", "100%", True, 1.0, False), ("none", "fetch", "100%", True, 1.0, True),
             ("none", "fetch", "100%", True, 1.0, "max-autotune-no-cudagraphs"),
             ("none", "fetch", "100%", False, 1.0, True), ("oracle", "fetch", "100%", True, 1.0, True),
             ("oracle", "fetch", "25%", False, 0.85, True), ("oracle", "fetch", "25%", True, 0.85, True),
             ("oracle", "cpu", "25%", False, 0.85, True), ("oracle", "speculate", "0", False, 0.85, True),
             ("oracle", "cpu", "0", True, 0.85, True), ("oracle", "cpu", "25%", True, 0.85, True),
             ("oracle", "cpu", "50%", True, 0.85, True), ("oracle", "fetch", "0", True, 0.85, True, 2),
             ("none", "fetch", "0", True, 1.0, True), ("none", "cpu", "0", True, 1.0, True),
             ("none", "cpu", "25%", True, 1.0, True), ("none", "cpu", "50%", True, 1.0, True),
             ("current", "fetch", "100%", True, 1.0, True), ("quasi", "fetch", "0", True, 1.0, True, 2),
             ("quasi", "speculate", "0", False, 1.0, True), ("quasi", "fetch", "0", True, 1.0, True),
             ("quasi", "fetch", "0", True, 1.0, True, 4), ("quasi", "fetch", "100%", True, 1.0, True)]
    if args.modes:
        modes = [modes[int(i)] for i in args.modes.split(",")]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    host_profile = out.with_suffix(".host.txt") if args.host_profile else None
    variants = [(int(t), None if d == "auto" else float(d), a == "1", None if r == "auto" else float(r), pa == "1",
                 n == "1", int(q), rs)
                for t in args.threads.split(",")
                for d in args.demand_share.split(",") for a in args.run_ahead.split(",")
                for r in args.host_read_share.split(",")   # r: a share, or auto (measured at start)
                for pa in args.grouped_attention.split(",") for n in args.native_layers.split(",")
                for q in args.queue_ahead.split(",") for rs in args.resident_steps.split(",")]
    for (prefetch, on_miss, budget, table, hit, compiled, *window), (threads, demand, ahead, reads, grouped, native, q,
                                                                      resident) \
            in ((m, v) for m in modes for v in variants):
        # compiled: False, True, or a torch.compile mode; window: prefetch_window (default 0)
        mode = compiled if isinstance(compiled, str) else "default"
        config = dataclasses.replace(base, prefetch=prefetch, on_miss=on_miss, gpu_expert_budget=budget,
                                     device_table=table, oracle_hit_rate=hit, compile=bool(compiled), compile_mode=mode,
                                     prefetch_window=window[0] if window else 0, cpu_threads=threads,
                                     cpu_demand_share=demand, run_ahead=ahead, grouped_attention=grouped,
                                     host_read_share=reads if table and on_miss != "speculate" else 0.0)
        t0 = time.perf_counter()
        trace = out.with_suffix(f".{len(rows)}.trace.json.gz") if args.chrome_trace else None
        row = profile_mode(parts, config, prompt, forced[:args.decode], args.warmup, recorded, host_profile, native, q,
                           trace, resident)
        row["seconds"] = time.perf_counter() - t0
        print(json.dumps(row), flush=True)
        rows.append(row)
    omp = {k: v for k, v in os.environ.items() if k.startswith(("OMP_", "GOMP_", "KMP_", "SPECMOE_"))}
    result = {"command": " ".join(["python", "benchmarks/profile_decode.py", *sys.argv[1:]]), "layers": args.layers,
              "environment": omp, "threads": torch.get_num_threads(),
              "context": args.context, "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu", "rows": rows}
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    lines = ["# Where a decode step's time goes", "", f"    {result['command']}", "",
             f"Model A's shape with {args.layers} layers, context {args.context}, {result['device']}.", "",
             "| mode | budget | device table | compiled | wall ms | graphs alone ms | host us/layer (decide, after) "
             "| kernels/layer | kernel busy ms | cache hit | CPU expert ms | routing wait ms "
             "| queued step us: to first part, through last, after, queued after last |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        h = r["host_us_per_moe_layer"]
        after = h["after_graphed_compute"] + h.get("_drive", 0.0)
        lines.append(f"| {r['mode']} (p={r['oracle_hit_rate']}{', run ahead' if r.get('run_ahead') else ''}{', GPU reads %g' % r['host_read_share'] if r.get('host_read_share') else ''}{' (auto)' if r.get('host_read_auto') else ''}{', stock sdpa' if r.get('grouped_attention') is False else ''}{', queued %s ahead, native CPU parts' % (r.get('queue_ahead') or 'all') if r.get('native_layers') else ''}{', no host decision: %s' % r['resident_steps'] if r.get('resident_steps') else ''}{', window %d' % r['prefetch_window'] if r.get('prefetch_window') else ''}) | {r['budget']} | {r['device_table']} | {r['compile']} "
                     f"| {r['wall_ms_median']:.2f} | {r['graphs_only_ms_median']:.2f} "
                     f"| {h['graphed_layer']:.0f}, {after:.0f} | {r['kernels_per_moe_layer']:.0f} "
                     f"| {r['kernel_busy_ms_per_step']:.2f} | {r['cache_hit_rate']} "
                     f"| {r['telemetry']['cpu_expert_ms_per_step']:.2f} | {r['telemetry']['routing_wait_ms_per_step']:.2f} "
                     f"| {timeline(r['telemetry'].get('queued_step_us'))} |")
    timed = [r for r in rows if r.get("copy_timeline")]
    if timed:
        lines += ["", "Expert copies in the profiled steps (per token): the time some copy runs, its rate, and the "
                  "copy engine's idle time between the first copy and the last, split into short gaps (under 20 "
                  "us), longer ones inside a token, and the gap at each token's end.", "",
                  "| mode | copies | busy ms | GB/s while busy | short gaps: count, ms "
                  "| longer gaps: count, ms, median us | token end us |", "|---|---|---|---|---|---|---|"]
        for r in timed:
            c = r["copy_timeline"]
            lines.append(f"| {r['mode']}{' (window %d)' % r['prefetch_window'] if r.get('prefetch_window') else ''} "
                         f"| {c['copies_per_step']:.0f} | {c['busy_ms_per_step']:.2f} "
                         f"| {c['rate_while_busy_gb_s']:.1f} | {c['short_gaps_per_step']:.0f}, "
                         f"{c['idle_short_ms_per_step']:.2f} | {c['long_gaps_per_step']:.0f}, "
                         f"{c['idle_long_ms_per_step']:.2f}, {c['long_gap_us_median']:.0f} "
                         f"| {', '.join('%.0f' % g for g in c['token_end_us'])} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
