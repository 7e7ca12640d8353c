"""A KV cache of bounded size: the first `keep` tokens and the most recent `max_size - keep`.

Every query attends to the kept prefix (the "attention sink") and to the window of recent
tokens ending at itself, `max_size` keys in all; older keys are dropped. One token at a time
the buffer is a ring (order does not matter when nothing is masked); a chunk of several tokens
puts it back in temporal order and masks each query to its own window, so a chunked prefill
gives what one pass with that mask gives. Knows nothing of the model.
"""

from __future__ import annotations

import mlx.core as mx

from ..errors import UserError


def check_window(max_size: int, keep: int) -> None:
    if keep < 0 or max_size <= keep:
        raise UserError(f"--max-kv-size {max_size} must be larger than the kept prefix ({keep} tokens); raise it.")


class RotatingKVCache:
    """Keys and values of one layer, at most `max_size` positions, (B, Hkv, <= max_size, D)."""

    def __init__(self, max_size: int, keep: int = 4, step: int = 256):
        check_window(max_size, keep)
        self.max_size, self.keep, self.step = max_size, keep, step
        self.keys: mx.array | None = None
        self.values: mx.array | None = None
        self.offset = 0  # positions seen
        self._size = 0  # positions held
        self._next = 0  # where the next single token goes

    @property
    def size(self) -> int:
        return self._size

    def _positions(self) -> mx.array:
        """Absolute positions of the keys held, in temporal order."""
        if self.offset <= self.max_size:
            return mx.arange(self._size)
        recent = self._size - self.keep
        return mx.concatenate([mx.arange(self.keep), mx.arange(self.offset - recent, self.offset)])

    def make_mask(self, length: int) -> mx.array | str | None:
        if length == 1:
            return None  # the held keys are exactly the new token's window, once it is written
        queries = mx.arange(self.offset, self.offset + length)[:, None]  # (L, 1)
        keys = mx.concatenate([self._positions(), mx.arange(self.offset, self.offset + length)])[None]  # (1, S + L)
        recent = self.max_size - self.keep
        return (keys <= queries) & ((keys < self.keep) | (keys > queries - recent))  # (L, S + L)

    def _temporal(self) -> tuple[mx.array, mx.array]:
        """The held keys and values, oldest first (undoing the ring)."""
        k, v = self.keys[..., : self._size, :], self.values[..., : self._size, :]
        if self._size == self.max_size and self._next != self.keep:
            order = [slice(0, self.keep), slice(self._next, self.max_size), slice(self.keep, self._next)]
            k = mx.concatenate([k[..., s, :] for s in order], axis=2)
            v = mx.concatenate([v[..., s, :] for s in order], axis=2)
        return k, v

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        length = keys.shape[2]
        if length == 1 and self._size == self.max_size:  # full: overwrite the oldest recent token
            self.keys[..., self._next : self._next + 1, :] = keys
            self.values[..., self._next : self._next + 1, :] = values
            self._next = self.keep + (self._next + 1 - self.keep) % (self.max_size - self.keep)
            self.offset += 1
            return self.keys, self.values
        if length == 1 and self.keys is not None and self._size < self.keys.shape[2]:  # room in the buffer
            self.keys[..., self._size : self._size + 1, :] = keys
            self.values[..., self._size : self._size + 1, :] = values
            self._size, self.offset = self._size + 1, self.offset + 1
            self._next = self._size if self._size < self.max_size else self.keep
            return self.keys[..., : self._size, :], self.values[..., : self._size, :]
        k, v = self._temporal() if self.keys is not None else (keys[..., :0, :], values[..., :0, :])
        k, v = mx.concatenate([k, keys], axis=2), mx.concatenate([v, values], axis=2)  # what these queries see
        self.offset += length
        self._store(k, v)
        return k, v

    def _store(self, k: mx.array, v: mx.array) -> None:
        """Hold the kept prefix and the most recent keys of (temporal) k, v, with room to grow."""
        if k.shape[2] > self.max_size:
            recent = self.max_size - self.keep
            k = mx.concatenate([k[..., : self.keep, :], k[..., -recent:, :]], axis=2)
            v = mx.concatenate([v[..., : self.keep, :], v[..., -recent:, :]], axis=2)
        self._size = k.shape[2]
        room = min(self.max_size, -(-(self._size + 1) // self.step) * self.step) - self._size
        if room > 0:
            pad = [(0, 0), (0, 0), (0, room), (0, 0)]
            k, v = mx.pad(k, pad), mx.pad(v, pad)
        self.keys, self.values = k, v
        self._next = self._size if self._size < self.max_size else self.keep

    def restore(self, keys: mx.array, values: mx.array, offset: int) -> None:
        """Hold these keys and values (temporal order, what `state` returned) after `offset` positions seen."""
        self.offset = offset
        self._store(keys, values)

    def trim(self, n: int) -> int:
        """Forget the last `n` positions; only before anything was dropped (a dropped key cannot come back)."""
        if self.offset > self.max_size:
            raise UserError("a rotating cache that has dropped tokens cannot be rewound; start a new one.")
        n = min(self.offset, n)
        self.offset -= n
        self._size -= n
        self._next = self._size
        return n

    @property
    def state(self) -> list[mx.array]:
        if self.keys is None:
            return []
        return list(self._temporal())

    @property
    def nbytes(self) -> int:
        return 0 if self.keys is None else self.keys.nbytes + self.values.nbytes
