"""The two queues of work on the device: compute (the current stream) and copies (a
high-priority side stream), with events between them. On the CPU every copy is
synchronous and every event is already complete, so the same runtime code runs there."""

from __future__ import annotations

import torch


class Streams:
    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        if self.cuda:
            self.compute = torch.cuda.current_stream(self.device)
            # Highest priority: a copy that a layer waits for should not queue behind compute.
            low, high = torch.cuda.Stream.priority_range()
            self.copy = torch.cuda.Stream(self.device, priority=high)
        else:
            self.compute = self.copy = None

    def _record(self, stream, timing: bool = False):
        if not self.cuda:
            return None
        ev = torch.cuda.Event(enable_timing=timing)
        ev.record(stream)
        return ev

    def record_on_copy(self):
        return self._record(self.copy)

    def record_on_compute(self):
        return self._record(self.compute)

    def timed_event_on_compute(self):
        return self._record(self.compute, timing=True)

    def host_event(self):
        """An event after the work queued so far on the compute stream, for the host to wait
        on (`.synchronize()`); off CUDA, one that is already complete."""
        return self.record_on_compute() if self.cuda else _DONE

    def copy_waits(self, event) -> None:
        if event is not None and self.cuda:
            self.copy.wait_event(event)

    def compute_waits(self, event) -> None:
        if event is not None and self.cuda:
            self.compute.wait_event(event)

    def copy_context(self):
        return torch.cuda.stream(self.copy) if self.cuda else _Null()

    def synchronize(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)


class _Null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class _Done:
    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True


_DONE = _Done()
