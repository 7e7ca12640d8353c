"""Error-compensating (GPTQ) quantization into MLX's affine format.

Round-to-nearest quantizes each weight on its own. GPTQ quantizes the columns
of a weight matrix one at a time and spreads each column's rounding error over
the columns not yet quantized, weighted by the inverse Hessian H = X^T X of
the layer's calibration inputs, so the layer's *outputs* on real activations
move as little as possible. Layers are processed in order, each calibrated on
the outputs of the already-quantized layers before it.

The result is an ordinary quantized checkpoint (packed weights, scales,
biases): loaders need not know how it was made. Knows nothing of files.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..errors import UserError
from ..models import Model
from ..models.qwen2 import MLP, PROJECTIONS
from .dequantize import dequantized
from .recipes import output_layer

GPTQ_DENSE_ONLY = (
    "GPTQ (--calibrate) quantizes dense Qwen2 models only, not mixture-of-experts ones (each expert sees only "
    "the calibration tokens routed to it, too few for its Hessian); quantize without --calibrate (round-to-nearest)."
)


def pack(q: np.ndarray, bits: int) -> np.ndarray:
    """Integers (out, n) in [0, 2^bits) -> MLX's packed uint32 layout (a little-endian bit stream)."""
    out, n = q.shape
    bitplanes = ((q[..., None].astype(np.uint32) >> np.arange(bits, dtype=np.uint32)) & 1).astype(np.uint8)
    return np.packbits(bitplanes.reshape(out, n * bits), axis=1, bitorder="little").view(np.uint32)


