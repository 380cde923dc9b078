"""What the GPU's expert slots hold after a prompt: each layer's most used experts, or the last layers whole.

    python benchmarks/cache_fill.py                  # the demo model on the CPU; writes benchmarks/results/cache_fill.*
    python benchmarks/cache_fill.py --device cuda

The demo model with its trained estimators (real routing) decodes the same tokens after
the same prompt with `cache_fill` set to `prompt` (the slots shared evenly among the
layers, each keeping the experts the prompt used most) and to `recent` (what the prompt's
last copies left: its last layers, whole), in modes whose cache does not follow decode
(`none+cpu`: nothing is copied while decoding) and modes whose cache does (`none+fetch`:
demand copies, LRU; `hybrid+cpu`: predicted copies). Reported per row: the cache hit rate,
the experts the CPU computed and the bytes copied per token, and the time per token (on the
CPU a copy is a memcpy and the times say little; the counts are what carries over).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from runtime.bench import bench  # noqa: E402
from runtime.build import parts_from_model  # noqa: E402
from runtime.cli import bench_prompt  # noqa: E402
from runtime.config import RuntimeConfig  # noqa: E402
from specmoe.paths import DEMO_MODEL_DIR, REPO_ROOT  # noqa: E402

FILLS = ("recent", "prompt")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--decode", type=int, default=40)
    p.add_argument("--warmup", type=int, default=8)
    p.add_argument("--budgets", default="25%,50%")
    p.add_argument("--modes", default="none+cpu,none+fetch,hybrid+cpu")
    p.add_argument("--out", default=str(REPO_ROOT / "benchmarks" / "results" / "cache_fill"))
    args = p.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    est = str(REPO_ROOT / "checkpoints" / "demo-estimator-h1")
    base = RuntimeConfig(device=args.device, dtype="bf16", estimators=est, host_read_share=0.0,
                         max_context=args.prompt_tokens + args.decode + 8)
    model = AutoModelForCausalLM.from_pretrained(DEMO_MODEL_DIR, dtype=torch.bfloat16)
    parts = parts_from_model(model, base, tokenizer=AutoTokenizer.from_pretrained(DEMO_MODEL_DIR))
    prompt = bench_prompt(parts.tokenizer, args.prompt_tokens)
    modes = [m.split("+") for m in args.modes.split(",") if m]
    runs, labels = [], []
    for prefetch, on_miss in modes:
        for budget in args.budgets.split(","):
            for fill in FILLS:
                runs.append(dataclasses.replace(base, prefetch=prefetch, on_miss=on_miss, gpu_expert_budget=budget,
                                                cache_fill=fill))
                labels.append(f"{prefetch}+{on_miss}, cache_fill {fill}")
    result = bench(parts, base, runs, prompt, args.decode, args.warmup, progress=True, labels=labels)
    command = "python benchmarks/cache_fill.py" + "".join(f" {a}" for a in sys.argv[1:] if not a.startswith("--out"))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"command": command, **result}, indent=2) + "\n")
    lines = [f"# Cache fill after a prompt: {result['model']} on {result['device']}", "", f"    {command}", "",
             f"Prompt {result['prompt_tokens']} tokens, {result['decode_tokens'] - result['warmup']} decoded tokens "
             f"timed after {result['warmup']} warm-up, every row on the same tokens.", "",
             "| mode | GPU expert budget | slots | cache hit rate | CPU experts per token | MiB copied per token "
             "| prefetch hit rate | ms per token |",
             "|---|---|---|---|---|---|---|---|"]
    for r in result["modes"]:
        def f(v, fmt):
            return "-" if v is None else format(v, fmt)
        lines.append(f"| {r['mode']} | {r['gpu_expert_budget']} | {r['engine']['gpu_slots']} "
                     f"| {f(r['cache_hit_rate'], '.3f')} | {f(r['cpu_experts_per_token'], '.2f')} "
                     f"| {(r['bytes_copied_per_token'] or 0) / 2**20:.2f} | {f(r['prefetch_hit_rate'], '.3f')} "
                     f"| {r['ms_per_token_median']:.2f} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
