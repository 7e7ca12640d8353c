"""The one dequantize helper: packed affine weights back to a float matrix, and quantized layers to float ones."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_unflatten

from ..models.experts import QuantizedSwitchLinear, SwitchLinear

QUANTIZED = (nn.QuantizedLinear, nn.QuantizedEmbedding, QuantizedSwitchLinear)


def dequantize(
    packed: mx.array, scales: mx.array, biases: mx.array, group_size: int, bits: int, dtype: mx.Dtype | None = None
) -> mx.array:
    """The float matrix (out, in) of packed affine weights; with `dtype`, computed from scales and biases in it."""
    if dtype is not None:
        scales, biases = scales.astype(dtype), biases.astype(dtype)
    return mx.dequantize(packed, scales, biases, group_size=group_size, bits=bits)


def float_weight(layer: nn.Module) -> mx.array:
    """The float weight (out, in) of a Linear or Embedding, quantized or not ((E, out, in) for experts)."""
    if isinstance(layer, QUANTIZED):
        return dequantize(layer.weight, layer.scales, layer.biases, layer.group_size, layer.bits)
    return layer.weight


def in_dims(layer: nn.Module) -> int:
    """Input width of a Linear, quantized or not (a packed row holds 32 // bits weights per uint32)."""
    if isinstance(layer, QUANTIZED):
        return layer.weight.shape[-1] * 32 // layer.bits
    return layer.weight.shape[-1]


def dequantized(module: nn.Module) -> nn.Module:
    """A float Linear, Embedding or SwitchLinear holding the dequantized weights of a quantized one (same
    function)."""
    w = float_weight(module)
    if isinstance(module, QuantizedSwitchLinear):
        layer = SwitchLinear(w.shape[2], w.shape[1], w.shape[0])
    elif isinstance(module, nn.QuantizedEmbedding):
        layer = nn.Embedding(*w.shape)
    else:
        layer = nn.Linear(w.shape[1], w.shape[0], bias="bias" in module)
        if "bias" in module:
            layer.bias = module.bias
    layer.weight = w
    return layer


def dequantize_model(model: nn.Module) -> None:
    """Replace quantized layers by float ones holding the dequantized weights, in place."""
    replacements = [(path, dequantized(m)) for path, m in model.named_modules() if isinstance(m, QUANTIZED)]
    if replacements:
        model.update_modules(tree_unflatten(replacements))
