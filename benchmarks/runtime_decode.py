"""Decode speed of the runtime, modes side by side, beside the copy floor of each.

    python benchmarks/runtime_decode.py --decode 72 --warmup 8   # the complete run (about 6.5 minutes on an H200):
                                                                 # model B, accelerate's offload, model A at 1024 and
                                                                 # 8192 tokens; writes benchmarks/results/runtime_decode.*
    python benchmarks/runtime_decode.py --only a --quick         # model A's main modes only

Model A has Qwen3-30B-A3B's shape (48 layers, 128 experts, top-8, hidden 2048, expert
hidden 768, bf16: 58 GB of experts) with random weights built on the machine, through
the runtime's own host store and slots. It decodes forced random tokens, and its token
embeddings are wide enough that each token keeps its own routing through all layers:
random routers then route nearly uniformly, so model A's cache hit rates are
pessimistic (real models reuse experts far more), and its real predictors have nothing
to predict: model A also runs the `oracle` predictor thinned to a set hit rate (each
predicted expert replaced by a wrong one with probability 1 - p), labelled as such.
Model B is the demo model with its trained estimators: real routing, real hit rates.

Every mode decodes the same tokens (an exact pass records them first); times are
medians over the decoded tokens after warm-up; the copy floor of a mode is its bytes
copied per token over the host-to-device bandwidth measured in the same run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from runtime.bench import bench, markdown  # noqa: E402
from runtime.build import configure, parts_from_model, parts_random  # noqa: E402
from runtime.config import RuntimeConfig  # noqa: E402
from runtime.predict import router_predictor  # noqa: E402
from specmoe.paths import DEMO_MODEL_DIR, REPO_ROOT  # noqa: E402

RESULTS = REPO_ROOT / "benchmarks" / "results"
# Model A's token embeddings are drawn with std 8 (its other weights with 0.02) and its
# decoded tokens are forced random ones: otherwise every token routes alike and any cache
# looks perfect (runtime.build.parts_random says why). Measured over 12 decoded tokens on
# 48 layers of this shape (distinct experts per layer; uniform routing gives about 69):
# std 1 gives 69 at layer 0 but 24 at layer 12 and 14 at layer 47, the attention averages
# piling up in the residual; std 8 gives 66-69 at every depth.
EMBEDDING_STD = 8.0


def qwen3_30b_shape(layers: int, hidden: int = 2048):
    from transformers import Qwen3MoeConfig

    scale = hidden / 2048
    return Qwen3MoeConfig(vocab_size=151936 if hidden == 2048 else 4096, hidden_size=hidden,
                          intermediate_size=int(6144 * scale), moe_intermediate_size=int(768 * scale),
                          num_hidden_layers=layers, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
                          num_experts=128, num_experts_per_tok=8, norm_topk_prob=True, max_position_embeddings=40960,
                          rope_parameters={"rope_type": "default", "rope_theta": 1e6}, tie_word_embeddings=False)


def reads_label(share) -> str:
    """How a row names its host_read_share (None: measured at start)."""
    if share is None:
        return " (GPU reads a measured share of misses in host memory)"
    return f" (GPU reads {share:g} of misses in host memory)" if share else ""


def host_limits(parts, experts_per_call: int = 8, repeats: int = 30) -> dict:
    """What the host can do, measured on model A's own store: the CPU expert throughput of
    the runtime's kernels and of stock torch (bytes of expert weights per second, 8 experts
    of one token per call, every call on experts not read before), and the memory read
    bandwidth (a sum over 4 GB of the store)."""
    from benchmarks.cpu_expert_kernel import median_seconds
    from runtime import cpu_kernels
    from runtime.cpu_experts import CpuExperts

    store, family, spec = parts.store, parts.family, parts.spec
    experts = family.experts(parts.model, spec.moe_layers[0])
    cpu = CpuExperts(family, store)
    x = torch.randn(1, spec.hidden_size).to(store.layout.dtype)
    cursor = [0]

    def next_work():
        layer = spec.moe_layers[(cursor[0] // spec.num_experts) % len(spec.moe_layers)]
        ids = [(cursor[0] + i) % spec.num_experts for i in range(experts_per_call)]
        cursor[0] += experts_per_call
        return layer, ids

    def timed(fn):
        # the next experts are picked inside the timed call: a few microseconds of Python
        return median_seconds(lambda: fn(*next_work()), repeats)

    def runtime_call():
        layer, ids = next_work()
        cpu.compute(experts, layer, x, [(0, e, 1.0) for e in ids])

    nbytes = experts_per_call * store.layout.tensor_bytes
    kernel = median_seconds(runtime_call, repeats)
    with torch.inference_mode():
        stock = timed(lambda l, ids: [family.apply_expert(experts, store.expert(l, e), x) for e in ids])
    flat = store.blocks.view(-1)[: min(store.nbytes, 4 << 30) // 4 * 4].view(torch.float32)
    memory = median_seconds(lambda: float(flat.sum()), 4, warmup=1)
    together = host_reads = None
    if parts.device.type == "cuda":
        together = copies_and_cpu_together(parts, runtime_call, nbytes)
        host_reads = host_reads_alone_and_with_cpu(parts, runtime_call, nbytes)
    cpu.close()
    expert_copy = expert_copy_bandwidth(parts) if parts.device.type == "cuda" else None
    return {"threads": cpu.threads, "torch_threads": torch.get_num_threads(), "cpu_kernels": cpu_kernels.backend(),
            "cpu_prefetch": os.environ.get(cpu_kernels.PREFETCH_ENV) or "cache",
            "expert_copy_bytes_per_s": expert_copy, "together": together, "gpu_reads_host": host_reads,
            "cpu_expert_bytes_per_s": nbytes / kernel, "torch_expert_bytes_per_s": nbytes / stock,
            "memory_read_bytes_per_s": flat.numel() * 4 / memory,
            "expert_bytes": store.layout.tensor_bytes}


def copies_and_cpu_together(parts, cpu_call, call_bytes: int, experts: int = 48, rounds: int = 7) -> dict:
    """Both host channels at once, as `cpu` decode runs them: expert copies to the GPU (one
    per expert from the pinned store, as the runtime issues them) while the CPU computes
    other experts with the runtime's kernels. Both read host memory, so each may slow the
    other; medians of `rounds` rounds of `experts` copies."""
    store = parts.store
    block = store.layout.block_bytes
    n_blocks = store.blocks.shape[0]
    dst = torch.empty((8, block), dtype=torch.uint8, device=parts.device)
    stream = torch.cuda.Stream(parts.device)
    copy_rates, cpu_rates = [], []
    for r in range(rounds + 1):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        first = (n_blocks // 2 + r * experts) % n_blocks   # far from the experts the CPU reads
        with torch.cuda.stream(stream):
            start.record()
            for j in range(experts):
                dst[j % 8].copy_(store.blocks[(first + j) % n_blocks], non_blocking=True)
            end.record()
        t0, calls = time.perf_counter(), 0
        while not end.query():
            cpu_call()
            calls += 1
        cpu_s = time.perf_counter() - t0
        end.synchronize()
        if r == 0 or calls == 0:
            continue
        copy_rates.append(experts * block / (start.elapsed_time(end) / 1e3))
        cpu_rates.append(calls * call_bytes / cpu_s)
    if not copy_rates:
        return {}
    copy, cpu = statistics.median(copy_rates), statistics.median(cpu_rates)
    return {"copy_bytes_per_s": copy, "cpu_expert_bytes_per_s": cpu, "sum_bytes_per_s": copy + cpu}


def host_reads_alone_and_with_cpu(parts, cpu_call, call_bytes: int) -> dict:
    """The third channel: the GPU computing experts from their weights in place in the pinned
    store, alone and while the CPU computes other experts (runtime.bench.host_reads_beside_cpu)."""
    from runtime.bench import host_reads_beside_cpu

    experts = parts.family.experts(parts.model, parts.spec.moe_layers[0])
    return host_reads_beside_cpu(parts.store, parts.family, experts, parts.spec.hidden_size, cpu_call, call_bytes,
                                 parts.device)


def expert_copy_bandwidth(parts, experts: int = 8, repeats: int = 20) -> float:
    """Host-to-device bytes per second of copies as the runtime issues them: 8 experts, one
    copy each, from the pinned store into a slot buffer, back to back on one stream (the
    copy floor's bandwidth is measured with one 64 MB copy; per-expert copies may be slower)."""
    store = parts.store
    dst = torch.empty((experts, store.layout.block_bytes), dtype=torch.uint8, device=parts.device)
    stream = torch.cuda.Stream(parts.device)
    times = []
    with torch.cuda.stream(stream):
        for i in range(repeats + 2):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for j in range(experts):
                dst[j].copy_(store.blocks[(i * experts + j) % store.blocks.shape[0]], non_blocking=True)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
    return experts * store.layout.block_bytes / statistics.median(times[2:])


def gpu_events(prof) -> list:
    """The kernels and copies the GPU ran under a torch profiler."""
    return [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]


def gpu_busy_ms(events: list, steps: int) -> float:
    """ms per step the GPU spent in these kernels and copies (gpu_events), over `steps` steps."""
    return sum(e.device_time for e in events) / 1e3 / steps


def gpu_time_alone(parts, base, prompt, forced, steps: int = 6, profiled: int = 3) -> float:
    """ms of GPU work in one decode step with every expert resident: its kernels' and copies'
    own time, from the torch profiler over `profiled` steps after `steps` of warm-up. (Replaying
    the step's graphs back to back measures no such thing on the H200 machine: queued deep,
    they leave idle time between kernels; benchmarks/results/profile_decode_resident.md.)"""
    from torch.profiler import ProfilerActivity, profile

    engine = configure(parts, dataclasses.replace(base, prefetch="none", on_miss="fetch", gpu_expert_budget="100%"))
    tokens = (list(forced) * (steps + profiled))[:steps + profiled]
    try:
        engine.step(prompt)
        for token in tokens[:steps]:
            engine.step(torch.tensor([token]))
        engine.streams.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for token in tokens[steps:]:
                engine.step(torch.tensor([token]))
            engine.streams.synchronize()
        return gpu_busy_ms(gpu_events(prof), profiled)
    finally:
        engine.close()


STARTED = time.perf_counter()


def said(result: dict) -> None:
    """One line per row as it ends: a long run shows where its time goes."""
    row = result["modes"][-1]
    print(f"  [{time.perf_counter() - STARTED:6.0f} s] {row['mode']} at {row['gpu_expert_budget']}: "
          f"{row['ms_per_token_median']:.2f} ms/token (prefill {row['prefill_seconds']:.1f} s)", flush=True)


def add_floors(result: dict, limits: dict) -> None:
    """Beside each row: its CPU floor (expert bytes the CPU computed per token over the CPU
    expert throughput of the runtime's kernels; also over stock torch's and over the memory
    read bandwidth), its shared-memory floor, and the mode's limit: the largest of its copy
    floor, its CPU floor and its shared-memory floor (each a time no schedule of that split
    of work can beat)."""
    for row in result["modes"]:
        per_token = (row.get("cpu_experts_per_token") or 0.0) * limits["expert_bytes"]
        row["cpu_floor_ms"] = 1e3 * per_token / limits["cpu_expert_bytes_per_s"]
        row["cpu_floor_torch_ms"] = 1e3 * per_token / limits["torch_expert_bytes_per_s"]
        row["cpu_floor_memory_ms"] = 1e3 * per_token / limits["memory_read_bytes_per_s"]
        together = limits.get("together") or {}
        if together.get("sum_bytes_per_s") and per_token:
            # Copies and CPU experts read the same host memory: the bytes of both over what
            # the two channels moved together when measured at once.
            row["shared_memory_floor_ms"] = 1e3 * (per_token + row["pcie_bytes_per_token"]) / \
                together["sum_bytes_per_s"]
        row["limit_ms"] = max(row["copy_floor_ms"], row["cpu_floor_ms"], row.get("shared_memory_floor_ms") or 0.0)
        if limits.get("expert_copy_bytes_per_s"):
            row["copy_floor_expert_copies_ms"] = 1e3 * (row["bytes_copied_per_token"] or 0.0) / \
                limits["expert_copy_bytes_per_s"]


def model_a(args, out: dict, save=lambda: None) -> None:
    """Model A's modes (`--quick`: the main ones), then its long context (`--only long`: that
    alone); `save` writes what is measured so far after each part."""
    base = RuntimeConfig(device=args.device, dtype="bf16", max_context=args.context + args.decode + 8, track_hits=True,
                         device_table=not args.planned)
    t0 = time.perf_counter()
    parts = parts_random(qwen3_30b_shape(args.layers, args.hidden), base, progress=False,
                         embedding_std=EMBEDDING_STD)
    print(f"model A built in {time.perf_counter() - t0:.1f}s: {parts.store.nbytes / 1e9:.1f} GB of experts", flush=True)
    limits = host_limits(parts)
    out["host_limits"] = limits
    print(f"  [{time.perf_counter() - STARTED:6.0f} s] host: CPU experts {limits['cpu_expert_bytes_per_s'] / 1e9:.1f} GB/s ({limits['cpu_kernels']}), stock torch "
          f"{limits['torch_expert_bytes_per_s'] / 1e9:.1f} GB/s, memory read "
          f"{limits['memory_read_bytes_per_s'] / 1e9:.1f} GB/s" + (
              f"; expert copies {limits['expert_copy_bytes_per_s'] / 1e9:.1f} GB/s"
              if limits["expert_copy_bytes_per_s"] else "") + (
              f"; at once: copies {limits['together']['copy_bytes_per_s'] / 1e9:.1f} GB/s + CPU experts "
              f"{limits['together']['cpu_expert_bytes_per_s'] / 1e9:.1f} GB/s"
              if limits.get("together") else "") + (
              f"; GPU reading experts in host memory {limits['gpu_reads_host']['gpu_read_bytes_per_s'] / 1e9:.1f} GB/s"
              if limits.get("gpu_reads_host") else ""), flush=True)
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, parts.model.config.vocab_size, (args.context,), generator=gen)
    forced = torch.randint(0, parts.model.config.vocab_size, (args.decode + 1,), generator=gen).tolist()
    runs, labels = [], []

    def add(prefetch, on_miss, budget, p=1.0, window=0, share=None, demand=0.0, ahead=True, reads=0.0):
        config = dataclasses.replace(base, prefetch=prefetch, on_miss=on_miss, gpu_expert_budget=budget,
                                     oracle_hit_rate=p, prefetch_window=window, cpu_copy_share=share,
                                     cpu_demand_share=demand, run_ahead=ahead, host_read_share=reads)
        label = f"{prefetch}+{on_miss}" + ("" if ahead else " (layer by layer)") + reads_label(reads)
        if prefetch == "oracle":
            label += f" (oracle thinned to p={p})"
        if window:
            label += f" (window {window})"
        if share is not None:
            label += f" (copy share fixed at {share})"
        if demand is None:
            label += " (demand copies)"
        if prefetch == "quasi":
            # A random model has no calibration text to average experts over: d_l = 0, so
            # q_l = LN_{l+1}(r_l). The same computation and cost as with real default vectors.
            config = (dataclasses.replace(config, prefetch="current"),
                      lambda parts: router_predictor(parts.model, parts.family, parts.spec, "quasi",
                                                     device=parts.device))
            label += " (default vectors 0)"
        runs.append(config)
        labels.append(label)

    def saving(key: str):
        """bench's on_row: each row saved, with its floors, as soon as it is measured."""
        def on_row(result: dict) -> None:
            out[key] = result
            add_floors(result, limits)
            save()
            said(result)
        return on_row

    def long_context() -> None:
        """The same model at a long context: attention reads more; copies do not change."""
        nonlocal runs, labels
        if not args.long_context:
            return
        long_base = dataclasses.replace(base, max_context=args.long_context + args.decode + 8)
        long_prompt = torch.randint(0, parts.model.config.vocab_size, (args.long_context,),
                                    generator=torch.Generator().manual_seed(1))
        runs, labels = [], []
        b = args.budgets[0] if args.budgets else "25%"
        for r in args.host_read_shares:
            add("none", "cpu", b, reads=r)
        add("none", "fetch", "0")
        add("quasi", "speculate", "0")
        add("none", "cpu", b)
        runs = [(dataclasses.replace(r[0], max_context=long_base.max_context), r[1]) if isinstance(r, tuple)
                else dataclasses.replace(r, max_context=long_base.max_context) for r in runs]
        bench(parts, long_base, runs, long_prompt, args.decode, args.warmup, progress=False, labels=labels,
              forced=forced, on_row=saving("model_a_long_context"))
        print(markdown(out["model_a_long_context"], "model A, long context"), flush=True)

    if args.only == "long":
        long_context()
        return
    if args.quick:   # a check of the main numbers in a fraction of the time
        add("none", "fetch", "0")
        add("none", "fetch", "100%")
        add("quasi", "speculate", "0")
        add("quasi", "fetch", "0")
        add("quasi", "fetch", "0", window=args.window)
        p = args.hit_rates[0]
        add("none", "cpu", "0")
        add("none", "cpu", "0", ahead=False)
        for r in args.host_read_shares:
            add("none", "cpu", "0", reads=r)
        add("none", "cpu", "0", demand=None)
        add("oracle", "cpu", "0", p)
        add("oracle", "cpu", "0", p, share=0.25)
        for b in args.budgets:
            add("oracle", "fetch", b, p)
            add("oracle", "cpu", b, p)
            add("none", "cpu", b)
            add("none", "cpu", b, ahead=False)
            for r in args.host_read_shares:
                add("none", "cpu", b, reads=r)
        bench(parts, base, runs, prompt, args.decode, args.warmup, progress=False, labels=labels, forced=forced,
              on_row=saving("model_a"))
        print(markdown(out["model_a"], "model A (quick)"), flush=True)
        long_context()
        return
    # The complete run: every mode the targets name, fitting one 10-minute call with model B,
    # the accelerate baseline and the long context.
    add("none", "fetch", "0")
    add("quasi", "speculate", "0")
    add("quasi", "fetch", "0")
    add("quasi", "fetch", "0", window=args.window)   # wrong predictions dropped before their turn
    add("none", "fetch", "100%")        # every expert resident: the GPU's own time per token
    add("quasi", "fetch", "100%")       # ... plus the predictor: its cost per layer
    add("none", "cpu", "0")
    for r in args.host_read_shares:
        add("none", "cpu", "0", reads=r)
    for b in args.budgets:
        add("none", "fetch", b)
        add("none", "cpu", b)
        for r in args.host_read_shares:
            add("none", "cpu", b, reads=r)
    for p in args.hit_rates:
        add("oracle", "speculate", "0", p)
        add("oracle", "fetch", "0", p, window=args.window)
        add("oracle", "cpu", args.budgets[0], p)
    merged = bench(parts, base, runs, prompt, args.decode, args.warmup, progress=False, labels=labels, forced=forced,
                   on_row=saving("model_a"))
    long_context()
    if parts.device.type == "cuda":
        merged["gpu_kernel_ms_per_token_all_resident"] = gpu_time_alone(parts, base, prompt, forced)
        print(f"GPU time per token, every expert resident, kernels and copies alone: "
              f"{merged['gpu_kernel_ms_per_token_all_resident']:.2f} ms", flush=True)
    out["model_a"] = merged
    print(markdown(merged, "model A"), flush=True)


