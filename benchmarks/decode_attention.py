"""One decoded token's attention over a static KV cache: ways to run it, timed.

    python benchmarks/decode_attention.py
    python benchmarks/decode_attention.py --device cpu --cache 1072

Qwen3-30B-A3B's attention shape (32 query heads over 4 key/value heads of 128), a cache
of `--cache` positions of which the last few are unwritten and masked, bf16. On the GPU
each way is compiled as the runtime compiles its pieces and replayed from a CUDA graph
(on the CPU it runs eagerly, as the runtime's CPU path does); the time
is the median over replays, beside the floor (keys and values read once at the measured
device bandwidth) and its error against a float64 reference.

Results: benchmarks/results/decode_attention.{json,md} (on the CPU, eager: decode_attention_cpu).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from specmoe.paths import REPO_ROOT  # noqa: E402

RESULTS = REPO_ROOT / "benchmarks" / "results"


def stock_repeat(q, k, v, mask, groups):
    """What transformers' sdpa path runs under torch.compile: keys and values repeated per head."""
    b, kvh, n, d = k.shape
    k = k[:, :, None].expand(b, kvh, groups, n, d).reshape(b, kvh * groups, n, d)
    v = v[:, :, None].expand(b, kvh, groups, n, d).reshape(b, kvh * groups, n, d)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def packed_sdpa(q, k, v, mask, groups):
    b, h, _, d = q.shape
    return F.scaled_dot_product_attention(q.reshape(b, h // groups, groups, d), k, v, attn_mask=mask)


def packed_sdpa_efficient(q, k, v, mask, groups):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION]):
        return packed_sdpa(q, k, v, mask, groups)


