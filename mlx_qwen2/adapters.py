"""LoRA and DoRA layers: apply to a model, fuse into it, save and load them (mlx-lm's format).

An adapted Linear computes  y = W x + scale * B A x  (LoRA), or, for DoRA,
y = m * (W + scale * B A) x / ||W + scale * B A||_rows. `lora_a` is (in, rank)
and `lora_b` (rank, out), as mlx-lm stores them, so each tool loads the
other's adapters. Works on float and quantized (QLoRA) bases. Knows nothing
of files beyond the two an adapter folder holds.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from .model import PROJECTIONS

DEFAULT_KEYS = PROJECTIONS
ADAPTER_LEAVES = ("lora_a", "lora_b", "m")


def _weight(linear: nn.Module) -> mx.array:
    """The float weight (out, in) of a Linear or QuantizedLinear."""
    if isinstance(linear, nn.QuantizedLinear):
        return mx.dequantize(linear.weight, linear.scales, linear.biases, linear.group_size, linear.bits)
    return linear.weight


def _in_dims(linear: nn.Module) -> int:
    if isinstance(linear, nn.QuantizedLinear):
        return linear.weight.shape[1] * 32 // linear.bits
    return linear.weight.shape[1]


class LoRALinear(nn.Module):
    """A frozen Linear (or QuantizedLinear) plus a trainable low-rank update."""

    def __init__(self, linear: nn.Module, rank: int = 8, scale: float = 20.0, dropout: float = 0.0):
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be at least 1, got {rank}")
        in_dims, out_dims = _in_dims(linear), linear.weight.shape[0]
        self.linear = linear
        self.scale = scale
        self.dropout = nn.Dropout(p=dropout)
        bound = 1 / math.sqrt(in_dims)
        self.lora_a = mx.random.uniform(-bound, bound, (in_dims, rank))
        self.lora_b = mx.zeros((rank, out_dims))  # zero: a fresh adapter changes nothing

    def delta(self) -> mx.array:
        """scale * B A as an (out, in) matrix."""
        return (self.scale * self.lora_b.T) @ self.lora_a.T

    def __call__(self, x: mx.array) -> mx.array:
        z = (self.dropout(x) @ self.lora_a) @ self.lora_b
        return self.linear(x) + (self.scale * z).astype(x.dtype)

    def fused(self) -> nn.Linear:
        """A plain Linear computing what this layer computes (in eval mode)."""
        w = _weight(self.linear)
        return _linear(w + self.delta().astype(w.dtype), self.linear)


class DoRALinear(LoRALinear):
    """LoRA with a learned magnitude per output row (weight-decomposed low-rank adaptation)."""

    def __init__(self, linear: nn.Module, rank: int = 8, scale: float = 20.0, dropout: float = 0.0):
        super().__init__(linear, rank, scale, dropout)
        self.m = mx.linalg.norm(_weight(linear).astype(mx.float32), axis=1)  # (out,)

    def __call__(self, x: mx.array) -> mx.array:
        w = _weight(self.linear)
        y = x @ w.T + (self.scale * ((self.dropout(x) @ self.lora_a) @ self.lora_b)).astype(x.dtype)
        # The norm is treated as a constant in the backward pass, as the DoRA paper suggests.
        norm = mx.stop_gradient(mx.linalg.norm(w + self.delta().astype(w.dtype), axis=1))
        y = (self.m / norm).astype(x.dtype) * y
        return y + self.linear.bias if "bias" in self.linear else y

    def fused(self) -> nn.Linear:
        w = _weight(self.linear)
        adapted = w + self.delta().astype(w.dtype)
        return _linear((self.m / mx.linalg.norm(adapted, axis=1))[:, None].astype(w.dtype) * adapted, self.linear)


def _linear(weight: mx.array, like: nn.Module) -> nn.Linear:
    out = nn.Linear(weight.shape[1], weight.shape[0], bias="bias" in like)
    out.weight = weight
    if "bias" in like:
        out.bias = like.bias
    return out


def apply_adapters(
    model: nn.Module,
    num_layers: int,
    rank: int = 8,
    scale: float = 20.0,
    dropout: float = 0.0,
    keys: tuple[str, ...] | list[str] | None = None,
    dora: bool = False,
) -> None:
    """Freeze the model and wrap `keys` of its last `num_layers` layers in trainable adapters."""
    layers = model.layers
    if not 0 < num_layers <= len(layers) and num_layers != -1:
        raise ValueError(f"num_layers must be in 1..{len(layers)} (or -1 for all), got {num_layers}")
    keys = tuple(keys or DEFAULT_KEYS)
    unknown = [k for k in keys if k not in DEFAULT_KEYS]
    if unknown:
        raise ValueError(f"unknown adapter keys {unknown}; choose among {', '.join(DEFAULT_KEYS)}")
    model.freeze()
    cls = DoRALinear if dora else LoRALinear
    chosen = layers if num_layers == -1 else layers[-num_layers:]
    for layer in chosen:
        wrapped = [(k, cls(m, rank, scale, dropout)) for k, m in layer.named_modules() if k in keys]
        layer.update_modules(tree_unflatten(wrapped))


def fuse_adapters(model: nn.Module, dequantize: bool = False) -> None:
    """Replace every adapted layer by a plain layer computing the same function (re-quantized unless asked)."""
    fused = []
    for path, m in model.named_modules():
        if isinstance(m, LoRALinear):
            layer = m.fused()
            if isinstance(m.linear, nn.QuantizedLinear) and not dequantize:
                layer = nn.QuantizedLinear.from_linear(layer, m.linear.group_size, m.linear.bits)
            fused.append((path, layer))
    if fused:
        model.update_modules(tree_unflatten(fused))


def adapter_weights(model: nn.Module) -> dict[str, mx.array]:
    return dict(tree_flatten(model.trainable_parameters()))


def adapter_config(
    fine_tune_type: str, num_layers: int, rank: int, scale: float, dropout: float, keys: tuple[str, ...] | None
) -> dict[str, Any]:
    """adapter_config.json, in the layout mlx-lm writes and reads."""
    params: dict[str, Any] = {"rank": rank, "scale": scale, "dropout": dropout}
    if keys is not None and tuple(keys) != DEFAULT_KEYS:
        params["keys"] = list(keys)
    return {"fine_tune_type": fine_tune_type, "num_layers": num_layers, "lora_parameters": params}


def load_adapters(model: nn.Module, adapter_path: str | Path) -> None:
    """Apply the adapters saved in a folder (ours or mlx-lm's) to a loaded model."""
    folder = Path(adapter_path)
    config_path, weights_path = folder / "adapter_config.json", folder / "adapters.safetensors"
    for p in (config_path, weights_path):
        if not p.is_file():
            raise FileNotFoundError(
                f"{p} not found: an adapter folder holds adapter_config.json and adapters.safetensors."
            )
    config = json.loads(config_path.read_text())
    kind = config.get("fine_tune_type", "lora")
    if kind not in ("lora", "dora", "full"):
        raise ValueError(f"{config_path}: unknown fine_tune_type {kind!r}")
    if kind != "full":
        p = config.get("lora_parameters") or {}
        keys = [k for k in p.get("keys") or DEFAULT_KEYS]
        apply_adapters(model, config["num_layers"], p.get("rank", 8), p.get("scale", 20.0), 0.0, keys, kind == "dora")
    weights = mx.load(str(weights_path))
    params = dict(tree_flatten(model.parameters()))
    bad = [
        f"{k} {tuple(w.shape)} (model: {tuple(params[k].shape) if k in params else 'absent'})"
        for k, w in weights.items()
        if k not in params
        or params[k].shape != w.shape
        or (kind != "full" and k.rpartition(".")[2] not in ADAPTER_LEAVES)
    ]
    if bad:
        raise ValueError(f"the adapters in {folder} do not fit this model (another model's?): {'; '.join(bad[:3])}")
    model.load_weights(list(weights.items()), strict=False)
    model.eval()
