"""Held-out perplexity and routing statistics of an MoE model.

    python -m tracing.model_report                 # demo model, demo corpus test split
    python -m tracing.model_report --model DIR --dataset FILE --split test --json out.json

Reports perplexity against a unigram baseline fitted on the train split, and
per MoE layer: the entropy of the expert load (1.0 = perfectly even), the share
of routing assignments taken by the most popular experts, and how much the
perplexity rises when that layer's router is replaced by a random one (same
shape and weight scale). A model whose routing carries no information shows
no rise.
"""

from __future__ import annotations

import argparse
import json
import math
from contextlib import contextmanager
from pathlib import Path

import torch
from tqdm.auto import tqdm

from specmoe.corpus import load_text_dataset
from specmoe.errors import cli_errors
from specmoe.models import load_moe_model
from specmoe.tokens import pack_rows

from .text_table import format_table


@torch.no_grad()
def perplexity(model, rows: torch.Tensor, batch_size: int = 16, desc: str | None = None) -> float:
    device = model.get_input_embeddings().weight.device
    total, count = 0.0, 0
    for i in tqdm(range(0, len(rows), batch_size), desc=desc, leave=False, disable=desc is None):
        batch = rows[i:i + batch_size].to(device)
        loss = model(input_ids=batch, labels=batch).loss.float().item()
        n = batch.numel() - batch.shape[0]  # every token but the first of each row is predicted
        total += loss * n
        count += n
    return math.exp(total / count)


def unigram_perplexity(train_rows: torch.Tensor, eval_rows: torch.Tensor, vocab_size: int) -> float:
    """Add-one smoothed unigram model of the train tokens, scored on the predicted eval tokens."""
    counts = torch.bincount(train_rows.flatten(), minlength=vocab_size).double() + 1.0
    logp = counts.log() - counts.sum().log()
    targets = eval_rows[:, 1:].flatten()
    return math.exp(-logp[targets].mean().item())


@contextmanager
def capture_expert_load(loaded):
    """Count how often each expert of each MoE layer is selected, from the ids the model really used."""
    fam, spec = loaded.family, loaded.spec
    counts = {layer: torch.zeros(spec.num_experts, dtype=torch.long) for layer in spec.moe_layers}
    handles = []
    for layer in spec.moe_layers:
        def hook(module, args, kwargs, layer=layer):
            ids = fam.captured_routing(args, kwargs)[1]
            counts[layer] += torch.bincount(ids.flatten().cpu(), minlength=spec.num_experts)
        handles.append(fam.experts(loaded.model, layer).register_forward_pre_hook(hook, with_kwargs=True))
    try:
        yield counts
    finally:
        for h in handles:
            h.remove()


@contextmanager
def random_router(loaded, layer: int, seed: int = 0):
    """Temporarily give `layer` a random router with the learned one's shape and per-row scale."""
    weight = loaded.family.router_weight(loaded.family.router(loaded.model, layer))
    saved = weight.detach().clone()
    gen = torch.Generator().manual_seed(seed + layer)
    noise = torch.randn(saved.shape, generator=gen, dtype=torch.float32)
    noise = noise / noise.norm(dim=1, keepdim=True) * saved.float().norm(dim=1, keepdim=True).cpu()
    with torch.no_grad():
        weight.copy_(noise.to(weight.dtype))
    try:
        yield
    finally:
        with torch.no_grad():
            weight.copy_(saved)


def load_stats(counts: torch.Tensor) -> dict:
    p = counts.double() / counts.sum()
    nz = p[p > 0]
    entropy = float(-(nz * nz.log()).sum() / math.log(len(p)))
    top = torch.sort(p, descending=True).values
    n_top = max(1, len(p) // 8)
    return {"load_entropy": entropy, f"top{n_top}_share": float(top[:n_top].sum()),
            "uniform_top_share": n_top / len(p), "max_share": float(top[0]), "min_share": float(top[-1]),
            "unused_experts": int((counts == 0).sum())}


def compute_report(loaded, eval_rows: torch.Tensor, train_rows: torch.Tensor | None = None,
                   random_routers: bool = True, batch_size: int = 16) -> dict:
    spec = loaded.spec
    with capture_expert_load(loaded) as counts:
        ppl = perplexity(loaded.model, eval_rows, batch_size, desc="perplexity")
    report = {"model": loaded.model_id, "family": spec.family, "eval_tokens": int(eval_rows.numel()),
              "perplexity": ppl, "layers": {}}
    if train_rows is not None:
        report["unigram_perplexity"] = unigram_perplexity(train_rows, eval_rows, len(loaded.tokenizer))
    for layer in spec.moe_layers:
        report["layers"][layer] = load_stats(counts[layer])
    if random_routers:
        for layer in tqdm(spec.moe_layers, desc="random routers", leave=False):
            with random_router(loaded, layer):
                rppl = perplexity(loaded.model, eval_rows, batch_size)
            report["layers"][layer]["random_router_perplexity"] = rppl
            report["layers"][layer]["random_router_rise"] = rppl / ppl - 1.0
    return report


def format_report(report: dict) -> str:
    lines = [f"model {report['model']} ({report['family']}), {report['eval_tokens']:,} held-out tokens",
             f"perplexity {report['perplexity']:.2f}"
             + (f" (unigram baseline {report['unigram_perplexity']:.1f})" if "unigram_perplexity" in report else "")]
    first = next(iter(report["layers"].values()))
    top_key = next(k for k in first if k.startswith("top") and k.endswith("_share"))
    has_random = "random_router_perplexity" in first
    headers = ["layer", "load entropy", top_key, "max share", "unused"]
    if has_random:
        headers += ["random-router ppl", "rise"]
    rows = []
    for layer, s in report["layers"].items():
        row = [str(layer), f"{s['load_entropy']:.3f}", f"{s[top_key]:.3f}", f"{s['max_share']:.3f}",
               str(s["unused_experts"])]
        if has_random:
            row += [f"{s['random_router_perplexity']:.2f}", f"{100 * s['random_router_rise']:.1f}%"]
        rows.append(row)
    lines += format_table(headers, rows)
    lines.append(f"(even load: entropy 1.000, {top_key} {first['uniform_top_share']:.3f})")
    return "\n".join(lines)


@cli_errors("python -m tracing.model_report")
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tracing.model_report", description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="hub id or local directory (default: the bundled demo model)")
    parser.add_argument("--dataset", help="text dataset (default: the bundled demo corpus)")
    parser.add_argument("--split", default="test")
    parser.add_argument("--baseline-split", default="train", help="split the unigram baseline is fitted on")
    parser.add_argument("--text-field", default="text")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--max-tokens", type=int, default=None)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--no-random-routers", action="store_true", help="skip the random-router ablation")
    parser.add_argument("--json", type=Path, help="also write the report as JSON")
    args = parser.parse_args(argv)

    loaded = load_moe_model(args.model, dtype=args.dtype, device=args.device)
    tok = loaded.tokenizer
    eval_rows = pack_rows(load_text_dataset(args.dataset, args.split, args.text_field), tok, args.text_field,
                          args.seq_len, args.max_tokens)
    train_rows = None
    if args.baseline_split:
        train_rows = pack_rows(load_text_dataset(args.dataset, args.baseline_split, args.text_field), tok,
                               args.text_field, args.seq_len)
    report = compute_report(loaded, eval_rows, train_rows, random_routers=not args.no_random_routers)
    report["dataset"] = {"spec": args.dataset or "demo-corpus", "split": args.split, "seq_len": args.seq_len}
    print(format_report(report))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
