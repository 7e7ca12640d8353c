"""A KV cache for a batch of sequences of different lengths: rows left-padded to one length, masked.

Row b's first `left_pad[b]` positions are padding: its RoPE positions are (index - left_pad[b]) and
no query attends to them. Rows join (from their own single-sequence caches) and leave (filtered
out) between decode steps; the engine does that, this module only keeps the arrays right.
Knows nothing of the model.
"""

from __future__ import annotations

import mlx.core as mx

from .kv import KVCache


class BatchKVCache:
    """Keys and values of one layer for B rows, (B, Hkv, T, D), with per-row left padding."""

    def __init__(self, keys: mx.array | None, values: mx.array | None, left_pad: list[int], step: int = 256):
        self.step = step
        self._size = 0 if keys is None else keys.shape[2]
        self.keys, self.values = keys, values
        self.left_pad = list(left_pad)

    @classmethod
    def empty(cls, left_pad: list[int]) -> BatchKVCache:
        """A cache for rows that will be prefilled together, row b's first `left_pad[b]` columns padding."""
        return cls(None, None, left_pad)

    @classmethod
    def merge(cls, rows: list[KVCache | BatchKVCache | None]) -> BatchKVCache:
        """One batch cache from caches of single sequences or batches (None: no row), left-padding the shorter."""
        parts = [(r.keys[..., : r.size, :], r.values[..., : r.size, :], _pads(r)) for r in rows if r is not None]
        length = max(k.shape[2] for k, _, _ in parts)
        keys, values, pads = [], [], []
        for k, v, pad in parts:
            extra = length - k.shape[2]
            widths = [(0, 0), (0, 0), (extra, 0), (0, 0)]
            keys.append(mx.pad(k, widths) if extra else k)
            values.append(mx.pad(v, widths) if extra else v)
            pads += [p + extra for p in pad]
        return cls(mx.concatenate(keys), mx.concatenate(values), pads)

    @property
    def size(self) -> int:
        return self._size

    @property
    def offset(self) -> mx.array:
        """Each row's next position, (B,)."""
        return self._size - mx.array(self.left_pad)

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        start, length = self._size, keys.shape[2]
        if self.keys is None:
            self.keys, self.values = keys[..., :0, :], values[..., :0, :]
        if start + length > self.keys.shape[2]:
            room = self._capacity(start + length) - self.keys.shape[2]
            widths = [(0, 0), (0, 0), (0, room), (0, 0)]
            self.keys, self.values = mx.pad(self.keys, widths), mx.pad(self.values, widths)
        self._size = start + length
        self.keys[..., start : self._size, :] = keys
        self.values[..., start : self._size, :] = values
        return self.keys[..., : self._size, :], self.values[..., : self._size, :]

    def _capacity(self, needed: int) -> int:
        """Columns to allocate when `needed` no longer fit: whole steps, so growing is rare."""
        return -(-needed // self.step) * self.step

    def trim(self, n: int) -> int:
        """Forget the last `n` columns of every row (proposals refused in speculative decoding)."""
        n = min(n, self._size - max(self.left_pad, default=0))
        self._size -= n
        return n

    def make_mask(self, length: int) -> mx.array | str | None:
        """(B, 1, L, T): row b's query i sees keys from its first real position up to its own.

        A query in the padding sees only itself: a row of the mask with nothing allowed would make
        softmax NaN there, and the NaN would reach real rows through the padded values (0 x NaN).
        With no padding in any row (a batch of one, always, once it decodes) the mask is a single
        sequence's: none for one new token, "causal" for more, which attention computes without a
        mask array (about 2% of a decode step of one on the CPU).
        """
        if not any(self.left_pad):
            return KVCache.make_mask(self, length)  # type: ignore[arg-type]
        total = self._size + length
        keys = mx.arange(total)[None, None, None, :]  # (1, 1, 1, T)
        queries = mx.arange(self._size, total)[None, None, :, None]  # (1, 1, L, 1)
        first = mx.array(self.left_pad)[:, None, None, None]  # (B, 1, 1, 1)
        return (keys <= queries) & ((keys >= first) | (keys == queries))

    def filter(self, rows: list[int], trim: bool = True) -> None:
        """Keep only these rows (in this order); with `trim`, drop padding columns no row needs any more
        (not while a prefill still feeds columns of its own)."""
        self.left_pad = [self.left_pad[i] for i in rows]
        if self.keys is None:
            return
        index = mx.array(rows)
        self.keys, self.values = self.keys[index], self.values[index]
        cut = min(self.left_pad) if self.left_pad and trim else 0
        if cut:
            self.keys, self.values = self.keys[..., cut:, :], self.values[..., cut:, :]
            self.left_pad = [p - cut for p in self.left_pad]
            self._size -= cut

    def row(self, i: int) -> KVCache:
        """Row i as a single-sequence cache (its padding removed)."""
        out = KVCache(self.step)
        pad = self.left_pad[i]
        out.restore(self.keys[i : i + 1, :, pad : self._size, :], self.values[i : i + 1, :, pad : self._size, :])
        return out

    @property
    def state(self) -> list[mx.array]:
        return [self.keys[..., : self._size, :], self.values[..., : self._size, :]]

    @property
    def nbytes(self) -> int:
        return 0 if self.keys is None else self.keys.nbytes + self.values.nbytes


def _pads(cache: KVCache | BatchKVCache) -> list[int]:
    return list(cache.left_pad) if isinstance(cache, BatchKVCache) else [0] * cache.keys.shape[0]
