"""Faster layers for a backend, chosen at load time; each computes what the layer it replaces computes.

MLX's CPU backend is slow wherever a product's operands are all 16-bit
floats: its bfloat16 and float16 matmuls do not use BLAS, and its quantized
product with bfloat16 scales (mlx-lm's default) and bfloat16 activations is
~10x slower than with a float32 input, which MLX computes in float32 whatever
the scales' dtype. Its quantized kernel for many tokens (prefill) is also far
slower than dequantizing the matrix and using the float32 BLAS matmul. So on
CPU, quantized layers and 16-bit float layers compute in float32:

- quantized layers, for 1 or 2 tokens (decode; up to SMALL at widths other
  than 2, 4 and 8 bits): the quantized product with a float32 input, its
  row blocks spread over one CPU stream per core (MLX runs that kernel on
  one thread; each stream has its own; its cost grows with the rows);
- 2-, 4- and 8-bit layers for up to PAD_ROWS tokens (a batch decoding):
  `planes_product`, the packed fields of each byte turned into float32
  planes and multiplied by the matching inputs, never interleaved back;
- more tokens, and 16-bit float layers always: a float32 copy of the matrix
  (dequantized, or upcast) times the input, through BLAS (for one token,
  upcasting and BLAS's float32 product beat MLX's bfloat16 one by ~25%);

and round the result back to the activations' dtype. Inside generation's
passes (`inference`: nothing there is differentiated or compiled), every
product of up to kernels.MAX_ROWS rows (kernels.WIDE_ROWS for quantized and
16-bit weights: a prefill's too) goes instead to the compiled few-row
kernels (`kernels`), which read the matrix once on every core whatever its
kind (never a float32 copy), and a whole decoder layer's products, norms,
residuals and SiLU go to them in four calls (`decoder`); the paths above
serve training, other callers, machines without a C compiler, and
MLX_QWEN2_KERNELS=off. A forward pass of 2-8 tokens (a batch decoding) runs OpenBLAS on one thread and splits every
product over the CPU streams, one block each side by side (`pace`, set by
the embeddings as each pass starts; see SPLIT_TOKENS). The embeddings hand
the model float32 activations, as MLX's 16-bit elementwise operations
(norms, attention, residuals) are slow on CPU too: prefill of the 0.5B
model ~1.4x faster. The KV cache is then float32 as well, twice a 16-bit
cache (12 KB more per token for the 0.5B model). Float32 copies are made
for row blocks of the matrix, each waiting for the previous block's product
(`mx.depends`), so only a block or two of them exist at a time, never a
whole matrix. The backward pass (training on a quantized or 16-bit
base) recomputes the copies block by block instead of keeping them.
Weights, scales and biases stay as stored: nothing is added at rest.

GPUs (Metal, CUDA) have fast kernels for all of these, so there nothing is
swapped. Knows nothing of files.
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
from collections.abc import Callable, Iterator

import mlx.core as mx
import mlx.nn as nn

from ...models.qwen2 import MLP
from ...quant.dequantize import dequantize
from . import blas, kernels

SMALL = 4  # tokens; above this, the float32 copy of the matrix is faster on CPU
QUANTIZED_SMALL = 2  # tokens; above this a 2-, 4- or 8-bit product over planes is faster (benchmarks/decode_step.py)
# With OpenBLAS (0.3.21 here) a float32 product of 16 rows is faster than one of 4, 8 or 12 on every matrix
# of the 0.5B model (4864 x 896: 8 rows 1.34 ms, 16 rows 1.02 ms; likely only the larger one is threaded).
# So products of FEW_ROWS rows (a batch of 2..15 sequences decoding together) run on rows padded with
# zeros to PAD_ROWS: a decode step of 8 sequences took 185 against 220 ms.
PAD_ROWS = 16
FEW_ROWS = range(2, PAD_ROWS)
# OpenBLAS shares a product of a few rows between its threads poorly: each packs its share of the matrix,
# then computes, one after the other. Two halves of the matrix on one thread each, on the two CPU streams
# side by side, are faster (a decode step of 8 float32 sequences: 246 against 269 ms, 4-bit: 513 against
# 682 ms; benchmarks/decode_step.py), but OpenBLAS's thread count is process-wide: so `pace` sets it for
# a whole forward pass, from its tokens.
# A pass of SPLIT_TOKENS tokens (a batch of 2-8 sequences decoding) runs OpenBLAS on one thread and deals
# every product's rows out over the streams; other passes keep OpenBLAS's own threads (prefill: one
# thread a half is slower; 9-16 rows: the padded product is as fast). Only where the streams can use all
# of OpenBLAS's threads (here: 2 and 2; more cores than MAX_STREAMS keep OpenBLAS's threads).
SPLIT_TOKENS = range(2, 9)
# In generation's passes (`inference`), products of up to kernels.MAX_ROWS rows go to the compiled kernels
# (`kernels`; quantized and 16-bit weights up to kernels.WIDE_ROWS, blocks of `blocked_mlp` included),
# which read each matrix once on every core, for every kind of weight (float32 too: at 16 rows
# the kernel took 1.6 ms where OpenBLAS's AVX-512 product took 2.5 for a 4864 x 896 matrix in an ad-hoc
# timing; a whole float32 decode step of 16 sequences was a tie, 307 against 294-298 ms, benchmarks/decode_step.py).
COPY_BLOCK = 1 << 20  # weights per block when making float32 copies (4 MB)
PLANE_BITS = (2, 4, 8)  # widths whose fields never cross a byte (dequantize_f32, planes_product)
PLANES_BLOCK = 1 << 21  # weights per block of a 2-, 4- or 8-bit product over planes (see planes_product)
SMALL_COPY_BLOCK = 1 << 19  # the same for up to SMALL tokens: ~30% faster decoding of 16-bit weights here
PRODUCT_BLOCK = 1 << 24  # most weights per block of a quantized product for up to SMALL tokens
MAX_STREAMS = 8  # most CPU streams the quantized product for few tokens is spread over
F32 = mx.float32

Dense = Callable[..., mx.array]  # (weight block, *its scales and biases) -> float32 matrix block


def dequantize_f32(w: mx.array, scales: mx.array, biases: mx.array, group_size: int, bits: int) -> mx.array:
    """The float32 matrix of packed affine weights (..., out, in), as `quant.dequantize.dequantize` gives it.

    MLX's CPU dequantize is a composition over the packed uint32 words (a pair of shifts for each of the
    32 // bits fields, then a concatenation), twice the float32 output in temporaries. At 2, 4 and 8 bits
    a field never crosses a byte, so here each byte's fields are masked out of whole words and read as
    bytes (little-endian: the first field lowest): the same floats, ~2x faster, less held at once."""
    if bits not in PLANE_BITS:
        return dequantize(w, scales, biases, group_size, bits, dtype=F32)
    fields = [_field(w, bits, i) for i in range(8 // bits)]
    q = fields[0] if bits == 8 else mx.stack(fields, axis=-1)  # the bytes' fields interleaved back in order
    q = q.reshape(*w.shape[:-1], -1, group_size).astype(F32)  # (..., out, groups, group_size)
    return (q * scales.astype(F32)[..., None] + biases.astype(F32)[..., None]).reshape(*w.shape[:-1], -1)


def _field(w: mx.array, bits: int, i: int) -> mx.array:
    """Field i of every byte of packed words (..., n) at 2, 4 or 8 bits, as bytes (..., 4 n): inputs i, i + f,
    i + 2f, ... of each row (f = 8 // bits fields a byte)."""
    if bits == 8:
        return mx.view(w, mx.uint8)
    return mx.view((w >> (bits * i)) & ((1 << bits) - 1) * 0x01010101, mx.uint8)  # masked in whole words


def planes_product(
    x: mx.array, w: mx.array, scales: mx.array, biases: mx.array, group_size: int, bits: int
) -> mx.array:
    """x @ W.T, (..., in) x packed (out, in) -> (..., out), float32, at 2, 4 or 8 bits, W never interleaved.

    Field i of every byte of a row (masked out of whole words, as in `dequantize_f32`) is a plane holding
    inputs i, i + f, i + 2f, ... (f = 8 // bits fields a byte), in groups of group_size / f; so
    x @ W.T = sum over planes of x[..., i::f] @ (plane * scales).T, plus (x summed over each group) @ biases.T.
    Per weight that is a mask, a conversion and a product by the scale: no interleaving copy, no bias pass;
    the planes are made on the CPU streams side by side (MLX's elementwise operations use one thread each),
    the products go through BLAS."""
    fields = 8 // bits
    out, groups = scales.shape[-2], scales.shape[-1]
    s = scales.astype(F32)[..., None]  # (out, groups, 1)
    y = rows_product(x.reshape(*x.shape[:-1], groups, group_size).sum(axis=-1), biases.astype(F32))
    streams = _streams()
    own = _split and fields >= len(streams)  # each stream multiplies its own planes, on one thread
    terms = [y]
    for i in range(fields):
        with mx.stream(streams[i % len(streams)]):
            plane = _field(w, bits, i).reshape(out, groups, -1)  # (out, groups, group_size / f)
            plane = (plane.astype(F32) * s).reshape(out, -1)
            if own:
                terms.append(x[..., i::fields] @ plane.T)
        if not own:
            terms.append(rows_product(x[..., i::fields], plane))
    return functools.reduce(mx.add, terms)


# A prompt's chunks (generation's prefill) for a model whose products the kernels take up to
# kernels.WIDE_ROWS rows (quantized or 16-bit weights) run in passes of at most PASS_ROWS tokens: each
# pass's float32 activations (attention's scores, the MLPs' and experts' intermediates) are a quarter of
# a 512-token pass's, and the kernels' cost is about linear in the rows. The 4-bit MoE benchmark's
# 256-token prompt: 296-307 tokens/s and MLX's peak at 1.052x the weights, against 254-261 and 1.142-1.145
# in one pass; the 4-bit 0.5B model, 512 tokens: 122 against 126 tokens/s, 1.074x against 1.107x; bfloat16
# 129 against 134, 1.021x against 1.039x (ad-hoc, one process each). Float32 weights keep the caller's
# chunks: OpenBLAS's products gain from more rows (the float32 MoE: 255-285 against 308-331 tokens/s).
PASS_ROWS = 128


def prefill_rows(model: nn.Module, step: int) -> int:
    """The tokens of a prefill pass for a prompt chunk of `step`: at most PASS_ROWS where `use_fast_layers`
    found the kernels taking the model's products (see above), else `step`."""
    return min(step, PASS_ROWS) if model.__dict__.get("_wide_kernels", False) else step


def _tokens(x: mx.array) -> int:
    return x.size // x.shape[-1]


_passes = threading.local()  # depth: how many `inference` blocks this thread is in


@contextlib.contextmanager
def inference() -> Iterator[None]:
    """Forward passes built inside run few-row products through the compiled kernels (`kernels`). Only for
    passes nothing differentiates or compiles: a kernel's result is computed as the pass is built, outside
    MLX's graph (generation's prefill and decode steps enter it)."""
    depth = getattr(_passes, "depth", 0)
    _passes.depth = depth + 1
    try:
        yield
    finally:
        _passes.depth = depth


def in_inference() -> bool:
    """Whether the pass being built is inside `inference`."""
    return bool(getattr(_passes, "depth", 0))


def _kernel(
    x: mx.array, w: mx.array, scales: mx.array | None = None, biases: mx.array | None = None, group_size=0, bits=0
) -> mx.array | None:
    """x @ W.T by the compiled kernels where they apply (inside `inference`, few rows), else None."""
    if not in_inference() or not kernels.supported(_tokens(x), w, scales, group_size, bits):
        return None
    return kernels.product(x, w, scales, biases, group_size, bits).astype(x.dtype)


_split = False  # whether the forward pass being built splits its products (see SPLIT_TOKENS)


def pace(tokens: int) -> None:
    """Set up the products of a forward pass of `tokens` tokens (see SPLIT_TOKENS). The CPU embeddings call
    it as each pass starts, before the pass's products are built; OpenBLAS reads its thread count as each
    call starts, so a pass still running from before is only slower for a moment, never different."""
    global _split
    split = tokens in SPLIT_TOKENS and 1 < blas.own_threads <= len(_streams())  # the streams use every thread
    if split != _split:
        blas.set_threads(1 if split else blas.own_threads)
        _split = split


def settle() -> None:
    """OpenBLAS back to its own thread count (generation calls it as it ends: a last pass of SPLIT_TOKENS
    tokens would otherwise leave OpenBLAS on one thread for whatever the process multiplies next)."""
    pace(0)


def splitting() -> bool:
    """Whether the forward pass being built splits its products over the CPU streams (see SPLIT_TOKENS)."""
    return _split


def rows_product(x: mx.array, w: mx.array, dense: Callable[[mx.array], mx.array] | None = None) -> mx.array:
    """x @ dense(w).T, (..., in) x (out, in) -> (..., out), `dense` making w's float32 matrix (default: w
    itself); split over the CPU streams in a pass of SPLIT_TOKENS tokens, else a product of 2..15 rows
    padded to 16 (see PAD_ROWS)."""
    if _split:
        return _split_product(x, w, dense)
    rows, w = _tokens(x), w if dense is None else dense(w)
    if rows not in FEW_ROWS:
        return x @ w.T
    flat = mx.pad(x.reshape(rows, x.shape[-1]), [(0, PAD_ROWS - rows), (0, 0)])
    return (flat @ w.T)[:rows].reshape(*x.shape[:-1], w.shape[0])


def _split_product(x: mx.array, w: mx.array, dense: Callable[[mx.array], mx.array] | None) -> mx.array:
    """x @ dense(w).T with w's rows in one block per CPU stream, each block made and multiplied on its own."""
    flat, rows = x.reshape(-1, x.shape[-1]), w.shape[0]
    blocks = _row_blocks(rows, 1, -(-rows // len(_streams())))  # one block a stream
    parts = _spread(blocks, (w,), lambda b: flat @ (b if dense is None else dense(b)).T)
    return mx.concatenate(parts, axis=-1).reshape(*x.shape[:-1], rows)


def _row_blocks(rows: int, row_size: int, budget: int) -> list[slice]:
    step = max(1, budget // row_size)
    return [slice(start, start + step) for start in range(0, rows, step)]


def _in_turn(blocks: list[slice], params: tuple[mx.array, ...], first: mx.array, step: Callable) -> list[mx.array]:
    """`step(block, *params[block])` for each row block, each only after the previous one's result."""
    results, previous = [], first
    for part in blocks:
        previous = step(part, *mx.depends([p[part] for p in params], previous))
        results.append(previous)
    return results


@functools.cache
def _streams() -> tuple[mx.Stream, ...]:
    """One CPU stream (each runs on its own thread) per core this process may use, at most MAX_STREAMS."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return tuple(mx.new_stream(mx.cpu) for _ in range(max(1, min(cores, MAX_STREAMS))))


def _spread(blocks: list[slice], params: tuple[mx.array, ...], step: Callable) -> list[mx.array]:
    """`step(*params[block])` for each row block, the blocks dealt out over the CPU streams."""
    streams = _streams()
    results = []
    for i, part in enumerate(blocks):
        with mx.stream(streams[i % len(streams)]):
            results.append(step(*[p[part] for p in params]))
    return results


def _forward(x: mx.array, params: tuple[mx.array, ...], in_dims: int, block: Callable, budget: int) -> mx.array:
    """x @ W.T as `block(x32, *params[rows])` over row blocks of about `budget` weights, one after another."""
    x32 = x.astype(F32)
    blocks = _row_blocks(params[0].shape[0], in_dims, budget)
    parts = _in_turn(blocks, params, x32, lambda _, *p: block(x32, *p))
    y = parts[0] if len(parts) == 1 else mx.concatenate(parts, axis=-1)
    return y.astype(x.dtype)


def _spread_forward(x: mx.array, params: tuple[mx.array, ...], in_dims: int, small: Callable) -> mx.array:
    """x @ W.T as `small(x32, *params[rows])` over row blocks dealt out over the CPU streams: as many blocks
    as a multiple of the streams, so that each stream gets the same work."""
    x32 = x.astype(F32)
    rows, n = params[0].shape[0], len(_streams())
    count = n * -(-rows * in_dims // (n * PRODUCT_BLOCK))
    parts = _spread(_row_blocks(rows, in_dims, -(-rows // count) * in_dims), params, lambda *p: small(x32, *p))
    y = parts[0] if len(parts) == 1 else mx.concatenate(parts, axis=-1)
    return y.astype(x.dtype)


def _input_grad(x: mx.array, params: tuple[mx.array, ...], in_dims: int, dense: Dense, cotangent: mx.array) -> mx.array:
    """cotangent @ W, one row block of W at a time, summed."""
    c32 = cotangent.astype(F32)
    blocks = _row_blocks(params[0].shape[0], in_dims, COPY_BLOCK)
    total = mx.zeros(x.shape, F32)

    def step(part: slice, *p: mx.array) -> mx.array:
        nonlocal total
        total = total + c32[..., part] @ dense(*p)
        return total

    _in_turn(blocks, params, c32, step)
    return total.astype(x.dtype)


@functools.cache
def quantized_product(group_size: int, bits: int) -> Callable[..., mx.array]:
    """(x, weight, scales, biases) -> x @ W.T for a quantized W, computed as described above."""

    def dense(w: mx.array, scales: mx.array, biases: mx.array) -> mx.array:
        return dequantize_f32(w, scales, biases, group_size, bits)

    def small(x32: mx.array, w: mx.array, scales: mx.array, biases: mx.array) -> mx.array:
        return mx.quantized_matmul(x32, w, scales, biases, transpose=True, group_size=group_size, bits=bits)

    def planes(x32: mx.array, w: mx.array, scales: mx.array, biases: mx.array) -> mx.array:
        return planes_product(x32, w, scales, biases, group_size, bits)

    def copies(x32: mx.array, w: mx.array, scales: mx.array, biases: mx.array) -> mx.array:
        return rows_product(x32, dense(w, scales, biases))

    @mx.custom_function
    def product(x: mx.array, w: mx.array, scales: mx.array, biases: mx.array) -> mx.array:
        in_dims, params, tokens = scales.shape[-1] * group_size, (w, scales, biases), _tokens(x)
        if tokens <= QUANTIZED_SMALL or (tokens <= SMALL and bits not in PLANE_BITS):
            return _spread_forward(x, params, in_dims, small)
        if tokens <= PAD_ROWS and bits in PLANE_BITS:  # a batch decoding: planes, no float32 copy
            return _forward(x, params, in_dims, planes, PLANES_BLOCK)
        return _forward(x, params, in_dims, copies, COPY_BLOCK)  # prefill: one full-width product a block

    @product.vjp
    def product_vjp(primals: tuple, cotangent: mx.array, output: mx.array) -> tuple:
        x, w, scales, biases = primals
        dx = _input_grad(x, (w, scales, biases), scales.shape[-1] * group_size, dense, cotangent)
        return dx, mx.zeros_like(w), mx.zeros_like(scales), mx.zeros_like(biases)  # quantized: not trainable

    return product


@mx.custom_function
def upcast_product(x: mx.array, w: mx.array) -> mx.array:
    """x @ W.T for a 16-bit float W, computed in float32 as described above (the weight is trainable)."""
    budget = SMALL_COPY_BLOCK if _tokens(x) <= SMALL else COPY_BLOCK
    return _forward(x, (w,), w.shape[-1], lambda x32, b: rows_product(x32, b, _upcast), budget)


def _upcast(w: mx.array) -> mx.array:
    return w.astype(F32)


@upcast_product.vjp
def _upcast_vjp(primals: tuple, cotangent: mx.array, output: mx.array) -> tuple:
    x, w = primals
    dx = _input_grad(x, (w,), w.shape[-1], lambda b: b.astype(F32), cotangent)
    c32, x32 = cotangent.astype(F32), x.astype(F32)
    dw = c32.reshape(-1, c32.shape[-1]).T @ x32.reshape(-1, x32.shape[-1])
    return dx, dw.astype(w.dtype)


def _is_16_bit(x: mx.array) -> bool:
    return x.dtype in (mx.float16, mx.bfloat16)


def _quantized(x: mx.array, layer: nn.Module) -> mx.array:
    """x @ W.T for a quantized layer's (or embedding's) W."""
    params = (layer.weight, layer.scales, layer.biases)
    y = _kernel(x, *params, layer.group_size, layer.bits)
    return y if y is not None else quantized_product(layer.group_size, layer.bits)(x, *params)


def _float(x: mx.array, w: mx.array) -> mx.array:
    """x @ W.T for a float layer's (or embedding's) W."""
    y = _kernel(x, w)
    if y is not None:
        return y
    return upcast_product(x, w) if _is_16_bit(w) else rows_product(x, w)


# An MLP of quantized or 16-bit weights over many rows (prefill) in generation's passes runs a block of its
# hidden width at a time, so its (rows, hidden) intermediates are never whole. For 352 rows of the 0.5B
# model at 4 bits, one layer's MLP held 43 MB beyond its input and output (the gate and up products,
# SiLU's and the product's intermediates, 6.8 MB each, and each product's parts before they are joined);
# in blocks of 640, a layer's peak fell from 46 to 20 MB, and the prefill of those rows took 2.8-2.9 s
# against 3.5 (bfloat16: 2.6 s against 2.6-2.9, peak over the weights and cache 85 MB against 124; ad-hoc,
# interleaved). Float32 weights are not copied per block, and there blocks were slower (2.6-3.0 s
# against 2.1-2.2) for no gain in peak: they keep the whole products. Blocks of about MLP_BLOCK
# activations, at least MIN_MLP_WIDTH wide, a multiple of MLP_ALIGN (every group size divides it).
MLP_BLOCK = 1 << 18
MIN_MLP_WIDTH = 256
MLP_ALIGN = 128


def blocked_mlp(mlp: nn.Module, x: mx.array) -> mx.array | None:
    """mlp(x) (an `MLP`: down(silu(gate(x)) * up(x))) computed a block of its hidden units at a time:

        down(silu(gate(x)) * up(x)) = sum over blocks b of  (silu(x @ Wg[b].T) * (x @ Wu[b].T)) @ Wd[:, b].T

    each block after the one before (so one block's intermediates exist at a time). The same function, to
    float32 rounding (the down product's sum is taken in another order). None where it does not apply:
    outside `inference`, a pass of few rows, or layers other than this backend's unbiased Linear layers
    (float32 weights, LoRA and tensor-parallel layers, 3-, 5- or 6-bit weights whose packed columns do not
    split cleanly)."""
    gate, up, down = mlp.gate_proj, mlp.up_proj, mlp.down_proj
    if not in_inference() or _tokens(x) <= kernels.MAX_ROWS or not all(_splits(m) for m in (gate, up, down)):
        return None
    hidden = gate.weight.shape[0]
    width = max(MIN_MLP_WIDTH, MLP_BLOCK // _tokens(x) // MLP_ALIGN * MLP_ALIGN)
    if width >= hidden:
        return None
    y = None
    for start in range(0, hidden, width):
        part = slice(start, min(start + width, hidden))
        xb = x if y is None else mx.depends([x], [y])[0]
        a = mlp.silu(_block(gate, xb, rows=part)) * _block(up, xb, rows=part)
        term = _block(down, a, cols=part)
        y = term if y is None else y + term
    return y


def _splits(layer: nn.Module) -> bool:
    """Whether `_block` takes this layer."""
    if "bias" in layer:
        return False
    if type(layer) is DequantizingLinear:
        return layer.bits in PLANE_BITS and layer.group_size <= MLP_ALIGN and MLP_ALIGN % layer.group_size == 0
    return type(layer) is UpcastingLinear and _is_16_bit(layer.weight)


def _block(layer: nn.Module, x: mx.array, rows: slice | None = None, cols: slice | None = None) -> mx.array:
    """x @ W[rows].T or x @ W[:, cols].T for the layer's W (cols: on group boundaries)."""
    if type(layer) is UpcastingLinear:
        w = layer.weight[rows] if rows is not None else layer.weight[:, cols]
        return _float(x, w)
    params = (layer.weight, layer.scales, layer.biases)
    if rows is not None:
        params = tuple(p[rows] for p in params)
    else:
        per_word, group = 32 // layer.bits, layer.group_size
        w, scales, biases = params
        params = (
            w[:, cols.start // per_word : cols.stop // per_word],
            scales[:, cols.start // group : cols.stop // group],
            biases[:, cols.start // group : cols.stop // group],
        )
    y = _kernel(x, *params, layer.group_size, layer.bits)  # up to kernels.WIDE_ROWS rows: no float32 copy
    return y if y is not None else quantized_product(layer.group_size, layer.bits)(x, *params)


class BlockingMLP(MLP):
    """An MLP whose prefill in generation's passes runs in blocks of hidden units (`blocked_mlp`) where it
    can; elsewhere MLP's own products."""

    def __call__(self, x: mx.array) -> mx.array:
        y = blocked_mlp(self, x)
        return y if y is not None else super().__call__(x)


class DequantizingLinear(nn.QuantizedLinear):
    """A QuantizedLinear computed in float32 (see above)."""

    def __call__(self, x: mx.array) -> mx.array:
        y = _quantized(x, self)
        return y + self.bias if "bias" in self else y


class DequantizingEmbedding(nn.QuantizedEmbedding):
    """A QuantizedEmbedding giving float32 activations, whose use as the output layer (tied models) is
    computed in float32."""

    def __call__(self, x: mx.array) -> mx.array:
        pace(x.size)  # a forward pass starts here
        return super().__call__(x).astype(F32)

    def as_linear(self, x: mx.array) -> mx.array:
        return _quantized(x, self)


class UpcastingLinear(nn.Linear):
    """A float Linear computed in float32: 16-bit weights upcast block by block; few-row products padded."""

    def __call__(self, x: mx.array) -> mx.array:
        y = _float(x, self.weight)
        return y + self.bias if "bias" in self else y


class UpcastingEmbedding(nn.Embedding):
    """A float Embedding giving float32 activations, whose use as the output layer (tied models) is computed
    like UpcastingLinear's."""

    def __call__(self, x: mx.array) -> mx.array:
        pace(x.size)  # a forward pass starts here
        return super().__call__(x).astype(F32)

    def as_linear(self, x: mx.array) -> mx.array:
        return _float(x, self.weight)
