"""Every routed expert of the model in host memory, one contiguous block each.

The store is one uint8 buffer [experts, block_bytes] (pinned when the runtime uses
CUDA, so a copy to a GPU slot is one cudaMemcpyAsync at full PCIe speed) filled
expert by expert straight from the checkpoint: host memory peaks at the expert bytes
plus one expert in flight.
"""

from __future__ import annotations

from typing import Callable, Iterable, Mapping

import torch
from tqdm.auto import tqdm

from specmoe.errors import SpecmoeError

from .expert_layout import ExpertLayout

# fill(layer, expert, out) writes one expert's tensors into the views `out`.
ExpertSource = Callable[[int, int, Mapping[str, torch.Tensor]], object]


class HostExpertStore:
    def __init__(self, layout: ExpertLayout, layers: Iterable[int], num_experts: int, *, pin: bool):
        self.layout = layout
        self.layers = tuple(int(l) for l in layers)
        self.num_experts = int(num_experts)
        self._row0 = {l: i * self.num_experts for i, l in enumerate(self.layers)}
        rows = len(self.layers) * self.num_experts
        total = rows * layout.block_bytes
        try:
            self.blocks = torch.empty((rows, layout.block_bytes), dtype=torch.uint8)
        except RuntimeError as err:
            raise SpecmoeError(f"cannot allocate {total / 2**30:.1f} GiB of host memory for the experts: "
                               f"{str(err).splitlines()[0]}") from None
        self._registered = False
        if pin:
            self._pin(total)
        self.pinned = pin
        self._views = layout.views(self.blocks)

    def _pin(self, total: int) -> None:
        # Page-lock the buffer in place: torch's pinned allocator rounds a request up to a
        # power of two, which for tens of GB wastes up to half of it.
        cudart = torch.cuda.cudart()
        err = cudart.cudaHostRegister(self.blocks.data_ptr(), total, 0)
        if int(getattr(err, "value", err)) != 0:
            try:
                self.blocks = self.blocks.pin_memory()
            except RuntimeError as exc:
                raise SpecmoeError(f"cannot pin {total / 2**30:.1f} GiB of host memory for the experts: "
                                   f"{str(exc).splitlines()[0]}") from None
        else:
            self._registered = True

    def __del__(self):
        if getattr(self, "_registered", False):
            try:
                torch.cuda.cudart().cudaHostUnregister(self.blocks.data_ptr())
            except Exception:  # noqa: BLE001 - interpreter shutdown
                pass

    @property
    def nbytes(self) -> int:
        return self.blocks.numel()

    def row(self, layer: int, expert: int) -> int:
        return self._row0[layer] + expert

    def block(self, layer: int, expert: int) -> torch.Tensor:
        """The uint8 block of one expert (what one copy moves)."""
        return self.blocks[self.row(layer, expert)]

    def expert(self, layer: int, expert: int) -> dict[str, torch.Tensor]:
        """Typed views of one expert's tensors."""
        r = self.row(layer, expert)
        return {k: v[r] for k, v in self._views.items()}

    def stacked(self, layer: int) -> dict[str, torch.Tensor]:
        """[E, ...] views of every expert of one layer (what CPU expert compute gathers from)."""
        r = self._row0[layer]
        return {k: v[r:r + self.num_experts] for k, v in self._views.items()}

    def fill(self, source: ExpertSource, desc: str = "experts to host memory", progress: bool = True) -> None:
        """Fill every block from `source`, one expert at a time."""
        with tqdm(total=len(self.layers) * self.num_experts, desc=desc, unit="expert", disable=not progress,
                  leave=False) as bar:
            for l in self.layers:
                for e in range(self.num_experts):
                    source(l, e, self.expert(l, e))
                    bar.update(1)


def device_view(t: torch.Tensor, device: torch.device | None = None) -> torch.Tensor:
    """A CUDA tensor over the same page-locked host memory as `t` (same shape, strides and
    dtype): a kernel that reads it fetches the bytes over PCIe as it goes, with no copy and no
    GPU memory. Raises SpecmoeError where the memory is not mapped for the device, or where
    the CUDA runtime files it under another device than `device`."""
    import ctypes

    from .streams import cudart_function

    get = cudart_function("cudaHostGetDevicePointer", [ctypes.POINTER(ctypes.c_void_p), ctypes.c_void_p,
                                                      ctypes.c_uint])
    ptr = ctypes.c_void_p()
    if get is None or get(ctypes.byref(ptr), t.data_ptr(), 0) != 0 or not ptr.value:
        raise SpecmoeError("the GPU cannot read this host memory in place (not page-locked and mapped); "
                           "use host_read_share 0")
    extent = (t.numel() and sum((n - 1) * st for n, st in zip(t.shape, t.stride()))) + 1
    nbytes = extent * t.element_size()

    class _Interface:   # what torch.as_tensor reads to wrap a CUDA pointer
        __cuda_array_interface__ = {"shape": (nbytes,), "typestr": "|u1", "data": (ptr.value, False),
                                    "version": 3, "strides": None}

    # No device argument: torch places the view where the runtime files the memory, and never
    # copies it (asked for another device, as_tensor would copy the whole store there).
    flat = torch.as_tensor(_Interface())
    want = torch.device(device) if device is not None else None
    if want is not None and flat.device.index != (want.index if want.index is not None
                                                  else torch.cuda.current_device()):
        raise SpecmoeError(f"the host store is mapped for {flat.device}, not {device}: the GPU cannot read it "
                           "in place there; use host_read_share 0")
    return flat.view(t.dtype).as_strided(t.shape, t.stride())
