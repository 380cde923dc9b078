"""y[p] = W[slot[p]] v[row[p]]: matrix-vector products with weights picked by a device index.

The decode step of an MoE block multiplies a handful of vectors by experts chosen on
the device. Gathering those experts first (`stack[slots]`) copies every weight once
and reads it twice more; this Triton kernel reads each chosen weight once, in place in
the slot stack (any strides), with no host synchronisation, so it can be captured in
a CUDA graph. Products accumulate in float32 and are rounded once to the output
dtype, as cuBLAS does. CUDA only; `available()` says whether Triton is importable.
"""

from __future__ import annotations

import functools

import torch

Tensor = torch.Tensor


@functools.cache
def available() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # any import failure means: use the torch paths
        return False
    return True


@functools.cache
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def indexed_matvec_kernel(v_ptr, w_ptr, slot_ptr, row_ptr, y_ptr, N, K,
                              s_vrow, s_wslot, s_wn, s_wk, s_yrow,
                              BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        p = tl.program_id(0)
        nb = tl.program_id(1)
        slot = tl.load(slot_ptr + p).to(tl.int64)
        row = tl.load(row_ptr + p).to(tl.int64)
        n = nb * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = n < N
        w_base = w_ptr + slot * s_wslot + n.to(tl.int64)[:, None] * s_wn
        acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            k_ok = k < K
            v = tl.load(v_ptr + row * s_vrow + k, mask=k_ok, other=0.0).to(tl.float32)
            w = tl.load(w_base + k[None, :] * s_wk, mask=n_ok[:, None] & k_ok[None, :], other=0.0)
            acc += w.to(tl.float32) * v[None, :]
        y = tl.sum(acc, axis=1)
        tl.store(y_ptr + p * s_yrow + n, y.to(y_ptr.dtype.element_ty), mask=n_ok)

    return indexed_matvec_kernel


def indexed_matvec(v: Tensor, weight: Tensor, slots: Tensor, rows: Tensor, *, in_out: bool) -> Tensor:
    """[P, N]: row p is v[rows[p]] times slot slots[p] of `weight`.

    v [R, K] (rows contiguous); weight [S, N, K] (in_out False, F.linear layout) or
    [S, K, N] (in_out True), any strides; slots, rows [P] integer tensors on v's device."""
    import triton

    if in_out:
        _, k_dim, n_dim = weight.shape
        s_wk, s_wn = weight.stride(1), weight.stride(2)
    else:
        _, n_dim, k_dim = weight.shape
        s_wn, s_wk = weight.stride(1), weight.stride(2)
    if v.stride(-1) != 1:
        v = v.contiguous()
    p = slots.shape[0]
    y = torch.empty(p, n_dim, dtype=weight.dtype, device=v.device)
    # Small tiles over N give enough programs to keep every SM's loads in flight at batch 1.
    block_n, block_k = (16, 256) if s_wk == 1 else (64, 32)
    grid = (p, triton.cdiv(n_dim, block_n))
    _kernel()[grid](v, weight, slots, rows, y, n_dim, k_dim, v.stride(0), weight.stride(0), s_wn, s_wk, y.stride(0),
                    BLOCK_N=block_n, BLOCK_K=block_k, num_warps=4)
    return y
