"""What `infer` runs when told nothing, against the modes it chooses between, on model A's shape.

    python benchmarks/default_modes.py     # on a CUDA machine; writes benchmarks/results/default_modes.*

`on_miss: auto` and `prefetch: auto`, the defaults, resolve on the machine they run on
(runtime.miss_policy): `cpu` where the CPU computes a layer's expected misses sooner than
PCIe copies them, with no predictor then (its whole step is queued ahead of the CPU's parts),
else `fetch` with the router on the current state predicting. Beside them in the same run,
each GPU budget: the default before `auto` (`current+fetch`), on-demand loading
(`none+fetch`), and `none+cpu` with and without the GPU reading a measured share of the
misses in host memory (`host_read_share`, auto by default). Model A is benchmarks/runtime_decode.py's (Qwen3-30B-A3B's
shape, random weights, uniform routing), decoding the same forced random tokens after the
same random prompt, after one `none+cpu` row that is thrown away (a process's first `cpu`
engine decoded slower than the same settings later).
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

from benchmarks.runtime_decode import EMBEDDING_STD, qwen3_30b_shape  # noqa: E402
from runtime.bench import bench  # noqa: E402
from runtime.build import parts_random  # noqa: E402
from runtime.config import RuntimeConfig  # noqa: E402
from specmoe.paths import REPO_ROOT  # noqa: E402

# (label, settings): each as a user sets it by hand, the rest of the settings at their defaults
COMPARED = (("current+fetch", dict(prefetch="current", on_miss="fetch")),
            ("none+fetch", dict(prefetch="none", on_miss="fetch")),
            ("none+cpu", dict(prefetch="none", on_miss="cpu")),
            ("none+cpu, no GPU reads", dict(prefetch="none", on_miss="cpu", host_read_share=0.0)))


def runs_for(base: RuntimeConfig, budgets: list[str]) -> tuple[list[RuntimeConfig], list[str | None]]:
    """Per budget: the defaults (None: labelled by what they resolve to), then the rest."""
    runs, labels = [], []
    for budget in budgets:
        runs.append(dataclasses.replace(base, gpu_expert_budget=budget))
        labels.append(None)
        for label, settings in COMPARED:
            runs.append(dataclasses.replace(base, gpu_expert_budget=budget, **settings))
            labels.append(label)
    return runs, labels


def floors_ms(row: dict, cpu_bytes_per_s: float | None) -> tuple[float, float | None]:
    """The row's copy floor (bytes over PCIe per token / the copy bandwidth of the run) and CPU
    floor (expert bytes the CPU computed per token / the CPU's rate `auto` measured)."""
    cpu_bytes = (row.get("cpu_experts_per_token") or 0.0) * row["engine"]["expert_block_bytes"]
    return row["copy_floor_ms"], (1e3 * cpu_bytes / cpu_bytes_per_s if cpu_bytes_per_s else None)


def markdown(result: dict, command: str) -> str:
    lines = [f"# What `infer` runs by default, on model A's shape\n", f"    {command}\n",
             f"Model A with {result['layers']} layers, context {result['prompt_tokens']}, "
             f"{result['decode_tokens'] - result['warmup']} decoded tokens timed after {result['warmup']} warm-up, "
             f"{result['gpu']}; host-to-device copies {result['copy_bandwidth_bytes_per_s'] / 1e9:.1f} GB/s in the "
             f"same run. Times are medians (p90 beside them). Floors: the copy floor (bytes over PCIe per token / "
             f"that bandwidth) and the CPU floor (expert bytes the CPU computed per token / the CPU's rate that "
             f"`auto` measured at the same budget).\n",
             "| GPU expert budget | mode | ms/token median | p90 | copy floor ms | CPU floor ms "
             "| against the previous default | why `auto` chose it |",
             "|---|---|---|---|---|---|---|---|"]
    by_budget: dict = {}
    for r in result["modes"]:
        by_budget.setdefault(r["gpu_expert_budget"], []).append(r)
    for budget, rows in by_budget.items():
        before = next(r["ms_per_token_median"] for r in rows if r["mode"] == "current+fetch" and not r.get("default"))
        cpu_rate = next((r["engine"].get("cpu_expert_bytes_per_s") for r in rows if r.get("default")), None)
        for r in rows:
            auto = r["engine"].get("on_miss_auto")
            reads = r["engine"].get("host_read_share") or 0.0
            name = (f"defaults: {r['mode']}" + (f", GPU reads {reads:.2f} of misses" if reads else "")
                    if r.get("default") else r["mode"])
            copy_ms, cpu_ms = floors_ms(r, cpu_rate)
            lines.append(f"| {budget} | {name} | {r['ms_per_token_median']:.2f} | {r['ms_per_token_p90']:.2f} "
                         f"| {copy_ms:.2f} | {'-' if cpu_ms is None else format(cpu_ms, '.2f')} "
                         f"| {r['ms_per_token_median'] / before:.2f}x | {auto if r.get('default') and auto else ''} |")
    return "\n".join(lines) + "\n"


def measure(parts, base: RuntimeConfig, budgets: list[str], prompt, forced: list[int], decode: int,
            warmup: int, progress: bool = False) -> dict:
    """Every row of `runs_for`, after one row that is thrown away: the first `cpu` engine of a
    process decoded slower than the same settings later (its CPU computed the same experts
    about 30% slower), whichever row came first."""
    runs, labels = runs_for(base, budgets)
    first = dataclasses.replace(base, prefetch="none", on_miss="cpu", gpu_expert_budget=budgets[0])
    result = bench(parts, base, [first] + runs, prompt, decode, warmup, progress=progress, forced=forced)
    result["thrown_away"] = result["modes"].pop(0)["mode"]
    for row, label in zip(result["modes"], labels):
        row["default"] = label is None   # its mode is what the defaults resolved to
        row["mode"] = label or row["engine"]["prefetch"] + "+" + row["engine"]["on_miss"]
    return result


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=48)
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--decode", type=int, default=40)
    p.add_argument("--warmup", type=int, default=8)
    p.add_argument("--budgets", default="0,25%,50%")
    p.add_argument("--out", default=str(REPO_ROOT / "benchmarks" / "results" / "default_modes"))
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("default_modes: needs a CUDA device (the defaults resolve differently without one)", file=sys.stderr)
        return 2
    started = time.perf_counter()
    base = RuntimeConfig(device="cuda", dtype="bf16", max_context=args.context + args.decode + 8)
    parts = parts_random(qwen3_30b_shape(args.layers), base, progress=False, embedding_std=EMBEDDING_STD)
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, parts.model.config.vocab_size, (args.context,), generator=gen)
    forced = torch.randint(0, parts.model.config.vocab_size, (args.decode + 1,), generator=gen).tolist()
    result = measure(parts, base, [b for b in args.budgets.split(",") if b], prompt, forced, args.decode,
                     args.warmup, progress=True)
    result.update({"layers": args.layers, "gpu": torch.cuda.get_device_name(),
                   "seconds": time.perf_counter() - started})
    command = "python benchmarks/default_modes.py " + " ".join(sys.argv[1:])
    result["command"] = command.strip()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    md = markdown(result, result["command"])
    out.with_suffix(".md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
