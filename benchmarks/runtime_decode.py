"""Decode speed of the runtime, modes side by side, beside the copy floor of each.

    python benchmarks/runtime_decode.py                       # both models, writes benchmarks/results/runtime_decode.*
    python benchmarks/runtime_decode.py --layers 8 --quick    # a smaller model A, fewer tokens

Model A has Qwen3-30B-A3B's shape (48 layers, 128 experts, top-8, hidden 2048, expert
hidden 768, bf16: 58 GB of experts) with random weights built on the machine, through
the runtime's own host store and slots. Random routers route nearly uniformly, so
model A's cache hit rates are pessimistic, and its real predictors have nothing to
predict: model A also runs the `oracle` predictor thinned to a set hit rate (each
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
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from runtime.bench import bench, markdown  # noqa: E402
from runtime.build import parts_from_model, parts_random  # noqa: E402
from runtime.config import RuntimeConfig  # noqa: E402
from runtime.predict import router_predictor  # noqa: E402
from specmoe.paths import DEMO_MODEL_DIR, REPO_ROOT  # noqa: E402

RESULTS = REPO_ROOT / "benchmarks" / "results"


def qwen3_30b_shape(layers: int, hidden: int = 2048):
    from transformers import Qwen3MoeConfig

    scale = hidden / 2048
    return Qwen3MoeConfig(vocab_size=151936 if hidden == 2048 else 4096, hidden_size=hidden,
                          intermediate_size=int(6144 * scale), moe_intermediate_size=int(768 * scale),
                          num_hidden_layers=layers, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
                          num_experts=128, num_experts_per_tok=8, norm_topk_prob=True, max_position_embeddings=40960,
                          rope_parameters={"rope_type": "default", "rope_theta": 1e6}, tie_word_embeddings=False)


def model_a(args, out: dict) -> None:
    base = RuntimeConfig(device=args.device, dtype="bf16", max_context=args.context + args.decode + 8, track_hits=True)
    t0 = time.perf_counter()
    parts = parts_random(qwen3_30b_shape(args.layers, args.hidden), base, progress=False)
    print(f"model A built in {time.perf_counter() - t0:.1f}s: {parts.store.nbytes / 1e9:.1f} GB of experts", flush=True)
    prompt = torch.randint(0, parts.model.config.vocab_size, (args.context,), generator=torch.Generator().manual_seed(0))
    runs, labels = [], []

    def add(prefetch, on_miss, budget, p=1.0):
        config = dataclasses.replace(base, prefetch=prefetch, on_miss=on_miss, gpu_expert_budget=budget,
                                     oracle_hit_rate=p)
        label = f"{prefetch}+{on_miss}"
        if prefetch == "oracle":
            label += f" (oracle thinned to p={p})"
        if prefetch == "quasi":
            # A random model has no calibration text to average experts over: d_l = 0, so
            # q_l = LN_{l+1}(r_l). The same computation and cost as with real default vectors.
            config = (dataclasses.replace(config, prefetch="current"),
                      lambda parts: router_predictor(parts.model, parts.family, parts.spec, "quasi",
                                                     device=parts.device))
            label += " (default vectors 0)"
        runs.append(config)
        labels.append(label)

    add("none", "fetch", "0")
    add("quasi", "speculate", "0")
    add("quasi", "fetch", "0")
    add("oracle", "speculate", "0")
    add("none", "fetch", "100%")        # every expert resident: the GPU's own time per token
    add("quasi", "fetch", "100%")       # ... plus the predictor: its cost per layer
    for b in args.budgets:
        add("none", "fetch", b)
        add("none", "cpu", b)
    for p in args.hit_rates:
        add("oracle", "speculate", "0", p)
        add("oracle", "fetch", "0", p)
        for b in args.budgets:
            add("oracle", "fetch", b, p)
            add("oracle", "cpu", b, p)
    merged = bench(parts, base, runs, prompt, args.decode, args.warmup, progress=False, labels=labels)
    out["model_a"] = merged
    print(markdown(merged, "model A"), flush=True)


def model_b(args, out: dict) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    est = str(REPO_ROOT / "checkpoints" / "demo-estimator-h1")
    base = RuntimeConfig(device=args.device, dtype="bf16", estimators=est, max_context=args.demo_context + args.decode + 8)
    model = AutoModelForCausalLM.from_pretrained(DEMO_MODEL_DIR, dtype=torch.bfloat16)
    parts = parts_from_model(model, base, tokenizer=AutoTokenizer.from_pretrained(DEMO_MODEL_DIR))
    from runtime.cli import bench_prompt

    prompt = bench_prompt(parts.tokenizer, args.demo_context)
    modes = [("none", "fetch"), ("current", "fetch"), ("quasi", "fetch"), ("hybrid", "fetch"), ("hybrid", "cpu"),
             ("quasi", "speculate"), ("hybrid", "speculate"), ("oracle", "speculate")]
    runs = [dataclasses.replace(base, prefetch=p, on_miss=m, gpu_expert_budget=b) for p, m in modes for b in ("0", "25%")]
    r = bench(parts, base, runs, prompt, args.decode, args.warmup, progress=False)
    out["model_b"] = r
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
    p.add_argument("--only", choices=("a", "b"), default=None)
    p.add_argument("--out", default=str(RESULTS / "runtime_decode"))
    args = p.parse_args()
    args.budgets = [b for b in args.budgets.split(",") if b]
    args.hit_rates = [float(x) for x in args.hit_rates.split(",") if x]
    out = {"command": "python benchmarks/runtime_decode.py " + " ".join(sys.argv[1:]),
           "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", "torch": torch.__version__}
    if args.only in (None, "b"):
        model_b(args, out)
    if args.only in (None, "a"):
        model_a(args, out)
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.with_suffix(".json").write_text(json.dumps(out, indent=2) + "\n")
    md = [f"# Runtime decode on {out['gpu']}\n", f"    {out['command']}\n"]
    for key, title in (("model_b", "Model B: the demo model with its trained estimators"),
                       ("model_a", "Model A: Qwen3-30B-A3B's shape, random weights")):
        if key in out:
            md += [f"## {title}\n", markdown(out[key], out["command"])]
    path.with_suffix(".md").write_text("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
