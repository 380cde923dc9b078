"""The runtime on a CUDA device: copy stream, pinned host store, copy/compute overlap.

Same references as tests/test_runtime.py (the stock model's own forward), now with
copies running on a side stream while the GPU computes."""

from __future__ import annotations

import pytest
import torch

import runtime
from runtime.config import RuntimeConfig
from runtime.cuda_graphs import DecodeGraphs
from tests.test_runtime import PROMPT, engine_logits, routing_never_lands, stock_logits
from tests.tiny_models import tiny_model

pytestmark = pytest.mark.gpu


def cfg(**kw) -> RuntimeConfig:
    # No GPU reads unless a test asks: measured at start, the split varies between engines, and
    # tests compare engines bit for bit.
    base = dict(device="cuda", max_context=64, host_read_share=0.0)
    base.update(kw)
    return RuntimeConfig(**base)


@pytest.mark.parametrize("family", ["qwen3_moe", "qwen2_moe", "deepseek_v3", "gpt_oss", "mixtral"])
@pytest.mark.parametrize("prefetch,on_miss,budget", [("none", "fetch", "0"), ("current", "cpu", "0"),
                                                     ("current", "fetch", "60%")])
def test_exact_modes_match_stock_on_cuda(family, prefetch, on_miss, budget):
    ref = tiny_model(family).cuda()
    ids = torch.cat([PROMPT, torch.tensor([4, 8, 15, 16, 23, 42, 1, 3])])
    expected = stock_logits(ref, ids.cuda())
    engine = runtime.from_model(tiny_model(family), cfg(prefetch=prefetch, on_miss=on_miss, gpu_expert_budget=budget))
    assert engine.moe.store.pinned
    got = engine_logits(engine, ids, prompt_len=len(PROMPT))
    engine.close()
    torch.testing.assert_close(got, expected, rtol=2e-4, atol=2e-4)


def test_expert_copies_go_straight_to_the_cuda_runtime_and_land_in_their_slots():
    """Copies of expert blocks bypass torch (one cudaMemcpyAsync each, on the copy stream): each
    slot holds the block it was given, the others are untouched."""
    from runtime.streams import Streams

    streams = Streams(torch.device("cuda"))
    assert streams._memcpy is not None, "the CUDA runtime torch loaded was not found: copies go through torch"
    src = torch.randint(0, 256, (7, 4096 + 64), dtype=torch.uint8).pin_memory()
    dst = torch.zeros((5, src.shape[1]), dtype=torch.uint8, device="cuda")
    pairs = [(0, 6), (3, 2), (4, 0)]
    streams.copy_blocks(dst, src, pairs)
    streams.synchronize()
    expected = torch.zeros_like(dst)
    for i, j in pairs:
        expected[i] = src[j].cuda()
    assert torch.equal(dst, expected)


def test_small_reads_and_writes_on_the_compute_stream_land_in_order():
    """The host's reads of routing (device to pinned host) and its writes of the CPU's part (pinned
    host to device) go straight to the CUDA runtime on the compute stream, behind the work queued
    before them."""
    from runtime.streams import Streams

    streams = Streams(torch.device("cuda"))
    ids = torch.arange(8, device="cuda")
    ids.mul_(3)   # queued before the read: the read must see it
    host = torch.empty(8, dtype=torch.long, pin_memory=True)
    streams.copy_on_compute(host, ids)
    streams.host_event().synchronize()
    assert host.tolist() == [3 * i for i in range(8)]
    part = torch.randn(1, 64).pin_memory()
    dev = torch.zeros(1, 64, device="cuda")
    streams.copy_on_compute(dev, part)
    dev.mul_(2)   # queued after the write: it must see the written values
    assert torch.equal(dev.cpu(), part * 2)


