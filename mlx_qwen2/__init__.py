"""Run, quantize and fine-tune Qwen2 / Qwen2.5 models with MLX.

from mlx_qwen2 import load, generate, stream_generate
"""

import importlib
from typing import Any

from . import blas

blas.preload()  # before anything imports mlx.core

__all__ = ["load", "generate", "stream_generate"]
__version__ = "0.1.0"

_PUBLIC = {"load": "loader", "generate": "generate", "stream_generate": "generate"}


def __getattr__(name: str) -> Any:
    # Resolved on first use rather than at import, so `python -m mlx_qwen2.generate`
    # does not run a module that the package already imported.
    if name not in _PUBLIC:
        raise AttributeError(f"module 'mlx_qwen2' has no attribute {name!r}")
    module = importlib.import_module(f".{_PUBLIC[name]}", __name__)
    # Importing mlx_qwen2.generate binds the submodule to the name `generate`;
    # the public API is the function, so bind all public names now.
    for public, source in _PUBLIC.items():
        if source == _PUBLIC[name]:
            globals()[public] = getattr(module, public)
    return globals()[name]
