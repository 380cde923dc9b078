"""Tiny random-init models of every supported MoE family, for CPU tests.

Every model is small (hidden 64, 2-4 decoder layers, 8 experts) but keeps what
makes its family different: dense layers where the family has them, group-limited
top-k for DeepSeek and GLM, shared experts, GPT-OSS's router and expert biases.
Stock init leaves routers near zero (or exactly zero for biases), which makes top-k
choices ties or weights uniform, so the routing state is overwritten here from a
seeded generator: the tests then exercise real choices."""

from __future__ import annotations

import math

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

HIDDEN = 64
NUM_EXPERTS = 8

_COMMON = dict(
    vocab_size=128,
    hidden_size=HIDDEN,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    tie_word_embeddings=False,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
    # Larger than the stock 0.02 so expert outputs are not lost next to the residual.
    initializer_range=0.1,
)

# Multi-head latent attention of the DeepSeek models, at toy size.
_MLA = dict(
    num_key_value_heads=4,
    kv_lora_rank=16,
    q_lora_rank=24,
    qk_rope_head_dim=8,
    qk_nope_head_dim=8,
    v_head_dim=16,
)

TINY_CONFIGS: dict[str, dict] = {
    "qwen3_moe": dict(
        num_hidden_layers=3, head_dim=16, intermediate_size=96, moe_intermediate_size=32,
        num_experts=NUM_EXPERTS, num_experts_per_tok=2, norm_topk_prob=True, mlp_only_layers=[0],
    ),
    "qwen2_moe": dict(
        # decoder_sparse_step=2 makes layers 1 and 3 sparse, 0 and 2 dense.
        num_hidden_layers=4, intermediate_size=96, moe_intermediate_size=32,
        shared_expert_intermediate_size=48, num_experts=NUM_EXPERTS, num_experts_per_tok=3,
        norm_topk_prob=False, decoder_sparse_step=2,
    ),
    "mixtral": dict(
        num_hidden_layers=2, head_dim=16, intermediate_size=32, num_local_experts=NUM_EXPERTS,
        num_experts_per_tok=2,
    ),
    "olmoe": dict(
        num_hidden_layers=2, intermediate_size=32, num_experts=NUM_EXPERTS, num_experts_per_tok=3,
        norm_topk_prob=False,
    ),
    "deepseek_v2": dict(
        **_MLA, num_hidden_layers=3, first_k_dense_replace=1, intermediate_size=96,
        moe_intermediate_size=32, n_routed_experts=NUM_EXPERTS, num_experts_per_tok=3,
        n_shared_experts=1, topk_method="group_limited_greedy", n_group=4, topk_group=2,
        routed_scaling_factor=1.5,
    ),
    "deepseek_v3": dict(
        **_MLA, num_hidden_layers=3, first_k_dense_replace=1, intermediate_size=96,
        moe_intermediate_size=32, n_routed_experts=NUM_EXPERTS, num_experts_per_tok=3,
        n_shared_experts=1, n_group=4, topk_group=2, norm_topk_prob=True, routed_scaling_factor=2.5,
    ),
    "glm4_moe": dict(
        num_hidden_layers=3, head_dim=16, first_k_dense_replace=1, intermediate_size=96,
        moe_intermediate_size=32, n_routed_experts=NUM_EXPERTS, num_experts_per_tok=2,
        n_shared_experts=1, n_group=2, topk_group=1, norm_topk_prob=True, routed_scaling_factor=1.8,
    ),
    "gpt_oss": dict(
        # A low swiglu_limit makes the clamp bite at toy scale (5.17 ignores it and keeps 7.0).
        num_hidden_layers=2, head_dim=16, intermediate_size=32, num_local_experts=NUM_EXPERTS,
        num_experts_per_tok=3, sliding_window=16, swiglu_limit=0.5,
        rope_parameters=dict(
            rope_type="yarn", rope_theta=150000.0, factor=4.0, beta_fast=32.0, beta_slow=1.0,
            truncate=False, original_max_position_embeddings=64,
        ),
    ),
    "phimoe": dict(
        # A wider jitter band than the stock 0.01 keeps runner-up experts in the sparsemixer softmax.
        num_hidden_layers=2, intermediate_size=32, num_local_experts=NUM_EXPERTS, num_experts_per_tok=2,
        router_jitter_noise=0.1,
    ),
}

TINY_FAMILIES: list[str] = list(TINY_CONFIGS)


def tiny_config(model_type: str, **overrides) -> PretrainedConfig:
    kwargs = {**_COMMON, **TINY_CONFIGS[model_type], **overrides}
    return AutoConfig.for_model(model_type, **kwargs)


def tiny_model(
    model_type: str,
    seed: int = 0,
    experts_implementation: str | None = None,
    **overrides,
) -> PreTrainedModel:
    """A float32 eval-mode model of `model_type` with non-degenerate routing.

    experts_implementation None keeps transformers' default (grouped_mm where it
    can dispatch); "eager" selects the per-expert loop."""
    config = tiny_config(model_type, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if experts_implementation is not None:
        model.set_experts_implementation(experts_implementation)
    _spread_routing(model, seed)
    return model.eval()


@torch.no_grad()
def _spread_routing(model: PreTrainedModel, seed: int) -> None:
    gen = torch.Generator().manual_seed(10_000 + seed)

    def fill(t: torch.Tensor, std: float) -> None:
        t.copy_(torch.randn(t.shape, generator=gen, dtype=torch.float32).to(t.dtype) * std)

    # The router input is normalised (entries ~1), so std c/sqrt(H) gives logits of std ~c.
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if leaf in ("gate", "router") and hasattr(module, "weight") and module.weight.dim() == 2:
            if module.weight.shape[0] != NUM_EXPERTS:
                continue
            sigmoid_scored = hasattr(module, "e_score_correction_bias")
            fill(module.weight, (1.5 if sigmoid_scored else 3.0) / math.sqrt(HIDDEN))
            if sigmoid_scored:
                fill(module.e_score_correction_bias, 0.1)
            bias = getattr(module, "bias", None)
            if isinstance(bias, torch.Tensor):
                fill(bias, 0.5)
        if leaf == "experts":
            for pname in ("gate_up_proj_bias", "down_proj_bias"):
                if isinstance(getattr(module, pname, None), torch.Tensor):
                    fill(getattr(module, pname), 0.05)
