"""Qwen2-MoE (Qwen2-57B-A14B, Qwen1.5-MoE-A2.7B): Qwen2 with mixture-of-experts MLPs in its sparse layers.

Attention, RoPE, norms and the cache protocol are Qwen2's; a sparse layer's MLP is a
router over `num_experts` SwiGLU experts (each token through its top
`num_experts_per_tok`) plus a shared expert scaled by a sigmoid gate. Experts are
held stacked under `mlp.switch_mlp` (mlx-lm's layout); `sanitize` stacks a Hugging
Face checkpoint's `mlp.experts.{e}` into it. Knows nothing of files.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import mlx.core as mx
import mlx.nn as nn

from ..errors import UserError
from . import qwen2
from .base import ModelArgs
from .experts import SwitchGLU

EXPERT_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


@dataclass
class MoeArgs(ModelArgs):
    """Qwen2-MoE hyper-parameters, named as in Hugging Face's config.json."""

    MODEL_TYPE: ClassVar[str] = "qwen2_moe"
    SIZES: ClassVar[tuple[str, ...]] = (
        *ModelArgs.SIZES,
        "num_experts",
        "num_experts_per_tok",
        "moe_intermediate_size",
        "shared_expert_intermediate_size",
        "decoder_sparse_step",
    )

    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    shared_expert_intermediate_size: int = 0
    norm_topk_prob: bool = False
    decoder_sparse_step: int = 1
    mlp_only_layers: list[int] = field(default_factory=list)
    qkv_bias: bool = True
    model_type: str = "qwen2_moe"

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> MoeArgs:
        missing = [
            k
            for k in ("num_experts", "num_experts_per_tok", "moe_intermediate_size", "shared_expert_intermediate_size")
            if k not in config
        ]
        if missing and config.get("model_type") == cls.MODEL_TYPE:
            raise UserError(
                f"config.json lacks {', '.join(missing)}, which every qwen2_moe config has; re-download or "
                "re-convert it."
            )
        return super().from_dict(config)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.num_experts_per_tok > self.num_experts:
            raise UserError(
                f"config.json: num_experts_per_tok ({self.num_experts_per_tok}) exceeds num_experts "
                f"({self.num_experts})."
            )
        if not all(isinstance(i, int) and not isinstance(i, bool) for i in self.mlp_only_layers):
            raise UserError(f"config.json: mlp_only_layers must list layer indices, got {self.mlp_only_layers!r}.")

    @property
    def attention_bias(self) -> bool:
        return self.qkv_bias

    def is_sparse(self, index: int) -> bool:
        """Whether layer `index` has experts (as transformers decides; mlx-lm makes every layer sparse)."""
        return index not in self.mlp_only_layers and (index + 1) % self.decoder_sparse_step == 0


class SparseMoeBlock(nn.Module):
    """Router, experts and shared expert of one sparse layer."""

    def __init__(self, args: MoeArgs):
        super().__init__()
        dim = args.hidden_size
        self.top_k, self.norm_topk_prob = args.num_experts_per_tok, args.norm_topk_prob
        self.gate = nn.Linear(dim, args.num_experts, bias=False)  # the router
        self.switch_mlp = SwitchGLU(dim, args.moe_intermediate_size, args.num_experts)
        self.shared_expert = qwen2.MLP(dim, args.shared_expert_intermediate_size)
        self.shared_expert_gate = nn.Linear(dim, 1, bias=False)

    def route(self, x: mx.array) -> tuple[mx.array, mx.array]:
        """Each token's experts (..., k) and their weights (..., k), from a float32 softmax over the router."""
        probs = mx.softmax(self.gate(x).astype(mx.float32), axis=-1, precise=True)
        k = self.top_k
        experts = mx.stop_gradient(mx.argpartition(-probs, kth=k - 1, axis=-1)[..., :k])
        weights = mx.take_along_axis(probs, experts, axis=-1)
        if self.norm_topk_prob:
            weights = weights / weights.sum(axis=-1, keepdims=True)
        return experts, weights.astype(x.dtype)

    def __call__(self, x: mx.array) -> mx.array:
        experts, weights = self.route(x)
        y = (self.switch_mlp(x, experts) * weights[..., None]).sum(axis=-2)  # (..., k, D) -> (..., D)
        return y + mx.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)


class Model(qwen2.Model):
    """Qwen2-MoE causal LM: token ids (B, L) -> logits (B, L, vocab)."""

    args: MoeArgs

    @staticmethod
    def make_mlp(args: MoeArgs, index: int) -> nn.Module:
        if args.is_sparse(index):
            return SparseMoeBlock(args)
        return qwen2.MLP(args.hidden_size, args.intermediate_size)

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """Also stack a Hugging Face checkpoint's experts into `switch_mlp` (lazily: nothing is read here)."""
        weights = super().sanitize(weights)
        for i, layer in enumerate(self.layers):
            if isinstance(layer.mlp, SparseMoeBlock):
                _stack_experts(weights, f"model.layers.{i}.mlp", self.args.num_experts)
        return weights


def _stack_experts(weights: dict[str, mx.array], prefix: str, num_experts: int) -> None:
    """`{prefix}.experts.{e}.{proj}.{kind}` (or transformers 5's fused `experts.gate_up_proj`) -> `switch_mlp`."""
    fused = weights.pop(f"{prefix}.experts.gate_up_proj", None)
    if fused is not None:  # (E, 2 * I, D): gate rows first, then up
        gate, up = mx.split(fused, 2, axis=1)
        weights[f"{prefix}.switch_mlp.gate_proj.weight"] = gate
        weights[f"{prefix}.switch_mlp.up_proj.weight"] = up
        weights[f"{prefix}.switch_mlp.down_proj.weight"] = weights.pop(f"{prefix}.experts.down_proj")
        return
    for proj in EXPERT_PROJECTIONS:
        for kind in ("weight", "scales", "biases"):
            keys = [f"{prefix}.experts.{e}.{proj}.{kind}" for e in range(num_experts)]
            found = [k in weights for k in keys]
            if not any(found):
                continue
            if not all(found):
                absent = [str(e) for e, ok in enumerate(found) if not ok]
                raise UserError(
                    f"the checkpoint lacks {prefix}.experts.{{{','.join(absent[:4])}}}.{proj}.{kind} although "
                    f"config.json has {num_experts} experts; re-download it."
                )
            weights[f"{prefix}.switch_mlp.{proj}.{kind}"] = mx.stack([weights.pop(k) for k in keys])
