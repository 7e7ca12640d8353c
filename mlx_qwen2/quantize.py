"""Grouped (affine) quantization of a loaded model; returns the config block it applied.

The block has mlx-lm's on-disk format: {"group_size", "bits", "mode"} plus, per
module path, `false` for a layer kept in float or a dict of its own settings.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

BITS = (2, 3, 4, 5, 6, 8)
GROUP_SIZES = (32, 64, 128)


def validate(bits: int, group_size: int) -> None:
    if bits not in BITS:
        raise ValueError(f"--q-bits {bits} is not supported; choose one of {', '.join(map(str, BITS))}.")
    if group_size not in GROUP_SIZES:
        raise ValueError(
            f"--q-group-size {group_size} is not supported; choose one of {', '.join(map(str, GROUP_SIZES))}."
        )


def quantize_model(model: nn.Module, bits: int = 4, group_size: int = 64) -> dict[str, Any]:
    """Quantize every Linear and Embedding in place; returns the `quantization` config block."""
    validate(bits, group_size)
    for path, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Embedding)) and module.weight.shape[-1] % group_size:
            raise ValueError(
                f"--q-group-size {group_size} does not divide the input dimension {module.weight.shape[-1]} "
                f"of {path}; choose a group size that does."
            )
    nn.quantize(
        model, group_size=group_size, bits=bits, class_predicate=lambda _, m: isinstance(m, (nn.Linear, nn.Embedding))
    )
    return {"group_size": group_size, "bits": bits, "mode": "affine"}


def dequantize_model(model: nn.Module) -> None:
    """Replace quantized layers by float ones holding the dequantized weights, in place."""
    replacements = []
    for path, module in model.named_modules():
        if isinstance(module, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
            w = mx.dequantize(module.weight, module.scales, module.biases, module.group_size, module.bits)
            if isinstance(module, nn.QuantizedLinear):
                out_dims, in_dims = w.shape
                layer = nn.Linear(in_dims, out_dims, bias="bias" in module)
                if "bias" in module:
                    layer.bias = module.bias
            else:
                layer = nn.Embedding(*w.shape)
            layer.weight = w
            replacements.append((path, layer))
    if replacements:
        model.update_modules(tree_unflatten(replacements))


def weights_of(model: nn.Module) -> dict[str, mx.array]:
    return dict(tree_flatten(model.parameters()))
