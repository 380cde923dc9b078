"""Time the batched MoE block's strategies (specmoe.moe_block) against each other.

    python benchmarks/moe_block_strategies.py                 # CPU, fp32 and bf16
    python benchmarks/moe_block_strategies.py --device cuda --dtypes bf16

Routed output only (routing ids and weights given), SwiGLU experts in slot stacks laid
out as the runtime lays them out (one padded block per slot, seen through as_strided),
random distinct slots per token. Prints the best of --repeats timings in milliseconds
(the best, not the median: on a shared CPU the other processes only ever add time).
"""

from __future__ import annotations

import argparse
import math
import time

import torch
from torch import nn

from specmoe.families import FAMILIES
from specmoe.moe_block import STRATEGIES, grouped_available, indexed_available, routed_output

# (label, hidden, expert hidden, slots, top-k, token counts)
SHAPES = (
    ("demo (H128 I64 S32 k4)", 128, 64, 32, 4, (1, 16, 256)),
    ("Qwen3-30B-A3B (H2048 I768 S16 k8)", 2048, 768, 16, 8, (1,)),
)
# On a GPU also all 128 experts of a Qwen3-30B-A3B layer resident, decode to prefill.
GPU_SHAPES = (("Qwen3-30B-A3B (H2048 I768 S128 k8)", 2048, 768, 128, 8, (1, 4, 16, 64, 256, 1024)),)


class _Act(nn.Module):
    """Stands in for a stock experts module: only its activation is read."""

    def __init__(self):
        super().__init__()
        self.act_fn = nn.SiLU()


def slot_stack(hidden: int, inter: int, slots: int, dtype, device) -> dict[str, torch.Tensor]:
    shapes = {"gate_up_proj": (2 * inter, hidden), "down_proj": (hidden, inter)}
    item = torch.empty((), dtype=dtype).element_size()
    sizes = [math.ceil(math.prod(s) * item / 256) * 256 // item for s in shapes.values()]
    per_slot = sum(sizes) + 256 // item  # padding: the slot stride is not the product of the dims
    buf = (torch.randn(slots * per_slot, device=device) * 0.05).to(dtype)
    out, at = {}, 0
    for (name, shape), size in zip(shapes.items(), sizes):
        strides = (per_slot, shape[1], 1)
        out[name] = buf.as_strided((slots, *shape), strides, at)
        at += size
    return out


def bench(fn, device, repeats: int, graph: bool = False) -> float:
    for _ in range(3):
        fn()
    if graph:
        # Decode runs captured: time replays, which is what the runtime pays per step.
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn()
        fn = g.replay
        for _ in range(3):
            fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return min(times) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--tokens", default=None, help="override the token counts, e.g. 1,16,256,1024")
    ap.add_argument("--no-graph", action="store_true", help="on CUDA, time eager calls instead of graph replays")
    args = ap.parse_args()
    device = torch.device(args.device)
    family = FAMILIES["qwen3_moe"]
    experts = _Act()
    gen = torch.Generator().manual_seed(0)
    print(f"torch {torch.__version__}, {device}, threads {torch.get_num_threads()}")
    graph = device.type == "cuda" and not args.no_graph
    shapes = SHAPES + (GPU_SHAPES if device.type == "cuda" else ())
    print("CUDA graph replays" if graph else "eager calls")
    print("| shape | dtype | T | " + " | ".join(STRATEGIES) + " |")
    print("|---|---|---|" + "---|" * len(STRATEGIES))
    for label, hidden, inter, slots, k, tokens in shapes:
        if args.tokens:
            tokens = tuple(int(t) for t in args.tokens.split(","))
        for dname in args.dtypes.split(","):
            dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dname]
            stack = slot_stack(hidden, inter, slots, dtype, device)
            for t in tokens:
                x = torch.randn(t, hidden, generator=gen).to(device, dtype)
                chosen = torch.rand(t, slots, generator=gen).topk(k, dim=-1).indices.to(device)
                weights = torch.softmax(torch.randn(t, k, generator=gen), -1).to(device, dtype)
                cells = []
                for s in STRATEGIES:
                    if (s == "grouped" and not grouped_available(device, dtype)
                            or s == "indexed" and not indexed_available(device)):
                        cells.append("n/a")
                        continue
                    with torch.no_grad():
                        ms = bench(lambda: routed_output(family, experts, x, stack, chosen, weights, strategy=s),
                                   device, args.repeats, graph)
                    cells.append(f"{ms:.3f}")
                print(f"| {label} | {dname} | {t} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
