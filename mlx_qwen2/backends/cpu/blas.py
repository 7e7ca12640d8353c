"""Use an optimized BLAS for MLX's CPU backend on Linux, when one is installed.

MLX's Linux CPU wheels call the reference BLAS for float32 matrix products.
Loading OpenBLAS into the process (globally) before `mlx.core` makes MLX's
calls resolve to it: the same results up to float rounding, about 20x faster
prefill. This must run before `mlx.core` is first imported; the package does
it on import. Set MLX_QWEN2_BLAS=off to opt out, or to a library path to choose.

OpenBLAS's builds for many CPUs (Debian's) pick their kernels from the CPU's model number; a virtual
machine that hides it (here: "Intel(R) Xeon(R) Processor") gets the oldest x86_64 kernels, "Prescott"
(SSE3), about 4x slower than the AVX-512 ones on this machine (float32 products of 352 rows: 47 against
196 GFLOPS). So where the user has not set OPENBLAS_CORETYPE, it is set from the CPU's flags while
OpenBLAS loads (`coretype`), and put back after.
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
core = ""  # the kernels OpenBLAS chose as it loaded (openblas_get_corename), "" without it
chosen_coretype: str | None = None  # the OPENBLAS_CORETYPE set for the load (None: the user's, or none)

# x86_64 CPU flags -> the OpenBLAS kernels they run (the newest first). SkylakeX's float32 kernels are also
# Cooper Lake's and Sapphire Rapids'; Haswell's are the AVX2 + FMA ones (also Zen's).
CORETYPES = (({"avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512cd"}, "SkylakeX"), ({"avx2", "fma"}, "Haswell"))


def coretype(cpuinfo: str) -> str | None:
    """The OPENBLAS_CORETYPE for an x86_64 CPU from its /proc/cpuinfo text; None where no rule applies."""
    line = next((line for line in cpuinfo.splitlines() if line.startswith("flags")), "")
    flags = set(line.partition(":")[2].split())
    return next((name for needed, name in CORETYPES if needed <= flags), None)


def _coretype_for_load() -> str | None:
    if "OPENBLAS_CORETYPE" in os.environ or os.uname().machine != "x86_64":
        return None
    try:
        with open("/proc/cpuinfo") as f:
            return coretype(f.read())
    except OSError:
        return None


def on_reference_blas() -> bool:
    """Whether MLX's CPU products run on the slow reference BLAS without the user having asked for it."""
    return in_use == REFERENCE and os.environ.get("MLX_QWEN2_BLAS", "").lower() not in OFF


def preload() -> str:
    """Load the first optimized BLAS found; returns a description of the BLAS in use."""
    global in_use, _library, own_threads, core, chosen_coretype
    choice = os.environ.get("MLX_QWEN2_BLAS", "")
    if sys.platform != "linux" or choice.lower() in OFF:
        return in_use
    if "mlx.core" in sys.modules:
        return in_use  # too late: MLX has already bound its BLAS symbols
    found = ctypes.util.find_library("openblas")
    chosen = _coretype_for_load()
    if chosen is not None:
        os.environ["OPENBLAS_CORETYPE"] = chosen  # read once, as the library loads
    try:
        for name in ([choice] if choice else []) + ([found] if found else []) + list(CANDIDATES):
            try:
                library = ctypes.CDLL(name, mode=ctypes.RTLD_GLOBAL)
            except OSError:
                continue
            in_use, _library, chosen_coretype = f"OpenBLAS ({name})", library, chosen
            own_threads = library.openblas_get_num_threads()
            if hasattr(library, "openblas_get_corename"):
                library.openblas_get_corename.restype = ctypes.c_char_p
                core = library.openblas_get_corename().decode()
            break
    finally:
        if chosen is not None:
            del os.environ["OPENBLAS_CORETYPE"]  # not passed on to the processes this one starts
    return in_use


def threads() -> int:
    """The threads OpenBLAS's next call may use (0: no OpenBLAS of ours loaded)."""
    return _library.openblas_get_num_threads() if _library is not None else 0


def set_threads(n: int) -> None:
    """Let OpenBLAS's next calls use `n` threads (process-wide; read by each call as it starts)."""
    if _library is not None:
        _library.openblas_set_num_threads(n)
