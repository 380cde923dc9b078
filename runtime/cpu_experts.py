"""Experts computed by the host CPU from the host store, while the GPU computes the rest.

At batch 1 an expert is a matrix-vector product over weights that already sit in
host memory: reading them there is cheaper than copying them over PCIe and reading
them again on the GPU. The work runs on one worker thread (torch releases the GIL
inside its kernels, so the main thread keeps launching GPU work meanwhile) with the
experts read in place from the store's blocks: no gather, no copy.
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from .host_store import HostExpertStore


class CpuExperts:
    def __init__(self, family, store: HostExpertStore, threads: int | None = None):
        self.family = family
        self.store = store
        if threads:
            torch.set_num_threads(int(threads))
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="specmoe-cpu-experts")
        self.seconds = 0.0

    def submit(self, experts_module, layer: int, x: torch.Tensor, work: list[tuple[int, int, float]]) -> Future:
        """sum over (token, expert, weight) in `work` of weight * Expert_{layer,expert}(x[token]),
        as float32 [T, H] on the CPU. `x` is a host tensor in the store's dtype."""
        return self._pool.submit(self._run, experts_module, layer, x, work)

    def _run(self, experts_module, layer, x, work):
        start = time.perf_counter()
        out = torch.zeros(x.shape, dtype=torch.float32)
        by_expert: dict[int, list[tuple[int, float]]] = {}
        for tok, e, w in work:
            by_expert.setdefault(e, []).append((tok, w))
        with torch.inference_mode():
            for e, rows in by_expert.items():
                toks = [t for t, _ in rows]
                y = self.family.apply_expert(experts_module, self.store.expert(layer, e), x[toks])
                out[toks] += y.float() * torch.tensor([w for _, w in rows], dtype=torch.float32).unsqueeze(1)
        self.seconds += time.perf_counter() - start
        return out

    def close(self) -> None:
        self._pool.shutdown(wait=True)