def side_by_side(args, out: dict) -> None:
    """Our rows for the llama.cpp comparison (benchmarks/llama_cpp_side_by_side.py): model A
    with --layers layers at the GPU expert bytes of each `--n-cpu-moe` setting, the exact
    modes side by side, merged into that script's results file and plotted with them."""
    from benchmarks.llama_cpp_side_by_side import default_ncmoe, expert_bytes_on_gpu, merge_rows

    base = RuntimeConfig(device=args.device, dtype="bf16", max_context=args.context + args.decode + 8, track_hits=True)
    parts = parts_random(qwen3_30b_shape(args.layers, args.hidden), base, progress=False, embedding_std=EMBEDDING_STD)
    gen = torch.Generator().manual_seed(0)
    vocab = parts.model.config.vocab_size
    prompt = torch.randint(0, vocab, (args.context,), generator=gen)
    forced = torch.randint(0, vocab, (args.decode + 1,), generator=gen).tolist()
    limits = out["host_limits"] = host_limits(parts)
    print(json.dumps(limits), flush=True)
    runs, labels, settings = [], [], []
    for ncmoe in default_ncmoe(args.layers):
        spec = parts.spec
        on_gpu = expert_bytes_on_gpu(ncmoe, args.layers, spec.num_experts, spec.hidden_size,
                                     spec.expert_intermediate_size)
        budget = str(on_gpu) if on_gpu else "0"
        hit = args.hit_rates[0] if args.hit_rates else 0.85
        # (prefetch, on_miss, oracle recall, demand share: None follows the host, run ahead, host reads)
        for prefetch, on_miss, p, demand, ahead, reads in (
                ("none", "fetch", 1.0, 0.0, True, 0.0), ("quasi", "fetch", 1.0, 0.0, True, 0.0),
                ("none", "cpu", 1.0, 0.0, True, 0.0), ("none", "cpu", 1.0, 0.0, False, 0.0),
                *(("none", "cpu", 1.0, 0.0, True, r) for r in args.host_read_shares),
                ("quasi", "cpu", 1.0, 0.0, True, 0.0),
                ("oracle", "cpu", hit, 0.0, True, 0.0)):
            config = dataclasses.replace(base, prefetch=prefetch, on_miss=on_miss, gpu_expert_budget=budget,
                                         oracle_hit_rate=p, cpu_demand_share=demand, run_ahead=ahead,
                                         host_read_share=reads)
            label = f"{prefetch}+{on_miss}" + (f" (oracle p={p})" if prefetch == "oracle" else "") + \
                (" (demand copies)" if demand is None else "") + ("" if ahead else " (layer by layer)") + \
                reads_label(reads)
            if prefetch == "quasi":
                config = (dataclasses.replace(config, prefetch="current"),
                          lambda parts: router_predictor(parts.model, parts.family, parts.spec, "quasi",
                                                         device=parts.device))
            runs.append(config)
            labels.append(label)
            settings.append(ncmoe)
    result = bench(parts, base, runs, prompt, args.decode, args.warmup, progress=False, labels=labels, forced=forced)
    add_floors(result, limits)
    out["side_by_side"] = result
    rows = []
    for ncmoe, row in zip(settings, result["modes"]):
        ms = row["ms_per_token_median"]
        rows.append({"system": "specmoe", "setting": f"{row['mode']}, budget of ncmoe={ncmoe}", "layers": args.layers,
                     "gpu_expert_layers": None, "gpu_expert_bytes": row["engine"]["gpu_expert_bytes"],
                     "context": args.context, "decode_tokens": row["decoded_tokens"], "tokens_per_s": 1e3 / ms,
                     "ms_per_token": round(ms, 4), "ms_per_layer": round(ms / args.layers, 4),
                     "copy_floor_ms": row["copy_floor_ms"], "cpu_floor_ms": row["cpu_floor_ms"],
                     "floor_ms": row["limit_ms"], "status": "ok"})
    merge_rows(Path(args.side_by_side), rows, command=" ".join(["python", "benchmarks/runtime_decode.py", *sys.argv[1:]]),
               host_limits=limits)
    print(markdown(result, "side by side (ours)"), flush=True)


