"""MoE experts on MLX's CPU backend: the same function as `models.experts.SwitchGLU`, computed faster.

MLX's CPU gathered products treat each (token, expert) pair as its own one-row
product: in prefill every pair reads its expert's whole matrix again, and the
quantized kernel runs on one thread. So on CPU:

- few pairs (decode) outside generation's passes: float32 experts as MLX
  gathers them (one matrix-vector product per pair, at the memory bound
  already); quantized experts with the pairs dealt out over one CPU stream per
  core (each runs on its own thread); 16-bit float experts upcast, only the
  chosen ones;
- many pairs (prefill, large batches): the pairs are sorted by expert, and
  each expert's rows are one matrix product through BLAS (the group sizes
  are read on the host: one sync per layer); quantized and 16-bit experts
  are made float32 one expert at a time, each copy waiting for the previous
  expert's product (`mx.depends`), so one expert's copy exists at a time;
- in generation's passes (`layers.inference`), experts are always grouped,
  and groups of up to KERNEL_ROWS rows go to the compiled kernels (`kernels`:
  a few rows of the matrix made float32 at a time, in registers and cache,
  never a float32 copy of an expert, on every core). 4-bit, against a copy
  and BLAS: 1.3-2x faster at 64 rows (a group's usual size in a 256-token
  prefill of 16 experts top 4), ~4x at 16 (a batch decoding); one token
  decodes 1.6x faster than on the streams above (both before the kernels'
  bytes were widened in one instruction, which made one-row 4-bit products
  ~3x faster). float32: decode 1.15x and prefill 1.1x faster than MLX's
  gathered products and BLAS (the benchmark's model, ad-hoc). Where every
  expert has at most KERNEL_ROWS rows, the whole pass is done on the host
  (`_on_host`: each expert's rows gathered, multiplied and written to their
  (token, slot) places there, no MLX array of the pairs): in a 128-token
  prefill pass of the benchmark's 4-bit model MLX's peak fell from 1.052x
  to 1.050x the weights and the prefill went from 296-307 to 336-339
  tokens/s, float32's from ~300 to 348-363 (ad-hoc). A decoder layer decoding
  takes its experts through `host_mixture` instead (the weighted sum too).

Adapters on the experts (LoRA) take MLX's gathered path. Knows nothing of files.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ...models.experts import QuantizedSwitchLinear, SwitchGLU, SwitchLinear
from . import kernels
from .layers import F32, _is_16_bit, _streams, dequantize_f32, in_inference, rows_product, splitting

SMALL_PAIRS = 16  # (token, expert) pairs up to which experts are gathered, not grouped
KERNEL_ROWS = 160  # an expert's rows up to which its grouped products go to the kernels (past it BLAS wins)
PLAIN = (SwitchLinear, QuantizedSwitchLinear)


class GroupingSwitchGLU(SwitchGLU):
    """A SwitchGLU computed as described above."""

    def __call__(self, x: mx.array, indices: mx.array) -> mx.array:
        projections = (self.gate_proj, self.up_proj, self.down_proj)
        if not all(type(p) in PLAIN for p in projections):
            return super().__call__(x, indices)  # adapters on the experts
        indices = mx.stop_gradient(indices)
        x32 = x.astype(F32)
        by_kernels = _kernel_operands(projections)
        if by_kernels is not None:
            ids = np.array(indices).reshape(-1, indices.shape[-1])  # host sync: which rows each expert has
            if np.bincount(ids.reshape(-1)).max() <= KERNEL_ROWS:
                y = mx.array(_on_host(by_kernels, kernels.host(x32), ids)).reshape(*indices.shape, x.shape[-1])
                return y.astype(x.dtype)
        if indices.size > SMALL_PAIRS or by_kernels is not None:
            y = _grouped(projections, x32, indices, self.silu, by_kernels)
        elif _is_16_bit(self.gate_proj.weight):
            upcast = functools.partial(_upcast_chosen, projections, silu=self.silu)
            y = _spread_pairs(x32, indices, upcast) if splitting() else upcast(x32, indices)
        elif isinstance(self.gate_proj, QuantizedSwitchLinear) or splitting():
            y = _spread_pairs(x32, indices, super().__call__)  # float32: OpenBLAS on one thread (SPLIT_TOKENS)
        else:
            y = super().__call__(x32, indices)
        return y.astype(x.dtype)


def _spread_pairs(x: mx.array, indices: mx.array, glu: Callable) -> mx.array:
    """The k experts of each token dealt out over the CPU streams; (..., k, D)."""
    streams = _streams()
    k = indices.shape[-1]
    parts = [p for p in np.array_split(np.arange(k), min(k, len(streams))) if p.size]
    if len(parts) == 1:
        return glu(x, indices)
    outs = []
    for stream, part in zip(streams, parts):
        with mx.stream(stream):
            outs.append(glu(x, indices[..., int(part[0]) : int(part[-1]) + 1]))
    return mx.concatenate(outs, axis=-2)


def _upcast_chosen(projections: tuple[nn.Module, ...], x: mx.array, indices: mx.array, silu: Callable) -> mx.array:
    """16-bit float experts: the chosen experts' matrices upcast (not all of them), then batched products."""
    flat = indices.reshape(-1)
    rows = mx.broadcast_to(x[..., None, :], (*indices.shape, x.shape[-1])).reshape(-1, 1, x.shape[-1])  # (P, 1, D)
    gate, up, down = (p.weight[flat].astype(F32).swapaxes(-1, -2) for p in projections)  # (P, in, out)
    y = (silu(rows @ gate) * (rows @ up)) @ down  # (P, 1, D)
    return y.reshape(*indices.shape, x.shape[-1])


