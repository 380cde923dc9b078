"""Expert copies over PCIe: one stream against several, as the runtime issues them.

    python benchmarks/copy_streams.py

Copies expert-sized rows (Qwen3-30B-A3B: 9.0 MiB each) from a pinned host slab to GPU
slots, one copy per expert as the runtime issues them, the rows in random order, over 1 to
4 streams in turn; beside them one large copy (the bandwidth the copy floor is computed
with). Times are medians over rounds, on CUDA events. The runtime copies on one stream:
several streams were measured to gain nothing (the results below).

Results: benchmarks/results/copy_streams.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from runtime.bench import copy_bandwidth  # noqa: E402
from specmoe.paths import REPO_ROOT  # noqa: E402

RESULTS = REPO_ROOT / "benchmarks" / "results"
EXPERT_BYTES = 3 * 2048 * 768 * 2   # gate, up and down of one Qwen3-30B-A3B expert in bf16


def timed_copies(streams: list, dst: torch.Tensor, src: torch.Tensor, order: list[int]) -> float:
    """Seconds for every row of `order` copied into `dst`, copy i on streams[i % n], the clock
    started on the current stream and stopped once every copy stream is done."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for stream in streams:
        stream.wait_event(start)
    for i, j in enumerate(order):
        with torch.cuda.stream(streams[i % len(streams)]):
            dst[i % dst.shape[0]].copy_(src[j], non_blocking=True)
    for stream in streams:
        torch.cuda.current_stream().wait_stream(stream)
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--experts", type=int, default=256, help="rows in the pinned slab")
    p.add_argument("--copies", type=int, default=384, help="expert copies per round (a token of model A)")
    p.add_argument("--streams", default="1,2,3,4")
    p.add_argument("--rounds", type=int, default=12)
    p.add_argument("--out", default=str(RESULTS / "copy_streams"))
    args = p.parse_args()
    counts = [int(n) for n in args.streams.split(",")]
    if min(counts) < 1 or args.copies < 1 or args.experts < 1 or args.rounds < 1:
        print("error: --streams, --copies, --experts and --rounds must be positive", file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        print("error: copy_streams measures host-to-device copies and needs a CUDA device", file=sys.stderr)
        return 1
    device = torch.device("cuda")
    src = torch.empty((args.experts, EXPERT_BYTES), dtype=torch.uint8).pin_memory()
    src.view(-1)[::4096] = 1   # touch every page
    dst = torch.empty((64, EXPERT_BYTES), dtype=torch.uint8, device=device)
    gen = torch.Generator().manual_seed(0)
    large = copy_bandwidth(device)
    rows = []
    times: dict[int, list[float]] = {n: [] for n in counts}
    high = torch.cuda.Stream.priority_range()[1]   # the runtime's copy stream has the highest priority
    all_streams = {n: [torch.cuda.Stream(device, priority=high) for _ in range(n)] for n in counts}
    for r in range(args.rounds + 2):
        order = torch.randint(0, args.experts, (args.copies,), generator=gen).tolist()
        for n in counts:   # interleaved: every count sees the same host and the same rows
            t = timed_copies(all_streams[n], dst, src, order)
            if r >= 2:
                times[n].append(t)
    nbytes = args.copies * EXPERT_BYTES
    floor_ms = 1e3 * nbytes / large
    for n in counts:
        med = statistics.median(times[n])
        rows.append({"copy_streams": n, "ms_median": 1e3 * med, "ms_min": 1e3 * min(times[n]),
                     "bytes_per_s": nbytes / med, "floor_ms": floor_ms, "over_floor": 1e3 * med / floor_ms,
                     "gap_us_per_copy": 1e6 * (med - nbytes / large) / args.copies})
    command = " ".join(["python", "benchmarks/copy_streams.py", *sys.argv[1:]])
    result = {"command": command, "device": torch.cuda.get_device_name(), "expert_bytes": EXPERT_BYTES,
              "copies": args.copies, "rounds": args.rounds,
              "large_copy_bytes_per_s": large, "rows": rows}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    lines = ["# Expert copies over one or several streams", "", f"    {command}", "",
             f"{result['device']}: {args.copies} copies of {EXPERT_BYTES / 2**20:.1f} MiB (one token of model A), "
             f"rows in random order from a pinned slab, medians of {args.rounds} rounds. "
             f"The floor is their bytes over one 64 MiB copy's rate, {large / 1e9:.1f} GB/s, measured in the "
             "same run.", "",
             "| copy streams | ms median | GB/s | floor ms | / floor | gap per copy us |", "|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['copy_streams']} | {row['ms_median']:.2f} | {row['bytes_per_s'] / 1e9:.1f} "
                     f"| {row['floor_ms']:.2f} | {row['over_floor']:.3f} | {row['gap_us_per_copy']:.1f} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
