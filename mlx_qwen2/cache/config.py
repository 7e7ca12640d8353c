"""Which cache kind a generation uses, from the command line's --max-kv-size / --kv-bits flags."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..errors import UserError
from .batch import BatchKVCache
from .batch_kinds import BatchQuantizedKVCache, BatchRotatingKVCache
from .kv import KVCache, make_cache
from .quantized import QuantizedKVCache, check_kv_group, check_kv_settings
from .rotating import RotatingKVCache


@dataclass
class CacheConfig:
    """Cache settings; the CLIs' flags and defaults come from these fields."""

    max_kv_size: int | None = field(
        default=None, metadata={"help": "bound the cache: keep the first --kv-keep tokens and the latest", "type": int}
    )
    kv_keep: int = field(default=4, metadata={"help": "with --max-kv-size: tokens always kept at the start"})
    kv_bits: int | None = field(default=None, metadata={"help": "quantize the KV cache to 4 or 8 bits", "type": int})
    kv_group_size: int = field(default=64, metadata={"help": "with --kv-bits: quantization group size"})
    quantized_kv_start: int = field(default=0, metadata={"help": "with --kv-bits: quantize once this many tokens"})

    def __post_init__(self) -> None:
        if self.kv_bits is not None:
            check_kv_settings(self.kv_bits, self.kv_group_size)
            if self.max_kv_size is not None:
                raise UserError("--kv-bits and --max-kv-size cannot be combined yet; choose one.")
        if self.max_kv_size is not None and self.max_kv_size <= self.kv_keep:
            raise UserError(
                f"--max-kv-size {self.max_kv_size} must be larger than the kept prefix (--kv-keep {self.kv_keep})."
            )
        if self.quantized_kv_start < 0:
            raise UserError(f"--quantized-kv-start must be >= 0, got {self.quantized_kv_start}")

    def check_model(self, head_dim: int) -> None:
        """UserError now for settings this model cannot use (rather than at its first prompt)."""
        if self.kv_bits is not None:
            check_kv_group(head_dim, self.kv_group_size)

    @property
    def plain(self) -> bool:
        """Whether this is the default growing float cache (the only kind the batching engine merges)."""
        return self.max_kv_size is None and self.kv_bits is None

    def make(self, num_layers: int) -> list[Any]:
        """One empty cache per layer (a quantized cache starts as a float one until `quantized_kv_start`)."""
        if self.max_kv_size is not None:
            return [RotatingKVCache(self.max_kv_size, self.kv_keep) for _ in range(num_layers)]
        if self.kv_bits is not None and self.quantized_kv_start == 0:
            return [QuantizedKVCache(self.kv_bits, self.kv_group_size) for _ in range(num_layers)]
        return make_cache(num_layers)

    def make_batch(self, left_pad: list[int], num_layers: int) -> list[BatchKVCache]:
        """One empty batch cache per layer for rows about to be prefilled together (the batching engine)."""
        if self.max_kv_size is not None:
            return [BatchRotatingKVCache(self.max_kv_size, self.kv_keep, left_pad) for _ in range(num_layers)]
        if self.kv_bits is not None and self.quantized_kv_start == 0:
            return [BatchQuantizedKVCache(self.kv_bits, self.kv_group_size, left_pad) for _ in range(num_layers)]
        return [BatchKVCache.empty(left_pad) for _ in range(num_layers)]

    def maybe_quantize_batch(self, cache: list[BatchKVCache], force: bool = False) -> list[BatchKVCache]:
        """Float batch caches quantized once their longest row holds `quantized_kv_start` tokens (or now, with
        `force`: rows joining a quantized batch); the caches unchanged otherwise."""
        first = cache[0]
        if self.kv_bits is None or type(first) is not BatchKVCache:
            return cache
        if not force and first.size - min(first.left_pad, default=0) < self.quantized_kv_start:
            return cache
        return [BatchQuantizedKVCache.from_float(c, self.kv_bits, self.kv_group_size) for c in cache]

    def maybe_quantize(self, cache: list[Any]) -> None:
        """Swap float layer caches for quantized ones, in place, once they hold `quantized_kv_start` tokens."""
        if self.kv_bits is None:
            return
        for i, c in enumerate(cache):
            if isinstance(c, KVCache) and c.offset >= self.quantized_kv_start:
                cache[i] = QuantizedKVCache.from_cache(c, self.kv_bits, self.kv_group_size)
