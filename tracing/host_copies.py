"""Device-to-host copies that overlap the GPU's compute.

Each GPU gets one side stream for copies. A copy waits for what the compute
stream has queued so far (so the tensor is complete), runs while the compute
stream goes on with the next batch, and leaves an event to wait for before the
host memory is read.
"""

from __future__ import annotations

import torch

_streams: dict[torch.device, torch.cuda.Stream] = {}


def copy_stream(device: torch.device) -> torch.cuda.Stream:
    if device not in _streams:
        _streams[device] = torch.cuda.Stream(device)
    return _streams[device]


def copy_to_host(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> list[torch.cuda.Event]:
    """dst.copy_(src) for each (dst on the host, src on a GPU), asynchronously; returns the events to wait for.

    dst should be pinned memory, or the copy is synchronous after all."""
    by_device: dict[torch.device, list] = {}
    for dst, src in pairs:
        by_device.setdefault(src.device, []).append((dst, src))
    events = []
    for device, group in by_device.items():
        stream = copy_stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            for dst, src in group:
                dst.copy_(src, non_blocking=True)
                src.record_stream(stream)  # the allocator must not hand src's memory out before the copy ran
            event = torch.cuda.Event(blocking=True)  # waiting threads sleep instead of spinning a core
            event.record(stream)
        events.append(event)
    return events


def pinned_empty(nbytes: int) -> torch.Tensor:
    """A uint8 host buffer, pinned when a GPU is present (falls back to pageable memory)."""
    if torch.cuda.is_available():
        try:
            return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
        except RuntimeError:  # pinned memory is limited on some machines
            pass
    return torch.empty(nbytes, dtype=torch.uint8)


def snapshot_to_host(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[torch.cuda.Event]]:
    """Host copies of `tensors` as they are now; GPU ones arrive asynchronously (wait for the events).

    GPU tensors are cloned on their compute stream first: work queued later may change them."""
    out, pairs = {}, []
    for name, t in tensors.items():
        t = t.detach()
        if t.device.type == "cuda":
            src = t.clone()
            dst = torch.empty(src.shape, dtype=src.dtype, pin_memory=True)
            pairs.append((dst, src))
            out[name] = dst
        else:
            out[name] = t.to("cpu").contiguous().clone()
    return out, (copy_to_host(pairs) if pairs else [])


def wait(events: list[torch.cuda.Event]) -> None:
    for event in events:
        event.synchronize()
