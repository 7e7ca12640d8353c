"""Which layers are swapped for their CPU versions (`layers`, `experts`, `decoder`), and the swap itself; also where
SiLU and attention's exponentials are computed with `elementwise`'s."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_unflatten

from ...models.base import retyped
from ...models.experts import QuantizedSwitchLinear, SwitchGLU, SwitchLinear
from ...models.qwen2 import MLP, Attention, DecoderLayer
from . import elementwise, kernels
from .decoder import FusedDecoderLayer
from .experts import GroupingSwitchGLU
from .layers import (
    BlockingMLP,
    DequantizingEmbedding,
    DequantizingLinear,
    UpcastingEmbedding,
    UpcastingLinear,
    _is_16_bit,
)

_SWAPS = {
    nn.QuantizedLinear: DequantizingLinear,
    nn.QuantizedEmbedding: DequantizingEmbedding,
    nn.Linear: UpcastingLinear,
    nn.Embedding: UpcastingEmbedding,
    SwitchGLU: GroupingSwitchGLU,
}


def _wide(module: nn.Module) -> bool:
    """Whether the kernels take this layer's products up to kernels.WIDE_ROWS rows (layers.prefill_rows)."""
    if type(module) is UpcastingLinear:
        return _is_16_bit(module.weight)
    return type(module) in (DequantizingLinear, QuantizedSwitchLinear) or (
        type(module) is SwitchLinear and _is_16_bit(module.weight)
    )


def _wanted(module: nn.Module) -> bool:
    return type(module) in _SWAPS


def use_fast_layers(model: nn.Module, device: mx.Device | None = None) -> int:
    """Swap in the fast layers for `device` (default: MLX's default device); returns how many."""
    device = device or mx.default_device()
    if device.type != mx.cpu:
        return 0
    swaps = [(path, retyped(m, _SWAPS[type(m)])) for path, m in model.named_modules() if _wanted(m)]
    if swaps:
        model.update_modules(tree_unflatten(swaps))
    # Each after its children's swaps: a module holds its children as they are when it is retyped.
    _retype_all(model, MLP, BlockingMLP)
    _retype_all(model, DecoderLayer, FusedDecoderLayer)
    model.__dict__["_wide_kernels"] = kernels.available() and any(_wide(m) for m in model.modules())
    if elementwise.SLOW_EXP:
        for _, m in model.named_modules():
            if isinstance(m, (MLP, SwitchGLU)):
                m.silu = elementwise.silu
            elif isinstance(m, Attention):
                m.exp = elementwise.attention_exp
    return len(swaps)


def _retype_all(model: nn.Module, kind: type, cls: type) -> None:
    """Every module of exactly type `kind` as a `cls`."""
    found = [(path, retyped(m, cls)) for path, m in model.named_modules() if type(m) is kind]
    if found:
        model.update_modules(tree_unflatten(found))
