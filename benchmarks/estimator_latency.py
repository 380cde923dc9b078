"""Estimator latency per decoded token on the GPU, against one decode layer's time.

    python benchmarks/estimator_latency.py --estimator checkpoints/demo-estimator-h1

For every target layer and predictor kind, one token's prediction (state ->
logits -> the family's exact top-k) is timed with CUDA events, synchronised
after each call as a runtime would see it; we quote medians. One decode layer's
time is a stock transformers decode step of the same model (bf16, everything on
the GPU, KV cache of --context tokens) divided by its number of layers. The
floor beside each time is the bytes the predictor reads over the measured HBM
bandwidth (it is launch-bound, far above that floor).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from estimators import SourceState, load_estimator  # noqa: E402
from specmoe.models import load_moe_model  # noqa: E402
from specmoe.paths import REPO_ROOT  # noqa: E402

RESULTS = REPO_ROOT / "benchmarks" / "results"


def cuda_median_ms(fn, iters: int, warmup: int = 20) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def hbm_bandwidth() -> float:
    x = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    ms = cuda_median_ms(lambda: y.copy_(x), 20, 3)
    return 2 * x.numel() / (ms / 1e3)


@torch.no_grad()
def decode_step_ms(loaded, context: int, iters: int) -> float:
    model = loaded.model
    ids = torch.randint(0, len(loaded.tokenizer), (1, context), device="cuda")
    out = model(input_ids=ids, use_cache=True)
    cache = out.past_key_values
    nxt = out.logits[:, -1:].argmax(-1)

    def step():
        nonlocal cache
        cache = model(input_ids=nxt, past_key_values=cache, use_cache=True).past_key_values

    return cuda_median_ms(step, iters, 5)


def predictor_bytes(est, target: int, kind: str) -> int:
    H, E = est.hidden_size, est.num_experts
    n = E * H + E * H + 2 * H  # router, default vectors, two norms
    if kind == "current":
        n = E * H + H
    if kind == "learned":
        n += sum(p.numel() for p in est.corrections[str(target)].parameters())
    return 4 * n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--estimator", type=Path, default=REPO_ROOT / "checkpoints" / "demo-estimator-h1")
    parser.add_argument("--model", default=None)
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--iters", type=int, default=200)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("this benchmark needs a CUDA GPU")

    loaded = load_moe_model(args.model, device="cuda", dtype="bf16")
    est = load_estimator(args.estimator, loaded.model, device="cuda")
    spec = loaded.spec
    bandwidth = hbm_bandwidth()
    layer_ms = decode_step_ms(loaded, args.context, 50) / spec.num_layers
    gen = torch.Generator(device="cuda").manual_seed(0)
    rows = []
    for kind in ("current", "quasi", "learned"):
        per_layer = []
        for t in est.targets:
            state = SourceState(residual=torch.randn(1, spec.hidden_size, device="cuda", generator=gen),
                                ids=torch.randperm(spec.num_experts, device="cuda")[: spec.top_k].unsqueeze(0),
                                weights=torch.full((1, spec.top_k), 1.0 / spec.top_k, device="cuda"))
            ms = cuda_median_ms(lambda: est.predict(t, state, kind), args.iters)
            per_layer.append({"target": t, "ms": ms, "floor_ms": predictor_bytes(est, t, kind) / bandwidth * 1e3})
        med = statistics.median(r["ms"] for r in per_layer)
        rows.append({"kind": kind, "median_ms_per_layer": med, "per_layer": per_layer,
                     "floor_ms": statistics.median(r["floor_ms"] for r in per_layer),
                     "share_of_decode_layer": med / layer_ms})

    result = {"command": "python benchmarks/estimator_latency.py " + " ".join(sys.argv[1:]),
              "device": torch.cuda.get_device_name(), "torch": torch.__version__, "model": spec.family,
              "estimator": str(args.estimator.relative_to(REPO_ROOT) if args.estimator.is_absolute() else args.estimator),
              "hbm_bytes_per_s": bandwidth, "decode_layer_ms": layer_ms, "context": args.context, "kinds": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "estimator_latency.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = ["# Estimator latency per token", "", f"`{result['command'].strip()}` on {result['device']}; "
             f"torch {result['torch']}.", "",
             f"One decode layer of the model (stock transformers, bf16, all weights on the GPU, KV cache of "
             f"{args.context} tokens): **{layer_ms:.3f} ms** (decode step / {spec.num_layers} layers).",
             f"Measured HBM bandwidth {bandwidth / 1e12:.2f} TB/s (device copy, read + write).", "",
             "| predictor | median ms per layer per token | floor (bytes / HBM bandwidth) | share of one decode layer |",
             "|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['kind']} | {r['median_ms_per_layer']:.3f} | {r['floor_ms'] * 1e3:.2f} us | "
                     f"{100 * r['share_of_decode_layer']:.0f}% |")
    lines.append("")
    (args.out / "estimator_latency.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
