"""The MoE block as one batched computation over experts held in slots.

The runtime keeps expert weights in a stack indexed by *slot* (`stack[name]` is
[S, ...], one slot per resident expert, in the family's per-expert layout of
`Family.expert_tensors`) and a slot table mapping expert id -> slot. This module
computes one MoE block from that: routing (the family's own, or ids and weights
handed in by a predictor), the chosen experts' weighted sum and the shared expert.
Every family difference (weight layout, glu, biases, routing) comes from
`specmoe.families`; nothing here names a family.

No path has a Python loop over experts, a host synchronisation or a data-dependent
shape, so each can be captured in a CUDA graph (call it once before capturing: Triton
compiles and the matmul libraries initialise on first use). Four strategies compute the same
routed output:

- ``indexed`` (CUDA with Triton): one kernel per projection reads each chosen slot's
  weights in place (`specmoe.indexed_matvec`): decode at the memory-bandwidth floor
  of the weights, no copy. Elsewhere it runs ``gather``.
- ``gather``: the weights of every (token, choice) pair are gathered into a [T*k, ...]
  copy and multiplied in batched matmuls (as gpt-fast does); the copy grows with T.
- ``grouped``: the pairs are sorted by slot and each projection is one grouped matmul
  (`torch._grouped_mm` / `F.grouped_mm`) with end offsets found on the device
  (searchsorted): every slot's weights are read once. Where the kernel exists: CUDA
  bf16 on sm90+, the CPU with torch >= 2.11; elsewhere it runs ``dense``.
- ``dense``: every token through every slot in chunks, then the chosen outputs picked:
  exact, S/k times the arithmetic.

``auto`` picks by T*k pairs: ``indexed`` up to INDEXED_MAX_PAIRS (128) where it can
run, else ``gather`` up to GATHER_MAX_PAIRS (8) if the copies stay within
GATHER_MAX_BYTES (4 MiB on the CPU), else ``grouped``, else ``dense``.

Milliseconds per call (best of 20; `benchmarks/moe_block_strategies.py`), SwiGLU slot
stacks laid out as the runtime lays them out:

    CPU, 2 cores (the H200 host pinned to 2 cores, torch 2.11; this project's own 2-core
    machine, shared with other jobs, gave the same ranking with 2-50x noise)
                                      T    gather   grouped   dense
    demo H128 I64 S32 k4, fp32        1     0.099     0.180   0.115
                                     16     0.747     0.535   0.438
                                    256      33.2      0.97    3.9
    demo, bf16                        1     0.205     0.370   0.450
                                     16     0.934     1.23    0.465
                                    256      21.5      1.80    1.37
    Qwen3-30B-A3B H2048 I768 S16 k8   1      55.8      6.9    11.6    (fp32)
                                      1      31.9      3.3   199      (bf16)

    H200, bf16, CUDA graph replays    T    gather   grouped   dense   indexed
    Qwen3-30B-A3B, all 128 in slots   1     0.093     0.094   0.320   0.053
                                      4     0.254     0.161   0.323   0.112
                                     16     0.837     0.345   0.344   0.299
                                     64      2.99     0.497   0.397   0.850
                                   1024      46.8     0.685   3.66    11.1

So on the CPU gather wins only for small experts at T=1 (the 4 MiB copy limit) and
grouped from a few tokens on; on the GPU the indexed kernel wins decode (its two
projections take 20 us of the 53; the rest is the glu and combine launches) and
grouped wins prefill by 5x over dense.

Numerics follow the stock transformers experts (their batched and grouped paths): x
is cast to the weights' dtype, each projection and the glu run in that dtype, each
expert's output is multiplied by its routing weight in the promoted dtype of the two
(bf16 for Qwen/OLMoE/GPT-OSS/Phi-MoE, whose routers hand bf16 weights; fp32 for
Mixtral and DeepSeek/GLM), summed over the k choices, then cast to x's dtype; the
shared expert is computed in its own dtype and added last, as the stock blocks do.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from specmoe.families import Family, SharedExpert
from specmoe.indexed_matvec import available as indexed_matvec_available
from specmoe.indexed_matvec import indexed_matvec

__all__ = ["STRATEGIES", "INDEXED_MAX_PAIRS", "GATHER_MAX_PAIRS", "GATHER_MAX_BYTES", "routed_output", "moe_block_forward", "stack_from_module",
           "grouped_available", "indexed_available", "choose_strategy"]

Tensor = torch.Tensor

STRATEGIES = ("gather", "grouped", "dense", "indexed")

# Up to this many (token, choice) pairs `auto` runs the indexed kernel on CUDA ...
INDEXED_MAX_PAIRS = 128
# ... or, without it, gathers weight copies; beyond these, it groups.
GATHER_MAX_PAIRS = 8
# ... and gathers only while the weight copies stay this small (bytes, per device type):
# on the CPU, allocating and filling a large copy costs more than the grouped kernel.
GATHER_MAX_BYTES = {"cpu": 4 << 20, "cuda": 1 << 40}

# Elements of one dense chunk's largest intermediate ([S, tokens, max(2I, H)]).
_DENSE_CHUNK_ELEMENTS = 1 << 25

_GROUPED_MM = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


def _torch_at_least(major: int, minor: int) -> bool:
    parts = torch.__version__.split("+")[0].split(".")
    return (int(parts[0]), int(parts[1])) >= (major, minor)


def grouped_available(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the grouped matmul kernel exists for this device and dtype."""
    if _GROUPED_MM is None:
        return False
    device = torch.device(device)
    if device.type == "cuda":
        return dtype == torch.bfloat16 and torch.cuda.get_device_capability(device) >= (9, 0)
    if device.type == "cpu":
        # Older CPU kernels are missing or need 16-byte aligned operands.
        return _torch_at_least(2, 11)
    return False


