"""How well can layer l+1's experts be predicted without layer l+1's attention?

    python benchmarks/prediction_ceiling.py --trace runs/demo/trace-test --tokens 32768

For each pair of consecutive MoE layers, route layer l+1's router on
LN_{l+1}(x_{l+1}), where x_{l+1} = r_l + MoE_l(s_l) is the exact input of block
l+1 (the real MoE output, computed with the model's own block, instead of the
default-vector stand-in d_l of the quasi-hidden state). The only thing this
`oracle-moe` predictor lacks is layer l+1's attention, which no predictor working
at layer l can have; its recall shows how much of the remaining miss rate is the
attention's doing. Writes benchmarks/results/prediction_ceiling.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from estimators.metrics import compute_metrics  # noqa: E402
from specmoe.models import load_moe_model  # noqa: E402
from specmoe.paths import REPO_ROOT  # noqa: E402
from tracing import TraceReader  # noqa: E402


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trace", type=Path, default=REPO_ROOT / "runs" / "demo" / "trace-test")
    parser.add_argument("--model", default=None, help="default: the model named in the trace manifest")
    parser.add_argument("--tokens", type=int, default=32768)
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "benchmarks" / "results" / "prediction_ceiling.md")
    args = parser.parse_args()

    reader = TraceReader(args.trace)
    loaded = load_moe_model(args.model or reader.manifest["model"]["id"], dtype="fp32", device="cpu")
    fam, model = loaded.family, loaded.model
    layers = [l for l in loaded.spec.moe_layers if l in reader.layers]
    shards = list(range(min(reader.num_shards, max(1, -(-args.tokens // (reader.sequences_per_shard * reader.seq_len))))))
    rows = []
    for src, dst in zip(layers, layers[1:]):
        a = reader.layer(src, ("residual", "topk_ids", "topk_weights"), shards=shards)
        b = reader.layer(dst, ("residual", "topk_ids", "topk_weights"), shards=shards)
        r = a["residual"][: args.tokens].float()
        s = fam.moe_norm(model, src)(r)
        x_next = r + fam.moe_forward(model, src, s.unsqueeze(0)).squeeze(0)
        router = fam.router(model, dst)
        oracle_ids, _ = fam.route(router, fam.router_logits(router, fam.moe_norm(model, dst)(x_next)))
        exact_ids, _ = fam.route(router, fam.router_logits(router, fam.moe_norm(model, dst)(b["residual"][: args.tokens].float())))
        true_ids, true_w = b["topk_ids"][: args.tokens].long(), b["topk_weights"][: args.tokens]
        rows.append((dst, compute_metrics(oracle_ids, true_ids, true_w).recall,
                     compute_metrics(exact_ids, true_ids, true_w).recall))
    mean_oracle = sum(r[1] for r in rows) / len(rows)
    lines = ["# Prediction ceiling without the target layer's attention", "",
             f"`python benchmarks/prediction_ceiling.py --tokens {args.tokens}` on the trace "
             f"`{args.trace.relative_to(REPO_ROOT) if args.trace.is_absolute() else args.trace}` "
             f"({min(args.tokens, reader.num_tokens):,} tokens), CPU, fp32.", "",
             "`oracle-moe`: layer t's router on LN_t(r_l + MoE_l(s_l)), i.e. the exact input of block t without its "
             "attention. `stored r_t`: the router on the stored (bf16) residual of layer t itself, which shows the "
             "rounding of the stored trace.", "",
             "| target layer | recall@k oracle-moe | recall@k stored r_t |", "|---|---|---|"]
    lines += [f"| {t} | {o:.4f} | {e:.4f} |" for t, o, e in rows]
    lines += [f"| mean | {mean_oracle:.4f} | {sum(r[2] for r in rows) / len(rows):.4f} |", ""]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
