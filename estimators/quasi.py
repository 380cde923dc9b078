"""Router inputs and quasi-hidden states, batched and in float32.

For MoE layer l and a target layer t = l + h (h MoE layers later):

    s_l = LN_moe_l(r_l)                                  moe_input(norm_l, r)
    d_l = sum_{e in I_l} g_{l,e} D_l[e]                  default_mix(D_l, ids, weights)
    q_l = LN_moe_t(r_l + d_l [+ shared_l(s_l)])          quasi_state(norm_t, r, d, shared)

`r` may come in any float dtype (traces store bf16); everything is computed in
float32 with autocast switched off, so that the same numbers come out under
Lightning's bf16-mixed precision as in a plain fp32 run. Norm modules whose
parameters are fp32 (our copies) give exact fp32 results; the RMSNorms of the
supported families also accept fp32 input with bf16 weights (they promote).
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor, nn

__all__ = ["fp32_region", "moe_input", "default_mix", "quasi_state", "dense_weights"]


def fp32_region(device: torch.device | str):
    """Context with autocast disabled on `device` (no-op where autocast is unknown)."""
    kind = torch.device(device).type
    try:
        return torch.autocast(device_type=kind, enabled=False)
    except RuntimeError:  # pragma: no cover - exotic device types
        return contextlib.nullcontext()


def _rows(x: Tensor) -> Tensor:
    return x.reshape(-1, x.shape[-1])


def moe_input(norm: nn.Module, residual: Tensor) -> Tensor:
    """s = LN(r) as float32 [T, H]."""
    r = _rows(residual)
    with fp32_region(r.device):
        return norm(r.float()).float()


def dense_weights(ids: Tensor, weights: Tensor, num_experts: int) -> Tensor:
    """[T, E] float32 with weights[t, j] at column ids[t, j] and 0 elsewhere."""
    ids, weights = _rows(ids), _rows(weights)
    out = torch.zeros(ids.shape[0], num_experts, dtype=torch.float32, device=ids.device)
    return out.scatter_add_(1, ids.long(), weights.float())


def default_mix(default_vectors: Tensor, ids: Tensor, weights: Tensor) -> Tensor:
    """d = sum_j weights[:, j] * D[ids[:, j]] as float32 [T, H].

    default_vectors: [E, H]; ids, weights: [T, k] (the combine weights the model
    hands its experts, scaling factors included)."""
    with fp32_region(default_vectors.device):
        dense = dense_weights(ids, weights, default_vectors.shape[0])
        return dense @ default_vectors.float()


def quasi_state(target_norm: nn.Module, residual: Tensor, mix: Tensor,
                shared: Tensor | None = None) -> Tensor:
    """q = LN_target(r + d [+ shared]) as float32 [T, H]."""
    r = _rows(residual)
    with fp32_region(r.device):
        x = r.float() + mix.float()
        if shared is not None:
            x = x + _rows(shared).float()
        return target_norm(x).float()
