"""The decode loop's KV cache: buffers preallocated for the whole image, written in place.

transformers' DynamicCache grows by torch.cat (a copy of the whole cache every step); `PreallocatedCache` allocates
(rows, kv_heads, prefix + every fed token, head_dim) per layer at the prefill, a step writes its keys in place and
attention reads a view of the filled part, or, in static mode (the CUDA graph's fixed shapes), the whole buffers.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer

__all__ = ["PreallocatedCache", "PreallocatedLayer"]


class PreallocatedLayer(DynamicLayer):
    """One layer's KV cache in buffers (rows, kv_heads, capacity, head_dim) allocated at the prefill; `update`
    writes a step's keys in place and returns views of the filled part (what attention reads)."""

    def __init__(self, capacity: int):
        super().__init__()
        self.capacity, self.length = capacity, 0
        self.write_at: torch.Tensor | None = None  # static mode: where a step writes (device int64 (k,))

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        n, h, _, d = key_states.shape
        # zeros, not empty: the fixed-shape step reads the whole buffer, and a masked score is still q.k (+ -inf),
        # which uninitialised memory can make NaN
        self.k_buf = key_states.new_zeros((n, h, self.capacity, d))
        self.v_buf = value_states.new_zeros((n, h, self.capacity, value_states.shape[-1]))
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self.write_at is not None:  # static mode: fixed shapes and no host-side offsets, as a CUDA graph replays
            self.k_buf.index_copy_(2, self.write_at, key_states)
            self.v_buf.index_copy_(2, self.write_at, value_states)
            return self.k_buf, self.v_buf
        end = self.length + key_states.shape[-2]
        if end > self.capacity:
            raise RuntimeError(f"PreallocatedCache: {end} tokens exceed the capacity {self.capacity}")
        self.k_buf[:, :, self.length : end] = key_states
        self.v_buf[:, :, self.length : end] = value_states
        self.length = end
        self.keys, self.values = self.k_buf[:, :, :end], self.v_buf[:, :, :end]
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length

    def select_rows(self, index: torch.Tensor) -> None:
        """Keep rows `index` (n',) of the cache, repeating as the index does: one copy of the filled part."""
        if not self.is_initialized:
            return
        self.k_buf, self.v_buf = self.k_buf[index], self.v_buf[index]
        self.keys, self.values = self.k_buf[:, :, : self.length], self.v_buf[:, :, : self.length]


class PreallocatedCache(Cache):
    """A transformers Cache of `num_layers` PreallocatedLayer of `capacity` tokens (prefix + every fed token)."""

    def __init__(self, num_layers: int, capacity: int):
        super().__init__(layers=[PreallocatedLayer(capacity) for _ in range(num_layers)])

    def select_rows(self, index: torch.Tensor) -> None:
        for layer in self.layers:
            layer.select_rows(index)

    def make_static(self, write_at: torch.Tensor) -> None:
        """From now on every layer writes a step's k tokens at positions `write_at` (int64 (k,), updated in place
        by the caller) and returns its whole buffers; the attention mask must then hide the unwritten positions."""
        for layer in self.layers:
            layer.write_at = write_at
