"""specmoe.families against the stock transformers models, for every family.

Ground truth never comes from specmoe.families itself: hooks on the stock modules
record what the model really fed its experts (a forward pre-hook on the experts
module) and what its pre-MoE norm produced (a forward hook on the norm)."""

from __future__ import annotations

import inspect

import pytest
import torch
from transformers import AutoConfig, LlamaConfig, PretrainedConfig, Qwen3Config

from tests.tiny_models import HIDDEN, NUM_EXPERTS, TINY_CONFIGS, TINY_FAMILIES, tiny_config, tiny_model
from specmoe.errors import UnsupportedModelError
from specmoe.families import FAMILIES, Family, MoESpec, detect_family

BATCH, SEQ = 2, 9


@pytest.fixture(scope="module", params=TINY_FAMILIES)
def model_type(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def model(model_type):
    return tiny_model(model_type)


def _input_ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 128, (BATCH, SEQ), generator=torch.Generator().manual_seed(seed))


def _expert_call_args(experts: torch.nn.Module, args: tuple, kwargs: dict) -> tuple:
    """(hidden, ids, weights) of a call to an experts module, whatever the argument names."""
    bound = inspect.signature(experts.forward).bind(*args, **kwargs)
    values = list(bound.arguments.values())
    return values[0], values[1], values[2]


@torch.no_grad()
def record(model, family: Family, input_ids: torch.Tensor) -> dict[int, dict]:
    """Per MoE layer: s (norm output), what the experts module received, router logits."""
    seen: dict[int, dict] = {}
    handles = []
    for layer in family.spec(model.config).moe_layers:
        seen[layer] = {}
        experts = family.experts(model, layer)

        def on_experts(module, args, kwargs, _layer=layer):
            hidden, ids, weights = _expert_call_args(module, args, kwargs)
            seen[_layer].update(hidden=hidden.clone(), ids=ids.clone(), weights=weights.clone())
            # The tracer's helper must agree with this independent reading.
            for mine, theirs in zip(family.captured_routing(args, kwargs), (hidden, ids, weights)):
                assert mine is theirs

        def on_norm(module, args, output, _layer=layer):
            seen[_layer]["s"] = output.clone()

        def on_router(module, args, output, _layer=layer):
            seen[_layer]["logits"] = output[0].clone()
            assert family.captured_logits(output) is output[0]

        handles.append(experts.register_forward_pre_hook(on_experts, with_kwargs=True))
        handles.append(family.moe_norm(model, layer).register_forward_hook(on_norm))
        handles.append(family.router(model, layer).register_forward_hook(on_router))
    try:
        model(input_ids)
    finally:
        for h in handles:
            h.remove()
    return seen


def _assert_routing_matches(family: Family, model, seen: dict[int, dict]) -> None:
    for layer, rec in seen.items():
        s = rec["s"].reshape(-1, HIDDEN)
        # The router input is LN_moe(r_l): what the experts receive is exactly s.
        torch.testing.assert_close(rec["hidden"], s, rtol=0, atol=0)
        router = family.router(model, layer)
        logits = family.router_logits(router, s)
        torch.testing.assert_close(logits, rec["logits"], rtol=0, atol=0)
        ids, weights = family.route(router, logits)
        assert ids.dtype == torch.long and ids.shape == rec["ids"].shape, layer
        assert torch.equal(ids, rec["ids"]), f"layer {layer}: ids differ"
        assert weights.dtype == rec["weights"].dtype, layer
        torch.testing.assert_close(weights, rec["weights"])


# ------------------------------------------------------------------ 1. routing


def test_route_reproduces_what_the_experts_receive(model_type, model):
    family = detect_family(model)
    assert family.name == model_type
    seen = record(model, family, _input_ids())
    assert seen and all("ids" in rec for rec in seen.values())
    _assert_routing_matches(family, model, seen)
    # Non-trivial routing: several distinct experts chosen, weights not all equal.
    ids = torch.cat([rec["ids"].flatten() for rec in seen.values()])
    assert ids.unique().numel() >= NUM_EXPERTS // 2
    weights = torch.cat([rec["weights"].flatten() for rec in seen.values()])
    assert weights.float().std() > 1e-3


