"""The two queues of work on the device: compute (the current stream) and copies (a
high-priority side stream), with events between them. On the CPU every copy is
synchronous and every event is already complete, so the same runtime code runs there."""

from __future__ import annotations

import ctypes
from pathlib import Path

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
        self._memcpy = _cuda_memcpy_async() if self.cuda else None

    def copy_blocks(self, dst: torch.Tensor, src: torch.Tensor, pairs: list[tuple[int, int]]) -> None:
        """dst[i] = src[j] for each (i, j) in `pairs`, rows of two 2-D uint8 tensors of the same
        row length (src pinned on the host, dst on the device), queued on the copy stream.

        One cudaMemcpyAsync each, called directly: a torch copy_ of a row costs tens of
        microseconds of host time (two views and the dispatch), and a layer's copies sit on
        the host's path between its routing and its experts."""
        if not self._direct():
            with self.copy_context():
                for i, j in pairs:
                    dst[i].copy_(src[j], non_blocking=self.cuda)
            return
        row = dst.shape[1]
        d0, s0, stream = dst.data_ptr(), src.data_ptr(), self.copy.cuda_stream
        for i, j in pairs:
            self._check(self._memcpy(d0 + i * row, s0 + j * row, row, _DEFAULT, stream))

    def copy_on_compute(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        """dst.copy_(src) queued on the compute stream, for small reads and writes between the
        host's pinned buffers and the device: one cudaMemcpyAsync where both are contiguous
        and alike (the runtime's own static buffers), else torch's copy."""
        self._small_copy(dst, src, self.compute)

    def copy_on_current(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        """The same on the stream work is queued on now (a graph's capture stream: the copy
        becomes one of its nodes)."""
        self._small_copy(dst, src, torch.cuda.current_stream(self.device) if self.cuda else None)

    def _small_copy(self, dst: torch.Tensor, src: torch.Tensor, stream) -> None:
        if (not self._direct() or dst.dtype != src.dtype or dst.shape != src.shape
                or not dst.is_contiguous() or not src.is_contiguous()):
            if stream is None:
                dst.copy_(src)
                return
            with torch.cuda.stream(stream):
                dst.copy_(src, non_blocking=True)
            return
        self._check(self._memcpy(dst.data_ptr(), src.data_ptr(), src.numel() * src.element_size(), _DEFAULT,
                                 stream.cuda_stream))

    def _direct(self) -> bool:
        # cudaMemcpyAsync found, and this thread's current device is the streams' own.
        return self._memcpy is not None and self.device.index in (None, torch.cuda.current_device())

    @staticmethod
    def _check(err: int) -> None:
        if err:
            raise RuntimeError(f"cudaMemcpyAsync failed with CUDA error {err}")

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


class HostGate:
    """Work queued on the compute stream that waits for the host: `close()` queues a wait for
    a value in pinned memory, `open()` writes it. The host can queue the next layer's graphs
    while the CPU computes this layer's experts, and the GPU starts them the moment the CPU's
    part is written, with no launch between (cuStreamWaitValue32 of the driver torch loaded).

    Every closed gate must be opened, errors included, or the stream waits forever."""

    _GEQ = 0   # CU_STREAM_WAIT_VALUE_GEQ

    def __init__(self, streams: Streams):
        self.streams = streams
        self._wait = _cu_stream_wait_value32() if streams.cuda else None
        self._flag = None
        self._seq = 0
        if self._wait is not None:
            self._flag = torch.zeros(1, dtype=torch.int32, pin_memory=True)
            self._flag_np = self._flag.numpy()

    @property
    def available(self) -> bool:
        return self._wait is not None

    @property
    def flag(self) -> torch.Tensor:
        """The pinned int32 the gates wait on: writing a sequence number there opens every gate
        up to it (what `open` does; a native caller may write it itself)."""
        return self._flag

    def reserve(self) -> int:
        """The number that will open the next gate, before that gate is queued (a CPU part
        may start on it early: writing it first lets the gate pass when it comes)."""
        if self._seq >= 1 << 30:
            # Every gate queued so far was opened: once the stream drains, counting starts over.
            self.streams.synchronize()
            self._seq = 0
            self._flag_np[0] = 0
        self._seq += 1
        return self._seq

    def close(self, seq: int | None = None) -> int:
        """Queue a wait on the compute stream (for `seq` from reserve(), else a new number);
        returns what opens it."""
        seq = seq or self.reserve()
        err = self._wait(self.streams.compute.cuda_stream, self._flag.data_ptr(), seq, self._GEQ)
        if err:
            raise RuntimeError(f"cuStreamWaitValue32 failed with CUDA error {err}")
        return seq

    def open(self, seq: int) -> None:
        # Stores leave this core in order: what the host wrote before (the CPU's part) is
        # visible to the GPU once it sees the flag.
        self._flag_np[0] = seq

    def run_until(self, done) -> None:
        """Nothing to do: the stream runs what the gates hold by itself (QueuedGate's host
        plays that part)."""


class QueuedGate:
    """HostGate's stand-in off CUDA, where a "replayed" piece runs when it is queued: work
    submitted while a gate is closed waits in a queue, in order, and runs once the flag
    reaches that gate's number (written by `open`, or by a native caller, then `drain`, which
    the thread playing the stream calls).
    With it the CPU test suite runs a run-ahead decode step's host path: the same order of
    pieces, copies and CPU parts a CUDA stream would see."""

    available = True

    def __init__(self):
        self._seq = 0
        self._flag = torch.zeros(1, dtype=torch.int32)
        self._queue: list = []   # ("gate", n) or a callable, in submission order

    @property
    def flag(self) -> torch.Tensor:
        return self._flag

    def reserve(self) -> int:
        self._seq += 1
        return self._seq

    def close(self, seq: int | None = None) -> int:
        seq = seq or self.reserve()
        self._queue.append(("gate", seq))
        self.drain()   # a number opened before its gate was queued: the gate passes, as on a GPU
        return seq

    @property
    def empty(self) -> bool:
        """Whether nothing waits behind a gate."""
        return not self._queue

    def submit(self, fn) -> None:
        """Run `fn` now, or after the gates closed before it have opened."""
        if self._queue:
            self._queue.append(fn)
        else:
            fn()

    def open(self, seq: int) -> None:
        self._flag[0] = max(int(self._flag[0]), seq)
        self.drain()

    def run_until(self, done) -> None:
        """Play the stream: run each piece once the flag (written by another thread) opens its
        gate, until done(), and then what the gates opened by then let through."""
        while not done():
            self.drain()
        self.drain()

    def drain(self) -> None:
        """Run what waits behind gates the flag has opened, up to the first still closed."""
        while self._queue:
            head = self._queue[0]
            if isinstance(head, tuple):
                if head[1] > int(self._flag[0]):
                    return
                self._queue.pop(0)
                continue
            self._queue.pop(0)
            head()


_DEFAULT = 4   # cudaMemcpyDefault: the direction follows from the addresses (unified addressing)


def _cuda_memcpy_async():
    """cudaMemcpyAsync of the CUDA runtime torch has loaded, as a ctypes function; None where
    it cannot be found (then copies go through torch)."""
    return cudart_function("cudaMemcpyAsync",
                           [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_void_p])


def cudart_function(name: str, argtypes: list):
    """A function of the CUDA runtime torch has loaded (found in this process's maps) as a
    ctypes function returning its error code; None where it cannot be found."""
    try:
        maps = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return None
    paths = {line.split()[-1] for line in maps if "libcudart" in line}
    for path in sorted(paths):
        try:
            fn = getattr(ctypes.CDLL(path), name)
        except (OSError, AttributeError):
            continue
        fn.argtypes = argtypes
        fn.restype = ctypes.c_int
        return fn
    return None


def _cu_stream_wait_value32():
    """The driver's cuStreamWaitValue32 as a ctypes function (32-bit waits are always
    supported by the v2 memory-operation API), None where the driver lacks it."""
    try:
        driver = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None
    fn = None
    for name in ("cuStreamWaitValue32_v2", "cuStreamWaitValue32"):
        fn = getattr(driver, name, None)
        if fn is not None:
            break
    if fn is None:
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_uint32, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


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