def indexed_available(device: torch.device) -> bool:
    """Whether the Triton indexed matrix-vector kernel can run on this device."""
    return torch.device(device).type == "cuda" and indexed_matvec_available()


def choose_strategy(pairs: int, device: torch.device, dtype: torch.dtype, expert_bytes: int = 0) -> str:
    """What `auto` runs for `pairs` = T*k (token, choice) pairs of experts of `expert_bytes` each."""
    device = torch.device(device)
    if pairs <= INDEXED_MAX_PAIRS and indexed_available(device):
        return "indexed"
    if pairs <= GATHER_MAX_PAIRS and pairs * expert_bytes <= GATHER_MAX_BYTES.get(device.type, 0):
        return "gather"
    return "grouped" if grouped_available(device, dtype) else "dense"


# --------------------------------------------------------------------------- stacks


def stack_from_module(family: Family, experts: nn.Module, slots=None) -> dict[str, Tensor]:
    """Stacked expert tensors {name: [N, ...]} of a loaded experts module, in slot order:
    slot i holds expert `slots[i]` (all experts, slot = id, by default)."""
    ids = None
    if slots is not None:
        ids = torch.as_tensor(slots, dtype=torch.long)
    return family.expert_stack(experts, ids)


def _stack_info(stack: dict[str, Tensor]) -> tuple[int, torch.dtype, torch.device]:
    w = stack["gate_up_proj"]
    return w.shape[0], w.dtype, w.device


# ----------------------------------------------------------------------- strategies


def _gather(family: Family, experts: nn.Module, x: Tensor, stack: dict[str, Tensor], slots: Tensor) -> Tensor:
    t, k = slots.shape
    flat = slots.reshape(-1)
    # Advanced indexing, not index_select: on CUDA the latter copied large slices 4x slower.
    picked = {name: w[flat] for name, w in stack.items()}
    rows = x.unsqueeze(1).expand(t, k, x.shape[-1]).reshape(t * k, 1, x.shape[-1])
    a = family.gate_fn(experts, picked, rows)            # [T*k, 1, I]
    return family.down_fn(picked, a).view(t, k, -1)      # [T*k, 1, H] -> [T, k, H]


def _grouped_linear(family: Family, stack: dict[str, Tensor], name: str, rows: Tensor, ends: Tensor,
                    row_slots: Tensor) -> Tensor:
    out = _GROUPED_MM(rows.contiguous(), family.in_out(stack[name]), offs=ends)
    bias = stack.get(name + "_bias")
    if bias is not None:
        # The stock grouped experts add the bias after the (rounded) product, as here.
        out = out + bias[row_slots]
    return out


