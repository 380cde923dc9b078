"""specmoe.moe_block against the stock transformers MoE blocks, for every family.

Ground truth is the model's own MoE block (`Family.moe_forward`) or, for routing handed
in, the stock experts module run one token and one expert at a time. Slot stacks are
built as the runtime builds them: one padded block per slot in one buffer, seen
through `torch.as_strided`, so the slot stride is not the product of the other dims;
slots that hold no expert are filled with NaN, so reading one would show."""

from __future__ import annotations

import math

import pytest
import torch

from tests.tiny_models import HIDDEN, NUM_EXPERTS, TINY_FAMILIES, tiny_model
from specmoe.families import detect_family
from specmoe.moe_block import (GATHER_MAX_BYTES, GATHER_MAX_PAIRS, STRATEGIES, choose_strategy, grouped_available,
                               moe_block_forward, routed_output, stack_from_module)

TOKENS = 13


@pytest.fixture(scope="module", params=TINY_FAMILIES)
def model_type(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def models(model_type):
    """fp32 and bf16 copies of the family's tiny model."""
    return {torch.float32: tiny_model(model_type), torch.bfloat16: tiny_model(model_type).to(torch.bfloat16)}


def padded_stack(tensors: dict[str, torch.Tensor], slot_of: dict[int, int], num_slots: int) -> dict[str, torch.Tensor]:
    """A slot stack {name: [num_slots, ...]} in one buffer, expert e's tensors (row e of
    `tensors`) in slot slot_of[e], NaN in every slot no expert occupies."""
    dtype = next(iter(tensors.values())).dtype
    device = next(iter(tensors.values())).device
    sizes = [math.prod(t.shape[1:]) for t in tensors.values()]
    per_slot = sum(s + 64 for s in sizes)  # padding after each tensor, as an aligned layout has
    buf = torch.full((num_slots * per_slot,), float("nan"), dtype=dtype, device=device)
    stack, at = {}, 0
    for (name, t), size in zip(tensors.items(), sizes):
        shape = t.shape[1:]
        strides = [per_slot] + [math.prod(shape[i + 1:]) for i in range(len(shape))]
        view = buf.as_strided((num_slots, *shape), strides, at)
        for e, slot in slot_of.items():
            view[slot].copy_(t[e])
        stack[name] = view
        at += size + 64
    return stack


def _tolerance(dtype: torch.dtype, ref: torch.Tensor) -> dict:
    if dtype == torch.float32:
        return dict(rtol=1e-5, atol=1e-5 * ref.abs().max().item())
    return dict(rtol=1.6e-2, atol=1e-2 * ref.abs().max().item())


def _inputs(dtype, seed: int, tokens: int = TOKENS, device="cpu") -> torch.Tensor:
    x = torch.randn(tokens, HIDDEN, generator=torch.Generator().manual_seed(seed))
    return x.to(device, dtype)


@torch.no_grad()
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_equals_stock_block(models, dtype):
    model = models[dtype]
    family = detect_family(model)
    for layer in family.spec(model).moe_layers:
        block = family.moe_block(model, layer)
        router = getattr(block, family.router_attr)
        x = _inputs(dtype, seed=layer)
        ref = family.moe_forward(model, layer, x.unsqueeze(0)).reshape(TOKENS, HIDDEN)
        stack = stack_from_module(family, getattr(block, family.experts_attr))
        _, stock_weights, stock_ids = router(x)
        for strategy in STRATEGIES + ("auto",):
            out, ids, weights = moe_block_forward(family, block, x, stack, torch.arange(NUM_EXPERTS),
                                                  strategy=strategy)
            assert out.dtype == dtype and out.shape == (TOKENS, HIDDEN)
            torch.testing.assert_close(out, ref, **_tolerance(dtype, ref))
            if dtype == torch.bfloat16:
                # Same rounding steps as the stock block: all but a few elements agree to the bit.
                assert (out == ref).float().mean() > 0.99
            assert torch.equal(ids, stock_ids) and torch.equal(weights, stock_weights)


@torch.no_grad()
@pytest.mark.parametrize("placement", ["more_slots", "needed_only"])
def test_permuted_slots(models, placement):
    model = models[torch.float32]
    family = detect_family(model)
    gen = torch.Generator().manual_seed(7)
    for layer in family.spec(model).moe_layers:
        block = family.moe_block(model, layer)
        experts = getattr(block, family.experts_attr)
        # Two tokens need at most 2k < E experts: room for a stack smaller than the layer.
        tokens = TOKENS if placement == "more_slots" else 2
        x = _inputs(torch.float32, seed=100 + layer, tokens=tokens)
        ref = family.moe_forward(model, layer, x.unsqueeze(0)).reshape(tokens, HIDDEN)
        router = getattr(block, family.router_attr)
        ids = family.route(router, family.router_logits(router, x))[0]
        if placement == "more_slots":
            num_slots = NUM_EXPERTS + 5
            present = list(range(NUM_EXPERTS))
        else:
            present = sorted(set(ids.flatten().tolist()))
            num_slots = len(present)
            assert num_slots < NUM_EXPERTS
        slots = torch.randperm(num_slots, generator=gen)[: len(present)].tolist()
        slot_of = dict(zip(present, slots))
        stack = padded_stack(stack_from_module(family, experts), slot_of, num_slots)
        assert stack["gate_up_proj"].stride(0) != math.prod(stack["gate_up_proj"].shape[1:])
        table = torch.zeros(NUM_EXPERTS, dtype=torch.long)  # absent experts: any slot, never read
        for e, s in slot_of.items():
            table[e] = s
        for strategy in STRATEGIES:
            out, _, _ = moe_block_forward(family, block, x, stack, table, strategy=strategy)
            torch.testing.assert_close(out, ref, **_tolerance(torch.float32, ref))


@torch.no_grad()
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_handed_in_routing(models, dtype):
    """Predicted ids and weights: equal to a per-token, per-expert run of the stock experts."""
    model = models[dtype]
    family = detect_family(model)
    spec = family.spec(model)
    gen = torch.Generator().manual_seed(3)
    for layer in spec.moe_layers:
        block = family.moe_block(model, layer)
        experts = getattr(block, family.experts_attr)
        tokens = 5
        x = _inputs(dtype, seed=200 + layer, tokens=tokens)
        ids = torch.rand(tokens, NUM_EXPERTS, generator=gen).topk(spec.top_k, dim=-1).indices
        weights = torch.rand(tokens, spec.top_k, generator=gen).to(dtype)
        table = torch.randperm(NUM_EXPERTS, generator=gen)
        slot_of = {e: int(table[e]) for e in range(NUM_EXPERTS)}
        stack = padded_stack(stack_from_module(family, experts), slot_of, NUM_EXPERTS)
        ref = torch.zeros(tokens, HIDDEN, dtype=torch.float64)
        one = torch.ones(1, 1, dtype=dtype)
        for t in range(tokens):
            for j in range(spec.top_k):
                y = experts(x[t:t + 1], ids[t, j].view(1, 1), one)[0]
                ref[t] += weights[t, j].double() * y.double()
        shared = family.block_shared_expert(block)
        if shared is not None:
            ref += shared.native(x).double()
        for strategy in STRATEGIES:
            out, out_ids, out_weights = moe_block_forward(family, block, x, stack, table, ids=ids, weights=weights,
                                                          strategy=strategy)
            assert out_ids is ids and out_weights is weights
            torch.testing.assert_close(out.double(), ref, **_tolerance(dtype, ref))


@torch.no_grad()
def test_shared_override(models):
    model = models[torch.float32]
    family = detect_family(model)
    layer = family.spec(model).moe_layers[-1]
    block = family.moe_block(model, layer)
    x = _inputs(torch.float32, seed=5)
    stack = stack_from_module(family, getattr(block, family.experts_attr))
    table = torch.arange(NUM_EXPERTS)
    routed, ids, weights = moe_block_forward(family, block, x, stack, table, shared=False)
    assert torch.equal(routed, routed_output(family, getattr(block, family.experts_attr), x, stack,
                                             table[ids], weights))
    full, _, _ = moe_block_forward(family, block, x, stack, table)
    given = torch.full_like(x, 0.25)
    with_given, _, _ = moe_block_forward(family, block, x, stack, table, shared=given)
    torch.testing.assert_close(with_given, routed + 0.25)
    if family.shared_attr is None:
        assert torch.equal(full, routed)
    else:
        module = family.block_shared_expert(block)
        torch.testing.assert_close(full, routed + module(x))


@torch.no_grad()
def test_experts_module_on_meta(models):
    """The runtime keeps the stock experts module with its parameters on the meta device:
    only its activation and constants may be read."""
    import copy

    model = models[torch.float32]
    family = detect_family(model)
    layer = family.spec(model).moe_layers[-1]
    block = family.moe_block(model, layer)
    stack = {k: v.clone() for k, v in stack_from_module(family, getattr(block, family.experts_attr)).items()}
    x = _inputs(torch.float32, seed=9)
    want, _, _ = moe_block_forward(family, block, x, stack, torch.arange(NUM_EXPERTS))
    hollow = copy.deepcopy(block)
    getattr(hollow, family.experts_attr).to("meta")
    for strategy in STRATEGIES:
        got, _, _ = moe_block_forward(family, hollow, x, stack, torch.arange(NUM_EXPERTS), strategy=strategy)
        torch.testing.assert_close(got, want, **_tolerance(torch.float32, want))


def test_stack_from_module_selection():
    model = tiny_model("gpt_oss")
    family = detect_family(model)
    experts = family.experts(model, 0)
    stack = stack_from_module(family, experts, [5, 2])
    assert set(stack) == set(family.expert_params)
    for name, t in family.expert_tensors(experts, 2).items():
        assert torch.equal(stack[name][1], t)


def test_auto_threshold():
    grouped = "grouped" if grouped_available("cpu", torch.float32) else "dense"
    assert choose_strategy(GATHER_MAX_PAIRS, "cpu", torch.float32, expert_bytes=1024) == "gather"
    assert choose_strategy(GATHER_MAX_PAIRS + 1, "cpu", torch.float32, expert_bytes=1024) == grouped
    assert choose_strategy(1, "cpu", torch.float32, expert_bytes=GATHER_MAX_BYTES["cpu"] + 1) == grouped


# ----------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@torch.no_grad()
def test_gpu_bf16_and_cuda_graph():
    device = torch.device("cuda")
    for model_type in TINY_FAMILIES:
        model = tiny_model(model_type).to(device, torch.bfloat16)
        family = detect_family(model)
        spec = family.spec(model)
        for layer in spec.moe_layers:
            block = family.moe_block(model, layer)
            experts = getattr(block, family.experts_attr)
            x = _inputs(torch.bfloat16, seed=layer, device=device)
            ref = family.moe_forward(model, layer, x.unsqueeze(0)).reshape(TOKENS, HIDDEN)
            table = torch.randperm(NUM_EXPERTS, generator=torch.Generator().manual_seed(layer))
            slot_of = {e: int(table[e]) for e in range(NUM_EXPERTS)}
            stack = padded_stack(stack_from_module(family, experts), slot_of, NUM_EXPERTS)
            table = table.to(device)
            for strategy in STRATEGIES + ("auto",):
                out, _, _ = moe_block_forward(family, block, x, stack, table, strategy=strategy)
                torch.testing.assert_close(out, ref, **_tolerance(torch.bfloat16, ref), msg=f"{model_type} {strategy}")

            # Decode (one token) captured in a CUDA graph, replayed with new inputs.
            static_x = x[:1].clone()
            static_table = table.clone()
            for _ in range(2):  # warm up outside the graph (lazy inits, allocator)
                moe_block_forward(family, block, static_x, stack, static_table)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static_out, static_ids, static_w = moe_block_forward(family, block, static_x, stack, static_table)
            for seed in range(3):
                new_x = _inputs(torch.bfloat16, seed=1000 + seed, tokens=1, device=device)
                static_x.copy_(new_x)
                graph.replay()
                torch.cuda.synchronize()
                want = family.moe_forward(model, layer, new_x.unsqueeze(0)).reshape(1, HIDDEN)
                torch.testing.assert_close(static_out, want, **_tolerance(torch.bfloat16, want),
                                           msg=f"{model_type} graph replay")


@pytest.mark.gpu
@torch.no_grad()
@pytest.mark.parametrize("model_type, sizes", [
    ("qwen3_moe", dict(hidden_size=1024, moe_intermediate_size=512)),
    ("gpt_oss", dict(hidden_size=1024, intermediate_size=512)),
])
def test_gpu_strategies_at_scale(model_type, sizes):
    """Hidden 1024: the indexed kernel's wide tiles (K >= 1024) and both weight layouts."""
    device = torch.device("cuda")
    model = tiny_model(model_type, **sizes).to(device, torch.bfloat16)
    family = detect_family(model)
    layer = family.spec(model).moe_layers[-1]
    block = family.moe_block(model, layer)
    table = torch.randperm(NUM_EXPERTS, generator=torch.Generator().manual_seed(1))
    slot_of = {e: int(table[e]) for e in range(NUM_EXPERTS)}
    stack = padded_stack(stack_from_module(family, getattr(block, family.experts_attr)), slot_of, NUM_EXPERTS)
    for tokens in (1, 5, 40):
        x = torch.randn(tokens, sizes["hidden_size"], generator=torch.Generator().manual_seed(tokens))
        x = x.to(device, torch.bfloat16)
        ref = family.moe_forward(model, layer, x.unsqueeze(0)).reshape(tokens, -1)
        for strategy in STRATEGIES + ("auto",):
            out, _, _ = moe_block_forward(family, block, x, stack, table.to(device), strategy=strategy)
            torch.testing.assert_close(out, ref, **_tolerance(torch.bfloat16, ref), msg=f"{strategy} T={tokens}")


@pytest.mark.gpu
@torch.no_grad()
@pytest.mark.parametrize("in_out", [False, True])
def test_indexed_matvec_negative_slot_is_a_zero_row(in_out):
    """A negative slot yields zeros and the other rows their own product, against a matmul per
    row; the weights may live in pinned host memory that the GPU reads over PCIe."""
    from specmoe.indexed_matvec import indexed_matvec
    from runtime.host_store import device_view

    gen = torch.Generator().manual_seed(3)
    n, k = 96, 1024
    shape = (5, k, n) if in_out else (5, n, k)
    host = torch.randn(shape, generator=gen).to(torch.bfloat16).pin_memory()
    v = torch.randn(2, k, generator=gen).to(torch.bfloat16).cuda()
    slots = torch.tensor([3, -1, 0, 4, -1, 1], device="cuda")
    for weight in (host.cuda(), device_view(host)):
        y = indexed_matvec(v, weight, slots, share=3, in_out=in_out)
        for p, slot in enumerate(slots.tolist()):
            if slot < 0:
                assert not y[p].any()
                continue
            w = host[slot].float()
            want = v[p // 3].float().cpu() @ (w if in_out else w.T)
            torch.testing.assert_close(y[p].float().cpu(), want, rtol=2e-2, atol=2e-2)