def accelerate_baseline(args, out: dict) -> None:
    """What users run instead: transformers with accelerate's CPU offload of the experts
    (dispatch_model with the experts' modules on "cpu": hooks move their weights to the
    GPU at every call). Few layers and tokens: it is slow; the per-layer time scales."""
    from accelerate import dispatch_model
    from transformers import AutoModelForCausalLM

    shape = qwen3_30b_shape(args.baseline_layers, args.hidden)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(shape, dtype=torch.bfloat16).eval()
    gpu = 0 if args.device == "cuda" else "cpu"   # "cpu" only for a dry run of this script
    device_map = {"model.embed_tokens": gpu, "model.norm": gpu, "model.rotary_emb": gpu, "lm_head": gpu}
    for l in range(shape.num_hidden_layers):
        for part in ("self_attn", "input_layernorm", "post_attention_layernorm", "mlp.gate"):
            device_map[f"model.layers.{l}.{part}"] = gpu
        device_map[f"model.layers.{l}.mlp.experts"] = "cpu"
    model = dispatch_model(model, device_map=device_map, main_device=gpu)
    ids = torch.randint(0, shape.vocab_size, (1, args.baseline_context), generator=torch.Generator().manual_seed(0))
    dev = "cuda" if args.device == "cuda" else "cpu"
    times = []
    with torch.inference_mode():
        step = model(ids.to(dev), use_cache=True)
        cache, token = step.past_key_values, step.logits[:, -1:].argmax(-1)
        for _ in range(args.baseline_tokens + 1):
            if dev == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            step = model(token, past_key_values=cache, use_cache=True)
            token = step.logits[:, -1:].argmax(-1)
            int(token)
            times.append(time.perf_counter() - t0)
    per_token = statistics.median(times[1:])
    out["accelerate_offload"] = {
        "layers": shape.num_hidden_layers, "context": args.baseline_context, "tokens_timed": len(times) - 1,
        "ms_per_token": 1e3 * per_token, "ms_per_layer": 1e3 * per_token / shape.num_hidden_layers,
        "ms_per_token_scaled_to_48_layers": 1e3 * per_token / shape.num_hidden_layers * 48,
    }
    print(f"accelerate offload: {1e3 * per_token:.1f} ms per token for {shape.num_hidden_layers} layers "
          f"({1e3 * per_token / shape.num_hidden_layers:.1f} ms per layer)", flush=True)
    del model


