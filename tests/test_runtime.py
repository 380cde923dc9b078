"""The runtime against the stock transformers forward, for every family and miss policy.

The reference is always the stock model (its own forward over the whole sequence, or
its own greedy `generate`); the runtime runs the same weights with experts moved to
its host store and copied or computed on demand."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import runtime
from runtime import cpu_kernels
from runtime.config import RuntimeConfig
from runtime.eviction import LFU, LRU
from runtime.expert_layout import ExpertLayout
from runtime.slots import ExpertSlots
from specmoe.errors import SpecmoeError
from tests.tiny_models import TINY_FAMILIES, tiny_model

PROMPT = torch.tensor([5, 17, 3, 99, 42, 7, 64, 23, 11, 80, 31, 9])


def stock_logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids[None]).logits[0].float()


def engine_logits(engine, ids: torch.Tensor, prompt_len: int) -> torch.Tensor:
    """Prefill the first prompt_len tokens at once, then decode the rest one at a time."""
    engine.reset()
    rows = [engine.step(ids[:prompt_len], all_logits=True)]
    for t in ids[prompt_len:]:
        rows.append(engine.step(t.reshape(1)))
    return torch.cat(rows)


def cfg(**kw) -> RuntimeConfig:
    base = dict(device="cpu", max_context=64, track_hits=True)
    base.update(kw)
    return RuntimeConfig(**base)


@pytest.mark.parametrize("family", TINY_FAMILIES)
@pytest.mark.parametrize("prefetch,on_miss,budget,table", [("none", "fetch", "0", False), ("current", "cpu", "0", False),
                                                           ("current", "fetch", "50%", False),
                                                           ("current", "fetch", "0", True), ("current", "cpu", "50%", True)])
def test_exact_modes_match_stock_forward(family, prefetch, on_miss, budget, table):
    ref = tiny_model(family)
    ids = torch.cat([PROMPT, torch.tensor([4, 8, 15, 16, 23, 42, 1, 3])])  # 20 tokens: past GPT-OSS's window of 16
    expected = stock_logits(ref, ids)
    engine = runtime.from_model(tiny_model(family), cfg(prefetch=prefetch, on_miss=on_miss, gpu_expert_budget=budget,
                                                        device_table=table))
    got = engine_logits(engine, ids, prompt_len=len(PROMPT))
    engine.close()
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3"])
def test_a_prompt_leaves_each_layers_most_used_experts_on_the_gpu(family):
    """cache_fill=prompt: once a prompt has run, the slots hold each MoE layer's experts that
    the prompt used most (recounted from its recorded routing), the slots shared evenly, the
    device table agreeing; decode after it matches the stock forward. `recent` leaves what the
    prompt's last copies left: the last layer whole, the first MoE layer nothing."""
    from collections import Counter

    ref = tiny_model(family)
    ids = torch.randint(0, ref.config.vocab_size, (46,), generator=torch.Generator().manual_seed(4))
    prompt_len = 40
    expected = stock_logits(ref, ids)
    held = {}
    for fill in ("prompt", "recent"):
        engine = runtime.from_model(tiny_model(family), cfg(prefetch="none", on_miss="cpu", gpu_expert_budget="50%",
                                                            cache_fill=fill))
        moe, spec = engine.moe, engine.moe.spec
        moe.record_routing = {}
        engine.reset()
        rows = [engine.step(ids[:prompt_len], all_logits=True)]
        routing, moe.record_routing = moe.record_routing, None
        held[fill] = {l: {e for e in range(spec.num_experts) if (l, e) in moe.slots} for l in spec.moe_layers}
        if fill == "prompt":
            for l in spec.moe_layers:   # the table the decode reads holds exactly the slots' experts
                assert set(torch.nonzero(moe.present[moe._rows[l]]).flatten().tolist()) == held[fill][l]
            quota = moe.slots.num_slots // len(spec.moe_layers)
            used = {l: Counter(e for (_, layer), (chosen, _) in routing.items() if layer == l for e in chosen.tolist())
                    for l in spec.moe_layers}
            for l in spec.moe_layers:
                counts, kept = used[l], held[fill][l]
                assert len(kept) == min(quota, len(counts))
                assert min(counts[e] for e in kept) >= max((n for e, n in counts.items() if e not in kept), default=0)
        rows += [engine.step(t.reshape(1)) for t in ids[prompt_len:]]
        engine.close()
        torch.testing.assert_close(torch.cat(rows), expected, rtol=1e-4, atol=1e-4, msg=fill)
    first, last = spec.moe_layers[0], spec.moe_layers[-1]
    assert len(held["recent"][first]) < quota and held["recent"][last] == set(used[last])
    assert len(held["prompt"][first]) == quota


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
def test_a_prefill_wider_than_the_slots_runs_in_groups_and_matches_stock(family, monkeypatch):
    """A prompt that routes to more experts per layer than the minimum budget's slots: each
    layer's experts go through the GPU in groups, every (token, choice) counted once, with the
    stock forward's logits."""
    from runtime import offloaded_moe

    ref = tiny_model(family)
    ids = torch.randint(0, ref.config.vocab_size, (48,), generator=torch.Generator().manual_seed(2))
    expected = stock_logits(ref, ids)
    engine = runtime.from_model(tiny_model(family), cfg(prefetch="none", on_miss="fetch", gpu_expert_budget="0"))
    groups = []
    original = offloaded_moe.OffloadedMoE._run_many

    def run_many(self, layer, s, weights, slot_idx):
        groups.append(layer)
        return original(self, layer, s, weights, slot_idx)

    monkeypatch.setattr(offloaded_moe.OffloadedMoE, "_run_many", run_many)
    engine.reset()
    got = engine.step(ids, all_logits=True)
    spec, uses = engine.moe.spec, dict(engine.telemetry.uses)
    engine.close()
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert len(groups) > len(spec.moe_layers)   # some layer needed more than one group
    assert uses == {l: len(ids) * spec.top_k for l in spec.moe_layers}


