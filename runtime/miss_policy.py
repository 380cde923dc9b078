"""`on_miss: auto`: of the two exact miss policies, the one that should decode faster here.

A layer's misses either cross PCIe to the GPU (`fetch`) or are computed by the CPU where
they lie in host memory (`cpu`). Which is faster depends on the machine: on the H200
machine's 16-core host the CPU's kernels read experts at about 76-115 GB/s against 54 GB/s
of copies, and `cpu` decoded model A about twice as fast as `fetch` at a quarter of its experts
on the GPU (benchmarks/results/runtime_decode.md); a host with a few cores and a fast link turns
that around. Both rates are measured when the engine starts, on the model's own store.
"""

from __future__ import annotations

import dataclasses

# The part of a `cpu` layer nothing overlaps: from the CPU's part to the next layer's routing
# landing in host memory (the next attention and router, the staging copies): 87-94 us per
# layer on the H200 machine (benchmarks/results/profile_decode_chain.md). It decides for
# experts so small that the CPU's time is mostly this wait.
CPU_LAYER_LATENCY_S = 100e-6


@dataclasses.dataclass(frozen=True)
class MissPolicyChoice:
    on_miss: str                       # fetch | cpu
    reason: str                        # one line for a person


def choose_on_miss(*, cuda: bool, holds_every_expert: bool, misses_per_layer: float, expert_bytes: int,
                   copy_bytes_per_s: float | None = None, cpu_bytes_per_s: float | None = None) -> MissPolicyChoice:
    """`cpu` when a layer's expected misses take the CPU less time, with its serial wait, than
    copying them takes the link; `fetch` otherwise, and wherever nothing crosses a link (no
    CUDA device: expert slots are host memory too) or nothing misses (every expert on the GPU)."""
    if not cuda:
        return MissPolicyChoice("fetch", "no GPU: the expert slots are host memory too")
    if holds_every_expert or misses_per_layer <= 0:
        return MissPolicyChoice("fetch", "every expert fits on the GPU: nothing misses")
    if not copy_bytes_per_s or not cpu_bytes_per_s:
        raise ValueError("choose_on_miss needs both measured rates on a GPU")
    work = misses_per_layer * expert_bytes
    cpu_s = work / cpu_bytes_per_s + CPU_LAYER_LATENCY_S
    copy_s = work / copy_bytes_per_s
    on_miss = "cpu" if cpu_s < copy_s else "fetch"
    reason = (f"{misses_per_layer:.1f} misses a layer: the CPU {1e3 * cpu_s:.2f} ms "
              f"({cpu_bytes_per_s / 1e9:.1f} GB/s, {1e6 * CPU_LAYER_LATENCY_S:.0f} us of serial wait), "
              f"copies {1e3 * copy_s:.2f} ms ({copy_bytes_per_s / 1e9:.1f} GB/s)")
    return MissPolicyChoice(on_miss, reason)


def expected_misses(top_k: int, slots: int, total_experts: int) -> float:
    """Misses a layer can expect when its slots hold a uniform share of its experts (real
    routing, concentrated on fewer experts, misses less)."""
    return top_k * max(0.0, 1.0 - slots / total_experts)


def cpu_runs_ahead_without_prediction(config, cuda: bool) -> bool:
    """Whether `cpu` decode queues whole steps ahead of the CPU's parts once no predictor places
    experts during decode (OffloadedMoE.runs_ahead: graphed, the device table, no demand
    copies), which `prefetch: auto` then keeps: predicted copies would cost that step more
    than they save on a host where copies and the CPU read the same memory."""
    return (cuda and config.on_miss == "cpu" and config.run_ahead and config.cuda_graphs and config.device_table
            and config.cpu_demand_share == 0.0)
