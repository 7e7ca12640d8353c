"""Apple Silicon memory handling, with the Metal device stubbed: the calls made and the warning's arithmetic."""

from __future__ import annotations

import mlx.core as mx
import pytest

from mlx_qwen2 import load, stream_generate
from mlx_qwen2.backends import metal
from mlx_qwen2.generation import batch_generate


@pytest.fixture
def fake_metal(monkeypatch):
    calls = []
    state = {"wired": 111, "cache": 222}

    def set_wired(n):
        calls.append(("wired", n))
        old, state["wired"] = state["wired"], n
        return old

    def set_cache(n):
        calls.append(("cache", n))
        old, state["cache"] = state["cache"], n
        return old

    monkeypatch.setattr(mx.metal, "is_available", lambda: True)
    monkeypatch.setattr(mx, "device_info", lambda: {"max_recommended_working_set_size": 10_000_000})
    monkeypatch.setattr(mx, "set_wired_limit", set_wired)
    monkeypatch.setattr(mx, "set_cache_limit", set_cache)
    monkeypatch.setattr(mx, "synchronize", lambda *a: calls.append(("sync",)))
    monkeypatch.setattr(mx, "clear_cache", lambda: calls.append(("clear",)))
    return calls, state


def test_limits_raised_then_restored(tiny_untied, fake_metal):
    calls, state = fake_metal
    model, tok = load(tiny_untied, fast=False)
    weights = metal.weight_bytes(model)
    with metal.wired_limit(model, cache_bytes=1000):
        assert state == {"wired": 10_000_000, "cache": 10_000_000 - weights - 1000}
    assert state == {"wired": 111, "cache": 222}  # restored
    assert calls[-3:] == [("wired", 111), ("cache", 222), ("clear",)] and ("sync",) in calls


def test_warning_when_weights_and_caches_do_not_fit(tiny_untied, fake_metal):
    model, _ = load(tiny_untied, fast=False)
    weights = metal.weight_bytes(model)
    warnings = []
    with metal.wired_limit(model, cache_bytes=10_000_000 - weights + 1, warn=warnings.append):
        pass
    assert len(warnings) == 1
    assert "need 0.01 GB, more than this Mac's recommended working set (0.01 GB)" in warnings[0]
    assert "--max-kv-size" in warnings[0] and "iogpu.wired_limit_mb=" in warnings[0]
    with metal.wired_limit(model, cache_bytes=10_000_000 - weights, warn=warnings.append):  # exactly fits
        pass
    assert len(warnings) == 1


def test_fit_arithmetic():
    assert metal.fit_warning(6 * 10**9, 2 * 10**9, 8 * 10**9) is None
    message = metal.fit_warning(6 * 10**9, 3 * 10**9, 8 * 10**9)
    assert "(6.00 GB)" in message and "(3.00 GB)" in message and "need 9.00 GB" in message
    assert f"iogpu.wired_limit_mb={int(9e9 * 1.1 / 2**20)}" in message


def test_generation_plans_its_cache(tiny_untied, fake_metal, monkeypatch):
    model, tok = load(tiny_untied, fast=False)
    seen = []
    real = metal.wired_limit

    def spy(model, cache_bytes=0, warn=None):
        seen.append(cache_bytes)
        return real(model, cache_bytes, warn)

    monkeypatch.setattr("mlx_qwen2.generation.stream.wired_limit", spy)
    monkeypatch.setattr("mlx_qwen2.generation.batch.wired_limit", spy)
    ids = tok.encode("Hello there")
    list(stream_generate(model, tok, ids, max_tokens=5))
    per_token = 2 * 2 * 2 * 16 * 4  # layers x (keys, values) x KV heads x head size x float32
    assert metal.kv_bytes_per_token(model) == per_token
    assert seen == [(len(ids) + 5) * per_token]
    batch_generate(model, tok, [ids, ids[:3]], max_tokens=4)
    assert seen[-1] == (len(ids) + 4 + 3 + 4) * per_token


def test_nothing_happens_off_metal(tiny_untied, monkeypatch):
    monkeypatch.setattr(mx.metal, "is_available", lambda: False)
    monkeypatch.setattr(mx, "set_wired_limit", lambda n: pytest.fail("no wired limit off Metal"))
    model, _ = load(tiny_untied)
    with metal.wired_limit(model, cache_bytes=10**15):
        pass
