"""Modes side by side on one model, in one run: time per token beside its copy floor.

Every mode decodes the same tokens: an exact pass first records the greedy
continuation of a fixed prompt (and the true routing, which the `oracle` predictor
replays), then each mode runs the prompt and feeds that same continuation token by
token, so modes differ only in how experts reach the GPU. Warm-up steps are
excluded. The copy floor of a mode is the bytes it copied per decoded token divided
by the host-to-device bandwidth measured in the same run.
"""

from __future__ import annotations

import dataclasses
import gc
import statistics
import time
from collections.abc import Callable

import torch
from tqdm.auto import tqdm

from specmoe.errors import SpecmoeError

from .build import ModelParts, configure
from .config import RuntimeConfig
from .predict import RecordedRouting


def parse_modes(text: str) -> list[tuple[str, str]]:
    """'none+fetch,quasi+speculate' -> [('none', 'fetch'), ('quasi', 'speculate')]."""
    out = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        if "+" not in item:
            raise SpecmoeError(f"mode {item!r} should read PREFETCH+ON_MISS, e.g. quasi+speculate")
        prefetch, on_miss = item.split("+", 1)
        out.append((prefetch.strip(), on_miss.strip()))
    if not out:
        raise SpecmoeError("no mode to run")
    return out


def copy_bandwidth(device: torch.device, nbytes: int = 64 * 2**20, repeats: int = 10) -> float:
    """Host-to-device bytes per second from pinned memory (host-to-host on the CPU), median."""
    if device.type == "cuda":
        src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
        dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
        times = []
        for _ in range(repeats + 2):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            dst.copy_(src, non_blocking=True)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        return nbytes / statistics.median(times[2:])
    src = torch.empty(nbytes, dtype=torch.uint8).fill_(1)
    dst = torch.empty_like(src)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - t0)
    return nbytes / statistics.median(times)


