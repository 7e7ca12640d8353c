"""Run, quantize and fine-tune Qwen2 / Qwen2.5 models with MLX.

from mlx_qwen2 import load, generate, stream_generate
"""

import warnings

from . import blas

blas.preload()  # before anything imports mlx.core

# `mlx_qwen2.generate` is both the CLI module and the public function. Importing the
# module first and binding the function after keeps `mlx_qwen2.generate` the function
# whatever is imported later; `python -m mlx_qwen2.generate` then finds the (CLI-only)
# module already imported, which runpy warns about but which is harmless here.
from . import generate as _cli  # noqa: E402, F401
from .generation import generate, stream_generate  # noqa: E402
from .loader import load  # noqa: E402

warnings.filterwarnings("ignore", message=r"'mlx_qwen2\.\w+' found in sys\.modules", category=RuntimeWarning)

__all__ = ["load", "generate", "stream_generate"]
__version__ = "0.1.0"
