"""Grouped (affine) quantization of a loaded model; returns the config block it applied.

The block has mlx-lm's on-disk format: {"group_size", "bits", "mode"} plus, per
module path, `false` for a layer kept in float or a dict of its own settings.
Knows nothing of files or calibration data.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

BITS = (2, 3, 4, 5, 6, 8)
GROUP_SIZES = (32, 64, 128)
# Mixed recipes: (bits for most layers, bits for the sensitive ones).
RECIPES = {"mixed_2_6": (2, 6), "mixed_3_4": (3, 4), "mixed_3_6": (3, 6), "mixed_4_6": (4, 6), "mixed_4_8": (4, 8)}


def validate(bits: int, group_size: int, recipe: str | None = None) -> None:
    if bits not in BITS:
        raise ValueError(f"--q-bits {bits} is not supported; choose one of {', '.join(map(str, BITS))}.")
    if group_size not in GROUP_SIZES:
        choices = ", ".join(map(str, GROUP_SIZES))
        raise ValueError(f"--q-group-size {group_size} is not supported; choose one of {choices}.")
    if recipe is not None and recipe not in RECIPES:
        raise ValueError(f"--quant-recipe {recipe} is unknown; choose one of {', '.join(RECIPES)}.")


def is_sensitive_layer(index: int, num_layers: int) -> bool:
    """The first and last eighth of the layers, and every third layer between them."""
    eighth = num_layers // 8
    return index < eighth or index >= num_layers - eighth or (index - eighth) % 3 == 2


def _layer_matrix(path: str) -> tuple[int, str] | None:
    m = re.match(r"model\.layers\.(\d+)\.(\w+\.\w+)$", path)
    return (int(m.group(1)), m.group(2)) if m else None


def output_layer(tied: bool) -> str:
    """The output layer's path: with tied embeddings (Qwen2 0.5B, 1.5B) it is the embedding."""
    return "model.embed_tokens" if tied else "lm_head"


def mlx_lm_recipe(path: str, num_layers: int) -> bool:
    """Whether mlx-lm's mixed recipes give `path` the high width: lm_head, and v_proj and down_proj of
    the sensitive layers. (For tied models that misses the output layer: there is no lm_head.)"""
    if path == "lm_head":
        return True
    found = _layer_matrix(path)
    return (
        bool(found) and found[1] in ("self_attn.v_proj", "mlp.down_proj") and is_sensitive_layer(found[0], num_layers)
    )


def recipe_high(shapes: dict[str, tuple[int, ...]], num_layers: int, tied: bool, low: int, high: int) -> set[str]:
    """The matrices a mixed recipe gives the high width: mlx-lm's budget, spent where it matters more.

    - The output layer, which for tied models is the shared embedding (mlx-lm's recipes leave it low;
      protecting it is the one place we spend more than mlx-lm).
    - k_proj and v_proj of every layer: with grouped-query attention they are small (1/7 of q_proj in
      Qwen2.5-0.5B) and each of their heads serves several query heads, so their error counts several times.
      On the real 0.5B model, mixed_3_6: perplexity 9.75 against mlx-lm's 10.34, 0.001 bits/weight smaller.
    - down_proj of the sensitive layers, leaving out the ones nearest the middle of the stack until the
      total is no larger than mlx-lm's recipe (plus the protected embedding, for tied models).
    """
    size = {p: int(np.prod(s)) for p, s in shapes.items()}

    def cost(high_set: set[str]) -> int:
        return sum(n * (high if p in high_set else low) for p, n in size.items())

    head = output_layer(tied)
    budget = cost({p for p in size if mlx_lm_recipe(p, num_layers)} | {head})
    kv = {p for p in size if p.endswith(("self_attn.k_proj", "self_attn.v_proj")) and _layer_matrix(p)}
    chosen = {head} | kv
    downs = sorted(
        (p for p in size if mlx_lm_recipe(p, num_layers) and p.endswith("mlp.down_proj")),
        key=lambda p: -abs(_layer_matrix(p)[0] - (num_layers - 1) / 2),  # outermost first
    )
    chosen |= set(downs)
    while cost(chosen) > budget and downs:
        chosen.discard(downs.pop())  # the one nearest the middle
    return chosen


def quantizable(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, nn.Embedding))


