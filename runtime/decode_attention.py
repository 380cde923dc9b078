"""Attention for one decoded token without copying keys and values per query head.

With grouped-query attention (Qwen3-MoE: 32 query heads over 4 key/value heads) the stock
`sdpa` path repeats the cache's keys and values for every query head before calling
scaled_dot_product_attention whenever a mask is given, and under torch.compile always:
for a 1024-token cache that writes 8 times the cache, about 17 MB per layer per token.
torch's own grouped-query attention (`enable_gqa`) reads each key/value head once for
its query heads. Measured on an H200 under compile and CUDA graphs (benchmarks/
decode_attention.py), one token over a 1072-position cache: 8.6 us against 18.2 us for
the repeated keys, 12.7 against 87.4 us at 8200 positions, with the same error against
a float64 reference. (Stacking a key/value head's query heads as its rows instead is
slower there: the fused kernels then have 4 heads of work to spread over the GPU. On the
CPU it is the other way round: for one bf16 token over 1072 positions, 0.57 ms stacked
against 6.4 ms for torch's grouped path and 8.1 ms for the repeat on a 2-core EPYC,
benchmarks/results/decode_attention_cpu.md; so the CPU stacks.)

`use_grouped_decode_attention(model)` registers this as an attention implementation and
switches the model to it when it runs `sdpa`; every other case (a prompt, no grouping,
arguments that change the scores, such as attention sinks) goes to the stock `sdpa`
function unchanged.
"""

from __future__ import annotations

import torch

NAME = "specmoe_grouped_sdpa"
_SCORE_ARGUMENTS = ("s_aux", "sinks", "softcap", "position_bias", "head_mask", "output_attentions")


def grouped_sdpa_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                           is_causal=None, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    groups = getattr(module, "num_key_value_groups", 1)
    # Arguments that change the scores themselves are the stock function's to handle;
    # positions, windows and the like are already in the mask.
    changes_scores = any(kwargs.get(k) is not None and kwargs.get(k) is not False for k in _SCORE_ARGUMENTS)
    grouped = (query.shape[2] == 1 and groups > 1 and not changes_scores and dropout == 0.0
               and key.shape[1] * groups == query.shape[1] and key.shape[-1] == value.shape[-1])
    if not grouped:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    if query.is_cuda or (attention_mask is not None and attention_mask.shape[1] != 1):
        out = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask,
                                                               scale=scaling, enable_gqa=True)
        return out.transpose(1, 2).contiguous(), None
    # On the CPU torch's grouped path is about as slow as the repeat (bf16); stacking a key/value
    # head's query heads as its rows is the fast one there (a mask shared by all heads broadcasts).
    b, heads, _, d = query.shape
    out = torch.nn.functional.scaled_dot_product_attention(query.reshape(b, heads // groups, groups, d), key, value,
                                                           attn_mask=attention_mask, scale=scaling)
    return out.reshape(b, heads, 1, value.shape[-1]).transpose(1, 2).contiguous(), None


def use_grouped_decode_attention(model, enable: bool = True) -> bool:
    """Switch `model` from `sdpa` to the grouped decode attention (or back, `enable=False`);
    whether it runs the grouped one now."""
    from transformers import AttentionInterface

    config = model.config
    current = getattr(config, "_attn_implementation", None)
    if not enable:
        if current == NAME:
            config._attn_implementation = "sdpa"
        return False
    if current == "sdpa":
        AttentionInterface.register(NAME, grouped_sdpa_attention)
        config._attn_implementation = NAME
        current = NAME
    return current == NAME
