"""Mixed-precision recipes: which matrices get the high width, within mlx-lm's size budget.

Knows nothing of files or of how a matrix is quantized; paths are module paths
("model.layers.3.mlp.down_proj").
"""

from __future__ import annotations

import re

import numpy as np

# Mixed recipes: (bits for most layers, bits for the sensitive ones).
RECIPES = {"mixed_2_6": (2, 6), "mixed_3_4": (3, 4), "mixed_3_6": (3, 6), "mixed_4_6": (4, 6), "mixed_4_8": (4, 8)}


def is_sensitive_layer(index: int, num_layers: int) -> bool:
    """The first eighth and the last of the layers, and every third layer between them, as mlx-lm counts them.

    The last part starts at 7 * num_layers // 8 (for 28 layers: 24, not 28 - 28 // 8 = 25).
    """
    return index < num_layers // 8 or index >= 7 * num_layers // 8 or (index - num_layers // 8) % 3 == 2


def _layer_matrix(path: str) -> tuple[int, str] | None:
    """(layer index, path inside the layer): (3, "mlp.down_proj"), or (3, "mlp.switch_mlp.down_proj") in MoE."""
    m = re.match(r"model\.layers\.(\d+)\.(\w+(?:\.\w+)+)$", path)
    return (int(m.group(1)), m.group(2)) if m else None


def is_router(path: str) -> bool:
    """An MoE layer's router or shared-expert gate (see ROUTER_BITS in quant.affine)."""
    return path.endswith((".mlp.gate", ".mlp.shared_expert_gate"))


def output_layer(tied: bool) -> str:
    """The output layer's path: with tied embeddings (Qwen2 0.5B, 1.5B) it is the embedding."""
    return "model.embed_tokens" if tied else "lm_head"


def mlx_lm_recipe(path: str, num_layers: int) -> bool:
    """Whether mlx-lm's mixed recipes give `path` the high width: lm_head, and v_proj and down_proj of
    the sensitive layers (in MoE layers: the experts' and the shared expert's down_proj). For tied models
    that misses the output layer: there is no lm_head."""
    if path == "lm_head":
        return True
    found = _layer_matrix(path)
    return (
        bool(found)
        and found[1].endswith(("self_attn.v_proj", "down_proj"))
        and is_sensitive_layer(found[0], num_layers)
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
        (p for p in size if mlx_lm_recipe(p, num_layers) and p.endswith("down_proj")),
        key=lambda p: -abs(_layer_matrix(p)[0] - (num_layers - 1) / 2),  # outermost first
    )
    chosen |= set(downs)
    while cost(chosen) > budget and downs:
        chosen.discard(downs.pop())  # the one nearest the middle
    return chosen