def quantizable_key(key: str) -> bool:
    """Checkpoint keys of the matrices a quantized checkpoint packs (projections, embedding, head)."""
    return key.endswith(".weight") and ("_proj." in key or key.startswith(("model.embed_tokens.", "lm_head.")))


def make_plan(
    num_layers: int,
    tied: bool,
    bits: int = 4,
    group_size: int = 64,
    recipe: str | None = None,
    shapes: dict[str, tuple[int, ...]] | None = None,
) -> Callable[[str], dict[str, Any]]:
    """Module path -> its quantization settings, for a uniform width or a mixed recipe.

    A recipe needs `shapes` (module path -> weight shape, of every matrix to quantize) to keep
    within its size budget."""
    validate(bits, group_size, recipe)
    if recipe is None:
        return lambda path: {"group_size": group_size, "bits": bits, "mode": "affine"}
    if shapes is None:
        raise ValueError("a mixed recipe needs the shapes of the matrices")
    low, high = RECIPES[recipe]
    chosen = recipe_high(shapes, num_layers, tied, low, high)
    return lambda path: {"group_size": group_size, "bits": high if path in chosen else low, "mode": "affine"}


def config_block(plan: Callable[[str], dict[str, Any]], paths: list[str]) -> dict[str, Any]:
    """The `quantization` block: the most common settings, with the other layers listed by path."""
    settings = {p: plan(p) for p in paths}
    counts: dict[tuple[int, int], int] = {}
    for s in settings.values():
        counts[(s["group_size"], s["bits"])] = counts.get((s["group_size"], s["bits"]), 0) + 1
    group_size, bits = max(counts, key=counts.get) if counts else (64, 4)
    block: dict[str, Any] = {"group_size": group_size, "bits": bits, "mode": "affine"}
    for p, s in settings.items():
        if (s["group_size"], s["bits"]) != (group_size, bits):
            block[p] = {"group_size": s["group_size"], "bits": s["bits"]}
    return block


def check_divisible(shapes: dict[str, tuple[int, ...]], plan: Callable[[str], dict[str, Any]]) -> None:
    for path, shape in shapes.items():
        g = plan(path)["group_size"]
        if shape[-1] % g:
            raise ValueError(
                f"--q-group-size {g} does not divide the input dimension {shape[-1]} "
                f"of {path}; choose a group size that does."
            )


def quantize_model(model: nn.Module, bits: int = 4, group_size: int = 64, recipe: str | None = None) -> dict[str, Any]:
    """Quantize every Linear and Embedding in place; returns the `quantization` config block."""
    shapes = {p: m.weight.shape for p, m in model.named_modules() if quantizable(m)}
    plan = make_plan(len(model.layers), bool(model.args.tie_word_embeddings), bits, group_size, recipe, shapes)
    check_divisible(shapes, plan)
    nn.quantize(model, class_predicate=lambda p, m: plan(p) if quantizable(m) else False)
    return config_block(plan, sorted(shapes))


def dequantized(module: nn.Module) -> nn.Module:
    """A float Linear or Embedding holding the dequantized weights of a quantized one (same function)."""
    w = mx.dequantize(module.weight, module.scales, module.biases, module.group_size, module.bits)
    if isinstance(module, nn.QuantizedEmbedding):
        layer = nn.Embedding(*w.shape)
    else:
        layer = nn.Linear(w.shape[1], w.shape[0], bias="bias" in module)
        if "bias" in module:
            layer.bias = module.bias
    layer.weight = w
    return layer


def dequantize_model(model: nn.Module) -> None:
    """Replace quantized layers by float ones holding the dequantized weights, in place."""
    replacements = [
        (path, dequantized(m))
        for path, m in model.named_modules()
        if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding))
    ]
    if replacements:
        model.update_modules(tree_unflatten(replacements))


def weights_of(model: nn.Module) -> dict[str, mx.array]:
    return dict(tree_flatten(model.parameters()))


def bits_per_weight(model: nn.Module) -> float:
    """Stored bits (weights, scales, biases) per parameter of the float model's matrices."""
    stored = params = 0
    for _, module in model.named_modules():
        if isinstance(module, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
            stored += (module.weight.nbytes + module.scales.nbytes + module.biases.nbytes) * 8
            params += module.weight.size * 32 // module.bits
        elif quantizable(module):
            stored += module.weight.nbytes * 8
            params += module.weight.size
    return stored / max(params, 1)