def test_host_gate_holds_the_compute_stream_until_the_host_opens_it():
    """Work queued behind a closed gate waits for the host's flag, however long, and runs once
    it is written; a gate opened before the stream reaches it does not wait at all."""
    import time

    from runtime.streams import HostGate, Streams

    streams = Streams(torch.device("cuda"))
    gate = HostGate(streams)
    assert gate.available, "cuStreamWaitValue32 not found in the CUDA driver"
    x = torch.zeros(4, device="cuda")
    seq = gate.close()
    x.add_(1)
    done = streams.host_event()
    time.sleep(0.05)
    assert not done.query()
    gate.open(seq)
    done.synchronize()
    assert x.tolist() == [1.0] * 4
    seq = gate.close()
    gate.open(seq)
    x.add_(1)
    assert x.tolist() == [2.0] * 4
    # Near the counter's end: the stream drains and counting starts over, still gating.
    gate._seq = 1 << 30
    seq = gate.close()
    assert seq == 1
    x.add_(1)
    done = streams.host_event()
    time.sleep(0.02)
    assert not done.query()
    gate.open(seq)
    assert x.tolist() == [3.0] * 4
    # A number taken ahead and opened before its gate is queued: the gate passes.
    early = gate.reserve()
    gate.open(early)
    gate.close(early)
    x.add_(1)
    assert x.tolist() == [4.0] * 4


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3", "gpt_oss"])
@pytest.mark.parametrize("budget,fill", [("0", "prompt"), ("60%", "prompt"), ("60%", "recent"), ("100%", "prompt")])
def test_run_ahead_cpu_decode_matches_stock_and_the_step_by_step_loop(family, budget, fill, monkeypatch):
    """`cpu` with no predictor queues each next layer behind a gate while the CPU computes
    (no gate for a layer whose experts are all on the GPU: the last layers with
    cache_fill=recent; at 100% every graph of a step is queued back to back), its CPU part
    by the native part that waits for the routing and opens the gate (the whole step queued,
    the parts on the native queue's thread), or by the Python path:
    the same logits as the loop that waits for the CPU before queuing (bit for bit: the same
    arithmetic) and as the stock forward (dense layers between MoE layers in deepseek_v3)."""
    ref = tiny_model(family).cuda()
    ids = torch.cat([PROMPT, torch.tensor([4, 8, 15, 16, 23, 42, 1, 3])])
    expected = stock_logits(ref, ids.cuda())
    got, counted = {}, {}
    for ahead, native in ((True, True), (True, False), (False, False)):
        monkeypatch.setattr(DecodeGraphs, "native_layers", native)
        engine = runtime.from_model(tiny_model(family), cfg(prefetch="none", on_miss="cpu", gpu_expert_budget=budget,
                                                            run_ahead=ahead, cache_fill=fill))
        got[ahead, native] = engine_logits(engine, ids, prompt_len=len(PROMPT))
        graphs = engine.decode_graphs
        assert graphs.run_ahead == ahead
        # every expert on the GPU: no step needs the queue (DecodeGraphs.all_resident)
        assert graphs.cpu_parts_queued == (ahead and native and budget != "100%")
        assert graphs.all_resident() == (budget == "100%")
        tel = engine.telemetry
        counted[ahead, native] = (dict(tel.uses), dict(tel.cache_hits), tel.cpu_experts)
        engine.close()
        assert (tel.cpu_experts > 0) == (budget != "100%")
    # every use, hit and CPU expert counted alike on all three paths
    assert counted[True, True] == counted[True, False] == counted[False, False]
    assert torch.equal(got[True, True], got[False, False])
    assert torch.equal(got[True, False], got[False, False])
    torch.testing.assert_close(got[True, True], expected, rtol=2e-4, atol=2e-4)