def test_route_in_bfloat16(model_type):
    """The dtype rules: which routers upcast, which hand back weights in the model dtype."""
    model = tiny_model(model_type).to(torch.bfloat16)
    family = detect_family(model)
    _assert_routing_matches(family, model, record(model, family, _input_ids(1)))


@pytest.mark.parametrize("impl", ["eager", "grouped_mm", "batched_mm"])
def test_route_under_each_experts_implementation(model_type, impl):
    model = tiny_model(model_type, experts_implementation=impl)
    assert model.config._experts_implementation == impl
    family = detect_family(model)
    _assert_routing_matches(family, model, record(model, family, _input_ids(2)))


@torch.no_grad()
def test_eager_and_default_experts_agree(model_type):
    """The per-expert loop and the default fused kernel get the same routing and,
    up to summation order, produce the same block output."""
    default, eager = tiny_model(model_type), tiny_model(model_type, experts_implementation="eager")
    assert eager.config._experts_implementation == "eager"
    family = FAMILIES[model_type]
    ids = _input_ids(5)
    rec_default, rec_eager = record(default, family, ids), record(eager, family, ids)
    for layer in rec_default:
        assert torch.equal(rec_default[layer]["ids"], rec_eager[layer]["ids"])
        torch.testing.assert_close(rec_default[layer]["weights"], rec_eager[layer]["weights"])
        s = rec_default[layer]["s"]
        torch.testing.assert_close(family.moe_forward(default, layer, s), family.moe_forward(eager, layer, s))


# ------------------------------------------------------------ 2. single experts


@torch.no_grad()
def test_expert_forward_matches_stock_experts(model_type, model):
    family = FAMILIES[model_type]
    layer = family.spec(model.config).moe_layers[-1]
    experts = family.experts(model, layer)
    x = torch.randn(5, HIDDEN, generator=torch.Generator().manual_seed(3))
    for e in range(NUM_EXPERTS):
        ids = torch.full((x.shape[0], 1), e, dtype=torch.long)
        ones = torch.ones(x.shape[0], 1, dtype=x.dtype)
        reference = experts(x, ids, ones)
        torch.testing.assert_close(family.expert_forward(experts, e, x), reference)


@torch.no_grad()
def test_native_glu_describes_the_glu(model_type, model):
    """What a family tells native kernels about its glu computes, written out here from the
    description alone, what its glu computes (which the test above ties to the stock experts)."""
    family = FAMILIES[model_type]
    experts = family.experts(model, family.spec(model.config).moe_layers[0])
    glu = family.native_glu(experts)
    assert glu is not None, model_type   # every family here has a glu the CPU kernels know
    gate_up = 4 * torch.randn(7, 2 * 16, generator=torch.Generator().manual_seed(2))
    if glu.kind == "swiglu":
        gate, up = gate_up[:, :16], gate_up[:, 16:]
        want = gate / (1 + torch.exp(-gate)) * up
    else:
        assert glu.kind == "clamped_swiglu"
        gate, up = gate_up[:, 0::2].clamp(max=glu.limit), gate_up[:, 1::2].clamp(-glu.limit, glu.limit)
        want = (up + 1) * gate / (1 + torch.exp(-glu.alpha * gate))
    torch.testing.assert_close(family.glu_fn(experts, gate_up), want)


def test_native_glu_is_none_for_other_activations():
    family = FAMILIES["qwen3_moe"]
    gelu = torch.nn.Module()
    gelu.act_fn = torch.nn.GELU()
    assert family.native_glu(gelu) is None


def test_expert_tensors_are_views_of_the_fused_parameters(model_type, model):
    family = FAMILIES[model_type]
    layer = family.spec(model.config).moe_layers[0]
    experts = family.experts(model, layer)
    for e in (0, NUM_EXPERTS - 1):
        tensors = family.expert_tensors(experts, e)
        assert set(tensors) == set(family.expert_params)
        if model_type == "gpt_oss":
            assert {"gate_up_proj_bias", "down_proj_bias"} <= set(tensors)
        for name, t in tensors.items():
            fused = getattr(experts, name)
            assert t.shape == fused.shape[1:]
            assert t.data_ptr() == fused.data_ptr() + e * fused.stride(0) * fused.element_size()
            assert not t.requires_grad
        # The runtime computes from copies: same result as from the module.
        copies = {k: v.clone() for k, v in tensors.items()}
        x = torch.randn(3, HIDDEN)
        with torch.no_grad():
            torch.testing.assert_close(
                family.apply_expert(experts, copies, x), family.expert_forward(experts, e, x)
            )


