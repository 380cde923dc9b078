"""How fast the host CPU computes routed experts at batch 1: the native kernels of
runtime/cpu_kernels.py against stock torch, and both against the host's memory read
bandwidth.

    python benchmarks/cpu_expert_kernel.py                  # torch.get_num_threads() threads
    python benchmarks/cpu_expert_kernel.py --threads 16

Qwen3-30B-A3B experts (H 2048, I 768, bf16: 9.4 MB each) in a runtime host store of
--buffer-gb (far larger than the last-level cache), one token, 1 and 8 experts per call;
every call takes the next experts of the store, so every weight comes from DRAM. Rates
are bytes of expert weights per second, from the median of --repeats calls:
  kernel   cpu_kernels.expert_outputs: two batched matrix-vector calls, glu in torch
  fused    cpu_kernels.expert_sum: the token's weighted sum over its experts in one native
           call (products, glu and sum; what a decode step runs)
  torch    family.apply_expert per expert, in bf16 (what the cpu miss policy ran before)
  memory   torch sum over the whole store, viewed as float32 (the read bandwidth to aim at)
Writes results/cpu_expert_kernel.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from runtime import cpu_kernels  # noqa: E402
from runtime.expert_layout import ExpertLayout  # noqa: E402
from runtime.host_store import HostExpertStore  # noqa: E402
from specmoe.families import FAMILIES  # noqa: E402

HIDDEN, INTER = 2048, 768
SHAPE = "Qwen3-30B-A3B (H2048 I768 bf16)"


class _Act(nn.Module):
    """Stands in for a stock experts module: only its activation is read."""

    def __init__(self):
        super().__init__()
        self.act_fn = nn.SiLU()


def make_store(buffer_bytes: int) -> HostExpertStore:
    layout = ExpertLayout.from_shapes({"gate_up_proj": (2 * INTER, HIDDEN), "down_proj": (HIDDEN, INTER)},
                                      torch.bfloat16)
    store = HostExpertStore(layout, [0], max(16, buffer_bytes // layout.block_bytes), pin=False)
    # A few random experts repeated: what the cache sees is addresses, not values, and this
    # fills gigabytes in a moment (normal numbers only: no denormal slow paths).
    pattern = (torch.randn(4, layout.block_bytes // 2) * 0.05).to(torch.bfloat16).view(torch.uint8)
    for r in range(0, store.blocks.shape[0], 4):
        rows = store.blocks[r:r + 4]
        rows.copy_(pattern[:rows.shape[0]])
    return store


def median_seconds(fn, repeats: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def host_after(call, repeats: int) -> tuple[float, float]:
    """Median seconds of a fixed piece of host code (small containers, a numpy copy, a small
    torch op: what the runtime does between a layer's CPU experts and its next GPU launch)
    run right after `call`, and run again at once with its caches warm. The difference is
    what the call's weights evicted."""
    src, dst, t = np.ones(2048, np.float32), np.empty(2048, np.float32), torch.zeros(2048)

    def probe():
        ids = {(0, e): e for e in range(64)}
        work = [(0, e, 0.125) for e in range(8)]
        dst[...] = src
        t.add_(1.0)
        return len(ids) + len(work)

    after, warm = [], []
    for _ in range(repeats):
        call()
        t0 = time.perf_counter()
        probe()
        t1 = time.perf_counter()
        probe()
        warm.append(time.perf_counter() - t1)
        after.append(t1 - t0)
    return statistics.median(after), statistics.median(warm)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    parser.add_argument("--buffer-gb", type=float, default=2.0, help="bytes of experts to cycle through")
    parser.add_argument("--repeats", type=int, default=100, help="timed calls per measurement")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    backend = cpu_kernels.backend()
    family, experts = FAMILIES["qwen3_moe"], _Act()
    store = make_store(int(args.buffer_gb * 2**30))
    weight_bytes = store.layout.tensor_bytes
    num = store.num_experts
    x = torch.randn(8, HIDDEN)
    at = [0]

    def next_ids(k: int) -> list[int]:
        at[0] = (at[0] + k) % (num - k)
        return list(range(at[0], at[0] + k))

    def kernel(k: int) -> None:
        cpu_kernels.expert_outputs(family, experts, store, 0, next_ids(k), x[:k])

    weights = [1 / 8] * 8

    def fused(k: int) -> None:
        cpu_kernels.expert_sum(family, experts, store, 0, next_ids(k), weights[:k], x[:1])

    xb = x.to(torch.bfloat16)

    def stock(k: int) -> None:
        for i, e in enumerate(next_ids(k)):
            family.apply_expert(experts, store.expert(0, e), xb[i:i + 1])

    flat = store.blocks.view(torch.float32)
    with torch.inference_mode():
        memory = store.nbytes / median_seconds(lambda: flat.sum(), max(3, args.repeats // 20), warmup=1)
        rows = []
        for k in (1, 8):
            row = {"experts": k, "weight_bytes": k * weight_bytes}
            for name, fn in (("kernel", kernel), ("fused", fused), ("torch", stock)):
                if name == "fused" and backend == "torch":
                    row["fused_ms"] = row["fused_gbps"] = None
                    continue
                seconds = median_seconds(lambda: fn(k), args.repeats if name != "torch" else max(10, args.repeats // 4))
                row[f"{name}_ms"] = seconds * 1e3
                row[f"{name}_gbps"] = k * weight_bytes / seconds / 1e9
            rows.append(row)
        probe_after = probe_warm = None
        if backend != "torch":
            probe_after, probe_warm = host_after(lambda: fused(8), args.repeats)

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    result = {"command": " ".join(["python benchmarks/cpu_expert_kernel.py", *sys.argv[1:]]), "cpu": cpu,
              "threads": threads, "torch": torch.__version__, "backend": backend, "shape": SHAPE,
              "expert_bytes": weight_bytes, "store_bytes": store.nbytes, "memory_read_gbps": memory / 1e9,
              "prefetch": os.environ.get(cpu_kernels.PREFETCH_ENV) or "cache",
              "host_code_after_fused_8_us": None if probe_after is None else probe_after * 1e6,
              "host_code_warm_us": None if probe_warm is None else probe_warm * 1e6, "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "cpu_expert_kernel.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = ["# CPU expert kernel at batch 1", "", f"`{result['command']}`", "",
             f"{cpu}, {threads} threads; torch {torch.__version__}; kernels: {backend}. {SHAPE}, "
             f"{weight_bytes / 1e6:.1f} MB of weights per expert, cycling through {store.nbytes / 2**30:.1f} GiB "
             f"of experts. Memory read bandwidth (torch sum over the store): **{memory / 1e9:.1f} GB/s**.", "",
             "| experts per call | kernel ms | kernel GB/s | fused ms | fused GB/s | torch ms | torch GB/s "
             "| kernel / memory |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        fused_cols = ("- | -" if r["fused_ms"] is None else f"{r['fused_ms']:.3f} | {r['fused_gbps']:.1f}")
        lines.append(f"| {r['experts']} | {r['kernel_ms']:.3f} | {r['kernel_gbps']:.1f} | {fused_cols} | "
                     f"{r['torch_ms']:.3f} | {r['torch_gbps']:.1f} | {r['kernel_gbps'] / (memory / 1e9):.0%} |")
    if probe_after is not None:
        lines += ["", f"Host code right after a fused call of 8 experts: {probe_after * 1e6:.1f} us; the same code "
                  f"again at once, caches warm: {probe_warm * 1e6:.1f} us (weights prefetched with "
                  f"`{result['prefetch']}` locality; SPECMOE_CPU_PREFETCH=nta builds non-temporal prefetches)."]
    (args.out / "cpu_expert_kernel.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
