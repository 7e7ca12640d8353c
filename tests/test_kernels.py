"""The compiled few-row products (backends/cpu/kernels.c) against the exact product, and where they run."""

from __future__ import annotations

import contextlib
import os
import shutil
import threading
import time

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from mlx_qwen2.backends.cpu import kernels
from mlx_qwen2.backends.cpu import layers as fast
from mlx_qwen2.backends.cpu.fast import use_fast_layers

needs_kernels = pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler on this machine")


@needs_kernels
def test_kernels_build_where_there_is_a_compiler():
    assert kernels.available()


def _exact(x: mx.array, w: np.ndarray) -> np.ndarray:
    return np.array(x, dtype=np.float64).reshape(-1, x.shape[-1]) @ w.T


@needs_kernels
@pytest.mark.parametrize("rows", [1, 2, 3, 5, 8, 16])
@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16, mx.float16])
def test_float_products_equal_the_exact_product(rows, dtype):
    mx.random.seed(rows)
    w = mx.random.normal((37, 96)).astype(dtype)  # 37 rows: a short last block of 4
    x = mx.random.normal((rows, 96))
    assert kernels.supported(rows, w)
    got = np.array(kernels.product(x, w))
    np.testing.assert_allclose(got, _exact(x, np.array(w.astype(mx.float32), dtype=np.float64)), atol=1e-4)


@needs_kernels
@pytest.mark.parametrize("rows", [1, 4, 7, 16, 61, 256])  # past MAX_ROWS: a prefill's (WIDE_ROWS)
@pytest.mark.parametrize("bits, group_size", [(2, 64), (2, 128), (4, 32), (4, 64), (8, 32), (8, 128)])
@pytest.mark.parametrize("scale_dtype", [mx.float32, mx.bfloat16, mx.float16])
def test_quantized_products_equal_the_exact_product(rows, bits, group_size, scale_dtype):
    """Against the float64 product of the dequantized matrix (MLX's own dequantize of the same fields)."""
    mx.random.seed(bits * rows)
    w, scales, biases = mx.quantize(mx.random.normal((21, 256)), group_size=group_size, bits=bits)
    scales, biases = scales.astype(scale_dtype), biases.astype(scale_dtype)
    dense = mx.dequantize(w, scales.astype(mx.float32), biases.astype(mx.float32), group_size=group_size, bits=bits)
    x = mx.random.normal((1, rows, 256))
    assert kernels.supported(rows, w, scales, group_size, bits)
    got = kernels.product(x, w, scales, biases, group_size, bits)
    assert got.shape == (1, rows, 21)
    np.testing.assert_allclose(np.array(got[0]), _exact(x, np.array(dense, dtype=np.float64)), atol=2e-4)


@needs_kernels
def test_what_the_kernels_do_not_take():
    w = mx.zeros((8, 96))
    assert not kernels.supported(kernels.MAX_ROWS + 1, w)  # float32 prefill: BLAS
    assert kernels.supported(kernels.WIDE_ROWS, w.astype(mx.bfloat16))  # 16-bit (and quantized): no copy
    assert not kernels.supported(kernels.WIDE_ROWS + 1, w.astype(mx.bfloat16))
    assert not kernels.supported(1, mx.zeros((8, 36)))  # not a multiple of the lanes (8 or 16) inputs
    assert not kernels.supported(1, w.astype(mx.int32))
    q, s, b = mx.quantize(mx.zeros((8, 192)), group_size=64, bits=3)
    assert not kernels.supported(1, q, s, 64, 3)  # fields that cross bytes
    q, s, b = mx.quantize(mx.zeros((8, 256)), group_size=32, bits=2)
    assert kernels.supported(1, q, s, 32, 2) == (kernels.lanes() == 8)  # a group of 8 bytes: with 8 lanes only