def test_run_ahead_decode_goes_on_after_the_graphs_replay_alone():
    """Replaying a step's graphs with no host between them (device_ms, as benchmarks time the
    GPU) advances the device's step count; the next run-ahead steps still find their routing
    at once (their native CPU parts would otherwise wait out a 30 s timeout and fail)."""
    import time

    engine = runtime.from_model(tiny_model("qwen3_moe"), cfg(prefetch="none", on_miss="cpu", gpu_expert_budget="0"))
    engine.reset()
    engine.step(PROMPT)
    engine.step(torch.tensor([4]))
    engine.decode_graphs.device_ms(repeats=2, warmup=1)
    start = time.monotonic()
    for t in (8, 15):
        assert torch.isfinite(engine.step(torch.tensor([t]))).all()
    assert time.monotonic() - start < 10
    assert engine.decode_graphs.run_ahead and engine.decode_graphs.cpu_parts_queued
    assert engine.telemetry.routing_wait_seconds < 10
    engine.close()


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
@pytest.mark.parametrize("on_miss,budget", [("cpu", "0"), ("fetch", "0"), ("cpu", "100%")])
def test_gpu_reads_experts_in_host_memory_and_stays_exact(family, on_miss, budget):
    """Half of each layer's misses computed by the experts graph reading their weights in
    place in pinned host memory (no copy, no slot), the rest by the CPU (running a layer
    ahead) or copied: the stock forward's logits. With every expert on the GPU, the graphs
    without reads replay and nothing is read."""
    ref = tiny_model(family).cuda()
    ids = torch.cat([PROMPT, torch.tensor([4, 8, 15, 16, 23, 42, 1, 3])])
    expected = stock_logits(ref, ids.cuda())
    engine = runtime.from_model(tiny_model(family), cfg(prefetch="none", on_miss=on_miss, gpu_expert_budget=budget,
                                                        host_read_share=0.5))
    got = engine_logits(engine, ids, prompt_len=len(PROMPT))
    assert engine.decode_graphs.run_ahead == (on_miss == "cpu")
    tel = engine.telemetry
    engine.close()
    torch.testing.assert_close(got, expected, rtol=2e-4, atol=2e-4)
    assert (tel.host_read_experts > 0) == (budget == "0")


def test_auto_host_reads_measure_the_split_and_stay_exact():
    """`host_read_share: null` with `cpu` on CUDA: the split is measured at start (both channels
    at once on this store), shaded, and the GPU takes whole misses by it; the stock forward's
    logits."""
    from runtime.build import HOST_READ_SHADE

    ref = tiny_model("qwen3_moe").cuda()
    ids = torch.cat([PROMPT, torch.tensor([4, 8, 15, 16, 23, 42, 1, 3])])
    expected = stock_logits(ref, ids.cuda())
    engine = runtime.from_model(tiny_model("qwen3_moe"), cfg(prefetch="none", on_miss="cpu", gpu_expert_budget="0",
                                                             host_read_share=None))
    share = engine.moe.host_read_share
    assert 0.0 <= share < 1.0 and engine.info["host_read_share"] == share
    assert share == pytest.approx(HOST_READ_SHADE * engine.info["host_read_measured"])   # shaded
    got = engine_logits(engine, ids, prompt_len=len(PROMPT))
    engine.close()
    torch.testing.assert_close(got, expected, rtol=2e-4, atol=2e-4)


@pytest.mark.parametrize("native", [True, False], ids=["native", "python"])
def test_run_ahead_step_that_fails_leaves_the_stream_running(native, monkeypatch):
    """An error in the CPU's part of a run-ahead step reaches the caller, and the gates it left
    closed are opened: the device does not wait forever on the queued layers. The native
    part fails for real: its routing never lands where it looks."""
    monkeypatch.setattr(DecodeGraphs, "native_layers", native)
    if native:
        routing_never_lands(monkeypatch)
    engine = runtime.from_model(tiny_model("qwen3_moe"), cfg(prefetch="none", on_miss="cpu", gpu_expert_budget="0"))
    engine.reset()
    engine.step(PROMPT)
    calls = []

    def broken(*a, **k):
        calls.append(1)
        raise RuntimeError("CPU expert kernel failed")

    if not native:
        engine.moe.cpu.compute = broken
    with pytest.raises(RuntimeError, match="did not reach host memory" if native else "CPU expert kernel failed"):
        engine.step(torch.tensor([6]))
    graphs = engine.decode_graphs
    assert graphs.run_ahead and graphs.cpu_parts_queued == native
    assert native or calls
    done = engine.streams.host_event()
    import time

    deadline = time.monotonic() + 10
    while not done.query():
        assert time.monotonic() < deadline, "the compute stream is stuck behind a closed gate"
        time.sleep(0.01)
    engine.close()


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
def test_cpu_with_demand_copies_matches_stock_on_cuda(family):
    """`cpu` at the minimum budget with the demand share left to the host: a layer's misses split
    between copies computed by the GPU and the CPU, exact either way."""
    ref = tiny_model(family).cuda()
    ids = torch.cat([PROMPT, torch.tensor([4, 8, 15, 16, 23, 42, 1, 3])])
    expected = stock_logits(ref, ids.cuda())
    engine = runtime.from_model(tiny_model(family), cfg(prefetch="current", on_miss="cpu", gpu_expert_budget="0",
                                                        cpu_demand_share=None))
    assert engine.moe.adapt_demand_share
    got = engine_logits(engine, ids, prompt_len=len(PROMPT))
    tel = engine.telemetry
    engine.close()
    torch.testing.assert_close(got, expected, rtol=2e-4, atol=2e-4)
    assert tel.demand_copies > 0 and tel.cpu_experts > 0


