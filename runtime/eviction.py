"""Which cached expert leaves the GPU when a slot is needed: one small class per policy.

A policy sees every use of a key (layer, expert) and picks a victim among the
candidates the slot table offers (never a slot that a queued computation still
needs: the table filters those out before asking).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Container, Hashable, Iterable

Key = Hashable


class EvictionPolicy:
    name = "base"

    def touched(self, key: Key) -> None:
        """`key` was used (or just arrived)."""

    def forget(self, key: Key) -> None:
        """`key` left the cache."""

    def victim(self, candidates: Iterable[Key]) -> Key | None:
        raise NotImplementedError

    def victim_among(self, resident: Container[Key] | Iterable[Key], protected: Container[Key]) -> Key | None:
        """The victim among resident keys that are not protected."""
        return self.victim(k for k in resident if k not in protected)


class LRU(EvictionPolicy):
    """Least recently used first: experts used by the last tokens stay."""

    name = "lru"

    def __init__(self):
        self._order: OrderedDict[Key, None] = OrderedDict()

    def touched(self, key):
        self._order[key] = None
        self._order.move_to_end(key)

    def forget(self, key):
        self._order.pop(key, None)

    def victim(self, candidates):
        allowed = set(candidates)
        for key in self._order:          # oldest first
            if key in allowed:
                return key
        return next(iter(allowed), None)

    def victim_among(self, resident, protected):
        # Oldest first, stopping at the first key free to go: a slot costs a few steps, not a
        # pass over every resident expert (thousands at large budgets).
        for key in self._order:
            if key in resident and key not in protected:
                return key
        return super().victim_among(resident, protected)


class LFU(EvictionPolicy):
    """Least frequently used first (ties: least recently used): popular experts stay."""

    name = "lfu"

    def __init__(self):
        self._count: dict[Key, int] = {}
        self._clock: dict[Key, int] = {}
        self._now = 0

    def touched(self, key):
        self._now += 1
        self._count[key] = self._count.get(key, 0) + 1
        self._clock[key] = self._now

    def forget(self, key):
        # Counts survive eviction: an expert that comes back keeps its history.
        self._clock.pop(key, None)

    def victim(self, candidates):
        return min(candidates, key=lambda k: (self._count.get(k, 0), self._clock.get(k, 0)), default=None)


POLICIES: dict[str, type[EvictionPolicy]] = {cls.name: cls for cls in (LRU, LFU)}
