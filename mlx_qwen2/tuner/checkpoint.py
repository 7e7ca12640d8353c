"""Training checkpoints in an adapter folder: save (each file replaced atomically) and resume.

The folder holds adapters.safetensors and adapter_config.json (mlx-lm's layout), the
best adapters so far, and the optimizer state with the step, so a run can continue.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_unflatten

from ..errors import UserError
from ..files import atomic_write, load_safetensors, read_json
from .adapters import adapter_weights


def save_checkpoint(
    folder: Path, model: nn.Module, optimizer: optim.Optimizer, step: int, best: bool, config: dict[str, Any]
) -> None:
    """Adapters (+ the best ones), optimizer state and step, each file replaced atomically."""
    folder.mkdir(parents=True, exist_ok=True)
    weights = adapter_weights(model)
    atomic_write(folder / "adapters.safetensors", lambda p: mx.save_safetensors(p, weights))
    if best:
        atomic_write(folder / "best_adapters.safetensors", lambda p: mx.save_safetensors(p, weights))
    state = dict(tree_flatten(optimizer.state))
    atomic_write(folder / "optimizer.safetensors", lambda p: mx.save_safetensors(p, state))
    text = json.dumps({**config, "step": step}, indent=2)
    atomic_write(folder / "adapter_config.json", lambda p: Path(p).write_text(text))


def resume(folder: Path, model: nn.Module, optimizer: optim.Optimizer) -> int:
    """Load adapters, optimizer state and step from a checkpoint folder into a prepared model; returns the step."""
    config_path = folder / "adapter_config.json"
    if not config_path.is_file():
        raise UserError(f"--resume: no checkpoint in {folder} (adapter_config.json not found).")
    step = read_json(config_path).get("step")
    if not isinstance(step, int):
        raise UserError(f"--resume: {config_path} records no step; it was not written by a training run.")
    weights = load_safetensors(folder / "adapters.safetensors")
    model.load_weights(list(weights.items()), strict=False)
    state = load_safetensors(folder / "optimizer.safetensors")
    optimizer.init(model.trainable_parameters())
    optimizer.state = tree_unflatten(list(state.items()))
    return step
