"""MoE experts on MLX's CPU backend: the same function as `models.experts.SwitchGLU`, computed faster.

MLX's CPU gathered products treat each (token, expert) pair as its own one-row
product: in prefill every pair reads its expert's whole matrix again, and the
quantized kernel runs on one thread. So on CPU:

- few pairs (decode): float32 experts as MLX gathers them (one matrix-vector
  product per pair, at the memory bound already); quantized experts with the
  pairs dealt out over one CPU stream per core (each runs on its own thread);
  16-bit float experts upcast, only the chosen ones;
- many pairs (prefill, large batches): the pairs are grouped by expert into a
  zero-padded (experts, most pairs of one expert, hidden) array, and each
  expert's group is one matrix product through BLAS; quantized and 16-bit
  experts are made float32 a block of experts at a time, each block waiting
  for the previous one's product (`mx.depends`), so only a block of copies
  exists at a time. The group sizes are read on the host (one sync per layer).

Adapters on the experts (LoRA) take MLX's gathered path. Knows nothing of files.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ...models.experts import QuantizedSwitchLinear, SwitchGLU, SwitchLinear
from ...quant.dequantize import dequantize
from .layers import F32, _in_turn, _is_16_bit, _streams

SMALL_PAIRS = 16  # (token, expert) pairs up to which experts are gathered, not grouped
EXPERT_COPY_BLOCK = 1 << 23  # weights per block of float32 copies of quantized or 16-bit experts (32 MB)
PLAIN = (SwitchLinear, QuantizedSwitchLinear)


class GroupingSwitchGLU(SwitchGLU):
    """A SwitchGLU computed as described above."""

    def __call__(self, x: mx.array, indices: mx.array) -> mx.array:
        projections = (self.gate_proj, self.up_proj, self.down_proj)
        if not all(type(p) in PLAIN for p in projections):
            return super().__call__(x, indices)  # adapters on the experts
        indices = mx.stop_gradient(indices)
        x32 = x.astype(F32)
        if indices.size > SMALL_PAIRS:
            y = _grouped(projections, x32, indices)
        elif isinstance(self.gate_proj, QuantizedSwitchLinear):
            y = _spread_pairs(x32, indices, lambda xs, idx: super(GroupingSwitchGLU, self).__call__(xs, idx))
        elif _is_16_bit(self.gate_proj.weight):
            y = _upcast_chosen(projections, x32, indices)
        else:
            y = super().__call__(x32, indices)
        return y.astype(x.dtype)


def _spread_pairs(x: mx.array, indices: mx.array, glu) -> mx.array:
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


def _upcast_chosen(projections: tuple[nn.Module, ...], x: mx.array, indices: mx.array) -> mx.array:
    """16-bit float experts: the chosen experts' matrices upcast (not all of them), then batched products."""
    flat = indices.reshape(-1)
    rows = mx.broadcast_to(x[..., None, :], (*indices.shape, x.shape[-1])).reshape(-1, 1, x.shape[-1])  # (P, 1, D)
    gate, up, down = (p.weight[flat].astype(F32).swapaxes(-1, -2) for p in projections)  # (P, in, out)
    y = (nn.silu(rows @ gate) * (rows @ up)) @ down  # (P, 1, D)
    return y.reshape(*indices.shape, x.shape[-1])


def _float_blocks(projections: tuple[nn.Module, ...]) -> tuple[tuple[mx.array, ...], int, object]:
    """The experts' parameters, experts per block, and (block's params) -> its float32 (gate, up, down)."""
    first = projections[0]
    if isinstance(first, QuantizedSwitchLinear):
        params = tuple(a for p in projections for a in (p.weight, p.scales, p.biases))
        group, bits = first.group_size, first.bits

        def floats(*ps: mx.array) -> tuple[mx.array, ...]:
            return tuple(dequantize(*ps[i : i + 3], group, bits, dtype=F32) for i in (0, 3, 6))

        per_expert = sum(p.weight.shape[1] * p.scales.shape[2] * group for p in projections)
    else:
        params = tuple(p.weight for p in projections)
        if not _is_16_bit(first.weight):
            return params, first.num_experts, lambda *ps: ps  # float32: the weights themselves, no copies
        per_expert = sum(p.weight[0].size for p in projections)

        def floats(*ps: mx.array) -> tuple[mx.array, ...]:
            return tuple(p.astype(F32) for p in ps)

    return params, max(1, EXPERT_COPY_BLOCK // per_expert), floats


def _grouped(projections: tuple[nn.Module, ...], x: mx.array, indices: mx.array) -> mx.array:
    """Pairs grouped by expert, one product per expert group (see the module docstring); (..., k, D)."""
    num_experts, k, dim = projections[0].num_experts, indices.shape[-1], x.shape[-1]
    flat = indices.reshape(-1)
    order = mx.argsort(flat)
    experts = np.array(flat[order])  # host sync: the group sizes decide the shapes below
    counts = np.bincount(experts, minlength=num_experts)
    cap = int(counts.max())
    slot = np.arange(experts.size) - (np.cumsum(counts) - counts)[experts]  # place in its expert's group
    dest = mx.array(experts * cap + slot)
    rows = x.reshape(-1, dim)[order // k]  # (P, D), sorted by expert
    groups = mx.zeros((num_experts * cap, dim), F32).at[dest].add(rows).reshape(num_experts, cap, dim)
    params, per_block, floats = _float_blocks(projections)
    blocks = [slice(e, min(e + per_block, num_experts)) for e in range(0, num_experts, per_block)]
    used = [b for b in blocks if counts[b].any()]  # a block of experts no token chose is skipped

    def step(part: slice, *ps: mx.array) -> mx.array:
        gate, up, down = floats(*ps)
        g = groups[part]  # (experts in block, cap, D)
        return (nn.silu(g @ gate.swapaxes(-1, -2)) * (g @ up.swapaxes(-1, -2))) @ down.swapaxes(-1, -2)

    done = dict(zip((b.start for b in used), _in_turn(used, params, groups, step)))
    outs = [done.get(b.start, mx.zeros((b.stop - b.start, cap, dim), F32)) for b in blocks]
    y = mx.concatenate(outs).reshape(-1, dim)[dest]  # sorted order
    return y[mx.argsort(order)].reshape(*indices.shape, dim)
