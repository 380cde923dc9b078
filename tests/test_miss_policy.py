"""`on_miss: auto` (runtime.miss_policy): which exact policy serves a layer's misses sooner,
checked against the arithmetic done by hand, and how an engine and `infer` resolve it."""

from __future__ import annotations

import json

import pytest
import torch

import runtime
from runtime.cli import main
from runtime.config import RuntimeConfig, load_config
from runtime.miss_policy import (CPU_LAYER_LATENCY_S, choose_on_miss, cpu_runs_ahead_without_prediction,
                                 expected_misses)
from tests.test_runtime import PROMPT, engine_logits, stock_logits
from tests.tiny_models import tiny_model

QWEN3_30B_EXPERT = 3 * 2048 * 768 * 2      # bytes of one bf16 expert of Qwen3-30B-A3B's shape


@pytest.mark.parametrize("expert_bytes,misses,copy_gb_s,cpu_gb_s,expected", [
    (QWEN3_30B_EXPERT, 6, 54.4, 94.8, "cpu"),      # the H200 machine at 25%: 0.70 ms against 1.04
    (QWEN3_30B_EXPERT, 8, 54.4, 94.8, "cpu"),      # ... at the minimum budget
    (QWEN3_30B_EXPERT, 6, 54.4, 28.5, "fetch"),    # stock torch's rate on the same host: 2.09 ms
    (QWEN3_30B_EXPERT, 6, 25.0, 40.0, "cpu"),      # a PCIe 4 desktop with fast memory
    (48 * 1024, 6, 54.4, 94.8, "fetch"),           # the demo model's 48 KiB experts: the CPU's wait dominates
])
def test_auto_picks_the_channel_that_serves_a_layers_misses_sooner(expert_bytes, misses, copy_gb_s, cpu_gb_s,
                                                                   expected):
    by_hand_cpu = misses * expert_bytes / (cpu_gb_s * 1e9) + CPU_LAYER_LATENCY_S
    by_hand_copy = misses * expert_bytes / (copy_gb_s * 1e9)
    assert (by_hand_cpu < by_hand_copy) == (expected == "cpu")   # the table above is right
    choice = choose_on_miss(cuda=True, holds_every_expert=False, misses_per_layer=misses, expert_bytes=expert_bytes,
                            copy_bytes_per_s=copy_gb_s * 1e9, cpu_bytes_per_s=cpu_gb_s * 1e9)
    assert choice.on_miss == expected
    assert f"{cpu_gb_s:.1f} GB/s" in choice.reason and f"{copy_gb_s:.1f} GB/s" in choice.reason


def test_auto_fetches_where_nothing_crosses_a_link_or_nothing_misses():
    assert choose_on_miss(cuda=False, holds_every_expert=False, misses_per_layer=8,
                          expert_bytes=QWEN3_30B_EXPERT).on_miss == "fetch"
    assert choose_on_miss(cuda=True, holds_every_expert=True, misses_per_layer=0,
                          expert_bytes=QWEN3_30B_EXPERT).on_miss == "fetch"
    with pytest.raises(ValueError):
        choose_on_miss(cuda=True, holds_every_expert=False, misses_per_layer=8, expert_bytes=QWEN3_30B_EXPERT)


def test_expected_misses_follow_the_budget_share():
    assert expected_misses(8, 1536, 6144) == pytest.approx(6.0)
    assert expected_misses(8, 16, 6144) == pytest.approx(8 * (1 - 16 / 6144))
    assert expected_misses(8, 6144, 6144) == 0.0


def test_auto_is_the_default_in_the_dataclass_and_the_yaml():
    for config in (RuntimeConfig(), load_config()):
        assert config.on_miss == "auto" and config.prefetch == "auto"
        assert config.host_read_share is None   # auto: measured with `cpu` on a GPU, else none


def test_an_auto_engine_off_cuda_fetches_and_matches_stock():
    ref = tiny_model("qwen3_moe")
    ids = torch.cat([PROMPT, torch.tensor([4, 8, 15, 16])])
    engine = runtime.from_model(tiny_model("qwen3_moe"), RuntimeConfig(device="cpu", max_context=64, prefetch="none"))
    assert engine.moe.on_miss == "fetch" and engine.moe.cpu is None
    assert engine.info["on_miss"] == "fetch" and "no GPU" in engine.info["on_miss_auto"]
    assert engine.config.on_miss == "fetch"
    got = engine_logits(engine, ids, prompt_len=len(PROMPT))
    engine.close()
    torch.testing.assert_close(got, stock_logits(ref, ids), rtol=1e-4, atol=1e-4)


def test_infer_says_what_auto_chose(tmp_path, capsys):
    tel = tmp_path / "telemetry.json"
    assert main(["generate", "To be", "--device", "cpu", "--max-new-tokens", "3", "--prefetch", "none",
                 "--telemetry", str(tel), "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "none+fetch (auto: no GPU" in err
    assert json.loads(tel.read_text())["engine"]["on_miss"] == "fetch"


def test_auto_prefetch_gives_way_to_a_cpu_step_queued_ahead():
    """`prefetch: auto` predicts nothing where `cpu` decode on a GPU would run ahead without a
    predictor; wherever something stops that step (no GPU, demand copies, eager decode) it
    keeps its predictor."""
    cpu = RuntimeConfig(on_miss="cpu")
    assert cpu_runs_ahead_without_prediction(cpu, cuda=True)
    assert not cpu_runs_ahead_without_prediction(cpu, cuda=False)
    for change in (dict(on_miss="fetch"), dict(cpu_demand_share=None), dict(cpu_demand_share=0.25),
                   dict(run_ahead=False), dict(cuda_graphs=False), dict(device_table=False)):
        assert not cpu_runs_ahead_without_prediction(RuntimeConfig(**{"on_miss": "cpu", **change}), cuda=True), change
    # off CUDA an auto-prefetch cpu engine keeps its predictor, as before
    engine = runtime.from_model(tiny_model("qwen3_moe"), RuntimeConfig(device="cpu", max_context=64, on_miss="cpu"))
    assert engine.info["prefetch"] == "current" and engine.moe.predictor is not None
    engine.close()


def test_infer_bench_names_an_auto_mode_with_what_it_resolved_to(tmp_path):
    out = tmp_path / "bench"
    assert main(["bench", "--device", "cpu", "--modes", "auto+auto,none+cpu", "--prompt-tokens", "16",
                 "--decode-tokens", "4", "--warmup", "1", "--out", str(out), "--quiet"]) == 0
    data = json.loads((out / "bench.json").read_text())
    assert [r["mode"] for r in data["modes"]] == ["auto+auto (current+fetch)", "none+cpu"]
    assert "| auto+auto (current+fetch) |" in (out / "bench.md").read_text()