# ------------------------------------------------------------ 3. whole MoE block


@torch.no_grad()
def test_weighted_experts_plus_shared_reproduce_the_block(model_type, model):
    family = FAMILIES[model_type]
    spec = family.spec(model.config)
    seen = record(model, family, _input_ids(4))
    for layer, rec in seen.items():
        s = rec["s"]
        flat = s.reshape(-1, HIDDEN)
        experts = family.experts(model, layer)
        ids, weights = family.route(family.router(model, layer), family.router_logits(family.router(model, layer), flat))
        total = torch.zeros_like(flat)
        for slot in range(ids.shape[1]):
            for e in ids[:, slot].unique().tolist():
                rows = ids[:, slot] == e
                out = family.expert_forward(experts, e, flat[rows])
                total[rows] += weights[rows, slot, None].to(out.dtype) * out
        shared = family.shared_expert_output(model, layer, s)
        assert (shared is not None) == spec.has_shared_expert
        if shared is not None:
            total = total + shared.reshape(-1, HIDDEN)
        block_out = family.moe_forward(model, layer, s)
        assert block_out.shape == s.shape
        torch.testing.assert_close(total, block_out.reshape(-1, HIDDEN))


# ------------------------------------------------------------------ 4. spec


EXPECTED_SPEC = {
    # family: (num_layers, moe_layers, top_k, expert size, shared, scoring)
    "qwen3_moe": (3, (1, 2), 2, 32, False, "softmax"),
    "qwen2_moe": (4, (1, 3), 3, 32, True, "softmax"),
    "mixtral": (2, (0, 1), 2, 32, False, "softmax"),
    "olmoe": (2, (0, 1), 3, 32, False, "softmax"),
    "deepseek_v2": (3, (1, 2), 3, 32, True, "softmax"),
    "deepseek_v3": (3, (1, 2), 3, 32, True, "sigmoid"),
    "glm4_moe": (3, (1, 2), 2, 32, True, "sigmoid"),
    "gpt_oss": (2, (0, 1), 3, 32, False, "softmax"),
    "phimoe": (2, (0, 1), 2, 32, False, "softmax"),
}


def test_every_family_is_covered():
    assert set(FAMILIES) == set(TINY_FAMILIES) == set(EXPECTED_SPEC)


def test_spec_fields(model_type, model):
    family = detect_family(model.config)
    spec = family.spec(model.config)
    assert isinstance(spec, MoESpec)
    num_layers, moe_layers, top_k, isize, shared, scoring = EXPECTED_SPEC[model_type]
    assert spec == MoESpec(
        family=model_type, model_type=model_type, num_layers=num_layers, moe_layers=moe_layers,
        num_experts=NUM_EXPERTS, top_k=top_k, hidden_size=HIDDEN, expert_intermediate_size=isize,
        has_shared_expert=shared, scoring=scoring, max_position_embeddings=256,
    )
    assert family.spec(model) == spec
    with pytest.raises(Exception):
        spec.top_k = 1  # frozen
    # The spec agrees with the modules the model actually built.
    layers = family.decoder_layers(model)
    assert len(layers) == spec.num_layers
    for i in range(spec.num_layers):
        if i in spec.moe_layers:
            router = family.router(model, i)
            assert family.router_weight(router).shape == (spec.num_experts, spec.hidden_size)
            experts = family.experts(model, i)
            assert getattr(experts, family.expert_params[0]).shape[0] == spec.num_experts
            assert tuple(inspect.signature(experts.forward).parameters)[:3] == family.experts_call
        else:
            with pytest.raises(ValueError, match="dense"):
                family.moe_block(model, i)
    assert (family.router_bias(family.router(model, spec.moe_layers[0])) is not None) == (model_type == "gpt_oss")
    selection_bias = family.selection_bias(family.router(model, spec.moe_layers[0]))
    assert (selection_bias is not None) == (spec.scoring == "sigmoid")


