"""benchmarks/default_modes.py on the CPU with a small model of model A's shape: every budget
gets the defaults, labelled by what they resolved to, beside each compared mode as set by
hand; the first row is thrown away; the table compares each row with `current+fetch`."""

from __future__ import annotations

import torch

from benchmarks.default_modes import COMPARED, markdown, measure
from benchmarks.runtime_decode import EMBEDDING_STD, qwen3_30b_shape
from runtime.build import parts_random
from runtime.config import RuntimeConfig


def test_default_modes_rows_and_table():
    base = RuntimeConfig(device="cpu", dtype="bf16", max_context=48)
    parts = parts_random(qwen3_30b_shape(2, 256), base, progress=False, embedding_std=EMBEDDING_STD)
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, parts.model.config.vocab_size, (16,), generator=gen)
    forced = torch.randint(0, parts.model.config.vocab_size, (7,), generator=gen).tolist()
    result = measure(parts, base, ["0", "25%"], prompt, forced, decode=6, warmup=2)
    rows = result["modes"]
    assert result["thrown_away"] == "none+cpu"
    assert len(rows) == 2 * (1 + len(COMPARED))
    defaults = [r for r in rows if r["default"]]
    # off CUDA the defaults resolve to fetch, with the router on the current state predicting
    assert [r["mode"] for r in defaults] == ["current+fetch"] * 2
    assert all("no GPU" in r["engine"]["on_miss_auto"] for r in defaults)
    assert [r["mode"] for r in rows[1:1 + len(COMPARED)]] == [label for label, _ in COMPARED]
    hand = {r["mode"]: r for r in rows if r["gpu_expert_budget"] == "25%" and not r["default"]}
    assert hand["none+cpu, no GPU reads"]["engine"]["host_read_share"] == 0.0
    assert hand["none+cpu"]["cpu_experts_per_token"] > 0 and hand["none+fetch"]["cpu_experts_per_token"] == 0
    result.update(layers=2, gpu="cpu")
    table = markdown(result, "python benchmarks/default_modes.py")
    before = hand["current+fetch"]["ms_per_token_median"]
    line = next(l for l in table.splitlines() if l.startswith("| 25% | none+fetch |"))
    assert f"| {hand['none+fetch']['ms_per_token_median'] / before:.2f}x |" in line
    assert "| 25% | defaults: current+fetch |" in table
