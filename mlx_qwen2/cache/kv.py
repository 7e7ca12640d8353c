"""The plain KV cache: keys and values of one attention layer in buffers grown in steps.

Buffers are preallocated and grown a step at a time, so decoding does not copy the whole
history at every token. Knows nothing of the model.
"""

from __future__ import annotations

import mlx.core as mx

from ..errors import UserError


class SequentialCache:
    """What the caches that hold every position seen, in order, share (plain and quantized)."""

    offset: int

    def make_mask(self, length: int) -> str | None:
        """One new token attends to everything cached: no mask. More: "causal" (the last query sees the last key)."""
        return "causal" if length > 1 else None

    def trim(self, n: int) -> int:
        """Forget the last `n` positions (for re-using a cache); returns how many were dropped."""
        n = min(self.offset, n)
        self.offset -= n
        return n

    @property
    def size(self) -> int:
        """Positions held (for these kinds, all positions seen)."""
        return self.offset


class KVCache(SequentialCache):
    """Keys and values of one attention layer, (B, n_kv_heads, length, head_dim)."""

    def __init__(self, step: int = 256):
        if step < 1:
            raise UserError("step must be at least 1")
        self.step = step
        self.keys: mx.array | None = None
        self.values: mx.array | None = None
        self.offset = 0

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        """Append (B, Hkv, L, D) keys/values; return everything cached so far."""
        start, length = self.offset, keys.shape[2]
        if self.keys is None or start + length > self.keys.shape[2]:
            self._grow(keys, values, start + length)
        self.offset = start + length
        self.keys[..., start : self.offset, :] = keys
        self.values[..., start : self.offset, :] = values
        return self.keys[..., : self.offset, :], self.values[..., : self.offset, :]

    def _grow(self, keys: mx.array, values: mx.array, needed: int) -> None:
        B, n_kv, _, k_dim = keys.shape
        size = -(-needed // self.step) * self.step  # round up to a whole step
        new_k = mx.zeros((B, n_kv, size, k_dim), keys.dtype)
        new_v = mx.zeros((B, n_kv, size, values.shape[3]), values.dtype)
        if self.keys is not None and self.offset:
            new_k[..., : self.offset, :] = self.keys[..., : self.offset, :]
            new_v[..., : self.offset, :] = self.values[..., : self.offset, :]
        self.keys, self.values = new_k, new_v

    @property
    def state(self) -> list[mx.array]:
        """The cached keys and values, (B, Hkv, offset, D) each; empty before the first update."""
        if self.keys is None:
            return []
        return [self.keys[..., : self.offset, :], self.values[..., : self.offset, :]]

    def restore(self, keys: mx.array, values: mx.array) -> None:
        """Set the cache to hold these keys and values (what `state` returned, or a copy of it)."""
        self.keys, self.values, self.offset = keys, values, keys.shape[2]

    @property
    def nbytes(self) -> int:
        """Bytes of the buffers (allocated, not only used)."""
        return 0 if self.keys is None else self.keys.nbytes + self.values.nbytes


def make_cache(num_layers: int, step: int = 256) -> list[KVCache]:
    """One empty cache per decoder layer."""
    return [KVCache(step) for _ in range(num_layers)]
