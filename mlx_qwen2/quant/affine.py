"""Grouped (affine) quantization: settings, the per-layer plan, its config block, and quantizing a model.

The block has mlx-lm's on-disk format: {"group_size", "bits", "mode"} plus, per
module path, `false` for a layer kept in float or a dict of its own settings.
Knows nothing of files or calibration data.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from ..errors import UserError
from ..models.experts import QuantizedSwitchLinear, SwitchLinear
from .recipes import RECIPES, is_router, recipe_high

BITS = (2, 3, 4, 5, 6, 8)
GROUP_SIZES = (32, 64, 128)
DEFAULT_BITS, DEFAULT_GROUP_SIZE = 4, 64  # mlx-lm's defaults
# MoE routers (mlp.gate, mlp.shared_expert_gate) are kept at least at this width: they are tiny (about 0.01% of
# Qwen2-57B-A14B's weights), and a rounding error there changes which experts a token goes to, not just how
# much. `python -m benchmarks.moe --router` measures 4 against 8 bits and float (README, Qwen2-MoE).
ROUTER_BITS = 8


def validate(bits: int, group_size: int, recipe: str | None = None) -> None:
    """Raise UserError naming the first unsupported setting."""
    if bits not in BITS:
        raise UserError(f"--q-bits {bits} is not supported; choose one of {', '.join(map(str, BITS))}.")
    if group_size not in GROUP_SIZES:
        choices = ", ".join(map(str, GROUP_SIZES))
        raise UserError(f"--q-group-size {group_size} is not supported; choose one of {choices}.")
    if recipe is not None and recipe not in RECIPES:
        raise UserError(f"--quant-recipe {recipe} is unknown; choose one of {', '.join(RECIPES)}.")


def quantizable(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, nn.Embedding, SwitchLinear))


def quantizable_key(key: str) -> bool:
    """Checkpoint keys of the matrices a quantized checkpoint packs (projections, experts, routers, embedding,
    head)."""
    if not key.endswith(".weight"):
        return False
    path = key.removesuffix(".weight")
    return "_proj." in key or is_router(path) or path in ("model.embed_tokens", "lm_head")


def make_plan(
    num_layers: int,
    tied: bool,
    bits: int = DEFAULT_BITS,
    group_size: int = DEFAULT_GROUP_SIZE,
    recipe: str | None = None,
    shapes: dict[str, tuple[int, ...]] | None = None,
) -> Callable[[str], dict[str, Any]]:
    """Module path -> its quantization settings, for a uniform width or a mixed recipe.

    A recipe needs `shapes` (module path -> weight shape, of every matrix to quantize) to keep
    within its size budget."""
    validate(bits, group_size, recipe)
    if recipe is None:
        width = lambda path: bits  # noqa: E731
    elif shapes is None:
        raise ValueError("a mixed recipe needs the shapes of the matrices")
    else:
        low, high = RECIPES[recipe]
        chosen = recipe_high(shapes, num_layers, tied, low, high)
        width = lambda path: high if path in chosen else low  # noqa: E731

    def plan(path: str) -> dict[str, Any]:
        chosen_bits = max(width(path), ROUTER_BITS) if is_router(path) else width(path)
        return {"group_size": group_size, "bits": chosen_bits, "mode": "affine"}

    return plan


def config_block(plan: Callable[[str], dict[str, Any]], paths: list[str]) -> dict[str, Any]:
    """The `quantization` block: the most common settings, with the other layers listed by path."""
    settings = {p: plan(p) for p in paths}
    counts: dict[tuple[int, int], int] = {}
    for s in settings.values():
        counts[(s["group_size"], s["bits"])] = counts.get((s["group_size"], s["bits"]), 0) + 1
    group_size, bits = max(counts, key=counts.get) if counts else (DEFAULT_GROUP_SIZE, DEFAULT_BITS)
    block: dict[str, Any] = {"group_size": group_size, "bits": bits, "mode": "affine"}
    for p, s in settings.items():
        if (s["group_size"], s["bits"]) != (group_size, bits):
            block[p] = {"group_size": s["group_size"], "bits": s["bits"]}
    return block


def check_divisible(shapes: dict[str, tuple[int, ...]], plan: Callable[[str], dict[str, Any]]) -> None:
    for path, shape in shapes.items():
        g = plan(path)["group_size"]
        if shape[-1] % g:
            raise UserError(
                f"--q-group-size {g} does not divide the input dimension {shape[-1]} "
                f"of {path}; choose a group size that does."
            )


def quantize_model(
    model: nn.Module, bits: int = DEFAULT_BITS, group_size: int = DEFAULT_GROUP_SIZE, recipe: str | None = None
) -> dict[str, Any]:
    """Quantize every Linear and Embedding in place; returns the `quantization` config block."""
    shapes = {p: m.weight.shape for p, m in model.named_modules() if quantizable(m)}
    plan = make_plan(len(model.layers), bool(model.args.tie_word_embeddings), bits, group_size, recipe, shapes)
    check_divisible(shapes, plan)
    nn.quantize(model, class_predicate=lambda p, m: plan(p) if quantizable(m) else False)
    return config_block(plan, sorted(shapes))


def weights_of(model: nn.Module) -> dict[str, mx.array]:
    return dict(tree_flatten(model.parameters()))


def bits_per_weight(model: nn.Module) -> float:
    """Stored bits (weights, scales, biases) per parameter of the float model's matrices."""
    stored = params = 0
    for _, module in model.named_modules():
        if isinstance(module, (nn.QuantizedLinear, nn.QuantizedEmbedding, QuantizedSwitchLinear)):
            stored += (module.weight.nbytes + module.scales.nbytes + module.biases.nbytes) * 8
            params += module.weight.size * 32 // module.bits
        elif quantizable(module):
            stored += module.weight.nbytes * 8
            params += module.weight.size
    return stored / max(params, 1)