@needs_kernels
def test_a_forked_child_still_multiplies():
    """libgomp's threads do not survive fork: a child runs the kernels on one thread, and does not hang.
    (On host arrays: MLX's own threads do not survive fork either.)"""
    rng = np.random.default_rng(0)
    w, x = rng.standard_normal((40, 64), np.float32), rng.standard_normal((3, 64), np.float32)
    expected = kernels.multiply(x, w, kernels.KINDS[mx.float32])  # the parent's OpenMP team exists now
    np.testing.assert_allclose(expected, x.astype(np.float64) @ w.T, atol=1e-4)
    pid = os.fork()
    if pid == 0:  # the child: exit status 0 only if the product is right
        ok = kernels._threads() == 1 and np.allclose(kernels.multiply(x, w, 0), expected, atol=1e-5)
        os._exit(0 if ok else 1)
    for _ in range(300):
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            assert os.waitstatus_to_exitcode(status) == 0
            return
        time.sleep(0.1)
    os.kill(pid, 9)
    raise AssertionError("the forked child hung in the kernels")


def test_no_compiler_leaves_the_kernels_off(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    for compiler in (str(tmp_path / "no-such-compiler"), "false"):  # missing, and failing
        monkeypatch.setenv("CC", compiler)
        assert kernels._build() is None
        assert "not built" in capsys.readouterr().err
    assert not list((tmp_path / "mlx_qwen2" / "kernels").glob("*.so"))  # nothing half-written left


def test_opting_out(monkeypatch):
    monkeypatch.setenv("MLX_QWEN2_KERNELS", "off")
    assert kernels._library.__wrapped__() is None


def _layers(kind: str) -> tuple[nn.Module, nn.Module]:
    """(MLX's layer, our swapped copy) of one kind sharing parameters."""
    mx.random.seed(0)
    layer = nn.Linear(128, 40, bias=True)
    if kind == "bfloat16":
        layer.set_dtype(mx.bfloat16)
    elif kind != "float32":
        layer = nn.QuantizedLinear.from_linear(layer, group_size=64, bits=int(kind[0]))
    swapped = nn.Module()
    swapped.layer = layer
    assert use_fast_layers(swapped, mx.Device(mx.cpu)) == 1
    return layer, swapped.layer


@needs_kernels
@pytest.mark.parametrize("kind", ["float32", "bfloat16", "4bit", "8bit"])
def test_layers_use_the_kernels_only_inside_inference(kind, monkeypatch):
    """Outside `inference` (training, scoring: anything MLX may differentiate) the layers keep MLX's graph;
    inside, few-row products are the kernels', equal to within float32 rounding."""
    calls = []
    real = kernels.product
    monkeypatch.setattr(kernels, "product", lambda *a: calls.append(a) or real(*a))
    theirs, ours = _layers(kind)
    x = mx.random.normal((3, 1, 128))
    x = x.astype(mx.bfloat16) if kind == "bfloat16" else x
    outside = ours(x)
    assert not calls
    with fast.inference():
        inside = ours(x)
    assert len(calls) == 1
    assert inside.dtype == outside.dtype
    tol = 1e-2 if kind == "bfloat16" else 1e-4
    np.testing.assert_allclose(np.array(inside.astype(mx.float32)), np.array(outside.astype(mx.float32)), atol=tol)
    widest = kernels.MAX_ROWS if kind == "float32" else kernels.WIDE_ROWS  # quantized, 16-bit: a prefill's too
    with fast.inference():
        ours(mx.random.normal((1, widest, 128)).astype(x.dtype))
        assert len(calls) == 2
        ours(mx.random.normal((1, widest + 1, 128)).astype(x.dtype))  # MLX's and OpenBLAS's products
    assert len(calls) == 2


@needs_kernels
def test_gradients_are_untouched_by_generation_passes(monkeypatch):
    """A gradient taken while some thread generates would be wrong if the kernels ran in it: `inference`
    is per thread, and never on in `mx.grad`'s passes."""
    _, ours = _layers("float32")
    x = mx.random.normal((2, 128))

    def loss(w):
        return (x @ w.T).sum()

    def through_layer(w):
        ours.weight = w
        return ours(x).sum()

    expected = mx.grad(loss)(ours.weight)
    entered, done = threading.Event(), threading.Event()

    def generating() -> None:
        with fast.inference():
            entered.set()
            done.wait(30)

    other = threading.Thread(target=generating)
    other.start()
    try:
        assert entered.wait(30)
        got = mx.grad(through_layer)(ours.weight)
    finally:
        done.set()
        other.join()
    np.testing.assert_allclose(np.array(got), np.array(expected), atol=1e-5)
    with fast.inference():  # what the guard is for: inside, the product is outside MLX's graph
        assert not np.allclose(np.array(mx.grad(through_layer)(ours.weight)), np.array(expected), atol=1e-5)


@needs_kernels
def test_generation_with_kernels_gives_the_tokens_without(tiny, monkeypatch):
    """Greedy tokens of the tiny models through generation (kernels on), float32 and 4-bit, batched and alone,
    equal the tokens with the kernels off (MLX's and OpenBLAS's products)."""
    from mlx_qwen2 import load
    from mlx_qwen2.generation import batch_generate, stream_generate
    from mlx_qwen2.quant.affine import quantize_model

    calls = []
    real = kernels.product
    monkeypatch.setattr(kernels, "product", lambda *a: calls.append(1) or real(*a))
    prompts = [[5, 9, 3, 7], [11, 2], [4, 4, 8, 1, 6, 2, 9]]
    for bits in (None, 4):
        model, tok = load(tiny)
        if bits:
            quantize_model(model, group_size=32, bits=bits)
            use_fast_layers(model, mx.Device(mx.cpu))
        runs = []
        for on in (True, False):
            if not on:
                monkeypatch.setattr(kernels, "_library", lambda: None)
            calls.clear()
            alone = [
                [r.token for r in stream_generate(model, tok, p, max_tokens=8, temp=0.0) if r.token is not None]
                for p in prompts
            ]
            batched = [r.tokens for r in batch_generate(model, tok, prompts, max_tokens=8, temp=0.0)]
            assert bool(calls) == on
            runs.append((alone, batched))
        monkeypatch.setattr(kernels, "_library", real_library)
        assert runs[0] == runs[1]
        assert runs[0][0] == runs[0][1]


real_library = kernels._library


def _operands(kind: str, n: int, k: int, bias: bool) -> tuple[kernels.Operands, np.ndarray, np.ndarray | None]:
    """Operands of one kind for the fused calls, with the float64 matrix and bias they stand for."""
    mx.random.seed(n + k)
    layer = nn.Linear(k, n, bias=bias)
    if kind == "bfloat16":
        layer.set_dtype(mx.bfloat16)
    b = layer.bias if bias else None
    if kind in ("float32", "bfloat16"):
        return kernels.Operands(layer.weight, bias=b), np.array(layer.weight.astype(mx.float32), np.float64), _f64(b)
    q = nn.QuantizedLinear.from_linear(layer, group_size=32, bits=int(kind[0]))
    dense = mx.dequantize(q.weight, q.scales, q.biases, group_size=32, bits=q.bits)
    return kernels.Operands(q.weight, q.scales, q.biases, 32, q.bits, b), np.array(dense, np.float64), _f64(b)


def _f64(a: mx.array | None) -> np.ndarray | None:
    return None if a is None else np.array(a.astype(mx.float32), np.float64)


def _rms_norm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt((x * x).mean(axis=-1, keepdims=True) + eps) * w


@needs_kernels
@pytest.mark.parametrize("rows", [1, 3, 8, 16])
@pytest.mark.parametrize("kind", ["float32", "bfloat16", "4bit", "8bit"])
def test_norm_products_equal_the_norm_then_each_product(rows, kind):
    """q, k, v (or gate, up) in one call: rms_norm(x) @ W_i.T + b_i, each matrix of its own width."""
    rng = np.random.default_rng(rows)
    x = rng.standard_normal((rows, 128)).astype(np.float32) * 3
    weight = mx.array(rng.standard_normal(128).astype(np.float32)).astype(
        mx.bfloat16 if kind == "bfloat16" else mx.float32
    )
    matrices = [_operands(kind, n, 128, bias) for n, bias in ((96, True), (32, True), (40, False))]
    ys = kernels.norm_products(x, kernels.vector(weight), 1e-6, [m for m, _, _ in matrices])
    normed = _rms_norm(x.astype(np.float64), _f64(weight), 1e-6)
    for y, (_, w, b) in zip(ys, matrices):
        expected = normed @ w.T + (b if b is not None else 0)
        np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


@needs_kernels
@pytest.mark.parametrize("rows", [1, 5, 16])
@pytest.mark.parametrize("kind", ["float32", "bfloat16", "4bit"])
def test_residual_product_equals_the_residual_plus_the_product(rows, kind):
    """o_proj (residual + a @ W.T) and down_proj (residual + (silu(gate) * a) @ W.T) in one call each."""
    rng = np.random.default_rng(rows)
    a, gate = (rng.standard_normal((rows, 160)).astype(np.float32) * 4 for _ in range(2))
    residual = rng.standard_normal((rows, 64)).astype(np.float32)
    m, w, _ = _operands(kind, 64, 160, False)
    silu = gate.astype(np.float64) / (1 + np.exp(-gate.astype(np.float64)))
    for g, inputs in ((None, a.astype(np.float64)), (gate, silu * a)):
        y = kernels.residual_product(a, residual, m, gate=g)
        expected = residual + inputs @ w.T
        np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


@needs_kernels
def test_silu_of_the_fused_call_across_float32s_range():
    """SiLU as the kernels compute it (their own e^x) within float32 rounding of the exact one, from where
    e^-x overflows to where SiLU is x."""
    g = np.concatenate([np.linspace(-120, 120, 4000), [-88.7, -87.1, -87.0, -1e-30, 0.0, 1e-30, 87.5, 89.0]])
    g = np.resize(g, (8, 512)).astype(np.float32)  # a multiple of 8 and 16 inputs
    identity = kernels.Operands(mx.eye(512))
    y = kernels.residual_product(np.ones_like(g), np.zeros_like(g), identity, gate=g)
    exact = g.astype(np.float64) / (1 + np.exp(-g.astype(np.float64)))
    np.testing.assert_allclose(y, exact, rtol=3e-7, atol=1e-35)  # e^-x capped at e^88, as elementwise.silu caps it


@needs_kernels
@pytest.mark.parametrize("size", [1, 15, 1 << 16, (1 << 16) + 5])  # a tail past the last whole vector; threads
def test_the_kernels_exp_is_float32_exact_and_zero_below_its_range(size):
    """kernels.exp (attention's e^x in prefill) against float64 e^x: within 2 ulp for -87 <= x <= 88, 0 below."""
    x = np.resize(np.concatenate([np.linspace(-87, 88, 997), [-1e4, -88.0, -87.5, -1e-30, 0.0]]), size)
    y = kernels.exp(x.astype(np.float32))
    exact = np.exp(x.astype(np.float32).astype(np.float64))
    inside = x >= -87
    np.testing.assert_allclose(y[inside], exact[inside], rtol=2.5e-7)
    assert (y[~inside] == 0).all()


def load_as(folder, kind: str) -> nn.Module:
    """The model in `folder` as `kind` (float32, bfloat16, 4bit: group 32), with the CPU layers."""
    from mlx_qwen2 import load
    from mlx_qwen2.quant.affine import quantize_model

    model, _ = load(folder)
    if kind == "bfloat16":
        model.set_dtype(mx.bfloat16)
    elif kind == "4bit":
        quantize_model(model, group_size=32, bits=4)
    use_fast_layers(model, mx.Device(mx.cpu))  # again: the new layers, and what they are made of
    return model


def decoding_batch(folder, kind: str, seed: int) -> tuple[nn.Module, list, mx.array]:
    """The model in `folder` as `kind` (`load_as`), random caches of 6 positions for a batch of 5 rows, and
    one next token a row: a decode pass for the fused layer's tests."""
    from mlx_qwen2.backends.cpu import decoder

    model = load_as(folder, kind)
    assert all(type(layer) is decoder.FusedDecoderLayer for layer in model.layers)
    mx.random.seed(seed)
    shape = (5, model.args.n_kv_heads, 6, model.args.head_dim)
    kv = [(mx.random.normal(shape), mx.random.normal(shape)) for _ in model.layers]
    return model, kv, mx.array([[3], [17], [250], [9], [77]])


@needs_kernels
@pytest.mark.parametrize("tiny", ["untied", "tied"], indirect=True)
@pytest.mark.parametrize("kind", ["float32", "bfloat16", "4bit"])
def test_the_fused_decoder_layer_equals_the_layer(tiny, kind, monkeypatch):
    """A decode pass of a batch (kernels on) through `decoder.FusedDecoderLayer`'s four calls a layer gives
    the logits of `DecoderLayer`'s own path to float32 rounding; it takes that path outside `inference`."""
    from mlx_qwen2.backends.cpu import decoder
    from mlx_qwen2.cache.batch import BatchKVCache
    from mlx_qwen2.models.qwen2 import DecoderLayer

    model, kv, tokens = decoding_batch(tiny, kind, seed=3)
    calls = []
    real = kernels.norm_products
    monkeypatch.setattr(kernels, "norm_products", lambda *a: calls.append(1) or real(*a))

    def logits(fused: bool, inside: bool = True) -> np.ndarray:
        cache = [BatchKVCache(k, v, [0, 2, 0, 1, 0]) for k, v in kv]
        if not fused:
            monkeypatch.setattr(decoder.FusedDecoderLayer, "__call__", DecoderLayer.__call__)
        with fast.inference() if inside else contextlib.nullcontext():
            y = model(tokens, cache=cache)
        monkeypatch.undo()
        monkeypatch.setattr(kernels, "norm_products", lambda *a: calls.append(1) or real(*a))
        return np.array(y.astype(mx.float32))

    fused = logits(True)
    assert len(calls) == 2 * len(model.layers)  # q, k, v, and gate, up: one call each a layer
    calls.clear()
    unfused, outside = logits(False), logits(True, inside=False)
    assert not calls
    np.testing.assert_allclose(fused, unfused, atol=1e-4 * np.abs(unfused).max())
    np.testing.assert_allclose(outside, unfused, atol=1e-4 * np.abs(unfused).max())
    assert (fused.argmax(-1) == unfused.argmax(-1)).all()


@needs_kernels
@pytest.mark.parametrize("tiny", ["untied"], indirect=True)
def test_the_fused_layer_leaves_other_activations_to_the_plain_path(tiny, monkeypatch):
    """Activations other than the CPU embeddings' float32 go through `DecoderLayer`'s own path."""
    from mlx_qwen2 import load
    from mlx_qwen2.models.qwen2 import DecoderLayer

    model, _ = load(tiny)
    calls = []
    real = kernels.norm_products
    monkeypatch.setattr(kernels, "norm_products", lambda *a: calls.append(1) or real(*a))
    x = mx.random.normal((2, 1, model.args.hidden_size))
    with fast.inference():
        assert model.layers[0](x, None, None).dtype == mx.float32
        assert len(calls) == 2
        other = x.astype(mx.bfloat16)
        y, plain = model.layers[0](other, None, None), DecoderLayer.__call__(model.layers[0], other, None, None)
    assert len(calls) == 2
    assert y.dtype == plain.dtype and mx.array_equal(y, plain).item()
