"""KV cache against a full recompute."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from mlx_qwen2.cache import KVCache, make_cache
from mlx_qwen2.cache.batch import BatchKVCache
from mlx_qwen2.generation import prefill
from mlx_qwen2.loader import load

IDS = [(i * 37 + 11) % 400 for i in range(23)]


@pytest.mark.parametrize("step", [4, 7, 256])
def test_prefill_then_decode_equals_full_forward(tiny, step):
    model, _ = load(tiny)
    full = np.array(model(mx.array([IDS]))[0])
    cache = [KVCache(step) for _ in model.layers]
    split = 6  # prefill 6 tokens, then one at a time across several growth boundaries
    logits = [np.array(model(mx.array([IDS[:split]]), cache)[0])]
    for t in IDS[split:]:
        logits.append(np.array(model(mx.array([[t]]), cache)[0]))
    np.testing.assert_allclose(np.concatenate(logits), full, atol=1e-4, rtol=0)
    assert cache[0].offset == len(IDS)
    assert cache[0].keys.shape[2] % step == 0 and cache[0].keys.shape[2] >= len(IDS)


@pytest.mark.parametrize("pad", [0, 3])
def test_batch_cache_chunks_then_decode_equal_full_forward(tiny_untied, pad):
    """A batch cache's masks: with padding (an explicit mask), and without (none, or "causal")."""
    model, _ = load(tiny_untied)
    full = np.array(model(mx.array([IDS]))[0])
    cache = [BatchKVCache.empty([pad]) for _ in model.layers]
    ids = [0] * pad + IDS
    logits = [np.array(model(mx.array([ids[: pad + 5]]), cache)[0, pad:])]
    logits.append(np.array(model(mx.array([ids[pad + 5 : pad + 9]]), cache)[0]))  # a chunk after a prefix
    for t in ids[pad + 9 :]:
        logits.append(np.array(model(mx.array([[t]]), cache)[0]))
    np.testing.assert_allclose(np.concatenate(logits), full, atol=1e-4, rtol=0)


@pytest.mark.parametrize("step", [4, 5, 23])
def test_chunked_prefill_equals_one_pass(tiny_untied, step):
    """Multi-token chunks after a filled cache need a causal mask offset by the cache length.

    prefill leaves the last chunk (1 to `step` tokens) to the first generation step."""
    model, _ = load(tiny_untied)
    full = np.array(model(mx.array([IDS]))[0, -1])
    cache = make_cache(len(model.layers), step=5)
    rest = prefill(model, mx.array(IDS), cache, step=step)
    done = (len(IDS) - 1) // step * step
    assert rest.tolist() == IDS[done:] and cache[0].offset == done and 1 <= rest.size <= step
    np.testing.assert_allclose(np.array(model(rest[None], cache)[0, -1]), full, atol=1e-4, rtol=0)


def test_trim_rewinds(tiny_untied):
    model, _ = load(tiny_untied)
    cache = make_cache(len(model.layers), step=8)
    model(mx.array([IDS]), cache)
    for c in cache:
        assert c.trim(5) == 5
    out = np.array(model(mx.array([IDS[-5:]]), cache)[0])
    np.testing.assert_allclose(out, np.array(model(mx.array([IDS]))[0, -5:]), atol=1e-4, rtol=0)


def test_step_must_be_positive():
    with pytest.raises(ValueError):
        KVCache(step=0)
