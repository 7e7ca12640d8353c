"""Stacked experts: one weight (experts, out, in) and gathered products over it, float or quantized.

Each token's chosen experts are applied with `mx.gather_mm` / `mx.gather_qmm` (no
Python loop over experts). With many (token, expert) pairs (prefill), the pairs are
sorted by expert first, so each expert's rows are contiguous and its weight is read
once. Knows nothing of routing: the caller chooses the experts.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

SORT_PAIRS = 64  # (token, expert) pairs from which sorting by expert pays (mlx-lm's threshold too)


class SwitchLinear(nn.Module):
    """`num_experts` bias-free Linear layers stacked: weight (E, out, in); row i times its experts' W[e].T."""

    def __init__(self, input_dims: int, output_dims: int, num_experts: int):
        super().__init__()
        scale = input_dims**-0.5
        self.weight = mx.random.uniform(-scale, scale, (num_experts, output_dims, input_dims))

    @property
    def num_experts(self) -> int:
        return self.weight.shape[0]

    def __call__(self, x: mx.array, indices: mx.array, sorted_indices: bool = False) -> mx.array:
        """x (..., 1, in), indices (..., k) -> (..., k, 1, out)."""
        return mx.gather_mm(x, self.weight.swapaxes(-1, -2), rhs_indices=indices, sorted_indices=sorted_indices)

    def to_quantized(self, group_size: int = 64, bits: int = 4, mode: str = "affine") -> QuantizedSwitchLinear:
        return QuantizedSwitchLinear(self.weight, group_size, bits, mode)


class QuantizedSwitchLinear(nn.Module):
    """SwitchLinear with each expert's matrix quantized along its input dimension (mlx-lm's layout)."""

    def __init__(self, weight: mx.array, group_size: int = 64, bits: int = 4, mode: str = "affine"):
        """From the float stacked weight (E, out, in)."""
        super().__init__()
        self.group_size, self.bits, self.mode = group_size, bits, mode
        self._set(weight)
        self.freeze()

    def _set(self, weight: mx.array) -> None:
        self.weight, self.scales, *biases = mx.quantize(weight, self.group_size, self.bits, mode=self.mode)
        if biases:
            self.biases = biases[0]

    @property
    def num_experts(self) -> int:
        return self.weight.shape[0]

    def __call__(self, x: mx.array, indices: mx.array, sorted_indices: bool = False) -> mx.array:
        return mx.gather_qmm(
            x,
            self["weight"],
            self["scales"],
            self.get("biases"),
            rhs_indices=indices,
            transpose=True,
            group_size=self.group_size,
            bits=self.bits,
            mode=self.mode,
            sorted_indices=sorted_indices,
        )


def _by_expert(x: mx.array, indices: mx.array) -> tuple[mx.array, mx.array, mx.array]:
    """Pairs sorted by expert: rows (N*k, 1, D), their experts (N*k,), and the order that undoes the sort."""
    k = indices.shape[-1]
    flat = indices.flatten()
    order = mx.argsort(flat)
    return x.flatten(0, -3)[order // k], flat[order], mx.argsort(order)  # x: (..., 1, 1, D) -> (N, 1, D) first


class SwitchGLU(nn.Module):
    """`num_experts` SwiGLU MLPs (gate_proj, up_proj, down_proj stacked), each token through its k experts."""

    silu = staticmethod(nn.silu)  # a backend may set one that computes the same faster (backends/cpu)

    def __init__(self, input_dims: int, hidden_dims: int, num_experts: int):
        super().__init__()
        self.gate_proj = SwitchLinear(input_dims, hidden_dims, num_experts)
        self.up_proj = SwitchLinear(input_dims, hidden_dims, num_experts)
        self.down_proj = SwitchLinear(hidden_dims, input_dims, num_experts)

    def __call__(self, x: mx.array, indices: mx.array) -> mx.array:
        """x (..., D), indices (..., k) -> each expert's output, (..., k, D)."""
        indices = mx.stop_gradient(indices)
        x = mx.expand_dims(x, (-2, -3))  # (..., 1, 1, D): one row, shared by the k experts
        sort = indices.size >= SORT_PAIRS
        idx, undo = indices, None
        if sort:
            x, idx, undo = _by_expert(x, indices)
        h = self.silu(self.gate_proj(x, idx, sort)) * self.up_proj(x, idx, sort)
        y = self.down_proj(h, idx, sort)
        if sort:
            y = y[undo].reshape(*indices.shape, 1, y.shape[-1])  # back to (..., k, 1, D)
        return y.squeeze(-2)
