"""A preallocated KV cache the model's own attention modules write into.

The attention modules of every supported family call
`cache.update(key_states, value_states, layer_idx, ...)` and attend over what it
returns. This cache writes the new keys and values at the positions of the current
step (a device tensor, so a decode step has no host-side position bookkeeping) and
returns the whole preallocated length: shapes never change from step to step, which
is what CUDA graphs need. Unwritten positions are hidden by the additive mask built
in `attention_masks`. Tensors are allocated on the first update of each layer, from
the shapes the module hands in (multi-head latent attention has keys and values of
different widths).
"""

from __future__ import annotations

import torch


class StaticKVCache:
    def __init__(self, num_layers: int, max_len: int, device: torch.device, dtype: torch.dtype):
        self.max_len = int(max_len)
        self.device, self.dtype = torch.device(device), dtype
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers
        self.positions = torch.zeros(1, dtype=torch.long, device=self.device)
        self.length = 0  # tokens written so far (host-side, for masks and bounds)

    def set_positions(self, positions: torch.Tensor) -> None:
        self.positions = positions

    def _alloc(self, like: torch.Tensor) -> torch.Tensor:
        b, h, _, d = like.shape
        return torch.zeros((b, h, self.max_len, d), dtype=like.dtype, device=like.device)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        if self.keys[layer_idx] is None:
            self.keys[layer_idx] = self._alloc(key_states)
            self.values[layer_idx] = self._alloc(value_states)
        k, v = self.keys[layer_idx], self.values[layer_idx]
        k.index_copy_(2, self.positions, key_states.to(k.dtype))
        v.index_copy_(2, self.positions, value_states.to(v.dtype))
        return k, v

    # Parts of the Cache interface that attention code may consult.
    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.length

    def get_max_cache_shape(self, layer_idx: int = 0) -> int:
        return self.max_len

    @property
    def is_compileable(self) -> bool:
        return True

    def reset(self) -> None:
        # Old entries stay: every position at or past `length` is masked until rewritten.
        self.length = 0

    def layer(self, layer_idx: int) -> "LayerCache":
        """Layer `layer_idx`'s tensors as a cache of their own (allocated by an earlier update)."""
        if self.keys[layer_idx] is None:
            raise RuntimeError(f"the cache of layer {layer_idx} is not allocated yet")
        return LayerCache(self, self.keys[layer_idx], self.values[layer_idx])


class LayerCache:
    """One layer of a StaticKVCache that ignores the layer index the attention hands in: a
    compiled attention then sees the same code for every layer (an index into the cache's
    list would be a constant, and a compilation, per layer)."""

    is_compileable = True

    def __init__(self, cache: StaticKVCache, keys: torch.Tensor, values: torch.Tensor):
        self.cache, self.k, self.v = cache, keys, values

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int = 0, *args, **kwargs):
        positions = self.cache.positions
        self.k.index_copy_(2, positions, key_states.to(self.k.dtype))
        self.v.index_copy_(2, positions, value_states.to(self.v.dtype))
        return self.k, self.v

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.cache.length

    def get_max_cache_shape(self, layer_idx: int = 0) -> int:
        return self.cache.max_len


def attention_masks(kinds: set[str], positions: torch.Tensor, max_len: int, sliding_window: int | None,
                    dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Additive masks [1, 1, T, max_len] per attention kind ("full", "sliding"): 0 where
    query at `positions[i]` may see key position j, -inf elsewhere (future and unwritten
    positions, and for sliding layers keys at or before positions[i] - window)."""
    j = torch.arange(max_len, device=positions.device)
    q = positions.reshape(-1, 1)
    out = {}
    for kind in kinds:
        visible = j.reshape(1, -1) <= q
        if kind == "sliding" and sliding_window:
            visible = visible & (j.reshape(1, -1) > q - sliding_window)
        mask = torch.zeros(visible.shape, dtype=dtype, device=positions.device)
        out[kind] = mask.masked_fill_(~visible, torch.finfo(dtype).min)[None, None]
    return out
