"""Run, quantize and fine-tune Qwen2 / Qwen2.5 models with MLX.

    from mlx_qwen2 import load, generate, stream_generate
"""

from typing import Any

from . import blas

blas.preload()  # before anything imports mlx.core

__all__ = ["load", "generate", "stream_generate"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # Resolved on first use rather than at import, so `python -m mlx_qwen2.generate`
    # does not import the generate module twice.
    if name in ("generate", "stream_generate"):
        from . import generate as module
    elif name == "load":
        from . import loader as module
    else:
        raise AttributeError(f"module 'mlx_qwen2' has no attribute {name!r}")
    return getattr(module, name)
