"""The bounded and the quantized KV caches for a batch of rows: what `--max-kv-size` and `--kv-bits` are
to one sequence (rotating.py, quantized.py), in the batch layout of batch.py (rows left-padded to one
length, aligned on their newest token).

`BatchRotatingKVCache` holds, for every row, the position of each of its columns. A query at position q
sees the keys of its own row at positions p with p <= q and (p < keep or p > q - (max_size - keep)):
the same keys a `RotatingKVCache` gives it. Once the buffer is min(step, max_size / 4) columns past
max_size it is compacted: each row keeps only the columns a later query can see (its kept prefix and
its latest max_size - keep - 1), gathered to the right; so a row never holds more than 1.25 max_size
columns (plus a prefill chunk). A compaction copies about max_size columns, once every
min(step, max_size / 4) tokens: a few columns a token, where attention reads max_size.

`BatchQuantizedKVCache` quantizes each key and value vector as it arrives (the single cache's format),
so a row's numbers do not depend on the rows beside it. Knows nothing of the model.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from ..errors import UserError
from .batch import BatchKVCache
from .quantized import Triple, check_kv_settings, quantize_kv
from .rotating import check_window

_PAD = -(1 << 30)  # the position of a column that holds nothing (no query is ever there)


class BatchRotatingKVCache(BatchKVCache):
    """Keys and values of one layer for B rows, each row its kept prefix and window of recent tokens."""

    def __init__(self, max_size: int, keep: int, left_pad: list[int], step: int = 256):
        check_window(max_size, keep)
        super().__init__(None, None, [0] * len(left_pad), step)
        self.max_size, self.keep = max_size, keep
        self.seen = [-p for p in left_pad]  # each row's next position (a padded row starts below 0)
        self._slack = min(step, max(max_size // 4, 1))  # columns past max_size before a compaction
        self.pos = mx.zeros((len(left_pad), 0), dtype=mx.int32)  # (B, size): each column's position

    @classmethod
    def empty(cls, left_pad: list[int], max_size: int = 0, keep: int = 4) -> BatchRotatingKVCache:
        return cls(max_size, keep, left_pad)

    @classmethod
    def merge(cls, rows: list[BatchRotatingKVCache | None]) -> BatchRotatingKVCache:
        parts = [r for r in rows if r is not None]
        first, length = parts[0], max(r.size for r in parts)
        out = cls(first.max_size, first.keep, [], first.step)
        keys, values, pos = [], [], []
        for r in parts:
            extra = length - r.size
            widths = [(0, 0), (0, 0), (extra, 0), (0, 0)]
            k, v = r.keys[..., : r.size, :], r.values[..., : r.size, :]
            keys.append(mx.pad(k, widths) if extra else k)
            values.append(mx.pad(v, widths) if extra else v)
            pos.append(mx.pad(r.pos, [(0, 0), (extra, 0)], constant_values=_PAD) if extra else r.pos)
            out.seen += r.seen
        out.keys, out.values, out.pos = mx.concatenate(keys), mx.concatenate(values), mx.concatenate(pos)
        out._size, out.left_pad = length, [0] * len(out.seen)
        return out

    @property
    def offset(self) -> mx.array:
        return mx.array(self.seen)

    def make_mask(self, length: int) -> mx.array:
        """(B, 1, L, size + L). A query in the padding sees only itself (a row of nothing would be NaN)."""
        queries = mx.array(self.seen)[:, None] + mx.arange(length)[None]  # (B, L)
        keys = mx.concatenate([self.pos, queries], axis=1)[:, None, :]  # (B, 1, T)
        queries = queries[:, :, None]  # (B, L, 1)
        window = self.max_size - self.keep
        seen = (keys >= 0) & (keys <= queries) & ((keys < self.keep) | (keys > queries - window))
        return (seen | (keys == queries))[:, None]

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        length = keys.shape[2]
        out = super().update_and_fetch(keys, values)
        new = mx.array(self.seen)[:, None] + mx.arange(length)[None]
        self.pos = mx.concatenate([self.pos, new.astype(mx.int32)], axis=1)
        self.seen = [s + length for s in self.seen]
        if self._size >= self.max_size + self._slack:
            self._compact()
        return out

    def _capacity(self, needed: int) -> int:
        return min(super()._capacity(needed), max(needed, self.max_size + self._slack))  # no room past the bound

    def _compact(self) -> None:
        """Keep of each row only what a later query can see, gathered to the right."""
        pos, seen = np.array(self.pos), np.array(self.seen)[:, None]
        window = self.max_size - self.keep
        wanted = (pos >= 0) & ((pos < self.keep) | (pos > seen - window))
        width = int(wanted.sum(axis=1).max())
        index = np.zeros((len(pos), width), dtype=np.int32)
        kept = np.full((len(pos), width), _PAD, dtype=np.int32)
        for b, row in enumerate(wanted):
            cols = np.flatnonzero(row)
            index[b, width - len(cols) :], kept[b, width - len(cols) :] = cols, pos[b, cols]
        gather = mx.array(index)[:, None, :, None]
        self.keys = mx.take_along_axis(self.keys[..., : self._size, :], gather, axis=2)
        self.values = mx.take_along_axis(self.values[..., : self._size, :], gather, axis=2)
        self.pos, self._size = mx.array(kept), width

    def filter(self, rows: list[int], trim: bool = True) -> None:
        self.seen = [self.seen[i] for i in rows]
        self.left_pad = [0] * len(rows)
        index = mx.array(rows)
        self.pos = self.pos[index]
        if self.keys is None:
            return
        self.keys, self.values = self.keys[index], self.values[index]
        if trim and self._size:
            empty = np.array((self.pos < 0).all(axis=0))
            cut = len(empty) if empty.all() else int(np.argmin(empty))  # leading columns no row uses
            if cut:
                self.keys, self.values = self.keys[..., cut:, :], self.values[..., cut:, :]
                self.pos, self._size = self.pos[:, cut:], self._size - cut

    def trim(self, n: int) -> int:
        raise UserError("a bounded (--max-kv-size) batch cache cannot be rewound; decode without speculation.")

    def row(self, i: int):
        raise UserError("rows of a bounded (--max-kv-size) batch cache are not kept in the prefix cache.")


class BatchQuantizedKVCache(BatchKVCache):
    """Keys and values of one layer for B rows, each a (packed, scales, biases) triple, left-padded."""

    def __init__(self, bits: int, group_size: int, left_pad: list[int], step: int = 256):
        check_kv_settings(bits, group_size)
        super().__init__(None, None, left_pad, step)
        self.bits, self.group_size = bits, group_size
        self.keys: Triple | None = None
        self.values: Triple | None = None

    @classmethod
    def empty(cls, left_pad: list[int], bits: int = 8, group_size: int = 64) -> BatchQuantizedKVCache:
        return cls(bits, group_size, left_pad)

    @classmethod
    def from_float(cls, cache: BatchKVCache, bits: int, group_size: int) -> BatchQuantizedKVCache:
        """The same rows quantized (once the batch is past `--quantized-kv-start`)."""
        out = cls(bits, group_size, cache.left_pad, cache.step)
        if cache.keys is not None:
            out.update_and_fetch(*cache.state)
        return out

    @classmethod
    def merge(cls, rows: list[BatchQuantizedKVCache | None]) -> BatchQuantizedKVCache:
        parts = [r for r in rows if r is not None]
        first, length = parts[0], max(r.size for r in parts)
        out = cls(first.bits, first.group_size, [], first.step)
        keys, values = [], []
        for r in parts:
            extra = length - r.size
            keys.append(_left_padded(_used(r.keys, r.size), extra))
            values.append(_left_padded(_used(r.values, r.size), extra))
            out.left_pad += [p + extra for p in r.left_pad]
        out.keys = tuple(mx.concatenate(a) for a in zip(*keys))
        out.values = tuple(mx.concatenate(a) for a in zip(*values))
        out._size = length
        return out

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[Triple, Triple]:
        new_k, new_v = quantize_kv(keys, self.bits, self.group_size), quantize_kv(values, self.bits, self.group_size)
        start, length = self._size, keys.shape[2]
        if self.keys is None:
            self.keys, self.values = _used(new_k, 0), _used(new_v, 0)
        if start + length > self.keys[0].shape[2]:
            room = self._capacity(start + length) - self.keys[0].shape[2]
            self.keys, self.values = _right_padded(self.keys, room), _right_padded(self.values, room)
        self._size = start + length
        for buffers, new in ((self.keys, new_k), (self.values, new_v)):
            for buffer, part in zip(buffers, new):
                buffer[..., start : self._size, :] = part
        return _used(self.keys, self._size), _used(self.values, self._size)

    def filter(self, rows: list[int], trim: bool = True) -> None:
        self.left_pad = [self.left_pad[i] for i in rows]
        if self.keys is None:
            return
        index = mx.array(rows)
        cut = min(self.left_pad) if self.left_pad and trim else 0
        self.keys = tuple(a[index][..., cut:, :] for a in self.keys)
        self.values = tuple(a[index][..., cut:, :] for a in self.values)
        self.left_pad = [p - cut for p in self.left_pad]
        self._size -= cut

    def row(self, i: int):
        raise UserError("rows of a quantized (--kv-bits) batch cache are not kept in the prefix cache.")

    @property
    def state(self) -> list[mx.array]:
        return [*_used(self.keys, self._size), *_used(self.values, self._size)]

    @property
    def nbytes(self) -> int:
        return 0 if self.keys is None else sum(a.nbytes for a in (*self.keys, *self.values))


def _used(triple: Triple, size: int) -> Triple:
    return tuple(a[..., :size, :] for a in triple)


def _left_padded(triple: Triple, extra: int) -> Triple:
    return tuple(mx.pad(a, [(0, 0), (0, 0), (extra, 0), (0, 0)]) for a in triple) if extra else triple


def _right_padded(triple: Triple, room: int) -> Triple:
    return tuple(mx.pad(a, [(0, 0), (0, 0), (0, room), (0, 0)]) for a in triple)
