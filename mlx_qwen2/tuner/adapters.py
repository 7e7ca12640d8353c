"""LoRA and DoRA layers: apply to a model, fuse into it, save and load them (mlx-lm's format).

An adapted Linear computes  y = W x + scale * B A x  (LoRA), or, for DoRA,
y = m * (W + scale * B A) x / ||W + scale * B A||_rows. `lora_a` is (in, rank)
and `lora_b` (rank, out), as mlx-lm stores them, so each tool loads the
other's adapters. Works on float and quantized (QLoRA) bases. Stacked MoE
experts get a gathered LoRA (one A and B per expert: `lora_a` (E, rank, in),
`lora_b` (E, out, rank), as mlx-lm stores them). Knows nothing of files
beyond the two an adapter folder holds.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from ..errors import UserError
from ..files import load_safetensors
from ..models.experts import QuantizedSwitchLinear, SwitchLinear
from ..models.qwen2 import PROJECTIONS
from ..quant.dequantize import float_weight as _weight
from ..quant.dequantize import in_dims as _in_dims

SHARED_EXPERT = ("mlp.shared_expert.gate_proj", "mlp.shared_expert.up_proj", "mlp.shared_expert.down_proj")
EXPERTS = ("mlp.switch_mlp.gate_proj", "mlp.switch_mlp.up_proj", "mlp.switch_mlp.down_proj")
ROUTERS = ("mlp.gate", "mlp.shared_expert_gate")
# By default every projection of a dense layer; in an MoE layer, attention and the shared expert (the experts
# and routers only when named: each expert sees a fraction of the tokens, and a router's update moves tokens).
DEFAULT_KEYS = PROJECTIONS + SHARED_EXPERT
KEYS = DEFAULT_KEYS + EXPERTS + ROUTERS
SWITCH = (SwitchLinear, QuantizedSwitchLinear)
ADAPTER_LEAVES = ("lora_a", "lora_b", "m")
FINE_TUNE_TYPES = ("lora", "dora", "full")
# The one source of the adapter defaults (mlx-lm's: rank 8, scale 20, no dropout).
DEFAULT_RANK, DEFAULT_SCALE, DEFAULT_DROPOUT = 8, 20.0, 0.0


def _set_low_rank(
    adapter: nn.Module,
    linear: nn.Module,
    rank: int,
    scale: float,
    dropout: float,
    a_shape: tuple[int, ...],
    b_shape: tuple[int, ...],
) -> None:
    """The frozen layer, the scale, dropout, and A (uniform in +-1/sqrt(in)) and B (zero) of an adapter."""
    if rank < 1:
        raise UserError(f"LoRA rank must be at least 1, got {rank}")
    adapter.linear = linear
    adapter.scale = scale
    adapter.dropout = nn.Dropout(p=dropout)
    bound = 1 / math.sqrt(_in_dims(linear))
    adapter.lora_a = mx.random.uniform(-bound, bound, a_shape)
    adapter.lora_b = mx.zeros(b_shape)  # zero: a fresh adapter changes nothing


class LoRALinear(nn.Module):
    """A frozen Linear (or QuantizedLinear) plus a trainable low-rank update."""

    def __init__(
        self,
        linear: nn.Module,
        rank: int = DEFAULT_RANK,
        scale: float = DEFAULT_SCALE,
        dropout: float = DEFAULT_DROPOUT,
    ):
        super().__init__()
        in_dims, out_dims = _in_dims(linear), linear.weight.shape[0]
        _set_low_rank(self, linear, rank, scale, dropout, (in_dims, rank), (rank, out_dims))

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

    def __init__(self, linear: nn.Module, *args: Any, **kwargs: Any):  # LoRALinear's rank, scale, dropout
        super().__init__(linear, *args, **kwargs)
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


class LoRASwitchLinear(nn.Module):
    """Frozen stacked experts (SwitchLinear, quantized or not) plus a low-rank update per expert."""

    def __init__(
        self,
        linear: nn.Module,
        rank: int = DEFAULT_RANK,
        scale: float = DEFAULT_SCALE,
        dropout: float = DEFAULT_DROPOUT,
    ):
        super().__init__()
        experts, out_dims, in_dims = linear.num_experts, linear.weight.shape[1], _in_dims(linear)
        _set_low_rank(self, linear, rank, scale, dropout, (experts, rank, in_dims), (experts, out_dims, rank))

    def __call__(self, x: mx.array, indices: mx.array, sorted_indices: bool = False) -> mx.array:
        y = self.linear(x, indices, sorted_indices)
        z = mx.gather_mm(
            self.dropout(x), self.lora_a.swapaxes(-1, -2), rhs_indices=indices, sorted_indices=sorted_indices
        )
        z = mx.gather_mm(z, self.lora_b.swapaxes(-1, -2), rhs_indices=indices, sorted_indices=sorted_indices)
        return y + (self.scale * z).astype(x.dtype)

    def fused(self) -> SwitchLinear:
        """Plain stacked experts computing what this layer computes (in eval mode)."""
        w = _weight(self.linear)  # (E, out, in)
        experts, out_dims, in_dims = w.shape
        layer = SwitchLinear(in_dims, out_dims, experts)
        layer.weight = w + ((self.scale * self.lora_b) @ self.lora_a).astype(w.dtype)
        return layer


def _linear(weight: mx.array, like: nn.Module) -> nn.Linear:
    out = nn.Linear(weight.shape[1], weight.shape[0], bias="bias" in like)
    out.weight = weight
    if "bias" in like:
        out.bias = like.bias
    return out


def last_layers(model: nn.Module, num_layers: int) -> list[nn.Module]:
    """The last `num_layers` decoder layers (-1: all of them)."""
    layers = model.layers
    if not 0 < num_layers <= len(layers) and num_layers != -1:
        raise UserError(f"num-layers must be in 1..{len(layers)} (or -1 for all), got {num_layers}")
    return layers if num_layers == -1 else layers[-num_layers:]


def apply_adapters(
    model: nn.Module,
    num_layers: int,
    rank: int = DEFAULT_RANK,
    scale: float = DEFAULT_SCALE,
    dropout: float = DEFAULT_DROPOUT,
    keys: tuple[str, ...] | list[str] | None = None,
    dora: bool = False,
    layers: list[nn.Module] | None = None,
) -> None:
    """Freeze the model and wrap `keys` of its last `num_layers` layers (or of `layers`) in trainable adapters."""
    chosen = last_layers(model, num_layers) if layers is None else layers
    keys = tuple(keys or DEFAULT_KEYS)
    unknown = [k for k in keys if k not in KEYS]
    if unknown:
        raise UserError(f"unknown adapter keys {unknown}; choose among {', '.join(KEYS)}")
    model.freeze()
    for layer in chosen:
        wrapped = [(k, _adapter(m, rank, scale, dropout, dora)) for k, m in layer.named_modules() if k in keys]
        layer.update_modules(tree_unflatten(wrapped))


def _adapter(layer: nn.Module, rank: int, scale: float, dropout: float, dora: bool) -> nn.Module:
    if not isinstance(layer, SWITCH):
        return (DoRALinear if dora else LoRALinear)(layer, rank, scale, dropout)
    if dora:
        raise UserError("DoRA is not available for MoE experts (mlp.switch_mlp.*); use LoRA, or leave them out.")
    return LoRASwitchLinear(layer, rank, scale, dropout)


def make_trainable(
    model: nn.Module,
    fine_tune_type: str,
    num_layers: int,
    rank: int = DEFAULT_RANK,
    scale: float = DEFAULT_SCALE,
    dropout: float = DEFAULT_DROPOUT,
    keys: tuple[str, ...] | list[str] | None = None,
) -> None:
    """Freeze the model, then make the part to train trainable: adapters (lora, dora) or whole layers (full)."""
    if fine_tune_type not in FINE_TUNE_TYPES:
        raise UserError(f"fine-tune-type must be one of {', '.join(FINE_TUNE_TYPES)}, got {fine_tune_type!r}")
    if fine_tune_type != "full":
        apply_adapters(model, num_layers, rank, scale, dropout, keys, dora=fine_tune_type == "dora")
        return
    chosen = last_layers(model, num_layers)
    model.freeze()
    for layer in chosen:
        layer.unfreeze()


def fuse_adapters(model: nn.Module, dequantize: bool = False) -> None:
    """Replace every adapted layer by a plain layer computing the same function (re-quantized unless asked)."""
    fused = []
    for path, m in model.named_modules():
        if isinstance(m, (LoRALinear, LoRASwitchLinear)):
            layer = m.fused()
            if isinstance(m.linear, (nn.QuantizedLinear, QuantizedSwitchLinear)) and not dequantize:
                layer = layer.to_quantized(group_size=m.linear.group_size, bits=m.linear.bits)
            fused.append((path, layer))
    if fused:
        model.update_modules(tree_unflatten(fused))


def adapter_weights(model: nn.Module) -> dict[str, mx.array]:
    return dict(tree_flatten(model.trainable_parameters()))


def adapter_config(
    fine_tune_type: str, num_layers: int, rank: int, scale: float, dropout: float, keys: tuple[str, ...] | None
) -> dict[str, Any]:
    """adapter_config.json, in the layout mlx-lm writes and reads."""
    # The keys are always written: mlx-lm's default (every Linear, and in MoE layers the experts and routers
    # too) is not ours.
    params: dict[str, Any] = {"rank": rank, "scale": scale, "dropout": dropout, "keys": list(keys or DEFAULT_KEYS)}
    return {"fine_tune_type": fine_tune_type, "num_layers": num_layers, "lora_parameters": params}


def read_adapter_config(path: Path) -> tuple[str, int, dict[str, Any]]:
    """(fine_tune_type, num_layers, lora_parameters) of an adapter_config.json, checked."""
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
        kind, num_layers = config.get("fine_tune_type", "lora"), config["num_layers"]
        params = config.get("lora_parameters") or {}
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, AttributeError) as e:
        raise UserError(f"{path} is not a valid adapter config ({e!r}); re-train or re-download the adapters.") from e
    if kind not in FINE_TUNE_TYPES:
        raise UserError(f"{path}: unknown fine_tune_type {kind!r}")
    if not isinstance(num_layers, int) or not isinstance(params, dict):
        raise UserError(f"{path}: num_layers must be an integer and lora_parameters a mapping.")
    return kind, num_layers, params


def _adapted_paths(weights: dict[str, mx.array]) -> list[str]:
    """Paths inside a layer ("self_attn.q_proj") of the adapters in an adapter file."""
    found = {re.sub(r"^model\.layers\.\d+\.", "", k.rpartition(".")[0]) for k in weights if k.endswith(".lora_a")}
    return sorted(found)


Select = Callable[[str, mx.array], "tuple[str, mx.array] | None"]


def load_adapters(model: nn.Module, adapter_path: str | Path, select: Select | None = None) -> None:
    """Apply the adapters saved in a folder (ours or mlx-lm's) to a loaded model.

    A model that holds a share of the layers or of their widths (parallel.py) gives `select`: each saved
    (key, tensor) -> this process's (key, part), or None where it holds none of it; the layers adapted are
    then those the selected tensors name."""
    folder = Path(adapter_path)
    config_path, weights_path = folder / "adapter_config.json", folder / "adapters.safetensors"
    for p in (config_path, weights_path):
        if not p.is_file():
            raise UserError(f"{p} not found: an adapter folder holds adapter_config.json and adapters.safetensors.")
    kind, num_layers, p = read_adapter_config(config_path)
    weights = load_safetensors(weights_path)
    keys = list(p.get("keys") or _adapted_paths(weights))  # without keys (mlx-lm's default): those in the file
    layers = None
    if select is not None:
        weights = dict(kv for kv in (select(k, w) for k, w in weights.items()) if kv is not None)
        held = sorted({int(m.group(1)) for k in weights if (m := re.match(r"^model\.layers\.(\d+)\.", k))})
        layers = [model.layers[i] for i in held]
    if kind != "full":
        rank, scale = p.get("rank", DEFAULT_RANK), p.get("scale", DEFAULT_SCALE)
        apply_adapters(model, num_layers, rank, scale, 0.0, keys, kind == "dora", layers)
    params = dict(tree_flatten(model.parameters()))
    bad = [
        f"{k} {tuple(w.shape)} (model: {tuple(params[k].shape) if k in params else 'absent'})"
        for k, w in weights.items()
        if k not in params
        or params[k].shape != w.shape
        or (kind != "full" and k.rpartition(".")[2] not in ADAPTER_LEAVES)
    ]
    if bad:
        raise UserError(f"the adapters in {folder} do not fit this model (another model's?): {'; '.join(bad[:3])}")
    model.load_weights(list(weights.items()), strict=False)
    model.eval()
