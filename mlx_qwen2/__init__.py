"""Run, quantize and fine-tune Qwen2 / Qwen2.5 models with MLX.

from mlx_qwen2 import load, generate, stream_generate
"""

import sys
import types

from .backends.cpu import blas

blas.preload()  # before anything imports mlx.core

from .generation import generate, stream_generate  # noqa: E402
from .loader import load  # noqa: E402


class _Package(types.ModuleType):
    """`mlx_qwen2.generate` is both the public function and the CLI module's name.

    Importing a submodule sets it as an attribute of its package; this keeps the function
    there when the CLI module `mlx_qwen2.generate` is imported (`from mlx_qwen2.generate
    import main` still finds the module in sys.modules).
    """

    def __setattr__(self, name: str, value: object) -> None:
        if name == "generate" and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package

__all__ = ["load", "generate", "stream_generate"]
__version__ = "0.1.0"
