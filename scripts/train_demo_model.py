"""Train the bundled demo MoE (a Qwen3-MoE) from scratch on the demo corpus.

    python scripts/train_demo_model.py                      # recipe in configs/demo_model.yaml
    python scripts/train_demo_model.py --max-steps 50 --out /tmp/smoke

Steps: train a byte-level BPE tokenizer on the train split, train the model on
random windows of the packed train split with AdamW and a cosine schedule, keep
the weights with the best validation loss, save them in bf16 as safetensors
beside the tokenizer. The test split is never read.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from specmoe.corpus import load_text_dataset  # noqa: E402
from specmoe.paths import CONFIGS_DIR, DEMO_MODEL_DIR  # noqa: E402

EOS = "<|endoftext|>"


@dataclasses.dataclass
class TrainingConfig:
    seq_len: int = 256
    batch_size: int = 128
    max_steps: int = 2400
    max_minutes: float = 8.5
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 200
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    eval_every: int = 200
    seed: int = 0
    experts_implementation: str = "grouped_mm"


def train_tokenizer(texts: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS, pad_token=EOS,
                                   unk_token=None, model_max_length=1024)


def pack(tokenizer, texts: list[str]) -> torch.Tensor:
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    flat = [t for row in ids for t in row + [tokenizer.eos_token_id]]
    return torch.tensor(flat, dtype=torch.long)


@torch.no_grad()
def evaluate(model, tokens: torch.Tensor, seq_len: int, batch_size: int, device) -> float:
    model.eval()
    n = (len(tokens) - 1) // seq_len
    rows = tokens[: n * seq_len].view(n, seq_len)
    total, count = 0.0, 0
    for i in range(0, n, batch_size):
        batch = rows[i:i + batch_size].to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            out = model(input_ids=batch, labels=batch)
        total += out.loss.float().item() * batch.numel()
        count += batch.numel()
    model.train()
    return total / count


def lr_at(step: int, cfg: TrainingConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", type=Path, default=CONFIGS_DIR / "demo_model.yaml")
    parser.add_argument("--out", type=Path, default=DEMO_MODEL_DIR)
    parser.add_argument("--max-steps", type=int)
    parser.add_argument("--max-minutes", type=float)
    parser.add_argument("--experts-implementation")
    args = parser.parse_args()

    recipe = yaml.safe_load(args.config.read_text())
    cfg = TrainingConfig(**recipe["training"])
    for name in ("max_steps", "max_minutes", "experts_implementation"):
        if getattr(args, name) is not None:
            setattr(cfg, name, getattr(args, name))
    torch.manual_seed(cfg.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    start = time.time()

    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    train_texts = list(load_text_dataset(None, "train")["text"])
    val_texts = list(load_text_dataset(None, "validation")["text"])
    tokenizer = train_tokenizer(train_texts, recipe["tokenizer"]["vocab_size"])
    train_tokens, val_tokens = pack(tokenizer, train_texts), pack(tokenizer, val_texts)
    print(f"tokenizer: {len(tokenizer)} tokens; train {len(train_tokens):,} tokens, validation {len(val_tokens):,} "
          f"({time.time() - start:.0f}s)", flush=True)

    model_cfg = Qwen3MoeConfig(vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id,
                               bos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id,
                               output_router_logits=False, **recipe["model"])
    model = Qwen3MoeForCausalLM(model_cfg).to(device)
    if hasattr(model, "set_experts_implementation") and device.type == "cuda":
        model.set_experts_implementation(cfg.experts_implementation)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.2f} M parameters on {device}", flush=True)

    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed" not in n)]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}],
                                  lr=cfg.lr, betas=(0.9, 0.95), fused=device.type == "cuda")
    gen = torch.Generator().manual_seed(cfg.seed)
    best = (float("inf"), None, 0)
    history = []
    step, tokens_seen = 0, 0
    train_start = time.time()
    model.train()
    while step < cfg.max_steps and (time.time() - start) / 60 < cfg.max_minutes:
        offsets = torch.randint(0, len(train_tokens) - cfg.seq_len - 1, (cfg.batch_size,), generator=gen)
        batch = torch.stack([train_tokens[o:o + cfg.seq_len] for o in offsets.tolist()]).to(device, non_blocking=True)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, cfg)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            out = model(input_ids=batch, labels=batch, output_router_logits=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        tokens_seen += batch.numel()
        if step % cfg.eval_every == 0 or step == cfg.max_steps:
            val = evaluate(model, val_tokens, cfg.seq_len, cfg.batch_size, device)
            elapsed = time.time() - train_start
            history.append({"step": step, "tokens": tokens_seen, "train_loss": out.loss.item(), "val_loss": val,
                            "minutes": elapsed / 60})
            print(f"step {step:5d}  tokens {tokens_seen / 1e6:7.1f}M  train {out.loss.item():.3f}  "
                  f"val {val:.3f} (ppl {math.exp(val):.1f})  {tokens_seen / elapsed / 1e3:.0f}k tok/s", flush=True)
            if val < best[0]:
                best = (val, {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}, step)
    if best[1] is None:  # budget ran out before the first evaluation
        best = (evaluate(model, val_tokens, cfg.seq_len, cfg.batch_size, device), model.state_dict(), step)

    model.load_state_dict(best[1])
    model = model.to("cpu", torch.bfloat16)
    model.config.output_router_logits = False
    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    summary = {"parameters": n_params, "steps": step, "tokens_trained": tokens_seen, "best_step": best[2],
               "best_val_loss": best[0], "best_val_ppl": math.exp(best[0]), "minutes": (time.time() - start) / 60,
               "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
               "torch": torch.__version__, "config": dataclasses.asdict(cfg), "history": history}
    (args.out / "training_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"saved {args.out}: best validation ppl {math.exp(best[0]):.2f} at step {best[2]}, "
          f"{tokens_seen / 1e6:.1f}M tokens in {summary['minutes']:.1f} min", flush=True)


if __name__ == "__main__":
    main()