def host_reads_beside_cpu(store, family, experts_module, hidden: int, cpu_call, call_bytes: int,
                          device: torch.device, calls: int = 6, rounds: int = 5) -> dict:
    """Bytes of expert weights per second that the GPU computes from the pinned store in place
    (the indexed kernel reading over PCIe, 8 experts per call, as `host_read_share` runs it):
    alone, and while the host runs `cpu_call` (`call_bytes` of experts each) in a loop, with
    the CPU's rate then. Medians of `rounds` rounds of each (CUDA only)."""
    from specmoe.moe_block import routed_output

    from .host_store import device_view

    stack = store.layout.views(device_view(store.blocks, device))
    s = torch.randn(1, hidden, device=device).to(store.layout.dtype)
    w = torch.ones(1, 8, device=device)
    n_blocks = store.blocks.shape[0]
    total = 2 * rounds + 2
    rows = [torch.tensor([[(n_blocks // 3 + (r * calls + c) * 8 + j) % n_blocks for j in range(8)]], device=device)
            for r in range(total) for c in range(calls)]
    nbytes = calls * 8 * store.layout.tensor_bytes
    alone, beside, cpu_rates = [], [], []
    for r in range(total):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for c in range(calls):
            routed_output(family, experts_module, s, stack, rows[r * calls + c], w, strategy="indexed")
        end.record()
        with_cpu = r % 2 == 1
        t0, n = time.perf_counter(), 0
        while with_cpu and not end.query():
            cpu_call()
            n += 1
        cpu_s = time.perf_counter() - t0
        end.synchronize()
        if r < 2:   # warm-up: the kernels' first calls
            continue
        rate = nbytes / (start.elapsed_time(end) / 1e3)
        if not with_cpu:
            alone.append(rate)
        elif n:
            beside.append(rate)
            cpu_rates.append(n * call_bytes / cpu_s)
    out = {"gpu_read_bytes_per_s": statistics.median(alone)}
    if beside:
        out.update({"with_cpu_gpu_read_bytes_per_s": statistics.median(beside),
                    "with_cpu_cpu_expert_bytes_per_s": statistics.median(cpu_rates)})
    return out


def record_exact(parts: ModelParts, base: RuntimeConfig, prompt: torch.Tensor, new_tokens: int,
                 forced: list[int] | None = None):
    """Greedy continuation and true routing of every position, from an exact on-demand pass.
    With `forced`, those tokens are fed instead of the greedy ones (a random model's greedy
    output repeats one token, and so one routing, which would flatter every cache)."""
    engine = configure(parts, dataclasses.replace(base, prefetch="none", on_miss="fetch", gpu_expert_budget="0"))
    engine.moe.record_routing = {}
    if forced is None:
        tokens = list(engine.generate(prompt, new_tokens))
    else:
        tokens = [int(t) for t in forced[:new_tokens]]
        engine.reset()
        engine.step(prompt)
        for token in tokens[:-1]:
            engine.step(torch.tensor([token]))
    routing = engine.moe.record_routing
    engine.close()
    recorded = RecordedRouting(ids={k: v[0] for k, v in routing.items()}, weights={k: v[1] for k, v in routing.items()})
    return tokens, recorded


def run_mode(parts: ModelParts, config: RuntimeConfig, prompt: torch.Tensor, continuation: list[int],
             warmup: int, recorded: RecordedRouting | None, predictor=None) -> dict:
    if parts.device.type == "cuda":
        # Each mode reports its own peak GPU memory, with the previous mode's slots gone.
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(parts.device)
    engine = configure(parts, config, recorded=recorded if config.prefetch == "oracle" else None,
                       predictor=predictor(parts) if predictor is not None else None)
    try:
        engine.reset()
        tel = engine.telemetry
        t0 = time.perf_counter()
        engine.step(prompt)
        engine.streams.synchronize()
        prefill = time.perf_counter() - t0
        times = []
        for i, token in enumerate(continuation):
            if i == warmup:
                tel.reset_counters()
                tel.mark_decode_start()
            t0 = time.perf_counter()
            logits = engine.step(torch.tensor([token]))
            int(torch.argmax(logits[-1]))       # a real decode reads its token back: same sync here
            times.append(time.perf_counter() - t0)
        tel.step_seconds = times[warmup:]
        tel.prefill_seconds = prefill
        tel.prompt_tokens = int(prompt.numel())
        summary = tel.summary()
        ran = f"{engine.info['prefetch']}+{engine.info['on_miss']}"
        asked = f"{config.prefetch}+{config.on_miss}"
        # an `auto` part is named with what it resolved to on this machine
        summary["mode"] = f"{asked} ({ran})" if "auto" in (config.prefetch, config.on_miss) else ran
        summary["gpu_expert_budget"] = config.gpu_expert_budget
        summary["engine"] = engine.info
        return summary
    finally:
        engine.close()
        del engine
        gc.collect()
        if parts.device.type == "cuda":
            torch.cuda.empty_cache()


def mode_runs(base: RuntimeConfig, modes: list[tuple[str, str]], budgets: list[str]) -> list[RuntimeConfig]:
    return [dataclasses.replace(base, prefetch=p, on_miss=m, gpu_expert_budget=b) for p, m in modes for b in budgets]


def bench(parts: ModelParts, base: RuntimeConfig, runs: list[RuntimeConfig], prompt: torch.Tensor,
          decode_tokens: int, warmup: int, progress: bool = True, labels: list[str] | None = None,
          forced: list[int] | None = None, on_row: Callable[[dict], None] | None = None) -> dict:
    """Run every config in `runs` on the same prompt and decoded tokens; one row each. An item
    may also be (config, make_predictor), make_predictor(parts) giving the run's predictor.
    `forced` replaces the greedy continuation by given tokens (see `record_exact`). `on_row`
    gets the result so far after each row (a long benchmark can save what it has)."""
    if decode_tokens <= warmup:
        raise SpecmoeError(f"--decode-tokens ({decode_tokens}) must exceed --warmup ({warmup})")
    bandwidth = copy_bandwidth(parts.device)
    continuation, recorded = record_exact(parts, base, prompt, decode_tokens + 1, forced=forced)
    feed = continuation[:decode_tokens]
    rows = []
    result = {"copy_bandwidth_bytes_per_s": bandwidth, "prompt_tokens": int(prompt.numel()),
              "decode_tokens": decode_tokens, "warmup": warmup, "device": str(parts.device),
              "model": parts.info.get("model"), "modes": rows}
    for i, config in enumerate(tqdm(runs, desc="infer bench", unit="mode", disable=not progress)):
        config, make = config if isinstance(config, tuple) else (config, None)
        s = run_mode(parts, config, prompt, feed, warmup, recorded, make)
        if labels is not None:
            s["mode"] = labels[i]
        # Over PCIe: the bytes copied, and the weights the GPU read in place from host memory.
        per_token = (s["bytes_copied_per_token"] or 0.0) + \
            (s.get("host_read_experts_per_token") or 0.0) * s["engine"]["expert_block_bytes"]
        s["pcie_bytes_per_token"] = per_token
        s["copy_floor_ms"] = 1e3 * per_token / bandwidth
        rows.append(s)
        if on_row is not None:
            on_row(result)
    return result


def markdown(result: dict, command: str) -> str:
    lines = [
        f"Model `{result['model']}` on `{result['device']}`; prompt {result['prompt_tokens']} tokens, "
        f"{result['decode_tokens'] - result['warmup']} decoded tokens timed after {result['warmup']} warm-up; "
        f"{'host-to-device copy' if result['device'].startswith('cuda') else 'copies (host memory to host memory on the CPU)'} "
        f"{result['copy_bandwidth_bytes_per_s'] / 1e9:.1f} GB/s measured in the same run.",
        "",
        f"    {command}",
        "",
        "| mode | GPU expert budget | slots | ms/token median | p90 | copy floor ms | MiB copied/token | "
        "prefetch hit rate | cache hit rate | CPU expert s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["modes"]:
        def f(v, fmt):
            return "-" if v is None else format(v, fmt)
        lines.append(
            f"| {r['mode']} | {r['gpu_expert_budget']} | {r['engine']['gpu_slots']} | {f(r['ms_per_token_median'], '.2f')} "
            f"| {f(r['ms_per_token_p90'], '.2f')} | {f(r['copy_floor_ms'], '.2f')} "
            f"| {f((r['bytes_copied_per_token'] or 0) / 2**20, '.2f')} | {f(r['prefetch_hit_rate'], '.3f')} "
            f"| {f(r['cache_hit_rate'], '.3f')} | {f(r['cpu_expert_seconds'], '.3f')} |")
    return "\n".join(lines) + "\n"
