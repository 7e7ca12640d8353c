"""The CPU fast layers (fast.py) against MLX's own: outputs, gradients, and blocks of every size."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from mlx_qwen2.backends.cpu import blas, elementwise
from mlx_qwen2.backends.cpu import layers as fast
from mlx_qwen2.backends.cpu.fast import use_fast_layers


def _pair(quantized: bool, dtype: mx.Dtype, bits: int = 4) -> tuple[nn.Module, nn.Module]:
    """(MLX's layer, our swapped copy) sharing the same parameters."""
    mx.random.seed(0)
    layer = nn.Linear(128, 96, bias=True)
    layer.set_dtype(dtype)
    if quantized:
        layer = nn.QuantizedLinear.from_linear(layer, group_size=32, bits=bits)
    holder = nn.Module()
    holder.layer = layer
    swapped = nn.Module()
    swapped.layer = layer
    assert use_fast_layers(swapped, mx.Device(mx.cpu)) == 1
    assert type(swapped.layer) is not type(layer)
    return layer, swapped.layer


def _dense(layer: nn.Module) -> np.ndarray:
    if isinstance(layer, nn.QuantizedLinear):
        w = mx.dequantize(layer.weight, layer.scales, layer.biases, layer.group_size, layer.bits)
    else:
        w = layer.weight
    return np.array(w.astype(mx.float32), dtype=np.float64)


def _close(a: mx.array, b: mx.array | np.ndarray, dtype: mx.Dtype) -> None:
    a, b = np.array(a.astype(mx.float32)), np.asarray(b if isinstance(b, np.ndarray) else b.astype(mx.float32))
    tol = 1e-4 if dtype == mx.float32 else 2**-7 * max(np.abs(b).max(), 1.0)  # one 16-bit rounding
    np.testing.assert_allclose(a, b, atol=tol)


@pytest.mark.parametrize("quantized", [True, False], ids=["quantized", "16-bit"])
@pytest.mark.parametrize("tokens", [1, fast.SMALL, fast.SMALL + 1, 37])
@pytest.mark.parametrize("block", [1 << 20, 200])  # whole matrix, and row blocks of one or two rows
def test_outputs_and_input_gradients_match(quantized, tokens, block, monkeypatch):
    """Against the exact product of the same (dequantized) matrix, in float64: within one bfloat16 rounding.

    (MLX's own bfloat16 quantized product is further off: it accumulates in bfloat16.)"""
    monkeypatch.setattr(fast, "COPY_BLOCK", block)
    monkeypatch.setattr(fast, "PLANES_BLOCK", block)
    monkeypatch.setattr(fast, "SMALL_COPY_BLOCK", block)
    monkeypatch.setattr(fast, "PRODUCT_BLOCK", block)
    dtype = mx.bfloat16
    theirs, ours = _pair(quantized, dtype)
    w = _dense(theirs)
    x = mx.random.normal((2, tokens, 128)).astype(dtype)
    x64 = np.array(x.astype(mx.float32), dtype=np.float64)
    y = ours(x)
    assert y.dtype == theirs(x).dtype == dtype
    _close(y, x64 @ w.T + np.array(ours.bias.astype(mx.float32)), dtype)
    c = mx.random.normal((2, tokens, 96))
    gx = mx.grad(lambda x: (ours(x).astype(mx.float32) * c).sum())(x)
    _close(gx, np.array(c, dtype=np.float64) @ w, dtype)


@pytest.mark.parametrize("bits", [2, 3, 6, 8])
@pytest.mark.parametrize("block", [1 << 21, 200])
def test_quantized_products_of_other_widths_match(bits, block, monkeypatch):
    """Products at the other widths (few rows: planes at 2 and 8 bits, and MLX's quantized product for up
    to 4 tokens; many rows: float32 copies): the exact product of the dequantized matrix, in float64, to
    float32 rounding."""
    monkeypatch.setattr(fast, "COPY_BLOCK", block)
    monkeypatch.setattr(fast, "PLANES_BLOCK", block)
    theirs, ours = _pair(True, mx.float32, bits)
    for tokens in (5, 37):  # 15 rows (a batch decoding: planes at 2 and 8 bits), 111 rows (copies)
        x = mx.random.normal((3, tokens, 128))
        expected = np.array(x, dtype=np.float64) @ _dense(theirs).T + np.array(ours.bias, dtype=np.float64)
        np.testing.assert_allclose(np.array(ours(x)), expected, atol=2e-4)


def test_weight_gradient_of_a_16_bit_layer_matches():
    """Full fine-tuning trains the weights of an upcast layer: its weight gradient is MLX's."""
    theirs, ours = _pair(False, mx.float16)
    x = mx.random.normal((3, 9, 128)).astype(mx.float16)

    def grads(layer: nn.Module) -> dict:
        return nn.value_and_grad(layer, lambda x: layer(x).astype(mx.float32).square().sum())(x)[1]

    g_ours, g_theirs = grads(ours), grads(theirs)
    for name in ("weight", "bias"):
        _close(g_ours[name], g_theirs[name], mx.float16)  # 16-bit gradients: equal up to one rounding


def test_gpus_are_left_alone():
    m = nn.Module()
    m.a = nn.Linear(8, 8)
    m.b = nn.QuantizedLinear(64, 64, group_size=32, bits=4)
    assert use_fast_layers(m, mx.Device(mx.gpu)) == 0
    assert use_fast_layers(m, mx.Device(mx.cpu)) == 2


@pytest.mark.parametrize("rows", [1, 2, 5, 15, 16, 40])
def test_few_row_products_are_padded_and_unchanged(rows, monkeypatch):
    """2..15 rows go through a 16-row product (OpenBLAS threads it); the rows that come back are the same."""
    monkeypatch.setattr(fast, "_split", False)  # outside a pass of 2-8 tokens
    w = mx.random.normal((96, 64), key=mx.random.key(1))
    x = mx.random.normal((rows, 1, 64), key=mx.random.key(2))  # (batch, 1 token, in): a batched decode step
    seen = []
    real = mx.pad
    monkeypatch.setattr(mx, "pad", lambda a, widths, *args, **kw: seen.append(a.shape) or real(a, widths, *args, **kw))
    got = fast.rows_product(x, w)
    assert got.shape == (rows, 1, 96)
    np.testing.assert_allclose(np.array(got), np.array(x @ w.T), rtol=1e-5, atol=1e-5)
    assert bool(seen) == (2 <= rows < 16)
    layer = nn.Linear(64, 96)
    layer.weight = w
    holder = nn.Module()
    holder.l = layer
    reference = np.array(layer(x))
    assert use_fast_layers(holder, mx.Device(mx.cpu)) == 1
    np.testing.assert_allclose(np.array(holder.l(x)), reference, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("quantized", [True, False], ids=["quantized", "16-bit"])
def test_embeddings_hand_on_float32_activations(quantized):
    """The same rows as MLX's embedding, exactly, as float32 (the model then computes in float32)."""
    theirs = nn.Embedding(50, 64)
    theirs.set_dtype(mx.bfloat16)
    if quantized:
        theirs = nn.QuantizedEmbedding.from_embedding(theirs, group_size=32, bits=4)
    holder = nn.Module()
    holder.e = theirs
    assert use_fast_layers(holder, mx.Device(mx.cpu)) == 1
    ids = mx.array([[3, 7, 49]])
    ours = holder.e(ids)
    assert ours.dtype == mx.float32
    np.testing.assert_array_equal(np.array(ours), np.array(theirs(ids).astype(mx.float32)))


def test_exponentials_through_power_match_mlx():
    """e^x and SiLU computed with mx.power (elementwise.py) equal MLX's own to float32 rounding, and so do
    their gradients, at the extremes too (SiLU far below zero, where e^-x overflows)."""
    x = mx.random.normal((4096,), key=mx.random.key(3)) * 10
    x = mx.concatenate([x, mx.array([-1e4, -100.0, -88.0, -1e-7, 0.0, 1e-7, 88.0, 100.0, 1e4])])
    c = mx.random.normal(x.shape, key=mx.random.key(4))
    grads = [mx.grad(lambda x, f=f: (f(x) * c).sum())(x) for f in (elementwise.silu, nn.silu)]
    for ours, theirs in [(elementwise.silu(x), nn.silu(x)), grads]:
        assert np.isfinite(np.array(ours)).all()
        np.testing.assert_allclose(np.array(ours), np.array(theirs), rtol=2e-6, atol=1e-6)
    x = mx.clip(x, -87, 88)  # e^x in float32's range
    np.testing.assert_allclose(np.array(elementwise.exp(x)), np.array(mx.exp(x)), rtol=4e-6)


@pytest.mark.parametrize("exp", ["power", "kernels"])
def test_explicit_attention_equals_mlx_fused_one(tiny_untied, exp, monkeypatch):
    """The model with SiLU and e^x of elementwise.py (set where MLX's exp is slow: explicit attention scores)
    gives the logits of MLX's fused attention and SiLU: a long prompt (its scores in blocks), then a batch of
    rows of different lengths (masked padding); e^x through mx.power, or (in generation's passes, blocks of
    HOST_EXP scores or more) through the kernels."""
    from mlx_qwen2 import load
    from mlx_qwen2.backends.cpu import kernels
    from mlx_qwen2.cache import make_cache
    from mlx_qwen2.cache.batch import BatchKVCache
    from mlx_qwen2.models import base

    if exp == "kernels" and not kernels.available():
        pytest.skip("no C compiler: the kernels are not built")
    f_exp = elementwise.attention_exp if exp == "kernels" else elementwise.exp
    plain, _ = load(tiny_untied)
    ours, _ = load(tiny_untied)
    for model, fast_exp in ((plain, False), (ours, True)):
        for _, m in model.named_modules():  # whatever this machine is: one of each
            for name, f in (("silu", elementwise.silu), ("exp", f_exp)):
                if hasattr(m, name):
                    setattr(m, name, f) if fast_exp else m.__dict__.pop(name, None)
    assert ours.layers[0].self_attn.exp is f_exp and plain.layers[0].self_attn.exp is None
    monkeypatch.setattr(base, "SCORES_BLOCK", 40)  # blocks of a few queries
    monkeypatch.setattr(elementwise, "HOST_EXP", 16)  # the prompt's blocks (4 heads x 1 query x 36 keys)
    on_host = []
    real = kernels.exp
    monkeypatch.setattr(kernels, "exp", lambda x: on_host.append(x.size) or real(x))
    ids = mx.array([[5, 9, 2, 7, 1, 30, 4, 8, 11] * 4])
    logits = []
    for model in (plain, ours):
        with fast.inference() if exp == "kernels" else contextlib.nullcontext():
            cache = make_cache(len(model.layers))
            first = model(ids, cache=cache)
            other = make_cache(len(model.layers))  # a shorter row joins: left padding, masked
            model(ids[:, :4], cache=other)
            batch = [BatchKVCache.merge([c, o]) for c, o in zip(cache, other, strict=True)]
            step = model(mx.array([[3], [6]]), cache=batch)
        logits.append(np.concatenate([np.array(first).reshape(-1), np.array(step).reshape(-1)]))
    assert bool(on_host) == (exp == "kernels")
    np.testing.assert_allclose(logits[1], logits[0], atol=2e-5)


def test_exponentials_are_set_where_mlx_exp_is_slow(tiny_untied):
    """Off Apple Silicon `load` gives every MLP and attention elementwise's SiLU and e^x; there MLX's own."""
    from mlx_qwen2 import load

    model, _ = load(tiny_untied)
    layer = model.layers[0]
    assert (layer.self_attn.exp is elementwise.attention_exp) == elementwise.SLOW_EXP
    assert (layer.mlp.silu is elementwise.silu) == elementwise.SLOW_EXP
    plain, _ = load(tiny_untied, fast=False)
    assert plain.layers[0].self_attn.exp is None and plain.layers[0].mlp.silu is nn.silu


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_dequantize_f32_equals_mlx_dequantize(bits, group_size):
    """The CPU layers' dequantize (bytes masked out of words at 2, 4 and 8 bits) gives MLX's floats exactly:
    matrices and stacked experts, float32 and bfloat16 scales."""
    for shape in [(96, 256), (3, 40, 512)]:
        q, scales, biases = mx.quantize(
            mx.random.normal(shape, key=mx.random.key(bits)), group_size=group_size, bits=bits
        )
        for dtype in (mx.float32, mx.bfloat16):
            s, b = scales.astype(dtype), biases.astype(dtype)
            ours = fast.dequantize_f32(q, s, b, group_size, bits)
            theirs = mx.dequantize(q, s.astype(mx.float32), b.astype(mx.float32), group_size=group_size, bits=bits)
            assert ours.dtype == mx.float32 and ours.shape == theirs.shape
            np.testing.assert_array_equal(np.array(ours), np.array(theirs))


def _split_everywhere(monkeypatch) -> list[int]:
    """Passes of 2-8 tokens split their products over two CPU streams, whatever this machine has; returns
    the thread counts `pace` gives OpenBLAS (stubbed: OpenBLAS keeps its own)."""
    calls: list[int] = []
    streams = (mx.new_stream(mx.cpu), mx.new_stream(mx.cpu))
    monkeypatch.setattr(fast, "_streams", lambda: streams)
    monkeypatch.setattr(fast.blas, "own_threads", 2)
    monkeypatch.setattr(fast.blas, "set_threads", calls.append)
    monkeypatch.setattr(fast, "_split", False)
    return calls


def test_pace_gives_openblas_one_thread_for_passes_of_2_to_8_tokens(monkeypatch):
    calls = _split_everywhere(monkeypatch)
    for tokens, split in ((1, False), (2, True), (8, True), (9, False), (4, True), (1, False), (5, True)):
        fast.pace(tokens)
        assert fast.splitting() == split, tokens
    assert calls == [1, 2, 1, 2, 1]  # only on a change
    fast.settle()
    assert calls[-1] == 2 and not fast.splitting()
    monkeypatch.setattr(fast.blas, "own_threads", 4)  # more threads than streams: OpenBLAS keeps them
    fast.pace(4)
    assert not fast.splitting()
    monkeypatch.setattr(fast.blas, "own_threads", 1)  # OpenBLAS asked for one thread: nothing is split
    fast.pace(4)
    assert not fast.splitting()


def test_real_openblas_threads_follow_the_passes(tiny_untied, monkeypatch):
    """With the OpenBLAS that `preload` loaded and no compiled kernels (a machine without a compiler): one
    thread during a batch of 4 decoding, its own after."""
    from mlx_qwen2 import load
    from mlx_qwen2.generation import batch_generate

    own = fast.blas.own_threads
    if own < 2 or len(fast._streams()) < 2:
        pytest.skip(f"OpenBLAS threads {own}, {len(fast._streams())} CPU streams: passes are never split here")
    monkeypatch.setattr(fast.kernels, "_library", lambda: None)
    model, tok = load(tiny_untied)
    seen = []
    real = fast.rows_product
    try:
        fast.rows_product = lambda *a, **k: seen.append(fast.blas.threads()) or real(*a, **k)
        batch_generate(model, tok, ["a b", "c d e", "f", "g h i j"], max_tokens=3)
    finally:
        fast.rows_product = real
    assert 1 in seen and own in seen  # decode steps of 4 rows on one thread; the prompts' prefill on its own
    assert fast.blas.threads() == own and not fast.splitting()


@pytest.mark.parametrize("kind", ["float32", "bfloat16", "4bit", "8bit", "3bit"])
def test_split_products_equal_the_exact_product(kind, monkeypatch):
    """In a pass of 2-8 tokens every product is computed in row blocks on the CPU streams (planes on the
    streams that make them): the exact product of the (dequantized) matrix in float64."""
    _split_everywhere(monkeypatch)
    quantized = kind[0].isdigit()
    theirs, ours = _pair(quantized, mx.bfloat16 if kind == "bfloat16" else mx.float32, int(kind[0]) if quantized else 4)
    x = mx.random.normal((5, 1, 128))  # a batch of 5 decoding
    expected = np.array(x, dtype=np.float64) @ _dense(theirs).T + np.array(ours.bias.astype(mx.float32))
    fast.pace(5)
    assert fast.splitting()
    got = ours(x.astype(ours.weight.dtype) if kind == "bfloat16" else x)
    _close(got, expected, mx.bfloat16 if kind == "bfloat16" else mx.float32)


def test_batch_decoding_with_split_products_gives_the_same_logits(tiny_tied, monkeypatch):
    """A decode step of 4 rows of the tiny model (tied head, 4-bit and float32): split as on a machine with
    OpenBLAS threads to spare, and not split: the same logits to float32 rounding."""
    from mlx_qwen2 import load
    from mlx_qwen2.cache.batch import BatchKVCache
    from mlx_qwen2.quant.affine import quantize_model

    for bits in (None, 4):
        model, _ = load(tiny_tied, fast=False)
        if bits:
            quantize_model(model, group_size=32, bits=bits)
        assert use_fast_layers(model, mx.Device(mx.cpu)) > 0
        logits = []
        for split in (False, True):
            if split:
                _split_everywhere(monkeypatch)
            else:
                monkeypatch.setattr(fast, "SPLIT_TOKENS", range(0))
            mx.random.seed(3)
            shape = (4, model.args.n_kv_heads, 7, model.args.head_dim)
            cache = [BatchKVCache(mx.random.normal(shape), mx.random.normal(shape), [0, 2, 0, 5]) for _ in model.layers]
            logits.append(np.array(model(mx.array([[3], [9], [4], [1]]), cache=cache)))
            assert fast.splitting() == split
            monkeypatch.undo()
        np.testing.assert_allclose(logits[1], logits[0], atol=2e-5)


def test_openblas_coretype_from_the_cpu_flags():
    """A CPU whose model OpenBLAS does not know still gets the kernels its flags allow (see blas.coretype)."""
    avx512 = "flags\t\t: fpu sse2 avx avx2 fma avx512f avx512dq avx512cd avx512bw avx512vl\n"
    assert blas.coretype("processor : 0\n" + avx512) == "SkylakeX"
    assert blas.coretype("flags : fpu sse2 avx avx2 fma avx512f\n") == "Haswell"  # AVX-512 without BW/VL
    assert blas.coretype("flags : fpu sse2 avx\n") is None
    assert blas.coretype("") is None


def test_openblas_loaded_with_the_flags_coretype_and_the_environment_left_alone():
    """In a fresh process: OpenBLAS runs the kernels the flags allow, OPENBLAS_CORETYPE is not left set for
    child processes, and a user's own OPENBLAS_CORETYPE wins."""
    if not blas.in_use.startswith("OpenBLAS"):
        pytest.skip("no OpenBLAS installed")
    code = (
        "import os, mlx_qwen2; from mlx_qwen2.backends.cpu import blas; "
        "print(blas.core, blas.chosen_coretype, os.environ.get('OPENBLAS_CORETYPE'))"
    )
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_CORETYPE"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    expected = blas.coretype(open("/proc/cpuinfo").read()) if os.uname().machine == "x86_64" else None
    if expected is not None:
        assert out.split() == [expected, expected, "None"]
    own = subprocess.run(
        [sys.executable, "-c", code], env={**env, "OPENBLAS_CORETYPE": "Prescott"}, capture_output=True, text=True
    ).stdout
    assert own.split() == ["Prescott", "None", "Prescott"]


def _mlp(kind: str, dim: int, hidden: int) -> nn.Module:
    """An MLP of `kind` weights ("bfloat16", "float32", or "{bits}bit/{group}"), with this backend's layers."""
    from mlx_qwen2.models.qwen2 import MLP

    mx.random.seed(1)
    holder = nn.Module()
    holder.mlp = MLP(dim, hidden)
    if kind == "bfloat16":
        holder.mlp.set_dtype(mx.bfloat16)
    elif kind != "float32":
        bits, group = (int(v) for v in kind.split("bit/"))
        nn.quantize(holder, group_size=group, bits=bits)
    use_fast_layers(holder, mx.Device(mx.cpu))
    assert type(holder.mlp) is fast.BlockingMLP
    return holder.mlp


@pytest.mark.parametrize("kind", ["bfloat16", "4bit/32", "4bit/64", "8bit/128", "2bit/64"])
def test_blocked_mlp_equals_the_mlp(kind, monkeypatch):
    """A prefill's MLP a block of hidden units at a time (blocks of 128 here, the last one narrower) equals
    the whole products, to float32 rounding."""
    monkeypatch.setattr(fast, "MIN_MLP_WIDTH", 128)
    monkeypatch.setattr(fast, "MLP_BLOCK", 128 * 40)
    mlp = _mlp(kind, 128, 6 * 128 if kind.endswith("/128") else 5 * 128 + 64)
    x = mx.random.normal((2, 20, 128))
    whole = mlp(x)
    blocks = []
    real = fast._block
    monkeypatch.setattr(fast, "_block", lambda layer, *a, **kw: blocks.append(1) or real(layer, *a, **kw))
    with fast.inference():
        y = fast.blocked_mlp(mlp, x)
    assert y is not None and len(blocks) == 3 * 6  # gate, up and down for each of the 6 blocks
    np.testing.assert_allclose(np.array(y), np.array(whole), rtol=1e-5, atol=1e-5)


def test_blocked_mlp_is_for_prefill_of_copied_weights_only():
    """None (the caller's plain MLP) outside generation's passes, for few rows, and where blocks gain
    nothing (float32 weights) or cannot be cut cleanly (3-bit columns)."""
    x = mx.random.normal((1, 1024, 64))  # blocks of 256 (1 << 18 activations)
    assert fast.blocked_mlp(_mlp("4bit/64", 64, 1024), x) is None  # outside `inference`
    with fast.inference():
        assert fast.blocked_mlp(_mlp("4bit/64", 64, 1024), x[:, : fast.kernels.MAX_ROWS]) is None
        assert fast.blocked_mlp(_mlp("float32", 64, 1024), x) is None
        assert fast.blocked_mlp(_mlp("3bit/64", 64, 1024), x) is None
        assert fast.blocked_mlp(_mlp("4bit/64", 64, 1024), x) is not None


def test_blocked_mlp_holds_less(monkeypatch):
    """What the point is: MLX's peak while computing a 4-bit MLP over 512 rows is under half the whole
    products' (whose (512, 4096) float32 intermediates are 8 MB each)."""
    from mlx_qwen2.models.qwen2 import MLP

    mlp = _mlp("4bit/64", 64, 4096)
    x = mx.random.normal((512, 64))
    mx.eval(x, mlp.parameters())

    def peak(blocked: bool) -> int:
        mx.synchronize()
        mx.reset_peak_memory()
        start = mx.get_active_memory()
        with fast.inference():
            y = fast.blocked_mlp(mlp, x) if blocked else MLP.__call__(mlp, x)
        mx.eval(y)
        return mx.get_peak_memory() - start

    whole, blocked = peak(False), peak(True)
    assert whole > 2 * 512 * 4096 * 4  # more than two of the intermediates at once
    assert blocked < whole / 2, (blocked, whole)


@pytest.mark.parametrize("kind", ["bfloat16", "4bit"])
def test_a_prefill_runs_the_mlps_in_blocks_and_gives_the_same_logits(tiny_untied, kind, monkeypatch):
    """A prefill (generation's passes of more than kernels.MAX_ROWS rows) runs the layers' MLPs through
    `blocked_mlp` (blocks of 128 of the tiny model's 160 hidden units) and gives the logits of the plain
    layers outside those passes, to float32 rounding."""
    from mlx_qwen2 import load
    from mlx_qwen2.quant.affine import quantize_model

    model, _ = load(tiny_untied)
    if kind == "bfloat16":
        model.set_dtype(mx.bfloat16)
    else:
        quantize_model(model, group_size=32, bits=4)
        use_fast_layers(model, mx.Device(mx.cpu))
    monkeypatch.setattr(fast, "MIN_MLP_WIDTH", 128)
    monkeypatch.setattr(fast, "MLP_BLOCK", 128 * 24)
    tokens = mx.array([list(range(5, 29))])
    plain = np.array(model(tokens).astype(mx.float32))
    blocks = []
    real = fast._block
    monkeypatch.setattr(fast, "_block", lambda layer, *a, **kw: blocks.append(1) or real(layer, *a, **kw))
    with fast.inference():
        blocked = np.array(model(tokens).astype(mx.float32))
    assert len(blocks) == len(model.layers) * 3 * 2
    np.testing.assert_allclose(blocked, plain, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", ["float32", "bfloat16", "4bit"])
def test_prefill_passes_are_short_where_the_kernels_take_the_products(tiny_untied, kind, monkeypatch):
    """A quantized or 16-bit model's prompt runs in passes of at most PASS_ROWS tokens (the kernels take
    their products; float32 keeps the caller's chunks), with the cache and next tokens of one long pass."""
    import itertools

    from mlx_qwen2.cache import make_cache
    from mlx_qwen2.generation import generate_step
    from mlx_qwen2.sample import greedy
    from tests.test_kernels import load_as

    if not fast.kernels.available():
        pytest.skip("no C compiler: the kernels are not built")
    model = load_as(tiny_untied, kind)
    monkeypatch.setattr(fast, "PASS_ROWS", 8)
    prompt = mx.array([(7 * i + 3) % 400 for i in range(30)])

    def run(wide: bool) -> tuple[list[int], list[int], np.ndarray]:
        if kind != "float32":
            model.__dict__["_wide_kernels"] = wide
        cache, passes = make_cache(len(model.layers)), []
        steps = generate_step(
            prompt, model, cache, greedy, prefill_step_size=512, after=lambda c: passes.append(c[0].offset)
        )
        tokens = list(itertools.islice(steps, 4))
        return tokens, passes, np.array(cache[0].state[0][..., :30, :])

    tokens, passes, keys = run(True)
    if kind == "float32":
        assert passes[:1] == [30]  # the whole prompt in one pass
        return
    assert passes[:4] == [8, 16, 24, 30]
    one_pass = run(False)
    assert one_pass[1][:1] == [30]
    assert tokens == one_pass[0]
    np.testing.assert_allclose(keys, one_pass[2], atol=1e-4)
