"""Experts computed by the host CPU from the host store, while the GPU computes the rest.

At batch 1 an expert is a matrix-vector product over weights that already sit in
host memory: reading them there is cheaper than copying them over PCIe and reading
them again on the GPU. The experts are read in place from the store's blocks: no
gather, no copy. `compute` runs on the caller's thread (a graphed decode step, whose GPU
work is already queued); `submit` runs the same on one worker thread (the kernels release
the GIL, so the caller keeps launching GPU work meanwhile). Experts that one call gives a single token
go to the batched matrix-vector kernels of cpu_kernels (all of them in one parallel
region; a decode token's experts, glu and weighted sum in one native call); an expert
with several tokens is one torch matrix product, which reads it once.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from . import cpu_kernels
from .host_store import HostExpertStore


class CpuExperts:
    def __init__(self, family, store: HostExpertStore, threads: int | None = None, telemetry=None):
        self.family = family
        self.store = store
        self.telemetry = telemetry   # its cpu_expert_seconds counts the time computed here
        if threads:
            torch.set_num_threads(int(threads))
        # The native kernels' threads: as set, else one fewer than this process's cores. The
        # core left over runs the OS and the CUDA driver's threads beside a decode step; on
        # a 16-core host 15 threads decoded 4-9% faster than 16.
        self.threads = int(threads) if threads else max(1, _cores() - 1)
        cpu_kernels.available()  # build the kernels now, not at the first miss
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="specmoe-cpu-experts")
        self.seconds = 0.0
        self._sums: dict = {}   # (layer, experts module) -> cpu_kernels.prepare_sum's call, or None

    def submit(self, experts_module, layer: int, x: torch.Tensor, work: list[tuple[int, int, float]]) -> Future:
        """sum over (token, expert, weight) in `work` of weight * Expert_{layer,expert}(x[token]),
        as float32 [T, H] on the CPU. `x` is a host tensor in the store's dtype."""
        return self._pool.submit(self.compute, experts_module, layer, x, work)

    def compute(self, experts_module, layer: int, x: torch.Tensor, work: list[tuple[int, int, float]],
                out: torch.Tensor | None = None) -> torch.Tensor:
        """The same as `submit`, on the calling thread. A decode step whose only other work
        is already queued on the GPU calls this: no hop to the worker thread. `out` (float32
        [1, H]): where one token's sum is written when the native call computes it (the
        result is returned either way)."""
        start = time.perf_counter()
        experts = [e for _, e, _ in work]
        if x.shape[0] == 1 and len(set(experts)) == len(experts):
            # Decode: one token, distinct experts. One native call where the family's expert
            # fits it; else its output is w @ Y, one product, where the general path below
            # spends more time scattering rows than computing them.
            weights = [w for _, _, w in work]
            key = (layer, id(experts_module))
            if key not in self._sums:
                self._sums[key] = cpu_kernels.prepare_sum(self.family, experts_module, self.store, layer,
                                                          self.threads)
            call = self._sums[key]
            out = None if call is None else call(x, experts, weights, out)
            if out is None:
                with torch.inference_mode():
                    y = cpu_kernels.expert_outputs(self.family, experts_module, self.store, layer, experts,
                                                   x.expand(len(experts), -1))
                    out = (torch.tensor(weights, dtype=torch.float32) @ y).reshape(1, -1)
            self.spent(time.perf_counter() - start)
            return out
        out = torch.zeros(x.shape, dtype=torch.float32)
        tokens = Counter(e for _, e, _ in work)
        single = [item for item in work if tokens[item[1]] == 1]
        shared = [item for item in work if tokens[item[1]] > 1]
        with torch.inference_mode():
            for items, outputs in ((single, cpu_kernels.expert_outputs), (shared, cpu_kernels.torch_expert_outputs)):
                if not items:
                    continue
                toks = torch.tensor([t for t, _, _ in items], dtype=torch.int64)
                y = outputs(self.family, experts_module, self.store, layer, [e for _, e, _ in items], x[toks])
                out.index_add_(0, toks, y * torch.tensor([w for _, _, w in items], dtype=torch.float32)[:, None])
        self.spent(time.perf_counter() - start)
        return out

    def bind_table_layer(self, experts_module, layer: int, **buffers):
        """cpu_kernels.bind_table_layer for this store's layer `layer`: the CPU's part of a
        run-ahead decode layer as one native call, or None where it does not apply."""
        return cpu_kernels.bind_table_layer(self.family, experts_module, self.store, layer, threads=self.threads,
                                            **buffers)

    def spent(self, seconds: float) -> None:
        """Count `seconds` of expert computation (a bound native layer call counts its own here)."""
        self.seconds += seconds
        if self.telemetry is not None:
            self.telemetry.cpu_expert_seconds += seconds

    def close(self) -> None:
        self._pool.shutdown(wait=True)


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1
