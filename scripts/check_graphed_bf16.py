"""Graphed (and compiled) decode against eager decode on model A's shape in bf16: logits and routing per step."""
import dataclasses
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.runtime_decode import EMBEDDING_STD, qwen3_30b_shape  # noqa: E402
from runtime.build import configure, parts_random  # noqa: E402
from runtime.config import RuntimeConfig  # noqa: E402

base = RuntimeConfig(device="cuda", dtype="bf16", max_context=1100, prefetch="none", on_miss="fetch", gpu_expert_budget="100%")
parts = parts_random(qwen3_30b_shape(2), base, progress=False, embedding_std=EMBEDDING_STD)
g = torch.Generator().manual_seed(0)
V = parts.model.config.vocab_size
prompt = torch.randint(0, V, (1024,), generator=g)
forced = torch.randint(0, V, (12,), generator=g).tolist()
out = {}
for name, kw in (("eager", dict(cuda_graphs=False)), ("graphs", dict(compile=False)), ("compiled", dict(compile=True))):
    eng = configure(parts, dataclasses.replace(base, **kw))
    eng.reset()
    eng.step(prompt)
    logits, ids = [], []
    for t in forced:
        logits.append(eng.step(torch.tensor([t]))[-1].float().cpu())
        if eng._graphs is not None:
            ids.append({l: eng._graphs.ids[l].cpu().tolist()[0] for l in eng._graphs.ids})
    out[name] = (torch.stack(logits), ids)
    eng.close()
ref = out["eager"][0]
for name in ("graphs", "compiled"):
    lg, ids = out[name]
    print(name, "max|dlogit|", (lg - ref).abs().max().item(), "ref scale", ref.abs().max().item(),
          "argmax agree", (lg.argmax(-1) == ref.argmax(-1)).float().mean().item(), "nan", torch.isnan(lg).any().item())
    for l in ids[0]:
        distinct = len({e for step in ids for e in step[l]})
        print(f"  layer {l}: {distinct} distinct experts over {len(ids)} tokens (uniform routing: ~{min(128, 8 * len(ids))})")
