"""Attention for one decoded token without repeating keys and values per query head.

With grouped-query attention (Qwen3-MoE: 32 query heads over 4 key/value heads) the stock
`sdpa` path repeats the cache's keys and values for every query head before calling
scaled_dot_product_attention whenever a mask is given, and under torch.compile always:
for a 1024-token cache that writes 8 times the cache, about 17 MB per layer per token,
more memory traffic than the layer's attention weights. A single query token needs no
copy: the query heads of one key/value head are stacked as that head's queries, and
the mask (one row, shared by every head) broadcasts over them. The same products and
the same softmax per head, so the same numbers up to the kernel's rounding.

`use_packed_decode_attention(model)` registers this as an attention implementation and
switches the model to it when it runs `sdpa`; every other case (a prompt, no grouping,
extra arguments such as attention sinks) goes to the stock `sdpa` function unchanged.
"""

from __future__ import annotations

import torch

NAME = "specmoe_packed_sdpa"
_SCORE_ARGUMENTS = ("s_aux", "sinks", "softcap", "position_bias", "head_mask", "output_attentions")


def packed_sdpa_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                          is_causal=None, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    groups = getattr(module, "num_key_value_groups", 1)
    # Arguments that change the scores themselves (sinks, soft-capping, position biases) are
    # the stock function's to handle; positions, windows and the like are already in the mask.
    changes_scores = any(kwargs.get(k) is not None and kwargs.get(k) is not False for k in _SCORE_ARGUMENTS)
    packable = (query.shape[2] == 1 and groups > 1 and not changes_scores and dropout == 0.0
                and key.shape[1] * groups == query.shape[1]
                and (attention_mask is None or attention_mask.shape[1] == 1))
    if not packable:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    b, heads, _, d = query.shape
    # Query head h attends with key/value head h // groups, as the stock repeat would pair them.
    q = query.reshape(b, heads // groups, groups, d)
    out = torch.nn.functional.scaled_dot_product_attention(q, key, value, attn_mask=attention_mask, scale=scaling)
    return out.reshape(b, heads, 1, value.shape[-1]).transpose(1, 2).contiguous(), None


def use_packed_decode_attention(model, enable: bool = True) -> bool:
    """Switch `model` from `sdpa` to the packed decode attention (or back, `enable=False`);
    whether it runs the packed one now."""
    from transformers import AttentionInterface

    config = model.config
    current = getattr(config, "_attn_implementation", None)
    if not enable:
        if current == NAME:
            config._attn_implementation = "sdpa"
        return False
    if current == "sdpa":
        AttentionInterface.register(NAME, packed_sdpa_attention)
        config._attn_implementation = NAME
        current = NAME
    return current == NAME
