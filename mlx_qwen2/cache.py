"""KV caches the caller owns and passes to the model, one per layer.

Buffers are preallocated and grown in steps, so decoding does not copy the
whole history at every token. This module knows nothing of the model.
"""

from __future__ import annotations

import mlx.core as mx

from .errors import UserError


class KVCache:
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

    def trim(self, n: int) -> int:
        """Forget the last `n` positions (for re-using a cache); returns how many were dropped."""
        n = min(self.offset, n)
        self.offset -= n
        return n

    @property
    def state(self) -> tuple[mx.array, mx.array] | None:
        if self.keys is None:
            return None
        return self.keys[..., : self.offset, :], self.values[..., : self.offset, :]

    @property
    def nbytes(self) -> int:
        return 0 if self.keys is None else self.keys.nbytes + self.values.nbytes


def make_cache(num_layers: int, step: int = 256) -> list[KVCache]:
    """One empty cache per decoder layer."""
    return [KVCache(step) for _ in range(num_layers)]