def model_b(args, out: dict, save=lambda: None) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    est = str(REPO_ROOT / "checkpoints" / "demo-estimator-h1")
    # No GPU reads in model B's rows: each row is its mode alone, as in model A's (reads: own rows).
    base = RuntimeConfig(device=args.device, dtype="bf16", estimators=est, max_context=args.demo_context + args.decode + 8,
                         host_read_share=0.0)
    model = AutoModelForCausalLM.from_pretrained(DEMO_MODEL_DIR, dtype=torch.bfloat16)
    parts = parts_from_model(model, base, tokenizer=AutoTokenizer.from_pretrained(DEMO_MODEL_DIR))
    from runtime.cli import bench_prompt

    prompt = bench_prompt(parts.tokenizer, args.demo_context)
    modes = [("none", "fetch"), ("current", "fetch"), ("quasi", "fetch"), ("hybrid", "fetch"), ("hybrid", "cpu"),
             ("quasi", "speculate"), ("hybrid", "speculate"), ("oracle", "speculate")]
    runs = [dataclasses.replace(base, prefetch=p, on_miss=m, gpu_expert_budget=b) for p, m in modes for b in ("0", "25%")]
    def on_row(result: dict) -> None:
        out["model_b"] = result
        save()
        said(result)

    r = bench(parts, base, runs, prompt, args.decode, args.warmup, progress=False, on_row=on_row)
    print(markdown(r, "model B"), flush=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=48)
    p.add_argument("--hidden", type=int, default=2048, help="hidden size of model A (smaller for a dry run)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--demo-context", type=int, default=512)
    p.add_argument("--decode", type=int, default=72)
    p.add_argument("--warmup", type=int, default=8)
    p.add_argument("--budgets", default="25%,50%")
    p.add_argument("--hit-rates", default="0.85,0.95")
    p.add_argument("--only", choices=("a", "b", "baseline", "side", "long"), default=None,
                   help="one part; `side` runs our rows of the llama.cpp comparison (not part of the default run); "
                        "`long`: model A at --long-context only (on-demand, speculation, exact cpu)")
    p.add_argument("--side-by-side", default=str(RESULTS / "llama_cpp.json"),
                   help="the llama.cpp results file our rows are merged into (with --only side)")
    p.add_argument("--quick", action="store_true",
                   help="model A: the main modes only (at --long-context: on-demand, speculation and exact cpu)")
    p.add_argument("--host-read-shares", default="0.25",
                   help="`none+cpu` rows with the GPU reading these shares of misses in host memory (auto: "
                        "measured at start)")
    p.add_argument("--window", type=int, default=2, help="prefetch_window of the windowed exact modes")
    p.add_argument("--planned", action="store_true", help="exact decode planned by the host (no device-side slot table)")
    p.add_argument("--long-context", type=int, default=8192, help="also run model A at this context (0: skip)")
    p.add_argument("--baseline-layers", type=int, default=4, help="layers of model A under accelerate offload")
    p.add_argument("--baseline-tokens", type=int, default=4)
    p.add_argument("--baseline-context", type=int, default=1024)
    p.add_argument("--out", default=str(RESULTS / "runtime_decode"))
    args = p.parse_args()
    args.budgets = [b for b in args.budgets.split(",") if b]
    args.hit_rates = [float(x) for x in args.hit_rates.split(",") if x]
    args.host_read_shares = [None if x == "auto" else float(x) for x in args.host_read_shares.split(",") if x]
    out = {"command": "python benchmarks/runtime_decode.py " + " ".join(sys.argv[1:]),
           "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", "torch": torch.__version__}
    # Each part's results are written as soon as it ends: a run stopped later keeps them.
    if args.only in (None, "b"):
        model_b(args, out, save=lambda: write_results(out, Path(args.out)))
        write_results(out, Path(args.out))
    if args.only in (None, "baseline"):
        accelerate_baseline(args, out)
        write_results(out, Path(args.out))
    if args.only in (None, "a", "long"):
        model_a(args, out, save=lambda: write_results(out, Path(args.out)))
        write_results(out, Path(args.out))
    if args.only == "side":
        side_by_side(args, out)   # its rows go to the llama.cpp results file
    return 0