def _grouped(family: Family, experts: nn.Module, x: Tensor, stack: dict[str, Tensor], slots: Tensor) -> Tensor:
    t, k = slots.shape
    num_slots = stack["gate_up_proj"].shape[0]
    flat = slots.reshape(-1)
    row_slots, order = torch.sort(flat, stable=True)
    rows = x[order // k]
    # End offset of each slot's rows; searchsorted keeps it on the device and exact (no histogram).
    bounds = torch.arange(1, num_slots + 1, device=flat.device, dtype=row_slots.dtype)
    ends = torch.searchsorted(row_slots, bounds).to(torch.int32)
    gate_up = _grouped_linear(family, stack, "gate_up_proj", rows, ends, row_slots)
    a = family.glu_fn(experts, gate_up)
    y = _grouped_linear(family, stack, "down_proj", a, ends, row_slots)
    return torch.empty_like(y).index_copy_(0, order, y).view(t, k, -1)


def _dense(family: Family, experts: nn.Module, x: Tensor, stack: dict[str, Tensor], slots: Tensor) -> Tensor:
    t, k = slots.shape
    gate_up = stack["gate_up_proj"]
    num_slots = gate_up.shape[0]
    widest = max(gate_up.shape[1], gate_up.shape[2])
    chunk = max(1, _DENSE_CHUNK_ELEMENTS // (num_slots * widest))
    parts = []
    for start in range(0, t, chunk):
        h = x[start:start + chunk]
        n = h.shape[0]
        y_all = family.down_fn(stack, family.gate_fn(experts, stack, h.unsqueeze(0)))   # [S, n, H]
        tokens = torch.arange(n, device=x.device).unsqueeze(1)
        parts.append(y_all[slots[start:start + n], tokens])                            # [n, k, H]
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _indexed_linear(family: Family, stack: dict[str, Tensor], name: str, v: Tensor, flat: Tensor,
                    share: int) -> Tensor:
    out = indexed_matvec(v, stack[name], flat, share, in_out=family.weights_in_out)
    bias = stack.get(name + "_bias")
    return out if bias is None else out + bias[flat]


def _indexed(family: Family, experts: nn.Module, x: Tensor, stack: dict[str, Tensor], slots: Tensor) -> Tensor:
    t, k = slots.shape
    flat = slots.reshape(-1)
    gate_up = _indexed_linear(family, stack, "gate_up_proj", x, flat, k)
    a = family.glu_fn(experts, gate_up)
    return _indexed_linear(family, stack, "down_proj", a, flat, 1).view(t, k, -1)


_RUN = {"gather": _gather, "grouped": _grouped, "dense": _dense, "indexed": _indexed}


# -------------------------------------------------------------------------- public


def routed_output(family: Family, experts: nn.Module, x: Tensor, stack: dict[str, Tensor], slots: Tensor,
                  weights: Tensor, *, strategy: str = "auto") -> Tensor:
    """sum_j weights[t, j] * Expert_{slots[t, j]}(x[t]) as [T, H] in x's dtype.

    x [T, H]; stack {name: [S, ...]} (any strides); slots [T, k] slot indices; weights
    [T, k]; `experts` supplies only the activation and its constants."""
    _, dtype, device = _stack_info(stack)
    if strategy == "auto":
        expert_bytes = sum(w[0].numel() * w.element_size() for w in stack.values())
        strategy = choose_strategy(slots.numel(), device, dtype, expert_bytes)
    elif strategy == "grouped" and not grouped_available(device, dtype):
        strategy = "dense"
    elif strategy == "indexed" and not indexed_available(device):
        strategy = "gather"
    if strategy not in _RUN:
        raise ValueError(f"unknown strategy {strategy!r}; one of auto, {', '.join(STRATEGIES)}")
    y = _RUN[strategy](family, experts, x.to(dtype), stack, slots)
    # As the stock experts: weight in the promoted dtype of output and weights, sum over k, cast.
    return (y * weights.unsqueeze(-1)).sum(dim=1).to(x.dtype)


def moe_block_forward(family: Family, block: nn.Module, x: Tensor, stack: dict[str, Tensor], slot_table: Tensor,
                      *, ids: Tensor | None = None, weights: Tensor | None = None, shared=None,
                      strategy: str = "auto") -> tuple[Tensor, Tensor, Tensor]:
    """One MoE block on x [T, H] (the router input s = LN_moe(r)): (out [T, H], ids [T, k], weights [T, k]).

    Routing is the family's own unless `ids` and `weights` are handed in (predicted
    routing); either way ids are mapped to slots through `slot_table` [E]. `block` is
    the stock MoE block module: its router, its experts module (for the activation and
    constants only; its parameters may be on the meta device) and its shared expert.
    `shared`: None adds the block's own shared expert (where it has one); False adds
    none; a Tensor [T, H] is added as the shared output; a module is called on x
    (a `SharedExpert` in its native dtype)."""
    x = x.reshape(-1, x.shape[-1])
    if ids is None:
        if weights is not None:
            raise ValueError("weights without ids")
        router = getattr(block, family.router_attr)
        ids, weights = family.route(router, family.router_logits(router, x))
    elif weights is None:
        raise ValueError("ids without weights")
    experts = getattr(block, family.experts_attr)
    out = routed_output(family, experts, x, stack, slot_table[ids], weights, strategy=strategy)
    if shared is None:
        shared = family.block_shared_expert(block)
    if isinstance(shared, Tensor):
        out = out + shared.reshape(out.shape).to(out.dtype)
    elif isinstance(shared, SharedExpert):
        out = out + shared.native(x).to(out.dtype)
    elif isinstance(shared, nn.Module):
        out = out + shared(x).to(out.dtype)
    elif shared is not False and shared is not None:
        raise TypeError(f"shared must be None, False, a Tensor or a module, not {type(shared).__name__}")
    return out, ids, weights
