"""Run, quantize and fine-tune Qwen2 / Qwen2.5 models with MLX."""

from .generate import generate, stream_generate
from .loader import load

__all__ = ["load", "generate", "stream_generate"]
__version__ = "0.1.0"