def gqa_sdpa(q, k, v, mask, groups):
    """torch's own grouped-query sdpa (enable_gqa), with the mask."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)


def packed_math_fp32(q, k, v, mask, groups):
    """Scores and weighted sum as float32 products and sums (as the fused kernels compute them)."""
    b, h, _, d = q.shape
    qg = q.reshape(b, h // groups, groups, 1, d).float()
    scores = (qg * k[:, :, None].float()).sum(-1) * d ** -0.5 + mask.float()
    p = scores.softmax(-1)
    return (p[..., None] * v[:, :, None].float()).sum(-2).to(q.dtype)


def packed_matmul(q, k, v, mask, groups):
    """transformers' eager attention on the packed query: bf16 products, float32 softmax."""
    b, h, _, d = q.shape
    qg = q.reshape(b, h // groups, groups, d)
    scores = torch.matmul(qg, k.transpose(-1, -2)) * d ** -0.5 + mask
    return torch.matmul(scores.softmax(-1, dtype=torch.float32).to(q.dtype), v)


def packed_matmul_fp32_scores(q, k, v, mask, groups):
    """Packed, products by cuBLAS with float32 output of the scores."""
    b, h, _, d = q.shape
    qg = q.reshape(b, h // groups, groups, d)
    scores = torch.matmul(qg.float(), k.transpose(-1, -2).float()) * d ** -0.5 + mask.float()
    return torch.matmul(scores.softmax(-1).to(q.dtype), v)


WAYS = {"stock (keys and values repeated per head)": stock_repeat, "packed, sdpa": packed_sdpa,
        "packed, sdpa (memory-efficient kernel)": packed_sdpa_efficient, "sdpa enable_gqa": gqa_sdpa,
        "packed, float32 products and sums": packed_math_fp32, "packed, bf16 matmuls": packed_matmul,
        "packed, float32 matmuls": packed_matmul_fp32_scores}


def _time(fn, args, replays: int, inner: int = 20) -> float:
    """Median us per call of fn(*args), `inner` calls per CUDA graph replay."""
    for _ in range(3):
        fn(*args)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(inner):
            fn(*args)
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        g.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / inner)
    return statistics.median(times)


def _time_cpu(fn, args, replays: int, inner: int = 5) -> float:
    """Median us per call of fn(*args) on the host, `inner` calls per sample."""
    for _ in range(3):
        fn(*args)
    times = []
    for _ in range(replays):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn(*args)
        times.append((time.perf_counter() - t0) * 1e6 / inner)
    return statistics.median(times)


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "CPU"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cache", default="1072,8200", help="KV cache lengths, one run each")
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--replays", type=int, default=50)
    p.add_argument("--device", default="cuda",
                   help="cuda (compiled, CUDA graphs) or cpu (eager, as the runtime runs on the CPU)")
    p.add_argument("--out", default=None, help="default: benchmarks/results/decode_attention (_cpu on the CPU)")
    args = p.parse_args()
    dev = torch.device(args.device)
    cuda = dev.type == "cuda"
    timer = _time if cuda else _time_cpu
    groups = args.heads // args.kv_heads
    buf = torch.empty(1 << 28, dtype=torch.uint8, device=dev)
    bw = 2 * buf.numel() / (timer(lambda: buf.add_(1), (), 20, 5) / 1e6)   # read + write
    rows = []
    for n in (int(c) for c in args.cache.split(",")):
        gen = torch.Generator(device=dev).manual_seed(0)
        q = torch.randn(1, args.heads, 1, args.head_dim, device=dev, generator=gen).bfloat16()
        k = torch.randn(1, args.kv_heads, n, args.head_dim, device=dev, generator=gen).bfloat16()
        v = torch.randn(1, args.kv_heads, n, args.head_dim, device=dev, generator=gen).bfloat16()
        mask = torch.zeros(1, 1, 1, n, device=dev, dtype=torch.bfloat16)
        mask[..., n - 8:] = torch.finfo(torch.bfloat16).min          # unwritten positions
        ref = torch.softmax((q.double().reshape(1, args.kv_heads, groups, -1) @ k.double().transpose(-1, -2))
                            * args.head_dim ** -0.5 + mask.double(), -1) @ v.double()
        floor_us = 2 * k.numel() * k.element_size() / bw * 1e6
        for name, way in WAYS.items():
            fn = lambda q, k, v, m, way=way: way(q, k, v, m, groups)  # noqa: E731
            if cuda:
                fn = torch.compile(fn, dynamic=False)
            try:
                out = fn(q, k, v, mask)
                us = timer(fn, (q, k, v, mask), args.replays)
            except Exception as err:  # noqa: BLE001 - a way this build cannot run is reported, not fatal
                rows.append({"way": name, "cache": n, "error": str(err).splitlines()[0][:200]})
                continue
            err = (out.double().reshape(ref.shape) - ref).abs().max().item()
            rows.append({"way": name, "cache": n, "us": us, "floor_us": floor_us, "max_abs_error": err})
            print(json.dumps(rows[-1]), flush=True)
    out = Path(args.out or RESULTS / ("decode_attention" if cuda else "decode_attention_cpu"))
    result = {"command": " ".join(["python", "benchmarks/decode_attention.py", *sys.argv[1:]]),
              "device": torch.cuda.get_device_name() if cuda else f"{_cpu_name()}, {torch.get_num_threads()} threads",
              "torch": torch.__version__, "device_bandwidth_bytes_per_s": bw, "rows": rows}
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    lines = ["# One decoded token's attention over a static KV cache", "", f"    {result['command']}", "",
             f"{args.heads} query heads over {args.kv_heads} key/value heads of {args.head_dim}, bf16, "
             f"{result['device']}, torch {torch.__version__}; "
             + ("each way compiled and replayed from a CUDA graph. " if cuda else "each way run eagerly. ") +
             f"Floor: keys and values read once at {bw / 1e12:.3f} TB/s (a copy's read plus write).", "",
             "| way | cache | us (median) | floor us | max abs error vs float64 |", "|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['way']} | {r['cache']} | failed: {r['error']} | | |")
        else:
            lines.append(f"| {r['way']} | {r['cache']} | {r['us']:.1f} | {r['floor_us']:.1f} | {r['max_abs_error']:.2e} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