def _demo(dtype):
    from transformers import AutoModelForCausalLM

    from specmoe.paths import DEMO_MODEL_DIR

    return AutoModelForCausalLM.from_pretrained(DEMO_MODEL_DIR, dtype=dtype).eval()


@pytest.mark.parametrize("table", [False, True])
def test_demo_greedy_equals_stock_at_minimum_budget_on_cuda(table):
    ref = _demo(torch.float32).cuda()
    with torch.no_grad():
        expected = ref.generate(PROMPT[None].cuda(), max_new_tokens=48, do_sample=False)[0, len(PROMPT):].tolist()
    for on_miss in ("fetch", "cpu"):
        engine = runtime.from_model(_demo(torch.float32), cfg(prefetch="current", on_miss=on_miss, max_context=128,
                                                                device_table=table))
        assert list(engine.generate(PROMPT, 48)) == expected, on_miss
        engine.close()


def test_demo_bf16_logits_close_to_stock_on_cuda():
    ref = _demo(torch.bfloat16).cuda()
    ids = torch.cat([PROMPT, torch.tensor([4, 8, 15, 16, 23, 42])])
    expected = stock_logits(ref, ids.cuda())
    engine = runtime.from_model(_demo(torch.bfloat16), cfg(prefetch="current", on_miss="fetch"))
    got = engine_logits(engine, ids, prompt_len=len(PROMPT))
    # bf16 rounds differently in every implementation (the runtime's compiled pieces fuse other
    # ops, its experts sum in another order): against the fp32 model, the runtime's error should
    # be of the stock bf16 one's size (measured on an H200: 0.025 against 0.016); a wrong expert
    # or weight gives errors of order 1.
    exact = stock_logits(_demo(torch.float32).cuda(), ids.cuda())
    ours, stock = ((t - exact).norm() / exact.norm() for t in (got, expected))
    assert ours < 2.0 * stock + 1e-3, (float(ours), float(stock))
    assert (got.argmax(-1) == exact.argmax(-1)).float().mean() >= 0.8


def test_speculate_with_oracle_is_exact_on_cuda():
    from runtime.bench import record_exact

    ref = tiny_model("qwen3_moe").cuda()
    parts = runtime.parts_from_model(tiny_model("qwen3_moe"), cfg())
    continuation, recorded = record_exact(parts, cfg(), PROMPT, 8)
    ids = torch.cat([PROMPT, torch.tensor(continuation[:7])])
    expected = stock_logits(ref, ids.cuda())
    engine = runtime.configure(parts, cfg(prefetch="oracle", on_miss="speculate"), recorded=recorded)
    got = engine_logits(engine, ids, prompt_len=len(PROMPT))
    torch.testing.assert_close(got, expected, rtol=2e-4, atol=2e-4)