@pytest.mark.parametrize("family", ["qwen3_moe", "qwen2_moe", "deepseek_v3", "gpt_oss", "mixtral"])
@pytest.mark.parametrize("prefetch,on_miss,budget,window", [("none", "fetch", "0", 0), ("current", "fetch", "50%", 0),
                                                            ("current", "cpu", "0", 0), ("current", "cpu", "50%", 0),
                                                            ("current", "fetch", "0", 2), ("current", "cpu", "50%", 1)])
def test_graphed_decode_path_matches_stock_forward(family, prefetch, on_miss, budget, window):
    """The decode path CUDA graphs take (pieces, device table, misses added after the table
    computation by the fix-up piece or the CPU, copies of predictions, a window of copies in
    flight) run on the CPU, where each piece is called instead of replayed: equal to the
    stock forward."""
    ref = tiny_model(family)
    ids = torch.cat([PROMPT, torch.tensor([4, 8, 15, 16, 23, 42, 1, 3])])
    expected = stock_logits(ref, ids)
    engine = runtime.from_model(tiny_model(family), cfg(prefetch=prefetch, on_miss=on_miss, gpu_expert_budget=budget,
                                                        prefetch_window=window))
    engine.use_graphs = True
    got = engine_logits(engine, ids, prompt_len=len(PROMPT))
    assert engine.decode_graphs is not None
    tel = engine.telemetry
    engine.close()
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    if budget == "0":   # the decode steps missed experts, and the miss policy added them
        assert tel.cpu_experts > 0 if on_miss == "cpu" else tel.demand_copies > 0


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3", "gpt_oss"])
@pytest.mark.parametrize("budget,reads,fill", [("0", 0.0, "prompt"), ("0", 0.3, "prompt"), ("60%", 0.0, "prompt"),
                                               ("60%", 0.0, "recent"), ("100%", 0.0, "prompt")])
def test_run_ahead_host_path_matches_stock_on_the_cpu(family, budget, reads, fill, monkeypatch):
    """A run-ahead `cpu` step's host path, with the pieces waiting behind an emulated gate as
    they would in a CUDA stream: the whole step queued, each CPU part by the native part on the
    queue's thread that waits for the staged routing and opens the gate (this thread playing
    the stream), or the next layer queued before this layer's CPU part by the Python path;
    resident layers (the last ones whole with cache_fill=recent) counted once their routing
    has landed. The stock forward's logits, and every use, hit and CPU expert counted as the
    layer-by-layer loop counts them."""
    from runtime.cuda_graphs import DecodeGraphs

    monkeypatch.setattr(DecodeGraphs, "emulate_gate", True)
    monkeypatch.setattr(DecodeGraphs, "queue_ahead", 1)   # the host waits for each part before the next
    ref = tiny_model(family)
    ids = torch.cat([PROMPT, torch.tensor([4, 8, 15, 16, 23, 42, 1, 3])])
    expected = stock_logits(ref, ids)
    got, counted = {}, {}
    for ahead, native in ((True, True), (True, False), (False, False)):
        monkeypatch.setattr(DecodeGraphs, "native_layers", native)
        engine = runtime.from_model(tiny_model(family), cfg(prefetch="none", on_miss="cpu", gpu_expert_budget=budget,
                                                            run_ahead=ahead, host_read_share=reads, cache_fill=fill))
        engine.use_graphs = True
        got[ahead, native] = engine_logits(engine, ids, prompt_len=len(PROMPT))
        resident = [l for l in engine.moe.spec.moe_layers if engine.moe.layer_resident(l)]
        if budget != "60%":
            assert bool(resident) == (budget == "100%")
        elif family != "qwen3_moe":   # its 12-token prompt leaves no layer whole: 2 of 8 experts a token
            assert bool(resident) == (fill == "recent")   # the last layer whole beside CPU layers, or none
        graphs = engine.decode_graphs
        assert graphs.run_ahead == ahead
        queued = graphs.cpu_parts_queued
        # every expert on the GPU: no step needs the queue (DecodeGraphs.all_resident)
        assert queued == (ahead and native and cpu_kernels.available() and budget != "100%")
        assert graphs.all_resident() == (budget == "100%")
        tel = engine.telemetry
        counted[ahead, native] = (dict(tel.uses), dict(tel.cache_hits), tel.cpu_experts, tel.host_read_experts)
        engine.close()
        assert (tel.cpu_experts > 0) == (budget != "100%")
        assert (tel.host_read_experts > 0) == (reads > 0)
        timeline = tel.queued_step_us()   # where a queued step's time went, one entry per step
        if queued and budget != "100%":
            assert 0 < len(tel.queued_steps) <= len(ids) - len(PROMPT)
            assert all(timeline[k] >= 0 for k in ("to_first_part", "through_last_part", "after_last_part"))
            assert timeline["queued_after_last_part"] <= timeline["after_last_part"]
        else:
            assert timeline is None
    assert counted[True, True] == counted[True, False] == counted[False, False]
    for key, logits in got.items():
        torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4, msg=str(key))


def test_closing_the_engine_stops_the_queued_steps_thread(monkeypatch):
    """The thread that runs queued steps' CPU parts ends with the engine's close, not whenever
    the garbage collector gets to the graphs."""
    if not cpu_kernels.available():
        pytest.skip("the native kernels are not built here")
    import os

    from runtime.cuda_graphs import DecodeGraphs

    monkeypatch.setattr(DecodeGraphs, "emulate_gate", True)
    engine = runtime.from_model(tiny_model("qwen3_moe"), cfg(prefetch="none", on_miss="cpu", gpu_expert_budget="0"))
    engine.use_graphs = True
    engine.reset()
    engine.step(PROMPT)
    engine.step(torch.tensor([6]))
    graphs = engine.decode_graphs
    assert graphs.cpu_parts_queued
    threads = len(os.listdir("/proc/self/task"))
    engine.close()
    assert not graphs.cpu_parts_queued
    assert len(os.listdir("/proc/self/task")) == threads - 1


