"""The decode pieces that CUDA graphs capture, compiled: the same numbers as the model's own
modules, and one trace for every layer (a trace per layer would recompile 48 times on a
real model and fall back to eager after torch's recompile limit).

The CPU suite traces with the `aot_eager` backend (dynamo and AOT autograd, no code
generation); the GPU tests run inductor inside the graphs."""

from __future__ import annotations

import pytest
import torch

import runtime
from runtime.compiled_pieces import Pieces
from runtime.config import RuntimeConfig
from runtime.kv_cache import attention_masks
from tests.tiny_models import tiny_model

PROMPT = torch.tensor([5, 17, 3, 99, 42, 7, 64, 23, 11, 80, 31, 9, 4, 8, 15, 16, 23])


def _reference_layer(engine, l, x, rope, mask, pos):
    """Layer l's attention through the model's modules and the engine's whole cache."""
    layer = engine.layers[l]
    h = layer.input_layernorm(x)
    a = layer.self_attn(hidden_states=h, position_embeddings=rope, attention_mask=mask, position_ids=pos.reshape(1, 1),
                        **{engine._cache_kw: engine.cache})[0]
    r = x + a
    return r, layer.post_attention_layernorm(r)


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss", "deepseek_v3"])
def test_compiled_attention_equals_modules_and_traces_once(family):
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    engine = runtime.from_model(tiny_model(family), RuntimeConfig(device="cpu", max_context=32, prefetch="none"))
    with torch.inference_mode():
        engine.step(PROMPT)  # allocates every layer's cache
        pos = torch.tensor([len(PROMPT)])
        engine.cache.set_positions(pos)
        x = torch.randn(1, 1, engine.spec.hidden_size)
        rope = engine.base.rotary_emb(x, pos.reshape(1, 1))
        masks = attention_masks(set(engine._kinds), pos, engine.max_context, engine._window, x.dtype)
        pieces = Pieces(compile=True, backend="aot_eager")
        before = counters["stats"]["unique_graphs"]
        for l in range(len(engine.layers)):
            keys, values = engine.cache.keys[l].clone(), engine.cache.values[l].clone()
            r_ref, s_ref = _reference_layer(engine, l, x, rope, masks[engine._kinds[l]], pos)
            k_ref, v_ref = engine.cache.keys[l].clone(), engine.cache.values[l].clone()
            engine.cache.keys[l].copy_(keys)
            engine.cache.values[l].copy_(values)
            r, s = torch.full_like(x, float("nan")), torch.full_like(x, float("nan"))
            pieces.attention_block(engine.layers[l], x, rope, masks[engine._kinds[l]], pos, engine.cache.layer(l),
                                   engine._cache_kw, r, s)
            torch.testing.assert_close(r, r_ref, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(s, s_ref, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(engine.cache.keys[l], k_ref)
            torch.testing.assert_close(engine.cache.values[l], v_ref)
        graphs = counters["stats"]["unique_graphs"] - before
    engine.close()
    # One trace per kind of attention (GPT-OSS alternates sliding and full layers), not per layer.
    assert graphs <= len(set(engine._kinds)), f"{graphs} traces for {len(engine.layers)} layers"


def test_compiled_routing_and_experts_equal_a_brute_force_sum():
    torch._dynamo.reset()
    engine = runtime.from_model(tiny_model("qwen3_moe"), RuntimeConfig(device="cpu", max_context=32, prefetch="none",
                                                                       gpu_expert_budget="100%"))
    moe, family = engine.moe, engine.moe.family
    pieces = Pieces(compile=True, backend="aot_eager")
    H, k = engine.spec.hidden_size, engine.spec.top_k
    with torch.inference_mode():
        for l in engine.spec.moe_layers:
            s, r = torch.randn(1, H), torch.randn(1, 1, H)
            ids = torch.full((1, k), -1, dtype=torch.long)
            w, wsel = torch.full((1, k), float("nan")), torch.full((1, k), float("nan"))
            pieces.route(family, moe._routers[l], s, ids, w, wsel)
            ids_ref, w_ref = moe._route(l, s)
            torch.testing.assert_close(ids, ids_ref)
            torch.testing.assert_close(w, w_ref)
            torch.testing.assert_close(wsel, w_ref)
            slots = torch.tensor([[moe.slots.lookup((l, int(e))) for e in ids[0]]])
            x = torch.full_like(r, float("nan"))
            pieces.experts_from_slots(family, moe._experts[l], moe._shared[l], s, moe.slots.stack, slots, w, r, x)
            expected = r.reshape(1, H).clone()
            for j, e in enumerate(ids[0].tolist()):
                expected += w[0, j] * family.apply_expert(moe._experts[l], moe.store.expert(l, e), s)
            torch.testing.assert_close(x.reshape(1, H), expected, rtol=1e-5, atol=1e-5)
    engine.close()


@pytest.mark.parametrize("mode", ["current", "quasi", "learned", "hybrid"])
def test_compiled_prediction_equals_the_estimators_and_traces_once_per_kind(mode):
    """The decode graphs' prediction piece (the estimators' predict_target on one target's
    parts) predicts what the estimator's own predictor does at every layer of the demo model,
    with one trace per concrete kind (hybrid picks quasi or learned per layer), not one per layer."""
    from torch._dynamo.utils import counters
    from transformers import AutoModelForCausalLM

    from runtime.predict import build_predictor
    from specmoe.families import detect_family
    from specmoe.paths import DEMO_MODEL_DIR, REPO_ROOT

    torch._dynamo.reset()
    model = AutoModelForCausalLM.from_pretrained(DEMO_MODEL_DIR, dtype=torch.float32).eval()
    family = detect_family(model)
    spec = family.spec(model)
    predictor = build_predictor(mode, model, family, spec, estimators=str(REPO_ROOT / "checkpoints" / "demo-estimator-h1"))
    pieces = Pieces(compile=True, backend="aot_eager")
    gen = torch.Generator().manual_seed(0)
    H, k, E = spec.hidden_size, spec.top_k, spec.num_experts
    kinds = set()
    before = counters["stats"]["unique_graphs"]
    with torch.inference_mode():
        for source in spec.moe_layers:
            target = predictor.target_of(source)
            if target is None:
                continue
            r = torch.randn(1, H, generator=gen)
            s = family.moe_norm(model, source)(r)
            ids = torch.randperm(E, generator=gen)[:k].reshape(1, k)
            w = torch.softmax(torch.randn(1, k, generator=gen), -1)
            ref_ids, ref_w = predictor.predict(target, r, s, ids, w, 0)
            kind, parts = predictor.target_parts(target)
            kinds.add(kind)
            got_ids, got_w = torch.full_like(ref_ids, -1), torch.full_like(ref_w, float("nan"))
            pieces.predict(family, kind, r, s, ids, w, got_ids, got_w, **parts)
            torch.testing.assert_close(got_ids, ref_ids)
            torch.testing.assert_close(got_w, ref_w, rtol=1e-5, atol=1e-6)
    graphs = counters["stats"]["unique_graphs"] - before
    assert kinds <= {"quasi", "learned"} if mode == "hybrid" else kinds == {mode}
    assert 1 <= graphs <= len(kinds), f"{graphs} traces for {len(spec.moe_layers) - 1} layers"
