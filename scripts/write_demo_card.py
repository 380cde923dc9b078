"""Write the demo model's card (checkpoints/demo-moe/README.md) from measurements.

    python -m tracing.model_report --split test --json checkpoints/demo-moe/routing_report.json
    python scripts/write_demo_card.py

Every number in the card comes from training_summary.json (written by
scripts/train_demo_model.py) and routing_report.json (written by the command above).
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tracing.model_report import format_report  # noqa: E402
from specmoe.paths import DEMO_MODEL_DIR  # noqa: E402


def main() -> None:
    summary = json.loads((DEMO_MODEL_DIR / "training_summary.json").read_text())
    report = json.loads((DEMO_MODEL_DIR / "routing_report.json").read_text())
    report["model"] = "checkpoints/demo-moe"
    config = json.loads((DEMO_MODEL_DIR / "config.json").read_text())
    cfg = summary["config"]
    layers = report["layers"]
    rises = [s["random_router_rise"] for s in layers.values()]
    entropies = [s["load_entropy"] for s in layers.values()]
    top_key = next(k for k in next(iter(layers.values())) if k.startswith("top") and k.endswith("_share"))
    tops = [s[top_key] for s in layers.values()]
    size_mb = sum(p.stat().st_size for p in DEMO_MODEL_DIR.iterdir() if p.is_file()) / 1e6
    n_experts = config.get("num_experts", config.get("num_local_experts"))
    expert_params = config["num_hidden_layers"] * n_experts * 3 * config["hidden_size"] * config["moe_intermediate_size"]

    card = f"""# demo-moe: a small Qwen3-MoE trained from scratch on public-domain English

The default model of every specmoe command and of the tests. It exists so that
the whole pipeline (trace -> train estimators -> infer) runs offline on a real
MoE with learned routing. It is tiny and writes Elizabethan pastiche; it is not
meant for anything else.

| | |
|---|---|
| architecture | `Qwen3MoeForCausalLM` (transformers), {config['num_hidden_layers']} layers, all MoE |
| experts | {n_experts} per layer, top-{config['num_experts_per_tok']}, renormalised top-k (`norm_topk_prob`), expert hidden {config['moe_intermediate_size']} |
| hidden size | {config['hidden_size']}, {config['num_attention_heads']} query / {config['num_key_value_heads']} key-value heads of {config['head_dim']}, context {config['max_position_embeddings']} |
| parameters | {summary['parameters'] / 1e6:.2f} M ({expert_params / 1e6:.2f} M in experts), stored in bf16 |
| tokenizer | byte-level BPE, {config['vocab_size']} tokens, trained on the train split |
| files | {size_mb:.1f} MB in all |

## Data

The bundled demo corpus (`data/demo-corpus`, see its README): Shakespeare's plays
and poems, Milton's Paradise Lost and Paradise Regained, and the King James Bible,
cut into passages and split 90/5/5 into train / validation / test by a hash of
(work, passage). The model and its tokenizer saw only the train split; the best
checkpoint was chosen on the validation split; the figures below are on the test
split, which nothing was fitted on.

## Recipe

`python scripts/train_demo_model.py` (recipe in `configs/demo_model.yaml`), on one
{summary['device']} with torch {summary['torch']}: AdamW (betas 0.9/0.95, weight
decay {cfg['weight_decay']}), peak learning rate {cfg['lr']} with {cfg['warmup_steps']} warm-up steps and cosine
decay to {cfg['min_lr_ratio']}x, batches of {cfg['batch_size']} x {cfg['seq_len']} tokens drawn at random offsets
of the packed train split, bf16 autocast, load-balancing auxiliary loss
(coefficient {config['router_aux_loss_coef']}). {summary['steps']} steps, **{summary['tokens_trained'] / 1e6:.1f} M tokens trained** in
{summary['minutes']:.1f} minutes (tokenizer training included); the weights kept are those of step
{summary['best_step']}, best on validation (perplexity {summary['best_val_ppl']:.2f}).

## Held-out quality

On {report['eval_tokens']:,} test tokens (rows of {report['dataset']['seq_len']}):

| model | perplexity |
|---|---|
| demo-moe | **{report['perplexity']:.2f}** |
| unigram baseline (add-one, fitted on the train split) | {report['unigram_perplexity']:.1f} |

## Routing is learned, not uniform

Per layer, on the same test tokens: the entropy of the expert load (normalised so
that an even load is 1.0), the share of routing assignments that the most popular
eighth of the experts take (an even load gives {next(iter(layers.values()))['uniform_top_share']:.3f}), and the perplexity when
that one layer's router is replaced by a random one of the same shape and scale
(the rest of the model untouched).

```
{format_report(report)}
```

The load is far from even despite the load-balancing loss: load entropy
{min(entropies):.3f} to {max(entropies):.3f}, and the most popular eighth of the experts take
{100 * min(tops):.0f}% to {100 * max(tops):.0f}% of all assignments where an even load would give 12.5%.
That the routers have learned which expert each token needs shows in what a
random router does to a single layer: perplexity rises by {100 * min(rises):.1f}% to
{100 * max(rises):.0f}% depending on the layer (median {100 * statistics.median(rises):.1f}%); the first
layer's routing matters most.

Remake the figures: `python -m tracing.model_report --split test --json checkpoints/demo-moe/routing_report.json && python scripts/write_demo_card.py`.

## Loading

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained("checkpoints/demo-moe")
tokenizer = AutoTokenizer.from_pretrained("checkpoints/demo-moe")
```
"""
    (DEMO_MODEL_DIR / "README.md").write_text(card)
    print(f"wrote {DEMO_MODEL_DIR / 'README.md'}")


if __name__ == "__main__":
    main()
