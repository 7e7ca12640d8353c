"""An in-memory prefix cache: KV caches of earlier prompts, keyed by their tokens, least recently used out first.

A new prompt that shares a prefix with a stored one starts from a copy of that cache cut to the
shared length, and only the rest goes through the model. Bounded in entries and in bytes. Holds
plain (`kv`) caches of one sequence. Knows nothing of the model.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import mlx.core as mx

from ..errors import UserError
from .kv import KVCache


class PrefixCache:
    """Up to `max_entries` caches and `max_bytes` of keys and values, keyed by token sequence."""

    def __init__(self, max_entries: int = 8, max_bytes: int = 2 << 30):
        if max_entries < 1 or max_bytes < 1:
            raise UserError("a prefix cache needs room for at least one entry and one byte.")
        self.max_entries, self.max_bytes = max_entries, max_bytes
        self._entries: OrderedDict[tuple[int, ...], list[tuple[mx.array, mx.array]]] = OrderedDict()
        self.hits = self.misses = 0

    @property
    def nbytes(self) -> int:
        # a snapshot (taken in one step under the GIL): a server reads this while its engine thread stores
        return sum(_bytes(layers) for layers in list(self._entries.values()))

    def __len__(self) -> int:
        return len(self._entries)

    def fetch(self, tokens: Sequence[int]) -> tuple[int, list[KVCache] | None]:
        """(n, caches holding the first n tokens) for the longest stored prefix; (0, None) on a miss.

        n is at most len(tokens) - 1: the last token must go through the model to give logits.
        """
        best, best_key = 0, None
        for key in self._entries:
            n = min(common_prefix(key, tokens), len(tokens) - 1)
            if n > best:
                best, best_key = n, key
        if best_key is None:
            self.misses += 1
            return 0, None
        self.hits += 1
        self._entries.move_to_end(best_key)
        caches = []
        for keys, values in self._entries[best_key]:
            cache = KVCache()
            cache.restore(keys[..., :best, :], values[..., :best, :])
            caches.append(cache)
        return best, caches

    def store(self, tokens: Sequence[int], caches: Sequence[KVCache]) -> None:
        """Keep the keys and values of `caches`, which hold exactly `tokens`; evict what no longer fits."""
        if not caches or any(not isinstance(c, KVCache) or c.offset != len(tokens) for c in caches):
            return  # another kind, or not the state of these tokens: nothing to key it by
        key = tuple(tokens)
        layers = [tuple(c.state) for c in caches]
        self._entries.pop(key, None)
        if _bytes(layers) > self.max_bytes:
            return
        self._entries[key] = layers
        for other in list(self._entries):  # a stored prefix of this one is now redundant
            if other != key and len(other) < len(key) and key[: len(other)] == other:
                del self._entries[other]
        while len(self._entries) > self.max_entries or self.nbytes > self.max_bytes:
            self._entries.popitem(last=False)


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading tokens two sequences share."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _bytes(layers: list[tuple[mx.array, mx.array]]) -> int:
    return sum(k.nbytes + v.nbytes for k, v in layers)
