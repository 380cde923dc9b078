"""One expert as one contiguous block of bytes.

The host store and the GPU slots hold experts in the same layout: every expert of a
model is a block of `block_bytes` bytes holding its tensors (in the family's
per-expert in-memory layout, `Family.expert_tensors`) one after another, each at an
aligned offset. So one copy moves one expert, and a stack of blocks seen through
`torch.as_strided` is the [slots, ...] tensor the batched MoE block gathers from.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

import torch

from specmoe.errors import SpecmoeError

# Copies and vector loads like aligned starts; 256 bytes also keeps every dtype aligned.
_ALIGN = 256


@dataclass(frozen=True)
class ExpertLayout:
    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    dtype: torch.dtype
    offsets: tuple[int, ...]          # byte offset of each tensor inside a block
    block_bytes: int

    @classmethod
    def from_shapes(cls, shapes: Mapping[str, tuple[int, ...]], dtype: torch.dtype) -> "ExpertLayout":
        item = torch.empty((), dtype=dtype).element_size()
        offsets, at = [], 0
        for shape in shapes.values():
            offsets.append(at)
            at += _round_up(math.prod(shape) * item, _ALIGN)
        if at == 0:
            raise SpecmoeError("an expert layout needs at least one tensor")
        return cls(tuple(shapes), tuple(tuple(int(d) for d in s) for s in shapes.values()), dtype,
                   tuple(offsets), at)

    @property
    def tensor_bytes(self) -> int:
        """Bytes of weights in one expert (without alignment padding)."""
        item = torch.empty((), dtype=self.dtype).element_size()
        return sum(math.prod(s) * item for s in self.shapes)

    def views(self, blocks: torch.Tensor) -> dict[str, torch.Tensor]:
        """Typed [N, *shape] views of N blocks held in a uint8 tensor [N, block_bytes]."""
        if blocks.dtype != torch.uint8 or blocks.dim() != 2 or blocks.shape[1] != self.block_bytes:
            raise ValueError(f"expected uint8 blocks [N, {self.block_bytes}], got {blocks.dtype} {tuple(blocks.shape)}")
        item = torch.empty((), dtype=self.dtype).element_size()
        typed = blocks.view(self.dtype) if blocks.is_contiguous() else None
        if typed is None:
            raise ValueError("expert blocks must be one contiguous buffer")
        per_block = self.block_bytes // item
        out = {}
        for name, shape, offset in zip(self.names, self.shapes, self.offsets):
            strides = [per_block] + _contiguous_strides(shape)
            out[name] = typed.as_strided((blocks.shape[0], *shape), strides, typed.storage_offset() + offset // item)
        return out

    def block_views(self, block: torch.Tensor) -> dict[str, torch.Tensor]:
        """Typed views of one block (a uint8 row [block_bytes])."""
        return {k: v[0] for k, v in self.views(block.reshape(1, -1)).items()}


def _round_up(n: int, to: int) -> int:
    return (n + to - 1) // to * to


def _contiguous_strides(shape: tuple[int, ...]) -> list[int]:
    strides, acc = [], 1
    for d in reversed(shape):
        strides.append(acc)
        acc *= d
    return list(reversed(strides))