def test_copies_overlap_compute():
    """In the profile of a decode with copies ahead, host-to-device copies of the next
    layer's experts run while the current layer's kernels run."""
    from torch.profiler import ProfilerActivity, profile
    from transformers import Qwen3MoeConfig

    from runtime.build import parts_random

    shape = Qwen3MoeConfig(vocab_size=1024, hidden_size=1024, intermediate_size=2048, moe_intermediate_size=1024,
                           num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4, head_dim=128,
                           num_experts=64, num_experts_per_tok=4, max_position_embeddings=512)
    config = cfg(prefetch="current", on_miss="speculate", dtype="bf16", cuda_graphs=False, max_context=128)
    engine = runtime.configure(parts_random(shape, config, progress=False), config)
    list(engine.generate(PROMPT, 4))
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        list(engine.generate(PROMPT, 8))
    copies, kernels = [], []
    for ev in prof.events():
        if ev.device_type != torch.autograd.DeviceType.CUDA:
            continue
        span = (ev.time_range.start, ev.time_range.end)
        if "Memcpy HtoD" in ev.name and "Pinned" in ev.name and ev.time_range.end - ev.time_range.start > 20:
            copies.append(span)   # expert copies (about 6 MB), not the small index writes
        elif "Memcpy" not in ev.name and "Memset" not in ev.name:
            kernels.append(span)
    assert copies and kernels
    overlapped = sum(1 for cs, ce in copies if any(ks < ce and cs < ke for ks, ke in kernels))
    # Each layer computes for less time than its copies take, so not every copy can overlap;
    # with the copies serialised behind compute, none would.
    assert overlapped / len(copies) > 0.25, (overlapped, len(copies))


@pytest.mark.parametrize("table", [False, True])
@pytest.mark.parametrize("prefetch,on_miss", [("hybrid", "speculate"), ("hybrid", "fetch"), ("quasi", "cpu")])
@pytest.mark.parametrize("compiled", [False, True])
def test_graphed_decode_equals_eager_decode(prefetch, on_miss, table, compiled):
    """Decode steps replayed from CUDA graphs compute what the eager steps compute, with the
    demo estimators predicting inside the graphs. Compiled pieces fuse float32 arithmetic in
    another order: exact modes stay within float32 noise; in speculation a last-bit change can
    flip a predicted expert, and with it the token's output, so there the predictions and
    the greedy tokens are compared."""
    from specmoe.paths import REPO_ROOT

    est = str(REPO_ROOT / "checkpoints" / "demo-estimator-h1")
    ids = torch.cat([PROMPT, torch.tensor([4, 8, 15, 16, 23, 42, 1, 3, 5, 9])])
    rows = {}
    for graphs in (False, True):
        engine = runtime.from_model(_demo(torch.float32), cfg(prefetch=prefetch, on_miss=on_miss, estimators=est,
                                                                cuda_graphs=graphs, device_table=table,
                                                                compile=compiled))
        rows[graphs] = engine_logits(engine, ids, prompt_len=len(PROMPT))
        assert (engine.decode_graphs is not None) == graphs
        rows[(graphs, "hits")] = engine.telemetry.summary()["prefetch_hit_rate"]
        engine.close()
    if compiled and on_miss == "speculate":
        agree = (rows[True].argmax(-1) == rows[False].argmax(-1)).float().mean().item()
        assert agree >= 0.9, agree
        assert rows[(True, "hits")] == pytest.approx(rows[(False, "hits")], abs=0.05)
        return
    tol = 1e-3 if compiled else 1e-4
    torch.testing.assert_close(rows[True], rows[False], rtol=tol, atol=tol)
    assert rows[(True, "hits")] == pytest.approx(rows[(False, "hits")], abs=0.02)


