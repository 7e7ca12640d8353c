"""A KV cache held as 4- or 8-bit affine-quantized keys and values; attention reads it quantized.

Each key and value vector is quantized in groups along head_dim as it arrives (MLX's affine
format: packed uint32, a scale and a bias per group), so the cache takes about bits/16 + 2/group
of a 16-bit one. The model's attention sees `bits` on the cache and computes q @ K^T and
softmax @ V with quantized products. Knows nothing of the model.
"""

from __future__ import annotations

import mlx.core as mx

from ..errors import UserError
from .kv import KVCache, SequentialCache

KV_BITS = (4, 8)
KV_GROUP_SIZES = (32, 64, 128)


def check_kv_settings(bits: int, group_size: int) -> None:
    if bits not in KV_BITS:
        raise UserError(f"--kv-bits {bits} is not supported; choose 4 or 8.")
    if group_size not in KV_GROUP_SIZES:
        raise UserError(f"--kv-group-size {group_size} is not supported; choose 32, 64 or 128.")


def check_kv_group(head_dim: int, group_size: int) -> None:
    if head_dim % group_size:
        raise UserError(f"--kv-group-size {group_size} does not divide the head size {head_dim}; choose one that does.")


Triple = tuple[mx.array, mx.array, mx.array]  # packed, scales, biases


def quantize_kv(x: mx.array, bits: int, group_size: int) -> Triple:
    """Keys or values (..., head_dim) quantized along head_dim in groups (MLX's affine format)."""
    check_kv_group(x.shape[-1], group_size)
    return mx.quantize(x, group_size=group_size, bits=bits)


class QuantizedKVCache(SequentialCache):
    """Keys and values of one layer, quantized: each a (packed, scales, biases) triple, (B, Hkv, T, ...)."""

    def __init__(self, bits: int = 8, group_size: int = 64, step: int = 256):
        check_kv_settings(bits, group_size)
        self.bits, self.group_size, self.step = bits, group_size, step
        self.keys: Triple | None = None
        self.values: Triple | None = None
        self.offset = 0

    @classmethod
    def from_cache(cls, cache: KVCache, bits: int = 8, group_size: int = 64) -> QuantizedKVCache:
        """The same keys and values, quantized (to switch kinds part-way, `--quantized-kv-start`)."""
        out = cls(bits, group_size, cache.step)
        if cache.state:
            keys, values = cache.state
            out.update_and_fetch(keys, values)
        return out

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[Triple, Triple]:
        new_k, new_v = quantize_kv(keys, self.bits, self.group_size), quantize_kv(values, self.bits, self.group_size)
        start, length = self.offset, keys.shape[2]
        if self.keys is None or start + length > self.keys[0].shape[2]:
            self._grow(new_k, new_v, start + length)
        self.offset = start + length
        for buffers, new in ((self.keys, new_k), (self.values, new_v)):
            for buffer, part in zip(buffers, new):
                buffer[..., start : self.offset, :] = part
        return self._used(self.keys), self._used(self.values)

    def _used(self, triple: Triple) -> Triple:
        return tuple(a[..., : self.offset, :] for a in triple)

    def _grow(self, new_k: Triple, new_v: Triple, needed: int) -> None:
        size = -(-needed // self.step) * self.step

        def grown(old: Triple | None, new: Triple) -> Triple:
            out = tuple(mx.zeros((*a.shape[:2], size, a.shape[3]), a.dtype) for a in new)
            if old is not None and self.offset:
                for buffer, a in zip(out, old):
                    buffer[..., : self.offset, :] = a[..., : self.offset, :]
            return out

        self.keys, self.values = grown(self.keys, new_k), grown(self.values, new_v)

    def restore(self, *arrays: mx.array) -> None:
        """Hold these quantized keys and values: what `state` returned (packed, scales, biases of each)."""
        self.keys, self.values, self.offset = tuple(arrays[:3]), tuple(arrays[3:]), arrays[0].shape[2]

    @property
    def state(self) -> list[mx.array]:
        if self.keys is None:
            return []
        return [*self._used(self.keys), *self._used(self.values)]

    @property
    def nbytes(self) -> int:
        return 0 if self.keys is None else sum(a.nbytes for a in (*self.keys, *self.values))
