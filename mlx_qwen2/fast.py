"""Faster layers for a backend, chosen at load time; each computes what the layer it replaces computes.

MLX's CPU backend has no fast kernel for a quantized matrix times many tokens
(prefill): dequantizing the matrix and using the float matmul (BLAS) is ~10x
faster with float32 scales and ~150x with bfloat16 ones. Its quantized
matrix-vector product (decode) is ~10x faster with float32 scales than with
bfloat16 ones. GPUs (Metal, CUDA) have fast quantized kernels for both, so
there nothing is swapped. Knows nothing of files.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_unflatten


def _tokens(x: mx.array) -> int:
    return x.size // x.shape[-1]


class DequantizingLinear(nn.QuantizedLinear):
    """A QuantizedLinear that multiplies many tokens through the dequantized float matrix."""

    def __call__(self, x: mx.array) -> mx.array:
        if _tokens(x) == 1:
            return super().__call__(x)
        w = mx.dequantize(self.weight, self.scales, self.biases, self.group_size, self.bits)  # (out, in)
        y = x @ w.T
        return y + self.bias if "bias" in self else y


class DequantizingEmbedding(nn.QuantizedEmbedding):
    """A QuantizedEmbedding whose use as the output layer (tied models) dequantizes for many tokens."""

    def as_linear(self, x: mx.array) -> mx.array:
        if _tokens(x) == 1:
            return super().as_linear(x)
        return x @ mx.dequantize(self.weight, self.scales, self.biases, self.group_size, self.bits).T


_SWAPS = {nn.QuantizedLinear: DequantizingLinear, nn.QuantizedEmbedding: DequantizingEmbedding}


def _swap(module: nn.Module) -> nn.Module:
    fast = _SWAPS[type(module)].__new__(_SWAPS[type(module)])
    fast.__dict__.update(module.__dict__)  # settings: group_size, bits, frozen state
    dict.update(fast, module)  # parameters (a Module is a dict of them): same keys, so saving is unchanged
    # float32 scales and biases: exact for float16/bfloat16 ones, and much faster on CPU
    for name in ("scales", "biases"):
        if module[name].dtype in (mx.float16, mx.bfloat16):
            fast[name] = module[name].astype(mx.float32)
    return fast


def use_fast_layers(model: nn.Module, device: mx.Device | None = None) -> int:
    """Swap in the fast layers for `device` (default: MLX's default device); returns how many."""
    device = device or mx.default_device()
    if device.type != mx.cpu:
        return 0
    swaps = [(path, _swap(m)) for path, m in model.named_modules() if type(m) in _SWAPS]
    if swaps:
        model.update_modules(tree_unflatten(swaps))
    return len(swaps)