def _grid(w: np.ndarray, bits: int, search: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Scale and bias (out, 1) of an affine grid for each row of a group.

    With `search`, the range [min, max] is shrunk by the factor (1.0, 0.95, ... 0.75)
    that gives each row the least squared rounding error: clipping a few outliers
    buys a finer grid for all the other weights.
    """
    lo, hi = w.min(axis=1, keepdims=True), w.max(axis=1, keepdims=True)
    top = 2**bits - 1
    best_scale, best_lo, best_err = None, None, None
    for shrink in (1.0, 0.95, 0.9, 0.85, 0.8, 0.75) if search else (1.0,):
        l, h = lo * shrink, hi * shrink
        scale = np.where(h - l == 0, 1e-8, (h - l) / top)
        err = ((np.clip(np.rint((w - l) / scale), 0, top) * scale + l - w) ** 2).sum(axis=1, keepdims=True)
        if best_err is None:
            best_scale, best_lo, best_err = scale, l, err
        else:
            better = err < best_err
            best_scale, best_lo = np.where(better, scale, best_scale), np.where(better, l, best_lo)
            best_err = np.minimum(err, best_err)
    return best_scale, best_lo


def gptq(
    w: np.ndarray, h: np.ndarray, bits: int, group_size: int, damp: float = 0.1, block: int = 128
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Quantize w (out, in) given H (in, in); returns (q ints (out, in), scales, biases (out, in / group)).

    `damp` adds that fraction of H's mean diagonal to its diagonal. With a few thousand
    calibration tokens H is poorly conditioned (for down_proj, 4,864 inputs can exceed the
    token count); 0.1 was chosen over the usual 0.01 on one text (the README's perplexity text,
    with an earlier calibration sample). `benchmarks/gptq.py` measures what GPTQ gains on
    held-out text.
    """
    w = w.astype(np.float32).copy()
    out_dim, in_dim = w.shape
    h = h.astype(np.float64).copy()
    dead = np.diag(h) == 0  # inputs never active: their weights cannot matter
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h[np.diag_indices(in_dim)] += damp * np.mean(np.diag(h))
    # Upper Cholesky factor of H^-1: row i holds how column i's error propagates to later columns.
    hinv = np.linalg.cholesky(np.linalg.inv(h)).T.astype(np.float32)
    q = np.zeros((out_dim, in_dim), np.int64)
    scales = np.zeros((out_dim, in_dim // group_size), np.float32)
    biases = np.zeros_like(scales)
    top = 2**bits - 1
    block = max(group_size, block - block % group_size)
    for b0 in range(0, in_dim, block):
        b1 = min(b0 + block, in_dim)
        wb, errors = w[:, b0:b1], np.zeros((out_dim, b1 - b0), np.float32)
        for j in range(b1 - b0):
            col = b0 + j
            if col % group_size == 0:  # the group's grid, from its weights as updated so far
                s, z = _grid(wb[:, j : j + group_size], bits)
                scales[:, col // group_size], biases[:, col // group_size] = s[:, 0], z[:, 0]
            g = col // group_size
            qc = np.clip(np.rint((wb[:, j] - biases[:, g]) / scales[:, g]), 0, top)
            q[:, col] = qc
            err = (wb[:, j] - (qc * scales[:, g] + biases[:, g])) / hinv[col, col]
            wb[:, j + 1 :] -= np.outer(err, hinv[col, col + 1 : b1])
            errors[:, j] = err
        w[:, b1:] -= errors @ hinv[b0:b1, b1:]
    return q, scales, biases


class _Capture(nn.Module):
    """Wraps a Linear; accumulates H = sum x^T x over the inputs it sees."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner
        self.h = np.zeros((inner.weight.shape[1],) * 2, np.float64)

    def __call__(self, x: mx.array) -> mx.array:
        flat = x.reshape(-1, x.shape[-1]).astype(mx.float32)  # (tokens, in)
        self.h += np.array(flat.T @ flat, dtype=np.float64)
        return self.inner(x)


def _quantized_linear(linear: nn.Linear, h: np.ndarray, settings: dict[str, Any]) -> nn.QuantizedLinear:
    bits, group_size = settings["bits"], settings["group_size"]
    q, scales, biases = gptq(np.array(linear.weight, dtype=np.float32), h, bits, group_size)
    out_dim, in_dim = linear.weight.shape
    has_bias = "bias" in linear
    layer = nn.QuantizedLinear(in_dim, out_dim, bias=has_bias, group_size=group_size, bits=bits)
    dtype = linear.weight.dtype
    layer.weight = mx.array(pack(q, bits))
    layer.scales, layer.biases = mx.array(scales).astype(dtype), mx.array(biases).astype(dtype)
    if has_bias:
        layer.bias = linear.bias
    return layer


def _get(module: nn.Module, dotted: str) -> nn.Module:
    for part in dotted.split("."):
        module = module[int(part)] if part.isdigit() else getattr(module, part)  # layers are a list
    return module


def _set(module: nn.Module, dotted: str, value: nn.Module) -> None:
    parent, _, name = dotted.rpartition(".")
    setattr(_get(module, parent) if parent else module, name, value)


def _quantized_head(head: nn.Module, h: np.ndarray, settings: dict[str, Any]) -> nn.Module:
    """The output layer (lm_head, or the tied embedding) quantized with GPTQ on the final hidden states."""
    bits, group_size = settings["bits"], settings["group_size"]
    q, scales, biases = gptq(np.array(head.weight, dtype=np.float32), h, bits, group_size)
    quantized = head.to_quantized(group_size=group_size, bits=bits)
    quantized.weight = mx.array(pack(q, bits))
    quantized.scales = mx.array(scales).astype(head.weight.dtype)
    quantized.biases = mx.array(biases).astype(head.weight.dtype)
    return quantized


def quantize_gptq(
    model: Model,
    calibration: Sequence[Sequence[int]],
    plan: Callable[[str], dict[str, Any]],
    progress: Callable[[int, int], None] | None = None,
) -> None:
    """Quantize in place: GPTQ for the projections and the output layer, round-to-nearest for the input embedding."""
    if not all(isinstance(layer.mlp, MLP) for layer in model.layers):
        raise UserError(GPTQ_DENSE_ONLY)
    hidden = [model.model.embed_tokens(mx.array([ids])) for ids in calibration]  # (1, L, D) each
    quantized: dict[str, nn.Module] = {}
    n_layers = len(model.layers)
    for i, layer in enumerate(model.layers):
        captures = {name: _Capture(_get(layer, name)) for name in PROJECTIONS}
        for name, cap in captures.items():
            _set(layer, name, cap)
        for h in hidden:
            mx.eval(layer(h, "causal", None))
        for name, cap in captures.items():
            path = f"model.layers.{i}.{name}"
            quantized[path] = _quantized_linear(cap.inner, cap.h, plan(path))
            _set(layer, name, dequantized(quantized[path]))  # float: fast for many tokens on CPU
        hidden = [layer(h, "causal", None) for h in hidden]  # what the next layer sees, from quantized weights
        mx.eval(hidden)
        if progress:
            progress(i + 1, n_layers + 1)
    h_head = np.zeros((model.args.hidden_size,) * 2, np.float64)
    for h in hidden:
        f = model.model.norm(h)[0].astype(mx.float32)  # (L, D)
        h_head += np.array(f.T @ f, dtype=np.float64)
    tied = model.args.tie_word_embeddings
    head_path = output_layer(tied)
    quantized[head_path] = _quantized_head(_get(model, head_path), h_head, plan(head_path))
    if not tied:
        embed = plan("model.embed_tokens")
        quantized["model.embed_tokens"] = model.model.embed_tokens.to_quantized(embed["group_size"], embed["bits"])
    for path, module in quantized.items():
        _set(model, path, module)
    mx.eval(model.parameters())
    if progress:
        progress(n_layers + 1, n_layers + 1)
