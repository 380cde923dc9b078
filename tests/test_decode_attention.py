"""Decode attention without the per-head copy of keys and values: the same numbers as
attention over keys and values repeated per head (what the stock `sdpa` path runs), and
only where it applies."""

from __future__ import annotations

import pytest
import torch

import runtime
from runtime.config import RuntimeConfig
from runtime.decode_attention import NAME, grouped_sdpa_attention, use_grouped_decode_attention
from runtime.kv_cache import attention_masks
from tests.tiny_models import tiny_model


class _Module:
    def __init__(self, groups: int):
        self.num_key_value_groups = groups
        self.is_causal = True
        self.training = False


def _reference(query, key, value, mask, scale, groups):
    """Keys and values repeated per query head, then plain softmax attention, in float64."""
    k = key.double().repeat_interleave(groups, dim=1)
    v = value.double().repeat_interleave(groups, dim=1)
    scores = query.double() @ k.transpose(-1, -2) * scale + mask.double()
    return (scores.softmax(-1) @ v).transpose(1, 2)


@pytest.mark.parametrize("groups", [2, 8])
def test_grouped_decode_equals_repeated_keys_with_masked_positions(groups):
    gen = torch.Generator().manual_seed(0)
    kv_heads, d, max_len, written = 4, 16, 40, 23
    query = torch.randn(1, kv_heads * groups, 1, d, generator=gen)
    key = torch.randn(1, kv_heads, max_len, d, generator=gen)
    value = torch.randn(1, kv_heads, max_len, d, generator=gen)
    # Positions past the token's own are unwritten garbage: the mask must hide them in every head.
    mask = attention_masks({"full"}, torch.tensor([written - 1]), max_len, None, torch.float32)["full"]
    out, weights = grouped_sdpa_attention(_Module(groups), query, key, value, mask, scaling=d ** -0.5)
    assert weights is None
    assert out.shape == (1, 1, kv_heads * groups, d)
    ref = _reference(query, key, value, mask, d ** -0.5, groups)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    # A change in a hidden position changes nothing; one in a visible position does.
    key2 = key.clone()
    key2[:, :, written:] += 100.0
    out2, _ = grouped_sdpa_attention(_Module(groups), query, key2, value, mask, scaling=d ** -0.5)
    torch.testing.assert_close(out2, out)
    key2[:, 1, 0] += 1.0
    out3, _ = grouped_sdpa_attention(_Module(groups), query, key2, value, mask, scaling=d ** -0.5)
    assert not torch.allclose(out3[:, :, groups:2 * groups], out[:, :, groups:2 * groups])
    torch.testing.assert_close(out3[:, :, :groups], out[:, :, :groups])   # head group 0 reads kv head 0 only


def test_a_prompt_and_score_changing_arguments_go_to_the_stock_path(monkeypatch):
    import transformers.integrations.sdpa_attention as stock

    calls = []
    real = stock.sdpa_attention_forward
    monkeypatch.setattr(stock, "sdpa_attention_forward", lambda *a, **k: calls.append(k) or real(*a, **k))
    q = torch.randn(1, 4, 3, 8)
    kv = torch.randn(1, 2, 3, 8)
    grouped_sdpa_attention(_Module(2), q, kv, kv, None)            # three query tokens: a prompt
    grouped_sdpa_attention(_Module(2), q[:, :, :1], kv, kv, None, softcap=None)   # grouped
    assert len(calls) == 1
    with pytest.raises(ValueError, match="softcap"):             # stock sdpa refuses it, as it would have
        grouped_sdpa_attention(_Module(2), q[:, :, :1], kv, kv, None, softcap=30.0)
    assert len(calls) == 2


def test_runtime_switches_sdpa_models_only_and_decodes_like_stock():
    model = tiny_model("qwen3_moe")
    prompt = torch.tensor([5, 17, 3, 99, 42, 7, 64, 23])
    with torch.inference_mode():
        stock = model.generate(prompt[None], max_new_tokens=6, do_sample=False)[0, len(prompt):].tolist()
    engine = runtime.from_model(model, RuntimeConfig(device="cpu", max_context=32, prefetch="none"))
    assert model.config._attn_implementation == NAME
    with torch.inference_mode():
        assert list(engine.generate(prompt, 6)) == stock
    # Off again on request, and a model not on sdpa (GPT-OSS's sinks) is left as it is.
    assert use_grouped_decode_attention(model, enable=False) is False
    assert model.config._attn_implementation == "sdpa"
    oss = tiny_model("gpt_oss")
    assert use_grouped_decode_attention(oss) is False
    assert oss.config._attn_implementation == "eager"


@pytest.mark.gpu
@pytest.mark.parametrize("max_len", [40, 1072])
def test_grouped_decode_on_cuda_equals_repeated_keys(max_len):
    """The CUDA path (torch's grouped-query kernel, bf16) against the float64 reference."""
    gen = torch.Generator().manual_seed(1)
    kv_heads, groups, d, written = 4, 8, 128, max_len - 5
    query = torch.randn(1, kv_heads * groups, 1, d, generator=gen)
    key = torch.randn(1, kv_heads, max_len, d, generator=gen)
    value = torch.randn(1, kv_heads, max_len, d, generator=gen)
    mask = attention_masks({"full"}, torch.tensor([written - 1]), max_len, None, torch.bfloat16)["full"]
    out, _ = grouped_sdpa_attention(_Module(groups), *(t.bfloat16().cuda() for t in (query, key, value)),
                                    mask.cuda(), scaling=d ** -0.5)
    ref = _reference(*(t.bfloat16() for t in (query, key, value)), mask, d ** -0.5, groups)
    torch.testing.assert_close(out.double().cpu(), ref, rtol=2e-2, atol=2e-2)
