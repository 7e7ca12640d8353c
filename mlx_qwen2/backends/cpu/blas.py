"""Use an optimized BLAS for MLX's CPU backend on Linux, when one is installed.

MLX's Linux CPU wheels call the reference BLAS for float32 matrix products.
Loading OpenBLAS into the process (globally) before `mlx.core` makes MLX's
calls resolve to it: the same results up to float rounding, about 20x faster
prefill. This must run before `mlx.core` is first imported; the package does
it on import. Set MLX_QWEN2_BLAS=off to opt out, or to a library path to choose.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

CANDIDATES = (
    "libopenblas.so.0",  # Debian/Ubuntu: apt install libopenblas0-pthread
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "libopenblas.so",
)

REFERENCE = "reference BLAS (MLX's default)"
OFF = ("off", "0", "none")  # values of MLX_QWEN2_BLAS that opt out

in_use: str = REFERENCE if sys.platform == "linux" else "platform default (Accelerate / GPU)"
_library: ctypes.CDLL | None = None  # the OpenBLAS loaded by `preload`
own_threads = 0  # its thread count as loaded (OPENBLAS_NUM_THREADS, else the cores); 0 without it


def on_reference_blas() -> bool:
    """Whether MLX's CPU products run on the slow reference BLAS without the user having asked for it."""
    return in_use == REFERENCE and os.environ.get("MLX_QWEN2_BLAS", "").lower() not in OFF


def preload() -> str:
    """Load the first optimized BLAS found; returns a description of the BLAS in use."""
    global in_use, _library, own_threads
    choice = os.environ.get("MLX_QWEN2_BLAS", "")
    if sys.platform != "linux" or choice.lower() in OFF:
        return in_use
    if "mlx.core" in sys.modules:
        return in_use  # too late: MLX has already bound its BLAS symbols
    found = ctypes.util.find_library("openblas")
    for name in ([choice] if choice else []) + ([found] if found else []) + list(CANDIDATES):
        try:
            library = ctypes.CDLL(name, mode=ctypes.RTLD_GLOBAL)
        except OSError:
            continue
        in_use, _library = f"OpenBLAS ({name})", library
        own_threads = library.openblas_get_num_threads()
        break
    return in_use


def threads() -> int:
    """The threads OpenBLAS's next call may use (0: no OpenBLAS of ours loaded)."""
    return _library.openblas_get_num_threads() if _library is not None else 0


def set_threads(n: int) -> None:
    """Let OpenBLAS's next calls use `n` threads (process-wide; read by each call as it starts)."""
    if _library is not None:
        _library.openblas_set_num_threads(n)