def _expert_floats(projections: tuple[nn.Module, ...]) -> list[Callable[[int, mx.array], mx.array]]:
    """For each projection, (expert, after) -> that expert's float32 matrix, made only once `after` is."""

    def one(p: nn.Module) -> Callable[[int, mx.array], mx.array]:
        if isinstance(p, QuantizedSwitchLinear):
            return lambda e, after: dequantize_f32(
                *mx.depends([p.weight[e], p.scales[e], p.biases[e]], after), p.group_size, p.bits
            )
        return lambda e, after: mx.depends([p.weight[e]], after)[0].astype(F32)  # no copy if float32

    return [one(p) for p in projections]


def _grouped(
    projections: tuple[nn.Module, ...],
    x: mx.array,
    indices: mx.array,
    silu: Callable,
    by_kernels: list[list[kernels.Operands]] | None = None,
) -> mx.array:
    """Pairs grouped by expert, one product per expert that has pairs (see the module docstring), through the
    kernels where `by_kernels` gives the experts' operands (`_kernel_operands`); (..., k, D).

    A loop over the experts with pairs, of host-known sizes: MLX's gathered product has no grouped form on
    CPU, and padding every group to the largest one costs more than it saves (routers are uneven: in the
    benchmark's model the busiest expert gets ~4x the mean)."""
    num_experts, k, dim = projections[0].num_experts, indices.shape[-1], x.shape[-1]
    flat = indices.reshape(-1)
    order = mx.argsort(flat)
    counts = np.bincount(np.array(flat), minlength=num_experts)  # host sync: the group sizes
    ends = np.cumsum(counts)
    rows = x.reshape(-1, dim)[order // k]  # (P, D), sorted by expert
    gate, up, down = _expert_floats(projections)
    outs, previous = [], rows
    if by_kernels is not None:
        host = kernels.host(rows)
    for e in map(int, np.flatnonzero(counts)):
        if by_kernels is not None and counts[e] <= KERNEL_ROWS:
            g_op, u_op, d_op = (ops[e] for ops in by_kernels)
            r = host[int(ends[e] - counts[e]) : int(ends[e])]
            g, u = kernels.products(r, [g_op, u_op])
            outs.append(mx.array(kernels.residual_product(u, None, d_op, gate=g)))
            continue
        # Each expert's weights (or float32 copies) wait for the previous product: gate's for the previous
        # expert's output, up's for gate's product, down's for both: one matrix's temporaries at a time (left
        # free to run side by side, MLX held ~4% of the weights' bytes more in float32, and more for copies).
        r = rows[int(ends[e] - counts[e]) : int(ends[e])]
        g = rows_product(r, gate(e, previous))
        h = silu(g) * rows_product(r, up(e, g))
        previous = rows_product(h, down(e, h))
        outs.append(previous)
    y = mx.concatenate(outs)  # sorted order: every pair is in one group
    return y[mx.argsort(order)].reshape(*indices.shape, dim)


def _kernel_operands(projections: tuple[nn.Module, ...]) -> list[list[kernels.Operands]] | None:
    """Each projection's experts as kernel operands, where the kernels take the grouped products (see the
    module docstring: in generation's passes, experts the kernels take), else None."""
    return stacked_operands(projections) if in_inference() else None


def stacked_operands(projections: tuple[nn.Module, ...]) -> list[list[kernels.Operands]] | None:
    """Each projection's experts as kernel operands (kept on the projection while its weights stay the same
    arrays: made once, not every pass), or None if the kernels do not take one of them."""
    operands = []
    for p in projections:
        quantized = (p.scales, p.biases, p.group_size, p.bits) if isinstance(p, QuantizedSwitchLinear) else ()
        ops = kernels.kept(p, (p.weight, *quantized[:2]), lambda p=p, q=quantized: _stacked(p, q))
        if ops is None:
            return None
        operands.append(ops)
    return operands


def _stacked(p: nn.Module, quantized: tuple) -> list[kernels.Operands] | None:
    scales = (quantized[0][0], *quantized[2:]) if quantized else ()
    if not kernels.supported(1, p.weight[0], *scales):  # one expert's matrix (any rows: one for the check)
        return None
    return kernels.stacked(p.weight, *quantized)


def _each_expert(operands: list[list[kernels.Operands]], x: np.ndarray, experts: np.ndarray) -> Iterator[tuple]:
    """For each expert chosen in `experts` (rows, k): the rows and slots that chose it, and its output for
    those rows of x (rows, D) float32 on the host, through the kernels."""
    gate, up, down = operands
    for e in np.unique(experts):
        rows, slot = np.nonzero(experts == e)  # a token's k experts are distinct: each row once
        g, u = kernels.products(np.ascontiguousarray(x[rows]), [gate[e], up[e]])
        yield rows, slot, kernels.residual_product(u, None, down[e], gate=g)


def _on_host(operands: list[list[kernels.Operands]], x: np.ndarray, experts: np.ndarray) -> np.ndarray:
    """Each (token, expert) pair's output (rows, k, D), computed on the host (no MLX array of the pairs:
    their gathered rows, outputs and reordering held ~4 of them at once, 2 MB each in a 128-token pass)."""
    y = np.empty((*experts.shape, x.shape[1]), np.float32)
    for rows, slot, out in _each_expert(operands, x, experts):
        y[rows, slot] = out
    return y


def mixture_operands(glu: nn.Module) -> list[list[kernels.Operands]] | None:
    """A CPU SwitchGLU's experts as kernel operands for `host_mixture`; None where the kernels do not take
    them (adapters on the experts, sizes they cannot)."""
    projections = (glu.gate_proj, glu.up_proj, glu.down_proj)
    if type(glu) is not GroupingSwitchGLU or not all(type(p) in PLAIN for p in projections):
        return None
    return stacked_operands(projections)


def host_mixture(
    operands: list[list[kernels.Operands]], x: np.ndarray, experts: np.ndarray, weights: np.ndarray
) -> np.ndarray:
    """sum_j weights[:, j] * expert_{experts[:, j]}(x) for x (rows, D) float32 on the host, its experts and
    their weights (rows, k): each expert's rows through the kernels (`mixture_operands`; an MoE decoder
    layer's experts in `decoder.FusedDecoderLayer`)."""
    y = np.zeros_like(x)
    for rows, slot, out in _each_expert(operands, x, experts):
        y[rows] += weights[rows, slot, None] * out
    return y