def routing_never_lands(monkeypatch) -> None:
    """Make every native CPU part bound from now on wait for a routing that never lands where
    it looks, and give up after 0.2 s: a real failure of the queued step's native side."""
    real = cpu_kernels.bind_table_layer

    def never_ready(*a, **k):
        return real(*a, **{**k, "ready": torch.zeros(1, dtype=torch.int64), "timeout_s": 0.2})

    monkeypatch.setattr(cpu_kernels, "bind_table_layer", never_ready)


def test_queued_step_whose_cpu_part_fails_raises_it_and_leaves_nothing_waiting(monkeypatch):
    """A queued run-ahead step whose native CPU part fails for real (its routing never lands
    where it looks): the step raises that failure, the parts behind it opened their gates and
    every piece queued behind them ran, as a stream would drain."""
    if not cpu_kernels.available():
        pytest.skip("the native kernels are not built here")
    from runtime.cuda_graphs import DecodeGraphs

    monkeypatch.setattr(DecodeGraphs, "emulate_gate", True)
    routing_never_lands(monkeypatch)
    engine = runtime.from_model(tiny_model("qwen3_moe"), cfg(prefetch="none", on_miss="cpu", gpu_expert_budget="0"))
    engine.use_graphs = True
    engine.reset()
    engine.step(PROMPT)
    with pytest.raises(RuntimeError, match="did not reach host memory within 0.2"):
        engine.step(torch.tensor([6]))
    graphs = engine.decode_graphs
    assert graphs.cpu_parts_queued and graphs.gate.empty
    engine.close()


