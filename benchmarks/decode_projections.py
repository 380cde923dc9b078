"""A decoded token's dense projections: cuBLAS (F.linear) beside the Triton matvec kernel.

    python benchmarks/decode_projections.py

Qwen3-30B-A3B's attention projections and router, bf16, one row; each replayed from a
CUDA graph, median us per call beside the floor (weight bytes at the device bandwidth
measured here). The matvec rows include the tiles the runtime picks and a few others.

Results: benchmarks/results/decode_projections.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.decode_attention import _time  # noqa: E402
from specmoe.indexed_matvec import matvec, matvec_tiles  # noqa: E402
from specmoe.paths import REPO_ROOT  # noqa: E402

RESULTS = REPO_ROOT / "benchmarks" / "results"
SHAPES = {"q_proj": (4096, 2048), "k_proj / v_proj": (512, 2048), "o_proj": (2048, 4096), "router": (128, 2048)}
TILES = [(32, 256, 8), (16, 256, 8), (8, 256, 8), (16, 256, 4), (8, 512, 8), (64, 128, 8), (32, 128, 4)]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--replays", type=int, default=50)
    p.add_argument("--out", default=str(RESULTS / "decode_projections"))
    args = p.parse_args()
    dev = torch.device("cuda")
    buf = torch.empty(1 << 28, dtype=torch.uint8, device=dev)
    bw = 2 * buf.numel() / (_time(lambda: buf.add_(1), (), 20, 5) / 1e6)
    rows = []
    for name, (n, k) in SHAPES.items():
        # Weights of several layers in turn, as a decode step meets them: none is in L2 from the last call.
        ws = [torch.randn(n, k, device=dev).bfloat16() for _ in range(8)]
        x = torch.randn(1, k, device=dev).bfloat16()
        floor = n * k * 2 / bw * 1e6
        ways = {"cuBLAS (F.linear)": lambda: [F.linear(x, w) for w in ws]}
        picked = matvec_tiles(1, n, k)
        for t in [picked] + [t for t in TILES if t != picked]:
            ways[f"matvec {t}{' (picked)' if t == picked else ''}"] = lambda t=t: [matvec(x, w, tiles=t) for w in ws]
        for way, fn in ways.items():
            us = _time(fn, (), args.replays, inner=4) / len(ws)
            rows.append({"projection": name, "shape": [n, k], "way": way, "us": us, "floor_us": floor,
                         "tb_per_s": n * k * 2 / us / 1e6})
            print(json.dumps(rows[-1]), flush=True)
    out = Path(args.out)
    result = {"command": " ".join(["python", "benchmarks/decode_projections.py", *sys.argv[1:]]),
              "device": torch.cuda.get_device_name(), "device_bandwidth_bytes_per_s": bw, "rows": rows}
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    lines = ["# A decoded token's dense projections", "", f"    {result['command']}", "",
             f"bf16, one row, {result['device']}; tiles are (rows of outputs, inputs per step, warps). "
             f"Floor: the weight's bytes at {bw / 1e12:.2f} TB/s (a copy's read plus write).", "",
             "| projection | [out, in] | way | us (median) | floor us | TB/s |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['projection']} | {r['shape']} | {r['way']} | {r['us']:.2f} | {r['floor_us']:.2f} "
                     f"| {r['tb_per_s']:.2f} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
