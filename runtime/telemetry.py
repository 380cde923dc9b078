"""What a run cost and where the time went: counted on the way, reported as a table and JSON.

Counters that depend on GPU values (prefetch hits) accumulate on the device and are
read once at the end, so measuring never adds a host synchronisation to a step.
"""

from __future__ import annotations

import json
import resource
import statistics
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch


def host_peak_bytes() -> int:
    # ru_maxrss is in KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@dataclass
class Telemetry:
    moe_layers: tuple[int, ...]
    device: torch.device
    track_hits: bool = True
    step_seconds: list[float] = field(default_factory=list)
    prefill_seconds: float = 0.0
    prompt_tokens: int = 0
    bytes_copied: int = 0
    prefetched: int = 0
    prefetch_dropped: int = 0
    demand_copies: int = 0
    cpu_wait_seconds: float = 0.0
    cpu_expert_seconds: float = 0.0
    routing_wait_seconds: float = 0.0     # host waiting for a layer's routing to land (run-ahead `cpu`)
    cpu_experts: int = 0                  # (token, expert) products computed by the CPU
    host_read_experts: int = 0            # ... computed by the GPU reading weights in host memory
    uses: dict[int, int] = field(default_factory=dict)
    cache_hits: dict[int, int] = field(default_factory=dict)
    # Per queued step (monotonic ns): its start, its first CPU part's start, its last part's
    # end, when the host had queued the whole step, when it had seen the last part end, and
    # when it had counted its layers.
    queued_steps: list[tuple[int, int, int, int, int, int]] = field(default_factory=list)

    def __post_init__(self):
        n = len(self.moe_layers)
        self._index = {l: i for i, l in enumerate(self.moe_layers)}
        self._pred_hits = torch.zeros(n, dtype=torch.long, device=self.device)
        self._pred_total = [0] * n
        self._pred_exact = torch.zeros(n, dtype=torch.long, device=self.device)
        self._pred_tokens = [0] * n
        self._host_hits = [0] * n       # hits counted where the host holds both sides already
        self._host_exact = [0] * n
        self._decode_bytes_start = 0
        self._decode_cpu_start = 0
        self._decode_reads_start = 0
        self._waits: list = []

    def reset_counters(self) -> None:
        """Forget everything counted so far (e.g. after warm-up). Device counters are zeroed
        in place: captured CUDA graphs keep adding into the same tensor."""
        hits, exact = self._pred_hits, self._pred_exact
        fresh = Telemetry(self.moe_layers, self.device, self.track_hits)
        self.__dict__.update(fresh.__dict__)
        self._pred_hits, self._pred_exact = hits, exact
        self.zero_device_counters()

    def zero_device_counters(self) -> None:
        self._pred_hits.zero_()
        self._pred_exact.zero_()

    def save_device_counters(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self._pred_hits.clone(), self._pred_exact.clone()

    def restore_device_counters(self, hits: torch.Tensor, exact: torch.Tensor) -> None:
        """Put back counts saved earlier, in place (captured graphs keep adding into these tensors)."""
        self._pred_hits.copy_(hits)
        self._pred_exact.copy_(exact)

    def count_use(self, layer: int, hit: bool) -> None:
        self.count_uses(layer, 1, int(hit))

    def count_uses(self, layer: int, uses: int, hits: int) -> None:
        self.uses[layer] = self.uses.get(layer, 0) + uses
        if hits:
            self.cache_hits[layer] = self.cache_hits.get(layer, 0) + hits

    def prefetch_hits_device(self, layer: int, predicted: torch.Tensor, true: torch.Tensor,
                             count: bool = True, add=None) -> None:
        """recall@k of the prediction for `layer`, accumulated without a host sync (inside a
        CUDA graph too; then count=False and the host counts with `count_predicted`). `add`:
        the function that adds into the counters (add_hits, or its compiled form)."""
        i = self._index[layer]
        (add or add_hits)(predicted, true, self._pred_hits[i:i + 1], self._pred_exact[i:i + 1])
        if count:
            t = true.reshape(-1, true.shape[-1])
            self._pred_total[i] += t.numel()
            self._pred_tokens[i] += t.shape[0]

    def copy_wait(self, before, after) -> None:
        if before is not None:
            self._waits.append((before, after))

    def copy_wait_seconds(self) -> float:
        total = 0.0
        for before, after in self._waits:
            after.synchronize()
            total += before.elapsed_time(after) / 1e3
        return total

    def count_hits_host(self, layer: int, predicted, true) -> None:
        """recall@k of one token's prediction when the host already holds both id lists."""
        i = self._index[layer]
        found = len(set(predicted) & set(true))
        self._host_hits[i] += found
        self._host_exact[i] += int(found == len(true))
        self._pred_total[i] += len(true)
        self._pred_tokens[i] += 1

    def count_predicted(self, layer: int, n: int, tokens: int = 1) -> None:
        self._pred_total[self._index[layer]] += n
        self._pred_tokens[self._index[layer]] += tokens

    def mark_decode_start(self) -> None:
        self._decode_bytes_start = self.bytes_copied
        self._decode_cpu_start = self.cpu_experts
        self._decode_reads_start = self.host_read_experts

    # -------------------------------------------------------------- report

    def count_queued_step(self, begin: int, first_part: int, last_part: int, queued: int, seen: int,
                          end: int) -> None:
        self.queued_steps.append((begin, first_part, last_part, queued, seen, end))

    def queued_step_us(self) -> dict | None:
        """Medians over queued steps, in microseconds: from the step's start to its first CPU
        part, from there to the end of its last part, from there until the host had counted
        every layer; and after the last part's end (negative: before it), when the host had
        queued the step's last graph and when it saw the last part end."""
        if not self.queued_steps:
            return None
        spans = [(a - b, c - a, e - c, q - c, w - c) for b, a, c, q, w, e in self.queued_steps]
        names = ("to_first_part", "through_last_part", "after_last_part", "queued_after_last_part",
                 "seen_after_last_part")
        return {name: statistics.median(v[i] for v in spans) / 1e3 for i, name in enumerate(names)}

    def summary(self) -> dict:
        hits = [a + b for a, b in zip(self._pred_hits.tolist(), self._host_hits)]
        exact = [a + b for a, b in zip(self._pred_exact.tolist(), self._host_exact)]
        per_layer = {}
        for l, i in self._index.items():
            per_layer[str(l)] = {
                "prefetch_hit_rate": hits[i] / self._pred_total[i] if self._pred_total[i] else None,
                "exact_set_rate": exact[i] / self._pred_tokens[i] if self._pred_tokens[i] else None,
                "cache_hit_rate": self.cache_hits.get(l, 0) / self.uses[l] if self.uses.get(l) else None,
            }
        rates = [v["prefetch_hit_rate"] for v in per_layer.values() if v["prefetch_hit_rate"] is not None]
        exact_rates = [v["exact_set_rate"] for v in per_layer.values() if v["exact_set_rate"] is not None]
        uses = sum(self.uses.values())
        steps = self.step_seconds
        decode_tokens = len(steps)
        out = {
            "prompt_tokens": self.prompt_tokens,
            "decoded_tokens": decode_tokens,
            "prefill_seconds": self.prefill_seconds,
            "ms_per_token_median": 1e3 * statistics.median(steps) if steps else None,
            "ms_per_token_p90": 1e3 * float(np.percentile(steps, 90)) if steps else None,
            "tokens_per_second": decode_tokens / sum(steps) if steps else None,
            "prefetch_hit_rate": sum(rates) / len(rates) if rates else None,
            "exact_set_rate": sum(exact_rates) / len(exact_rates) if exact_rates else None,
            "cache_hit_rate": sum(self.cache_hits.values()) / uses if uses else None,
            "bytes_copied": self.bytes_copied,
            "bytes_copied_per_token": ((self.bytes_copied - self._decode_bytes_start) / decode_tokens
                                       if decode_tokens else None),
            "cpu_experts_per_token": ((self.cpu_experts - self._decode_cpu_start) / decode_tokens
                                      if decode_tokens else None),
            "host_read_experts_per_token": ((self.host_read_experts - self._decode_reads_start) / decode_tokens
                                            if decode_tokens else None),
            "experts_prefetched": self.prefetched,
            "prefetches_dropped": self.prefetch_dropped,
            "demand_copies": self.demand_copies,
            "cpu_expert_seconds": self.cpu_expert_seconds,
            "cpu_wait_seconds": self.cpu_wait_seconds,
            "routing_wait_seconds": self.routing_wait_seconds,
            "gpu_copy_wait_seconds": self.copy_wait_seconds(),
            "queued_step_us": self.queued_step_us(),
            "peak_gpu_bytes": (torch.cuda.max_memory_allocated(self.device) if self.device.type == "cuda" else None),
            "peak_host_bytes": host_peak_bytes(),
            "per_layer": per_layer,
        }
        return out


def add_hits(predicted: torch.Tensor, true: torch.Tensor, hits: torch.Tensor, exact: torch.Tensor) -> None:
    """hits += predicted ids found among the true ones, exact += tokens predicted whole."""
    p, t = predicted.reshape(-1, predicted.shape[-1]), true.reshape(-1, true.shape[-1])
    found = (p.unsqueeze(-1) == t.to(p.device).unsqueeze(-2)).any(-1)
    # .to() is a no-op on one device; with layers on several devices the counters live on one
    hits += found.sum().to(hits.device)
    exact += found.all(-1).sum().to(exact.device)


def format_summary(s: dict) -> str:
    def num(v, fmt):
        return "-" if v is None else format(v, fmt)

    engine = s.get("engine") or {}
    rows = []
    if engine.get("on_miss"):
        mode = f"{engine.get('prefetch')}+{engine['on_miss']}"
        rows.append(("mode", mode + (f" (auto: {engine['on_miss_auto']})" if engine.get("on_miss_auto") else "")))
    rows += [
        ("prompt tokens", num(s["prompt_tokens"], ",")),
        ("decoded tokens", num(s["decoded_tokens"], ",")),
        ("prefill", num(s["prefill_seconds"] * 1e3 if s["prefill_seconds"] else None, ".1f") + " ms"),
        ("time per token, median", num(s["ms_per_token_median"], ".2f") + " ms"),
        ("time per token, p90", num(s["ms_per_token_p90"], ".2f") + " ms"),
        ("prefetch hit rate", num(s["prefetch_hit_rate"], ".3f")),
        ("cache hit rate", num(s["cache_hit_rate"], ".3f")),
        ("copied per decoded token", num((s["bytes_copied_per_token"] or 0) / 2**20 if s["decoded_tokens"] else None,
                                         ".2f") + " MiB"),
        ("GPU waiting for copies", num(s["gpu_copy_wait_seconds"], ".3f") + " s"),
        ("CPU experts per decoded token", num(s["cpu_experts_per_token"], ".2f")),
        ("CPU expert time", num(s["cpu_expert_seconds"], ".3f") + " s"),
        ("CPU waiting for routing", num(s.get("routing_wait_seconds"), ".3f") + " s"),
        ("experts read from host memory by the GPU per token", num(s["host_read_experts_per_token"], ".2f")),
        ("peak GPU memory", num(s["peak_gpu_bytes"] / 2**30 if s["peak_gpu_bytes"] else None, ".2f") + " GiB"),
        ("peak host memory", num(s["peak_host_bytes"] / 2**30, ".2f") + " GiB"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def write_json(path: Path, obj: dict) -> None:
    from specmoe.safetensors_stream import write_text

    write_text(Path(path), json.dumps(obj, indent=2) + "\n", fsync=False)