def test_a_failed_step_leaves_no_cpu_part_for_the_next_one(monkeypatch):
    """A run-ahead step that fails after a CPU part was written, before the graph that adds it
    was queued: the step raises, the part is dropped, and decoding the same position again
    gives the stock forward's logits."""
    from runtime.cuda_graphs import DecodeGraphs

    monkeypatch.setattr(DecodeGraphs, "emulate_gate", True)
    ref = tiny_model("qwen3_moe")
    ids = torch.cat([PROMPT, torch.tensor([4, 8, 15, 16])])
    expected = stock_logits(ref, ids)
    engine = runtime.from_model(tiny_model("qwen3_moe"), cfg(prefetch="none", on_miss="cpu", gpu_expert_budget="0"))
    engine.use_graphs = True
    engine.reset()
    n = len(PROMPT)
    rows = [engine.step(ids[:n], all_logits=True), engine.step(ids[n:n + 1])]
    graphs = engine.decode_graphs
    layer = engine.moe.spec.moe_layers[0]

    def fails_after_a_part():
        graphs._graphs[0][2].replay()   # the prologue: the step counted on the device
        graphs.host_part(layer).fill_(3.0)
        raise RuntimeError("CPU expert kernel failed")

    monkeypatch.setattr(graphs, "_step_run_ahead", fails_after_a_part)
    with pytest.raises(RuntimeError, match="kernel failed"):
        engine.step(ids[n + 1:n + 2])
    monkeypatch.undo()
    assert not graphs.host_parts.any()
    rows += [engine.step(t.reshape(1)) for t in ids[n + 1:]]
    engine.close()
    torch.testing.assert_close(torch.cat(rows), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3", "gpt_oss"])
@pytest.mark.parametrize("prefetch,on_miss", [("none", "cpu"), ("current", "cpu"), ("none", "fetch")])
def test_host_reads_take_a_share_of_misses_and_stay_exact(family, prefetch, on_miss):
    """Graphed decode with 0.3 of each layer's misses computed by the experts graph straight
    from the host store (the GPU reading them over PCIe, here the CPU): the first misses in
    routing order, the others left to the CPU or to copies; the sum is the stock forward's.
    The fraction alternates over layers: their counts add up to 0.3 of the misses."""
    ref = tiny_model(family)
    ids = torch.cat([PROMPT, torch.tensor([4, 8, 15, 16, 23, 42, 1, 3])])
    expected = stock_logits(ref, ids)
    engine = runtime.from_model(tiny_model(family), cfg(prefetch=prefetch, on_miss=on_miss, gpu_expert_budget="0",
                                                        host_read_share=0.3))
    # 0.3 of n misses: over the layers so far, 0.3 * n * layers rounded half up
    layers = engine.spec.moe_layers
    k = engine.spec.top_k
    for n in range(k + 1):
        counts = [engine.moe.host_read_counts(l)[n] for l in layers]
        assert [sum(counts[:i + 1]) for i in range(len(layers))] == [int(0.3 * n * (i + 1) + 0.5)
                                                                     for i in range(len(layers))]
    engine.use_graphs = True
    got = engine_logits(engine, ids, prompt_len=len(PROMPT))
    tel = engine.telemetry
    engine.close()
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert tel.host_read_experts > 0
    if on_miss == "cpu":
        assert tel.cpu_experts > 0
    else:
        assert tel.demand_copies > 0


@pytest.mark.parametrize("budget,resident", [("100%", True), ("0", False)])
def test_a_layer_is_resident_when_the_table_holds_all_its_experts(budget, resident):
    """What lets a run-ahead step skip the gate of a layer: every expert of it in the device
    table after the first decode step (a budget that holds the model), none at the minimum."""
    engine = runtime.from_model(tiny_model("qwen3_moe"), cfg(prefetch="none", on_miss="cpu", gpu_expert_budget=budget))
    engine.use_graphs = True
    engine.reset()
    engine.step(PROMPT)
    engine.step(torch.tensor([5]))
    got = [engine.moe.layer_resident(l) for l in engine.spec.moe_layers]
    engine.close()
    assert got == [resident] * len(got)


@pytest.mark.parametrize("budget", ["100%", "0"])
def test_a_resident_layer_replays_the_experts_graph_without_host_reads(budget):
    """With host reads on, a layer whose experts are all on the GPU replays the experts
    graph that reads nothing from host memory (the other would add zeros); a layer that can
    miss, the one that reads. Exact either way."""
    ref = tiny_model("qwen3_moe")
    ids = torch.cat([PROMPT, torch.tensor([4, 8, 15, 16, 23, 42, 1, 3])])
    expected = stock_logits(ref, ids)
    engine = runtime.from_model(tiny_model("qwen3_moe"), cfg(prefetch="none", on_miss="cpu", gpu_expert_budget=budget,
                                                             host_read_share=0.5))
    engine.use_graphs = True
    got = engine_logits(engine, ids, prompt_len=len(PROMPT))
    graphs = engine.decode_graphs
    chosen = {l: graphs._experts_graph(l, g) for kind, l, g in graphs._graphs if kind == "post"}
    reads = engine.telemetry.host_read_experts
    engine.close()
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert set(graphs._plain_posts) == set(chosen)
    if budget == "100%":
        assert all(chosen[l] is graphs._plain_posts[l] for l in chosen) and reads == 0
    else:
        assert not any(chosen[l] is graphs._plain_posts[l] for l in chosen) and reads > 0


def test_a_measured_host_read_split_gives_the_gpu_whole_misses_it_finishes_first():
    """`host_read_share: null` (auto) sets the split measured at start with whole=True: of n
    misses the GPU takes floor(split * n) at every layer (never the slower channel), exact; a
    split too small to take one miss turns the reads off; off CUDA auto means none."""
    ref = tiny_model("qwen3_moe")
    ids = torch.cat([PROMPT, torch.tensor([4, 8, 15, 16, 23, 42, 1, 3])])
    expected = stock_logits(ref, ids)
    engine = runtime.from_model(tiny_model("qwen3_moe"), cfg(prefetch="none", on_miss="cpu", gpu_expert_budget="0",
                                                             host_read_share=None))
    assert engine.moe.host_reads(engine.spec.moe_layers[0]) is None   # on the CPU: measured as nothing
    k = engine.spec.top_k
    engine.moe.set_host_reads(0.6, whole=True)
    for l in engine.spec.moe_layers:
        assert engine.moe.host_read_counts(l) == [int(0.6 * n) for n in range(k + 1)]
    engine.use_graphs = True
    got = engine_logits(engine, ids, prompt_len=len(PROMPT))
    reads = engine.telemetry.host_read_experts
    engine.moe.set_host_reads(0.9 / k, whole=True)
    off = engine.moe.host_reads(engine.spec.moe_layers[0])
    engine.close()
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert reads > 0 and off is None


def test_cache_fill_is_checked():
    with pytest.raises(SpecmoeError, match="unknown cache_fill 'hot'; choose one of prompt, recent"):
        cfg(cache_fill="hot").validate()


def test_host_read_share_is_checked():
    from runtime.config import load_config

    assert load_config(host_read_share="auto").host_read_share is None   # the YAML's null
    assert load_config(host_read_share=0.25).host_read_share == 0.25
    for bad, match in ((dict(host_read_share=1.5), "host_read_share must be in"),
                       (dict(host_read_share=0.5, on_miss="speculate", prefetch="current"), "exact decode")):
        with pytest.raises(SpecmoeError, match=match):
            cfg(**bad).validate()
    # The reads are chosen from the device table: without it there is nothing to choose from.
    with pytest.raises(SpecmoeError, match="device table"):
        runtime.from_model(tiny_model("qwen3_moe"), cfg(on_miss="cpu", host_read_share=0.5, device_table=False))


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3", "gpt_oss"])
@pytest.mark.parametrize("prefetch", ["none", "current"])
@pytest.mark.parametrize("graphed", [False, True])
def test_cpu_with_a_demand_share_splits_misses_and_stays_exact(family, prefetch, graphed):
    """`cpu` with half of each layer's misses copied as soon as its routing is read: the GPU
    computes those, the CPU the others, and the sum is the stock forward's."""
    ref = tiny_model(family)
    ids = torch.cat([PROMPT, torch.tensor([4, 8, 15, 16, 23, 42, 1, 3])])
    expected = stock_logits(ref, ids)
    engine = runtime.from_model(tiny_model(family), cfg(prefetch=prefetch, on_miss="cpu", gpu_expert_budget="0",
                                                        cpu_demand_share=0.5))
    engine.use_graphs = graphed
    got = engine_logits(engine, ids, prompt_len=len(PROMPT))
    tel = engine.telemetry
    engine.close()
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert tel.cpu_experts > 0 and tel.demand_copies > 0


def test_block_copies_without_cuda_land_in_their_rows():
    from runtime.streams import Streams

    src = torch.randint(0, 256, (6, 40), dtype=torch.uint8)
    dst = torch.zeros((4, 40), dtype=torch.uint8)
    Streams(torch.device("cpu")).copy_blocks(dst, src, [(1, 5), (3, 0)])
    assert torch.equal(dst[1], src[5]) and torch.equal(dst[3], src[0])
    assert not dst[0].any() and not dst[2].any()


class _CopyEvent:
    """Stands in for a CUDA event on the copy stream (the CPU has none): done or still running."""

    def __init__(self, done: bool):
        self.done = done

    def query(self) -> bool:
        return self.done

    def synchronize(self) -> None:
        pass


@pytest.mark.parametrize("copies_done", [True, False])
def test_cpu_copy_shares_follow_whether_copies_kept_up(copies_done):
    """`cpu` with both shares left to the runtime: after each layer whose copies (predicted
    for the next layer, or of this layer's misses) had finished when the CPU finished its
    misses, more is copied; after each whose copies were still running, less. The tokens
    stay exact either way."""
    shape = dict(num_experts=32, num_experts_per_tok=4)  # predictions often absent from the few slots
    ref = tiny_model("qwen3_moe", **shape)
    ids = torch.cat([PROMPT, torch.tensor([4, 8, 15, 16, 23, 42, 1, 3])])
    expected = stock_logits(ref, ids)
    engine = runtime.from_model(tiny_model("qwen3_moe", **shape),
                                cfg(prefetch="current", on_miss="cpu", gpu_expert_budget="0"))
    engine.use_graphs = True
    moe = engine.moe
    moe.adapt_copy_share, moe.cpu_copy_share = True, 0.5
    moe.adapt_demand_share, moe.cpu_demand_share = True, 0.5
    moe.streams.record_on_copy = lambda: _CopyEvent(copies_done)
    got = engine_logits(engine, ids, prompt_len=len(PROMPT))
    shares = moe.cpu_copy_share, moe.cpu_demand_share
    engine.close()
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    for share in shares:
        assert share > 0.5 if copies_done else share < 0.5


@pytest.mark.parametrize("graphed", [False, True])
def test_speculation_reads_its_prediction_before_waiting_for_its_copies(graphed, monkeypatch):
    """In `speculate` the next layer's prediction is read to the host before the compute stream
    waits for this layer's copies: the host can then queue the next layer's copies while this
    layer's still run, and the link does not idle between layers. (Read after the wait, it
    lands only once this layer's copies have.) Copies here carry stand-in events, so that
    the compute stream's waits for them are queued as on a GPU."""
    engine = runtime.from_model(tiny_model("qwen3_moe", num_hidden_layers=5),
                                cfg(prefetch="current", on_miss="speculate", gpu_expert_budget="0"))
    engine.use_graphs = graphed
    moe = engine.moe
    log, where = [], {}
    monkeypatch.setattr(moe.streams, "record_on_copy", lambda: _CopyEvent(False))
    plan, read = moe._plan, moe._read

    def planned(layer, *a, **k):
        where["layer"] = layer
        return plan(layer, *a, **k)

    def reading(layer, t):
        log.append(("read", layer))
        return read(layer, t)

    monkeypatch.setattr(moe, "_plan", planned)
    monkeypatch.setattr(moe, "_read", reading)
    monkeypatch.setattr(moe.streams, "compute_waits", lambda ev: log.append(("wait", where.get("layer"))))
    engine.step(PROMPT)
    log.clear()
    for t in (4, 8, 15):
        engine.step(torch.tensor([t]))
    engine.close()
    # The first MoE layer runs its true routing (nothing predicted it); the last predicts nothing.
    layers = moe.spec.moe_layers[1:-1]
    assert len(layers) >= 2
    for layer in layers:
        assert log.index(("read", layer)) < log.index(("wait", layer)), log


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3", "gpt_oss"])
@pytest.mark.parametrize("graphed", [False, True])
def test_speculate_with_oracle_is_exact(family, graphed):
    """Speculation with a perfect predictor runs exactly the true experts and weights (also on
    the graphed decode path, whose hit counters must keep the prefill's counts)."""
    from runtime.bench import record_exact

    ref = tiny_model(family)
    parts = runtime.parts_from_model(tiny_model(family), cfg())
    base = cfg()
    continuation, recorded = record_exact(parts, base, PROMPT, 8)
    ids = torch.cat([PROMPT, torch.tensor(continuation[:7])])
    expected = stock_logits(ref, ids)
    engine = runtime.configure(parts, cfg(prefetch="oracle", on_miss="speculate"), recorded=recorded)
    engine.use_graphs = graphed
    got = engine_logits(engine, ids, prompt_len=len(PROMPT))
    assert (engine.decode_graphs is not None) == graphed
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert engine.telemetry.summary()["prefetch_hit_rate"] == pytest.approx(1.0)
    assert continuation == expected[len(PROMPT) - 1:].argmax(-1).tolist()[:8]


def test_generate_at_minimum_budget_matches_stock_greedy(demo_model_pair):
    """A long generation through the smallest budget, with copies ahead and eviction on every
    layer, gives the stock model's greedy tokens."""
    ref, fresh = demo_model_pair
    with torch.no_grad():
        expected = ref.generate(PROMPT[None], max_new_tokens=40, do_sample=False)[0, len(PROMPT):].tolist()
    engine = runtime.from_model(fresh, cfg(prefetch="current", on_miss="fetch", gpu_expert_budget="0"))
    got = list(engine.generate(PROMPT, 40))
    assert got == expected
    s = engine.telemetry.summary()
    assert engine.info["gpu_slots"] == 2 * 4
    assert s["prefetch_hit_rate"] > 0.5 and s["demand_copies"] > 0


def test_eviction_never_takes_a_slot_in_use(demo_model_pair, monkeypatch):
    """Whenever the MoE block runs, every slot it reads holds the expert it was planned for."""
    from runtime import offloaded_moe

    _, fresh = demo_model_pair
    engine = runtime.from_model(fresh, cfg(prefetch="current", on_miss="fetch", gpu_expert_budget="0",
                                           lookahead=2, device_table=True))
    checked = []
    original = offloaded_moe.OffloadedMoE._run

    def run(self, layer, s, weights, plan):
        for t, row in enumerate(plan.slot_idx):
            for slot, keep in zip(row, plan.keep[t]):
                if keep:
                    key = self.slots._slots[slot].key
                    assert key is not None and key[0] == layer, (layer, slot, key)
                    checked.append(key)
        return original(self, layer, s, weights, plan)

    original_many = offloaded_moe.OffloadedMoE._run_many

    def run_many(self, layer, s, weights, slot_idx):   # a prefill's tokens at once
        for slot in slot_idx.unique().tolist():
            if slot != self.slots.zero_slot:
                key = self.slots._slots[slot].key
                assert key is not None and key[0] == layer, (layer, slot, key)
                checked.append(key)
        return original_many(self, layer, s, weights, slot_idx)

    table_checked = []
    original_table = offloaded_moe.OffloadedMoE.table_output

    def table_output(self, layer, s, ids, weights):
        # exact decode reads slots through the device table: every entry it holds must name
        # the expert that sits in that slot
        row = self.table[self._rows[layer]].tolist()
        for e, slot in enumerate(row):
            if slot != self.slots.zero_slot:
                assert self.slots._slots[slot].key == (layer, e), (layer, e, slot, self.slots._slots[slot].key)
                table_checked.append((layer, e))
        return original_table(self, layer, s, ids, weights)

    monkeypatch.setattr(offloaded_moe.OffloadedMoE, "_run", run)
    monkeypatch.setattr(offloaded_moe.OffloadedMoE, "_run_many", run_many)
    monkeypatch.setattr(offloaded_moe.OffloadedMoE, "table_output", table_output)
    list(engine.generate(PROMPT, 12))
    assert len(checked) > 100 and len(table_checked) > 100


def test_slots_respect_protection_and_policies():
    layout = ExpertLayout.from_shapes({"w": (4, 4)}, torch.float32)
    slots = ExpertSlots(layout, 3, torch.device("cpu"), "lru")
    for e in range(3):
        assert slots.reserve((0, e), set()) is not None
    slots.touch((0, 0))
    # LRU evicts (0, 1): least recently used and not protected
    slots.reserve((1, 0), protected={(0, 2)})
    assert (0, 1) not in slots and (0, 0) in slots and (0, 2) in slots
    assert slots.reserve((1, 1), protected=set(slots.cached_keys())) is None
    lfu = LFU()
    for key, n in (("a", 3), ("b", 1), ("c", 2)):
        for _ in range(n):
            lfu.touched(key)
    assert lfu.victim(["a", "b", "c"]) == "b"
    lru = LRU()
    for key in "abc":
        lru.touched(key)
    lru.touched("a")
    assert lru.victim(["a", "b", "c"]) == "b"


def test_expert_layout_views_are_one_block_per_expert():
    layout = ExpertLayout.from_shapes({"gate_up_proj": (6, 4), "down_proj": (4, 3)}, torch.bfloat16)
    blocks = torch.zeros((5, layout.block_bytes), dtype=torch.uint8)
    views = layout.views(blocks)
    views["down_proj"][3].fill_(1.5)
    assert views["gate_up_proj"].shape == (5, 6, 4) and views["down_proj"].shape == (5, 4, 3)
    # only block 3 changed
    assert blocks[3].any() and not blocks[[0, 1, 2, 4]].any()


@pytest.mark.parametrize("budget,message", [("1KiB", "minimum"), ("lots", "cannot read"), ("150%", "more than")])
def test_bad_budget_is_one_clear_error(demo_model_pair, budget, message):
    _, fresh = demo_model_pair
    with pytest.raises(SpecmoeError, match=message):
        runtime.from_model(fresh, cfg(gpu_expert_budget=budget))


def test_prompt_longer_than_context_is_refused(demo_model_pair):
    _, fresh = demo_model_pair
    engine = runtime.from_model(fresh, cfg(max_context=16))
    with pytest.raises(SpecmoeError, match="context"):
        list(engine.generate(torch.arange(20), 4))


def test_speculate_needs_a_predictor(demo_model_pair):
    _, fresh = demo_model_pair
    with pytest.raises(SpecmoeError, match="speculate"):
        runtime.from_model(fresh, cfg(prefetch="none", on_miss="speculate"))


def test_cuda_asked_without_cuda_is_refused(demo_model_pair):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    _, fresh = demo_model_pair
    with pytest.raises(SpecmoeError, match="CUDA"):
        runtime.from_model(fresh, cfg(device="cuda"))


@pytest.fixture
def demo_model_pair():
    from transformers import AutoModelForCausalLM

    from specmoe.paths import DEMO_MODEL_DIR

    def load():
        return AutoModelForCausalLM.from_pretrained(DEMO_MODEL_DIR, dtype=torch.float32).eval()

    return load(), load()


# ---------------------------------------------------------------- loading from checkpoints on disk

@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    from tests.tiny_checkpoints import shared_checkpoints

    return shared_checkpoints(tmp_path_factory)


@pytest.mark.parametrize("family", TINY_FAMILIES)
@pytest.mark.parametrize("layout,shards", [("published", 3), ("fused", 1), ("saved", 3)])
def test_loaded_from_each_disk_layout_matches_stock(checkpoints, family, layout, shards):
    """runtime.load reads the experts straight from the safetensors files into its host store
    (no model object holds them) and decodes as the stock model does."""
    if family == "gpt_oss" and layout == "published":
        pytest.skip("published GPT-OSS experts are MXFP4: quantised weights (the reader's tests check them)")
    directory = checkpoints.dir(family, layout, shards)
    ids = torch.cat([PROMPT, torch.tensor([4, 8, 15, 16, 23, 42, 1, 3])])
    expected = stock_logits(checkpoints.model(family), ids)
    engine = runtime.load(model=str(directory), device="cpu", dtype="fp32", prefetch="current", on_miss="fetch",
                          max_context=64, progress=False)
    got = engine_logits(engine, ids, prompt_len=len(PROMPT))
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert all(p.is_meta for l in engine.spec.moe_layers
               for p in engine.family.experts(engine.model, l).parameters())


def test_missing_expert_tensor_is_one_clear_error(checkpoints, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    src = checkpoints.dir("qwen3_moe", "published", 1)
    dst = tmp_path / "broken"
    shutil.copytree(src, dst)
    path = next(dst.glob("*.safetensors"))
    tensors = load_file(path)
    key = next(k for k in tensors if ".experts.3.up_proj" in k)
    del tensors[key]
    save_file(tensors, path)
    with pytest.raises(SpecmoeError, match="experts.3.up_proj"):
        runtime.load(model=str(dst), device="cpu", progress=False)


def test_dense_model_is_refused(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1))
    model.save_pretrained(tmp_path / "dense")
    with pytest.raises(SpecmoeError, match="dense"):
        runtime.load(model=str(tmp_path / "dense"), device="cpu", progress=False)


def test_estimator_of_another_model_is_refused(checkpoints):
    from specmoe.paths import REPO_ROOT

    with pytest.raises(SpecmoeError, match="another model"):
        runtime.load(model=str(checkpoints.dir("qwen3_moe", "fused", 1)), device="cpu", prefetch="hybrid",
                     estimators=str(REPO_ROOT / "checkpoints" / "demo-estimator-h1"), progress=False)


def test_host_memory_stays_near_the_expert_bytes(tmp_path):
    """Loading a checkpoint whose experts dominate peaks near the expert bytes plus the rest,
    not at twice the experts (no model object ever holds them)."""
    import subprocess
    import sys
    import textwrap

    from transformers import AutoModelForCausalLM

    from tests.tiny_models import tiny_config

    config = tiny_config("qwen3_moe", num_experts=32, moe_intermediate_size=512, num_hidden_layers=2,
                         hidden_size=256, head_dim=32)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(tmp_path / "big-experts")
    expert_bytes = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if ".experts." in n)
    other_bytes = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if ".experts." not in n)
    assert expert_bytes > 10 * other_bytes
    code = textwrap.dedent(f"""
        import resource, torch, runtime
        def rss():
            for line in open("/proc/self/status"):
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
        import transformers.models.qwen3_moe.modeling_qwen3_moe  # imports cost ~100 MB: not the model's
        from transformers import AutoModelForCausalLM, AutoTokenizer
        before = rss()
        engine = runtime.load(model={str(tmp_path / 'big-experts')!r}, device="cpu", progress=False)
        print(before, rss(), engine.parts.store.nbytes)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    before, after, store = (int(v) for v in out.stdout.split()[-3:])
    grown = after - before
    assert store >= expert_bytes
    # the store, the non-expert weights and one expert in flight, plus a fixed allowance
    assert grown < store + 2 * other_bytes + 64 * 2**20, (grown, store, other_bytes)


def test_budget_rules():
    from runtime.budget import minimum_slots, parse_budget, slots_for_budget

    assert parse_budget("8GiB", 10) == 8 * 2**30 and parse_budget("1.5 GB", 10) == 1_500_000_000
    assert parse_budget("25%", 1000) == 250 and parse_budget(4096, 10) == 4096
    assert minimum_slots(8, 1, True) == 16 and minimum_slots(8, 2, True) == 24 and minimum_slots(4, 3, False) == 8
    assert slots_for_budget("0", 100, 1000, 4, 1, True, None) == 8
    assert slots_for_budget("50%", 100, 1000, 4, 1, True, None) == 500
    assert slots_for_budget("100%", 100, 1000, 4, 1, True, None) == 1000
    with pytest.raises(SpecmoeError, match="GPU memory free"):
        slots_for_budget("50%", 100, 1000, 4, 1, True, free_bytes=10_000)


def test_no_table_bookkeeping_grows_without_the_device_table(demo_model_pair):
    """A long generation at the minimum budget evicts on every layer; with device_table off
    nothing about the device table may pile up."""
    _, fresh = demo_model_pair
    engine = runtime.from_model(fresh, cfg(prefetch="current", on_miss="fetch", gpu_expert_budget="0"))
    list(engine.generate(PROMPT, 24))
    assert engine.moe._table_ops == [] and not any(engine.moe._to_install.values())


def test_thinned_oracle_keeps_the_asked_recall_and_distinct_experts():
    from runtime.predict import OraclePredictor, RecordedRouting

    gen = torch.Generator().manual_seed(3)
    ids = {(p, l): torch.randperm(16, generator=gen)[:4] for p in range(500) for l in (1, 2)}
    weights = {k: torch.full((4,), 0.25) for k in ids}
    oracle = OraclePredictor(RecordedRouting(ids, weights), (1, 2), 16, hit_rate=0.85)
    found = 0
    for p in range(500):
        pred, w = oracle.predict(2, torch.zeros(1, 8), None, None, None, p)
        assert pred.shape == (1, 4) and len(set(pred[0].tolist())) == 4
        found += len(set(pred[0].tolist()) & set(ids[(p, 2)].tolist()))
    assert 0.82 < found / 2000 < 0.88
    with pytest.raises(SpecmoeError, match="no recorded routing"):
        oracle.predict(2, torch.zeros(1, 8), None, None, None, 900)


@pytest.mark.parametrize("prefetch,on_miss", [("hybrid", "speculate"), ("hybrid", "fetch"), ("quasi", "cpu")])
def test_graphed_decode_path_equals_eager_with_estimators(prefetch, on_miss):
    """The demo model with its estimators predicting inside the decode pieces: the graphed
    path (pieces called in turn on the CPU) computes what the eager step computes, and counts
    the same prediction hits (prefill included)."""
    from transformers import AutoModelForCausalLM

    from specmoe.paths import DEMO_MODEL_DIR, REPO_ROOT

    est = str(REPO_ROOT / "checkpoints" / "demo-estimator-h1")
    ids = torch.cat([PROMPT, torch.tensor([4, 8, 15, 16, 23, 42, 1, 3, 5, 9])])
    rows, hits = {}, {}
    for graphed in (False, True):
        model = AutoModelForCausalLM.from_pretrained(DEMO_MODEL_DIR, dtype=torch.float32).eval()
        engine = runtime.from_model(model, cfg(prefetch=prefetch, on_miss=on_miss, estimators=est))
        engine.use_graphs = graphed
        rows[graphed] = engine_logits(engine, ids, prompt_len=len(PROMPT))
        assert (engine.decode_graphs is not None) == graphed
        hits[graphed] = engine.telemetry.summary()["prefetch_hit_rate"]
        engine.close()
    torch.testing.assert_close(rows[True], rows[False], rtol=1e-5, atol=1e-5)
    assert hits[True] == pytest.approx(hits[False], abs=1e-9)


@pytest.mark.parametrize("budget", ["100%", "60%"])
def test_a_step_with_every_expert_on_the_gpu_needs_no_host_decision(budget, monkeypatch):
    """The demo model, `quasi` predicting inside the decode pieces and `fetch`: at a budget that
    holds every expert the graphed step reads no layer's routing (no host round trip a layer),
    replays the graphs that predict beside the experts, and still matches the stock forward,
    counting every use as a hit and the same prediction hits as the eager step; at 60% it
    reads each layer's routing as before."""
    from transformers import AutoModelForCausalLM

    from runtime.offloaded_moe import OffloadedMoE
    from specmoe.paths import DEMO_MODEL_DIR, REPO_ROOT

    est = str(REPO_ROOT / "checkpoints" / "demo-estimator-h1")
    ids = torch.cat([PROMPT, torch.tensor([4, 8, 15, 16, 23, 42, 1, 3, 5, 9])])
    ref = AutoModelForCausalLM.from_pretrained(DEMO_MODEL_DIR, dtype=torch.float32).eval()
    expected = stock_logits(ref, ids)
    reads = []
    original = OffloadedMoE.graphed_layer
    monkeypatch.setattr(OffloadedMoE, "graphed_layer", lambda self, l, g: (reads.append(l), original(self, l, g)))
    hits = {}
    for graphed in (False, True):
        model = AutoModelForCausalLM.from_pretrained(DEMO_MODEL_DIR, dtype=torch.float32).eval()
        engine = runtime.from_model(model, cfg(prefetch="quasi", on_miss="fetch", estimators=est,
                                               gpu_expert_budget=budget))
        engine.use_graphs = graphed
        got = engine_logits(engine, ids, prompt_len=len(PROMPT))
        spec, tel = engine.moe.spec, engine.telemetry
        assert engine.moe.all_resident() == (budget == "100%")
        if graphed:   # graphs of its own, the prediction beside the experts, where it can come
            assert engine.decode_graphs.predicts_beside_experts == (budget == "100%")
        hits[graphed] = tel.summary()["prefetch_hit_rate"]
        engine.close()
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    decoded = len(ids) - len(PROMPT)
    if budget == "100%":
        assert reads == []   # the warm-up and capture passes call no host decision either
        assert tel.uses == tel.cache_hits == {l: len(ids) * spec.top_k for l in spec.moe_layers}
    else:
        assert len(reads) >= decoded * len(spec.moe_layers)
    assert hits[True] == pytest.approx(hits[False], abs=1e-9)


def test_prefetch_window_holds_copies_back_and_drops_superseded_ones(demo_model_pair, monkeypatch):
    """With a window of 1, predicted copies wait while one is in flight, go one at a time as
    copies finish, and those of a layer whose true ids arrived are never issued."""
    _, fresh = demo_model_pair
    engine = runtime.from_model(fresh, cfg(prefetch="current", on_miss="fetch", prefetch_window=1))
    moe = engine.moe
    target = moe.spec.moe_layers[1]
    k = moe.spec.top_k
    experts = list(range(k))

    class Copy:                     # a copy's event, as the copy stream would record it
        done = False

        def query(self):
            return Copy.done

    monkeypatch.setattr(moe.streams, "record_on_copy", lambda: Copy())
    pred = (torch.tensor([experts]), torch.full((1, k), 1.0 / k))
    moe._prefetch(target, pred, [experts], windowed=True)
    assert (target, experts[0]) in moe.slots            # the first goes at once
    assert list(moe._queued) == [(target, e) for e in experts[1:]]
    moe._pump()                                          # still in flight: nothing more
    assert len(moe._queued) == k - 1
    Copy.done = True
    moe._pump()                                          # it finished: the next one goes
    assert (target, experts[1]) in moe.slots and len(moe._queued) == k - 2
    Copy.done = False
    moe._drop_queued(target)                             # the target layer's true ids arrived
    assert not moe._queued
    assert not any((target, e) in moe.slots for e in experts[2:])
    engine.close()


def test_compile_modes_that_capture_graphs_themselves_are_refused():
    RuntimeConfig(compile_mode="max-autotune-no-cudagraphs").validate()
    with pytest.raises(SpecmoeError, match="compile_mode"):
        RuntimeConfig(compile_mode="reduce-overhead").validate()


def test_queued_gate_runs_work_in_order_once_its_gates_open():
    """The CPU stand-in for the GPU's gate: work submitted behind a closed gate waits, in
    order, and runs once the flag reaches that gate, whether `open` or a native caller
    (writing the flag, then `drain`) raised it; work with nothing closed before it runs now."""
    from runtime.streams import QueuedGate

    gate, ran = QueuedGate(), []
    gate.submit(lambda: ran.append("a"))
    first = gate.close()
    gate.submit(lambda: ran.append("b"))
    second = gate.close()
    gate.submit(lambda: ran.append("c"))
    assert ran == ["a"]
    gate.flag[0] = first   # as the native call writes it
    gate.drain()
    assert ran == ["a", "b"]
    gate.open(second)
    assert ran == ["a", "b", "c"]
    gate.submit(lambda: ran.append("d"))
    assert ran[-1] == "d"
    # A number taken ahead and opened before its gate is queued (a CPU part that finished
    # first): the gate passes.
    early = gate.reserve()
    gate.open(early)
    gate.close(early)
    gate.submit(lambda: ran.append("e"))
    assert ran[-1] == "e"


def test_bench_hands_over_each_row_as_it_is_measured():
    """`on_row` sees the result grow one row at a time, the same result bench returns: a
    benchmark stopped part way keeps the rows it measured."""
    from runtime.bench import bench

    base = RuntimeConfig(device="cpu", max_context=64)
    parts = runtime.parts_from_model(tiny_model("qwen3_moe"), base)
    runs = [dataclasses.replace(base, prefetch="none", on_miss=m, gpu_expert_budget="0") for m in ("fetch", "cpu")]
    seen = []
    result = bench(parts, base, runs, PROMPT, 6, 2, progress=False,
                   on_row=lambda r: seen.append((id(r), [row["mode"] for row in r["modes"]])))
    assert [rows for _, rows in seen] == [["none+fetch"], ["none+fetch", "none+cpu"]]
    assert {ident for ident, _ in seen} == {id(result)}
