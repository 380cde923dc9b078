"""Decode projections by the matvec kernel: the products of F.linear, for one-row inputs on
CUDA only; everything else is F.linear itself."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from runtime.decode_linear import MatvecLinear, use_matvec_projections
from tests.tiny_models import tiny_model


def test_off_cuda_a_matvec_linear_is_f_linear_and_cpu_models_are_not_switched():
    lin = nn.Linear(16, 8)
    x = torch.randn(3, 16)
    want = lin(x)
    lin.__class__ = MatvecLinear
    assert torch.equal(lin(x), want)
    model = tiny_model("qwen3_moe")
    assert use_matvec_projections(model.model.layers) == 0
    assert all(type(m) is not MatvecLinear for m in model.modules())


@pytest.mark.gpu
@torch.no_grad()
@pytest.mark.parametrize("n,k", [(4096, 2048), (512, 2048), (2048, 4096), (128, 2048), (100, 72)])
def test_matvec_equals_float32_products_rounded_once(n, k):
    """Against the float64 product rounded to bf16: as close as cuBLAS's own result is."""
    from specmoe.indexed_matvec import matvec

    gen = torch.Generator().manual_seed(n + k)
    w = torch.randn(n, k, generator=gen).to(torch.bfloat16).cuda()
    x = torch.randn(1, k, generator=gen).to(torch.bfloat16).cuda()
    ref = (x.double() @ w.double().T)
    got = matvec(x, w)
    cublas = F.linear(x, w)
    err, cublas_err = (got.double() - ref).abs().max(), (cublas.double() - ref).abs().max()
    assert err <= cublas_err * 1.01 + 1e-6, (err, cublas_err)
    with pytest.raises(ValueError, match="contiguous"):
        matvec(x, w.T.contiguous().T)


@pytest.mark.gpu
@torch.no_grad()
def test_switched_attention_decodes_like_f_linear():
    """One decode step through a layer's switched attention equals it through F.linear (bf16),
    a prompt goes through F.linear untouched, and switching back restores nn.Linear."""
    model = tiny_model("qwen3_moe").to("cuda", torch.bfloat16)
    layers = model.model.layers
    attn = layers[1].self_attn
    x1 = torch.randn(1, 1, model.config.hidden_size, device="cuda", dtype=torch.bfloat16)
    x5 = torch.randn(1, 5, model.config.hidden_size, device="cuda", dtype=torch.bfloat16)
    want1, want5 = attn.q_proj(x1), attn.q_proj(x5)
    assert use_matvec_projections(layers) == 4 * len(layers)
    assert type(attn.q_proj) is MatvecLinear
    torch.testing.assert_close(attn.q_proj(x1), want1, rtol=1e-2, atol=1e-2)
    assert torch.equal(attn.q_proj(x5), want5)      # a prompt: F.linear itself
    assert use_matvec_projections(layers, enable=False) == 0
    assert type(attn.q_proj) is nn.Linear