def write_results(out: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.with_suffix(".json").write_text(json.dumps(out, indent=2) + "\n")
    md = [f"# Runtime decode on {out['gpu']}\n", f"    {out['command']}\n"]
    if "accelerate_offload" in out:
        a = out["accelerate_offload"]
        md += ["## What users run instead: transformers with accelerate's CPU offload\n",
               f"{a['layers']} layers of model A's shape, experts offloaded with `dispatch_model`, context "
               f"{a['context']}: {a['ms_per_token']:.1f} ms per token, {a['ms_per_layer']:.1f} ms per layer, "
               f"{a['ms_per_token_scaled_to_48_layers']:.0f} ms per token scaled to 48 layers.\n"]
    if "host_limits" in out:
        h = out["host_limits"]
        copies = (f"; host-to-device copies of 8 experts, one copy each as the runtime issues them: "
                  f"{h['expert_copy_bytes_per_s'] / 1e9:.1f} GB/s" if h.get("expert_copy_bytes_per_s") else "")
        torch_threads = f" ({h['torch_threads']} threads)" if h.get("torch_threads", h["threads"]) != h["threads"] else ""
        md += [f"Host limits, measured on model A's store with {h['threads']} threads: CPU experts "
               f"{h['cpu_expert_bytes_per_s'] / 1e9:.1f} GB/s with the runtime's kernels ({h['cpu_kernels']}"
               f"{', non-temporal prefetch' if h.get('cpu_prefetch') == 'nta' else ''}), "
               f"{h['torch_expert_bytes_per_s'] / 1e9:.1f} GB/s with stock torch{torch_threads}; memory read "
               f"{h['memory_read_bytes_per_s'] / 1e9:.1f} GB/s{copies}.\n"]
        if h.get("together"):
            t = h["together"]
            md += [f"Both channels at once (expert copies to the GPU while the CPU computes other experts; "
                   f"both read host memory): copies {t['copy_bytes_per_s'] / 1e9:.1f} GB/s, CPU experts "
                   f"{t['cpu_expert_bytes_per_s'] / 1e9:.1f} GB/s, {t['sum_bytes_per_s'] / 1e9:.1f} GB/s together. "
                   "The shared-memory floor of a row is its copied and CPU-computed bytes over that sum.\n"]
        if h.get("gpu_reads_host"):
            g = h["gpu_reads_host"]
            md += [f"The GPU computing experts from their weights in place in the pinned store (the indexed kernel "
                   f"reading over PCIe, 8 experts per call): {g['gpu_read_bytes_per_s'] / 1e9:.1f} GB/s alone"
                   + (f"; while the CPU computes other experts, {g['with_cpu_gpu_read_bytes_per_s'] / 1e9:.1f} GB/s "
                      f"beside the CPU's {g['with_cpu_cpu_expert_bytes_per_s'] / 1e9:.1f} GB/s"
                      if g.get("with_cpu_gpu_read_bytes_per_s") else "") + ".\n"]
    for key, title in (("model_b", "Model B: the demo model with its trained estimators"),
                       ("model_a", "Model A: Qwen3-30B-A3B's shape, random weights"),
                       ("model_a_long_context", "Model A at a long context")):
        if key not in out:
            continue
        md += [f"## {title}\n", markdown(out[key], out["command"])]
        if "gpu_kernel_ms_per_token_all_resident" in out[key]:
            md.append(f"GPU time per token with every expert resident (its kernels and copies alone, from the "
                      f"profiler): {out[key]['gpu_kernel_ms_per_token_all_resident']:.2f} ms.\n")
        if any("limit_ms" in r for r in out[key]["modes"]):
            md += ["Floors: copy (bytes over PCIe per token / the pinned copy bandwidth); CPU (expert bytes the "
                   "CPU computed per token / the runtime's kernels' rate; also / stock torch's rate and / the "
                   "memory read bandwidth); shared memory (copied and CPU-computed bytes / what both moved at "
                   "once). The limit is the largest of copy, CPU (kernels) and shared memory. A queued `cpu` "
                   "step's time, medians in us: from its start to its first CPU part, through its last part "
                   "(the parts and their waits for routing), and after it (the host's tail).\n",
                   "| mode | budget | copy floor ms | copy floor, expert-sized copies ms | CPU floor ms "
                   "| CPU floor, stock torch ms | CPU floor (memory read) ms | shared-memory floor ms | limit ms "
                   "| measured ms | measured / limit | queued step us |",
                   "|---|---|---|---|---|---|---|---|---|---|---|---|"]

            def ms(v):
                return "-" if v is None else format(v, ".2f")

            for r in out[key]["modes"]:
                ratio = r["ms_per_token_median"] / r["limit_ms"] if r["limit_ms"] else None
                q = r.get("queued_step_us")
                md.append(f"| {r['mode']} | {r['gpu_expert_budget']} | {r['copy_floor_ms']:.2f} "
                          f"| {ms(r.get('copy_floor_expert_copies_ms'))} | {r['cpu_floor_ms']:.2f} "
                          f"| {ms(r.get('cpu_floor_torch_ms'))} | {r['cpu_floor_memory_ms']:.2f} "
                          f"| {ms(r.get('shared_memory_floor_ms'))} | {r['limit_ms']:.2f} "
                          f"| {r['ms_per_token_median']:.2f} | {ms(ratio)} "
                          f"| {', '.join(f'{v:.0f}' for v in q.values()) if q else '-'} |")
            md.append("")
    path.with_suffix(".md").write_text("\n".join(md))
    if "model_a" in out:
        plot_budgets(out["model_a"], path.with_suffix(".png"))


def plot_budgets(result: dict, path: Path) -> None:
    """Time per token against the GPU expert budget, one line per mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    total = result["modes"][0]["engine"]["total_experts"]
    lines: dict[str, list[tuple[float, float]]] = {}
    for row in result["modes"]:
        share = 100.0 * row["engine"]["gpu_slots"] / total
        lines.setdefault(row["mode"], []).append((share, row["ms_per_token_median"]))
    fig, ax = plt.subplots(figsize=(8, 5))
    for i, (mode, pts) in enumerate(sorted(lines.items())):
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="osD^v<>"[i % 7],
                linestyle=["-", "--", ":", "-."][i % 4], label=mode)
    ax.set_xlabel("GPU expert budget (% of all expert bytes)")
    ax.set_ylabel("ms per token (median)")
    ax.set_title(result["model"])
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