def test_graphed_and_compiled_bf16_decode_equal_eager_on_qwen3_30b_shape():
    """Two layers of Qwen3-30B-A3B's shape in bf16 (the benchmark's model A), every expert
    resident: graphed decode equals eager decode exactly, compiled decode within bf16
    rounding, with the same greedy tokens; and each token routes its own way (about 69
    distinct experts over 12 tokens for uniform routing, 8 for one fixed set)."""
    import dataclasses

    from benchmarks.runtime_decode import EMBEDDING_STD, qwen3_30b_shape
    from runtime.build import parts_random

    base = cfg(dtype="bf16", max_context=1100, prefetch="none", on_miss="fetch", gpu_expert_budget="100%")
    parts = parts_random(qwen3_30b_shape(2), base, progress=False, embedding_std=EMBEDDING_STD)
    gen = torch.Generator().manual_seed(0)
    vocab = parts.model.config.vocab_size
    prompt = torch.randint(0, vocab, (1024,), generator=gen)
    forced = torch.randint(0, vocab, (12,), generator=gen).tolist()
    logits, routes = {}, {}
    for name, kw in (("eager", dict(cuda_graphs=False)), ("graphs", dict(compile=False)), ("compiled", {})):
        engine = runtime.configure(parts, dataclasses.replace(base, **kw))
        engine.reset()
        engine.step(prompt)
        rows, ids = [], []
        for token in forced:
            rows.append(engine.step(torch.tensor([token]))[-1].float().cpu())
            if engine.decode_graphs is not None:
                ids.append({l: engine.decode_graphs.ids[l][0].tolist() for l in engine.decode_graphs.ids})
        logits[name], routes[name] = torch.stack(rows), ids
        engine.close()
    assert torch.equal(logits["graphs"], logits["eager"])
    scale = logits["eager"].abs().max().item()
    assert (logits["compiled"] - logits["eager"]).abs().max().item() <= 0.02 * scale
    assert torch.equal(logits["compiled"].argmax(-1), logits["eager"].argmax(-1))
    for l in routes["graphs"][0]:
        assert len({e for step in routes["graphs"] for e in step[l]}) > 40


def test_the_gpu_time_of_a_resident_step_is_its_kernels():
    """benchmarks/runtime_decode.py's GPU time per token with every expert resident, on two
    layers of model A's shape: some work, and less than the wall time of the same step."""
    import time

    from benchmarks.runtime_decode import EMBEDDING_STD, gpu_time_alone, qwen3_30b_shape
    from runtime.build import parts_random

    base = cfg(dtype="bf16", max_context=300, prefetch="none", on_miss="fetch", gpu_expert_budget="100%")
    parts = parts_random(qwen3_30b_shape(2), base, progress=False, embedding_std=EMBEDDING_STD)
    prompt = torch.randint(0, parts.model.config.vocab_size, (256,), generator=torch.Generator().manual_seed(0))
    busy = gpu_time_alone(parts, base, prompt, [5, 6, 7])
    engine = runtime.configure(parts, base)
    engine.step(prompt)
    walls = []
    for token in (5, 6, 7, 8, 9, 10):
        start = time.perf_counter()
        int(engine.step(torch.tensor([token]))[-1].argmax())
        walls.append(1e3 * (time.perf_counter() - start))
    engine.close()
    assert 0.0 < busy < sorted(walls)[3]


@pytest.mark.parametrize("prefetch,on_miss,budget,window", [("current", "fetch", "0", 2), ("current", "fetch", "0", 0),
                                                            ("current", "speculate", "0", 0),
                                                            ("none", "fetch", "0", 0), ("none", "cpu", "25%", 0)])
def test_a_decode_step_copies_nothing_from_pageable_memory(prefetch, on_miss, budget, window):
    """A copy from pageable host memory waits for the stream to drain before it starts: the
    host stands still until the GPU has caught up, and cannot issue the next copies meanwhile.
    Decode steps fed host tokens make none (table changes, the token and the CPU's parts all
    go through pinned buffers)."""
    from torch.profiler import ProfilerActivity, profile

    engine = runtime.from_model(tiny_model("qwen3_moe"), cfg(prefetch=prefetch, on_miss=on_miss,
                                                            gpu_expert_budget=budget, prefetch_window=window))
    engine.step(PROMPT)
    for t in (4, 8):   # graphs captured and warm
        engine.step(torch.tensor([t]))
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for t in (15, 16, 23, 42):
            int(torch.argmax(engine.step(torch.tensor([t]))[-1]))
        torch.cuda.synchronize()
    engine.close()
    copies = [e.name for e in prof.events() if "Memcpy" in e.name]
    assert any("HtoD" in name for name in copies)
    assert not [name for name in copies if "Pageable" in name]


