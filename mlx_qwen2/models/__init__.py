"""The architectures of the Qwen2 family as MLX modules, and the choice of one from a config.json.

Knows nothing of files, sampling, devices or how caches are allocated.
"""

from __future__ import annotations

from typing import Any

from ..errors import UserError
from . import qwen2, qwen2_moe
from .base import Cache, ModelArgs
from .qwen2 import Model
from .qwen2_moe import MoeArgs

ARCHITECTURES: dict[str, tuple[type[ModelArgs], type[Model]]] = {
    "qwen2": (ModelArgs, qwen2.Model),
    "qwen2_moe": (MoeArgs, qwen2_moe.Model),
}


def args_from_config(config: dict[str, Any]) -> ModelArgs:
    """The hyper-parameters of a config.json's architecture; UserError for one mlx_qwen2 does not run."""
    model_type = config.get("model_type", "qwen2")
    if model_type not in ARCHITECTURES:
        raise UserError(
            f"model_type is {model_type!r}, not 'qwen2' or 'qwen2_moe': mlx_qwen2 runs Qwen2, Qwen2.5 and "
            "Qwen2-MoE checkpoints only."
        )
    return ARCHITECTURES[model_type][0].from_dict(config)


def build(args: ModelArgs) -> Model:
    """The model (random weights) for `args`."""
    return ARCHITECTURES[args.model_type][1](args)


__all__ = ["ARCHITECTURES", "Cache", "Model", "ModelArgs", "MoeArgs", "args_from_config", "build"]
