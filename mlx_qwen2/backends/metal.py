"""Apple Silicon memory: keep the weights wired while generating or training, and say when they cannot fit.

macOS may page out GPU memory that is not wired, and a model paged out between two tokens is
read back from disk for the next. `wired_limit` raises MLX's wired limit to the device's
recommended working set for the duration of a run (restoring it after), bounds MLX's buffer
cache to what is left beside the weights, and warns, with what to do, when the weights plus
the caches a run plans exceed that working set. Elsewhere (CPU, CUDA) it does nothing.
Knows nothing of files.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten


def working_set() -> int | None:
    """The GPU's recommended working set in bytes, or None when not on Metal."""
    if not mx.metal.is_available():
        return None
    return int(mx.device_info()["max_recommended_working_set_size"])


def weight_bytes(model: nn.Module) -> int:
    return sum(p.nbytes for _, p in tree_flatten(model.parameters()))


def kv_bytes_per_token(model: nn.Module) -> int:
    """Bytes one position of a plain KV cache takes over all layers (keys and values, the weights' float dtype)."""
    args = model.args
    weight = model.model.embed_tokens
    dtype = getattr(weight, "scales", weight.weight).dtype
    return len(model.layers) * 2 * args.n_kv_heads * args.head_dim * dtype.size


def fit_warning(weights: int, caches: int, limit: int) -> str | None:
    """The warning for weights + caches over the working set, or None when they fit."""
    need = weights + caches
    if need <= limit:
        return None
    gb = lambda n: f"{n / 1e9:.2f} GB"
    return (
        f"the weights ({gb(weights)}) and KV caches ({gb(caches)}) need {gb(need)}, more than this Mac's "
        f"recommended working set ({gb(limit)}): macOS may page them out and generation slow to a crawl. "
        "Use a smaller quantization (convert -q --q-bits 4), bound the cache (--max-kv-size, --kv-bits 8), "
        f"or raise the limit: sudo sysctl iogpu.wired_limit_mb={int(need * 1.1 / 2**20)}"
    )


@contextmanager
def wired_limit(model: nn.Module, cache_bytes: int = 0, warn: Callable[[str], None] | None = None) -> Iterator[None]:
    """Within the block, on Metal: weights wired, buffer cache bounded, a warning if they cannot fit."""
    limit = working_set()
    if limit is None:
        yield
        return
    weights = weight_bytes(model)
    message = fit_warning(weights, cache_bytes, limit)
    if message:
        (warn or (lambda m: warnings.warn(m, stacklevel=3)))(message)
    old_wired = mx.set_wired_limit(limit)
    old_cache = mx.set_cache_limit(max(limit - weights - cache_bytes, 0))
    try:
        yield
    finally:
        mx.synchronize()  # nothing may still be running on the wired buffers
        mx.set_wired_limit(old_wired)
        mx.set_cache_limit(old_cache)
        mx.clear_cache()