@pytest.mark.parametrize("prefetch", ["quasi", "current"])
def test_a_resident_step_predicts_beside_its_experts(prefetch):
    """With every expert on the GPU a graphed step makes each layer's prediction on a second
    stream beside the layer's experts: kernels of one step overlap in time (on one stream they
    never do, and no copies run at this budget), and the step still computes what the eager
    step computes, with the same prediction hits."""
    from torch.profiler import ProfilerActivity, profile

    from specmoe.paths import REPO_ROOT

    est = str(REPO_ROOT / "checkpoints" / "demo-estimator-h1")
    ids = torch.cat([PROMPT, torch.tensor([4, 8, 15, 16, 23, 42, 1, 3, 5, 9])])
    rows, hits = {}, {}
    for graphs in (False, True):
        engine = runtime.from_model(_demo(torch.float32), cfg(prefetch=prefetch, on_miss="fetch", estimators=est,
                                                                gpu_expert_budget="100%", cuda_graphs=graphs))
        rows[graphs] = engine_logits(engine, ids, prompt_len=len(PROMPT))
        hits[graphs] = engine.telemetry.summary()["prefetch_hit_rate"]
        if graphs:
            assert engine.decode_graphs.predicts_beside_experts and engine.decode_graphs.all_resident()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for t in (7, 11, 13):
                    engine.step(torch.tensor([t]))
                torch.cuda.synchronize()
            kernels = sorted((e.time_range.start, e.time_range.end) for e in prof.events()
                             if e.device_type == torch.autograd.DeviceType.CUDA and "Memcpy" not in e.name
                             and "Memset" not in e.name)
        engine.close()
    torch.testing.assert_close(rows[True], rows[False], rtol=1e-3, atol=1e-3)
    assert hits[True] == pytest.approx(hits[False], abs=0.02)
    overlapping = sum(1 for (_, end), (start, _) in zip(kernels, kernels[1:]) if start < end)
    assert overlapping >= 3, overlapping   # at least one a step


def test_auto_miss_policy_measures_both_channels_and_follows_its_rule():
    """`on_miss: auto` on CUDA, two layers of model A's shape at the minimum budget: the copy
    and CPU expert rates are measured on the store, the policy is the one the rule gives for
    them, and the engine is built for it (a CPU part where it chose `cpu`, with no predictor
    and its steps queued ahead)."""
    from benchmarks.runtime_decode import EMBEDDING_STD, qwen3_30b_shape
    from runtime.build import parts_random
    from runtime.miss_policy import choose_on_miss, expected_misses

    base = cfg(dtype="bf16", max_context=300, on_miss="auto")   # prefetch auto too
    parts = parts_random(qwen3_30b_shape(2), base, progress=False, embedding_std=EMBEDDING_STD)
    engine = runtime.configure(parts, base)
    info, spec = engine.info, engine.spec
    assert info["copy_bytes_per_s"] > 1e9 and info["cpu_expert_bytes_per_s"] > 1e9
    rule = choose_on_miss(cuda=True, holds_every_expert=False,
                          misses_per_layer=expected_misses(spec.top_k, info["gpu_slots"], info["total_experts"]),
                          expert_bytes=info["expert_block_bytes"], copy_bytes_per_s=info["copy_bytes_per_s"],
                          cpu_bytes_per_s=info["cpu_expert_bytes_per_s"])
    assert info["on_miss"] == engine.moe.on_miss == rule.on_miss
    assert (engine.moe.cpu is not None) == (rule.on_miss == "cpu")
    # `cpu` then predicts nothing, and its steps are queued ahead of the CPU's parts
    assert info["prefetch"] == ("none" if rule.on_miss == "cpu" else "current")
    engine.step(torch.randint(0, parts.model.config.vocab_size, (64,), generator=torch.Generator().manual_seed(0)))
    for t in (5, 6, 7):
        assert torch.isfinite(engine.step(torch.tensor([t]))[-1]).all()
    assert engine.decode_graphs.run_ahead == (rule.on_miss == "cpu")
    engine.close()