def test_captured_routing_by_keyword():
    """A block that passes its routing by keyword (none does today) is still read right."""
    for family in FAMILIES.values():
        h, i, w = torch.zeros(1), torch.ones(1), torch.full((1,), 2.0)
        names = family.experts_call
        assert family.captured_routing((h,), {names[1]: i, names[2]: w}) == (h, i, w)
        assert family.captured_routing((), dict(zip(names, (h, i, w)))) == (h, i, w)


def test_decoder_layers_from_base_model_too(model_type, model):
    family = FAMILIES[model_type]
    assert family.base_model(model) is model.model and family.base_model(model.model) is model.model
    assert family.decoder_layers(model.model) is family.decoder_layers(model)
    paths = family.module_paths(family.spec(model).moe_layers[0])
    modules = dict(model.named_modules())
    layer = family.spec(model).moe_layers[0]
    assert modules[paths["router"]] is family.router(model, layer)
    assert modules[paths["experts"]] is family.experts(model, layer)
    assert modules[paths["norm"]] is family.moe_norm(model, layer)


def test_phimoe_uses_two_experts_whatever_the_config_says():
    config = tiny_config("phimoe", num_experts_per_tok=4)
    assert detect_family(config).spec(config).top_k == 2


# ------------------------------------------------------------------ 5. detection


def _one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize(
    "config",
    [
        LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96),
        Qwen3Config(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96),
    ],
    ids=["llama", "qwen3"],
)
def test_dense_models_are_refused(config):
    with pytest.raises(UnsupportedModelError) as err:
        detect_family(config)
    message = _one_line(err)
    assert config.model_type in message and "dense" in message
    assert all(name in message for name in FAMILIES)


def test_moe_config_without_sparse_layers_is_refused():
    with pytest.raises(UnsupportedModelError, match="dense"):
        detect_family(tiny_config("qwen3_moe", mlp_only_layers=[0, 1, 2]))


def test_unknown_model_types_are_refused():
    class MadeUpConfig(PretrainedConfig):
        model_type = "made_up_moe"

    with pytest.raises(UnsupportedModelError) as err:
        detect_family(MadeUpConfig(num_local_experts=8))
    message = _one_line(err)
    assert "made_up_moe" in message and "does not describe" in message
    assert all(name in message for name in FAMILIES)

    # A known MoE architecture that specmoe does not cover.
    with pytest.raises(UnsupportedModelError) as err:
        detect_family(AutoConfig.for_model("jamba"))
    assert "jamba" in _one_line(err)

    with pytest.raises(UnsupportedModelError):
        detect_family(object())


def test_detect_accepts_models_and_configs(model_type, model):
    assert detect_family(model) is detect_family(model.config) is FAMILIES[model_type]
    assert set(TINY_CONFIGS) == set(FAMILIES)


# ------------------------------------------------------------------ on a GPU


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@torch.no_grad()
def test_route_and_experts_on_cuda(model_type, dtype):
    """CUDA kernels (topk with sorted=False above all) must give the model's own order."""
    model = tiny_model(model_type).to("cuda", dtype)
    family = FAMILIES[model_type]
    seen = record(model, family, _input_ids(6).cuda())
    _assert_routing_matches(family, model, seen)
    for layer, rec in seen.items():
        experts = family.experts(model, layer)
        x = rec["s"].reshape(-1, HIDDEN)
        for e in rec["ids"].unique().tolist():
            host = {k: v.cpu() for k, v in family.expert_tensors(experts, e).items()}
            on_gpu = {k: v.to("cuda", non_blocking=True) for k, v in host.items()}
            ids = torch.full((x.shape[0], 1), e, dtype=torch.long, device="cuda")
            ones = torch.ones(x.shape[0], 1, dtype=x.dtype, device="cuda")
            torch.testing.assert_close(family.apply_expert(experts, on_gpu, x), experts(x, ids, ones))
