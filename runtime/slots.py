"""GPU expert slots: a byte budget of expert blocks, a cache over them, and the
ordering rules that keep copies and computations from trampling each other.

Slots are one uint8 buffer [S, block_bytes] on the device; `stack` holds its typed
[S, ...] views, which the batched MoE block gathers from. The table maps
(layer, expert) -> slot. Two events per slot enforce the ordering on the GPU
without ever blocking the host:

- `ready`: recorded on the copy stream after the copy into the slot; the compute
  stream waits for it before the first computation that reads the slot.
- `released`: recorded on the compute stream after the last computation that read
  the slot; the copy stream waits for it before it overwrites the slot.

A slot whose key is protected (needed by the layer being computed or by a copy
already queued for a coming layer) is never chosen for eviction.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from specmoe.errors import SpecmoeError

from .eviction import POLICIES, EvictionPolicy
from .expert_layout import ExpertLayout

Key = tuple[int, int]  # (decoder layer, expert)


@dataclass
class _Slot:
    key: Key | None = None
    ready: object | None = None        # torch.cuda.Event on the copy stream, None when nothing pending
    released: object | None = None     # torch.cuda.Event on the compute stream


class ExpertSlots:
    def __init__(self, layout: ExpertLayout, num_slots: int, device: torch.device, policy: str = "lru"):
        if num_slots < 1:
            raise SpecmoeError("the GPU expert budget holds no expert slot")
        if policy not in POLICIES:
            raise SpecmoeError(f"unknown eviction policy {policy!r}; choose one of {', '.join(POLICIES)}")
        self.layout = layout
        self.device = torch.device(device)
        self.num_slots = int(num_slots)
        # One extra block stays zero forever: routed entries that the GPU must not compute
        # (computed on the CPU instead) point there with weight 0, and never read a slot a copy
        # may be writing.
        self.buffer = torch.zeros((self.num_slots + 1, layout.block_bytes), dtype=torch.uint8, device=self.device)
        self.stack = layout.views(self.buffer)
        self.zero_slot = self.num_slots
        self.policy: EvictionPolicy = POLICIES[policy]()
        self._slots = [_Slot() for _ in range(self.num_slots)]
        self._where: dict[Key, int] = {}
        self._free = list(range(self.num_slots - 1, -1, -1))
        self.on_evict = None   # called with (key, slot) when a key gives its slot away

    @property
    def nbytes(self) -> int:
        return self.buffer.numel()

    @property
    def resident(self) -> int:
        return len(self._where)

    def __contains__(self, key: Key) -> bool:
        return key in self._where

    def lookup(self, key: Key) -> int | None:
        return self._where.get(key)

    def touch(self, key: Key) -> None:
        self.policy.touched(key)

    def cached_keys(self) -> list[Key]:
        return list(self._where)

    def reserve(self, key: Key, protected: set[Key]) -> int | None:
        """A slot for `key` (not yet resident): a free one, or the policy's victim among
        unprotected keys. None when every slot is protected."""
        if key in self._where:
            raise ValueError(f"{key} is already resident")
        if self._free:
            slot = self._free.pop()
        else:
            victim = self.policy.victim_among(self._where, protected)
            if victim is None:
                return None
            slot = self._where.pop(victim)
            self.policy.forget(victim)
            if self.on_evict is not None:
                self.on_evict(victim, slot)
        self._slots[slot].key = key
        self._where[key] = slot
        self.policy.touched(key)
        return slot

    def drop(self, key: Key) -> None:
        """Forget `key` (e.g. a copy that could not be made)."""
        slot = self._where.pop(key, None)
        if slot is not None:
            self._slots[slot].key = None
            self._free.append(slot)
            self.policy.forget(key)

    # -------------------------------------------------------------- ordering

    def set_ready(self, slot: int, event) -> None:
        self._slots[slot].ready = event

    def pending_ready(self, slot: int):
        """The copy event the compute stream must wait for before reading `slot` (once)."""
        s = self._slots[slot]
        event, s.ready = s.ready, None
        return event

    def set_released(self, slot: int, event) -> None:
        self._slots[slot].released = event

    def released(self, slot: int):
        return self._slots[slot].released
