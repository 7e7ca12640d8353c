"""Few-row products (`kernels.c`) for MLX's CPU backend, built with the machine's C compiler at first use.

A batch decoding multiplies a few rows by every matrix of the model: OpenBLAS packs the whole matrix
for such a product, MLX's quantized kernel runs on one thread, and its 16-bit products do not use BLAS.
`kernels.c` streams each matrix once, on every core, for 1..MAX_ROWS rows of float32, bfloat16,
float16 and 2-, 4- and 8-bit weights. Its result is computed eagerly: the inputs are evaluated, the
product runs on the host's memory (MLX's CPU arrays, read in place through the buffer protocol), and
the result comes back as a new array. So it may only run where nothing is differentiated or compiled:
`layers` calls it inside generation's passes only (`layers.inference`).

Built once per machine and source into the cache (`$XDG_CACHE_HOME/mlx_qwen2/kernels`, else ~/.cache),
written atomically. Without a compiler, or with MLX_QWEN2_KERNELS=off, `available()` is false and
the layers keep MLX's and OpenBLAS's products. Knows nothing of models.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import mlx.core as mx
import numpy as np

SOURCE = Path(__file__).with_name("kernels.c")
FLAGS = ["-O3", "-march=native", "-fno-math-errno", "-fopenmp", "-shared", "-fPIC"]
MAX_ROWS = 16  # float32 weights: past it OpenBLAS's products are as fast
# Quantized and 16-bit weights: up to WIDE_ROWS rows the kernels beat a float32 copy of the matrix and
# OpenBLAS's product, and make no copy (4-bit, 2816 x 1024: 32 rows 1.5 against 6.9 ms, 128 rows 5.9
# against 9.3, 256 rows 10.8 against 13.6, the copies holding 16-21 MB more; 512 rows a tie; bfloat16
# alike; ad-hoc timings of `kernels.products` against `layers.quantized_product` / `upcast_product`).
WIDE_ROWS = 256
KINDS = {mx.float32: 0, mx.bfloat16: 1, mx.float16: 2}  # the weight's kind; 3: quantized
QUANTIZED = 3
OFF = ("off", "0", "none")
# How long libgomp's threads spin after a call before they sleep. Its default (300,000 spins) keeps both cores
# of this machine busy for a while after each call, away from MLX's and OpenBLAS's threads: the attention
# products right after a prefill block's e^x on the kernels took 8.8 ms instead of 1.8; the 4-bit MoE benchmark
# decoded at 34 tokens/s against 41 with 1,000 spins, its float32 model prefilled at 236 against 292.
SPIN_COUNT = "1000"
T = TypeVar("T")


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "mlx_qwen2" / "kernels"


def _machine() -> str:
    """What the build depends on besides the source: the CPU (the build is -march=native), the compiler."""
    try:
        cpu = next((line for line in open("/proc/cpuinfo") if line.startswith("flags")), "")
    except OSError:
        cpu = ""
    return f"{platform.machine()} {platform.processor()} {cpu} {' '.join(FLAGS)} {shutil.which('cc')}"


def _build() -> Path | None:
    """The compiled library for this machine and source, built if missing; None without a compiler."""
    source = SOURCE.read_bytes()
    key = hashlib.sha256(source + _machine().encode()).hexdigest()[:16]
    target = _cache_dir() / f"kernels-{key}.so"
    if target.is_file():
        return target
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        return None
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        built = Path(tmp) / target.name
        try:
            done = subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", str(built)], capture_output=True, text=True)
            failure = done.stderr.strip()[:500] if done.returncode != 0 else None
        except OSError as e:
            failure = str(e)
        if failure is not None:  # the layers keep MLX's and OpenBLAS's products
            print(f"mlx_qwen2: few-row kernels not built ({compiler}): {failure}", file=sys.stderr)
            return None
        os.replace(built, target)  # atomic: another process building the same file at once is harmless
    return target


class Matrix(ctypes.Structure):
    """`struct matrix` of kernels.c: one matrix of a product, and the bias added to its result."""

    _fields_ = [
        ("kind", ctypes.c_int),
        ("N", ctypes.c_int),
        ("w", ctypes.c_void_p),
        ("scales", ctypes.c_void_p),
        ("biases", ctypes.c_void_p),
        ("sdtype", ctypes.c_int),
        ("group", ctypes.c_int),
        ("bits", ctypes.c_int),
        ("bias", ctypes.c_void_p),
        ("bias_kind", ctypes.c_int),
    ]


@functools.cache
def _library() -> ctypes.CDLL | None:
    if sys.platform != "linux" or os.environ.get("MLX_QWEN2_KERNELS", "").lower() in OFF:
        return None
    if "OMP_WAIT_POLICY" not in os.environ:  # read once, as libgomp loads with the library (if not loaded already)
        os.environ.setdefault("GOMP_SPINCOUNT", SPIN_COUNT)
    try:
        path = _build()
        library = ctypes.CDLL(str(path)) if path is not None else None
    except OSError:
        return None
    if library is not None:
        ptr, i, f, matrix = ctypes.c_void_p, ctypes.c_int, ctypes.c_float, ctypes.POINTER(Matrix)
        library.product.argtypes = [i, i, i, ptr, i, ptr, ptr, ptr, i, i, i, ptr, i]
        library.supported.argtypes = [i, i, i, i, i]
        library.norm_products.argtypes = [i, i, ptr, ptr, i, f, i, matrix, ctypes.POINTER(ptr), i]
        library.residual_product.argtypes = [i, i, ptr, ptr, ptr, matrix, ptr, i]
        library.products.argtypes = [i, i, ptr, i, matrix, ctypes.POINTER(ptr), i]
        library.exp_array.argtypes = [ctypes.c_size_t, ptr, ptr, i]
    return library


def lanes() -> int:
    """Floats a vector in the build for this machine (16 with AVX-512, else 8): inputs must be a multiple of
    it, and a quantized group of as many bytes."""
    library = _library()
    assert library is not None
    return library.lanes()


def available() -> bool:
    """Whether the kernels are built and loaded (building them now if needed)."""
    return _library() is not None


_forked = False  # a child of fork(): libgomp's threads did not come along, so one thread, no OpenMP team


def _after_fork() -> None:
    global _forked
    _forked = True


os.register_at_fork(after_in_child=_after_fork)


@functools.cache
def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _threads() -> int:
    return 1 if _forked else _cores()


def _bits(a: mx.array) -> mx.array:
    """16-bit floats as their bits (numpy has no bfloat16); other arrays as they are."""
    return mx.view(a, mx.uint16) if a.dtype in (mx.bfloat16, mx.float16) else a


def _host(*arrays: mx.array) -> list[np.ndarray]:
    """MLX arrays' memory as numpy (no copy unless strided), all evaluated in one go."""
    mx.eval(*arrays)
    return [np.ascontiguousarray(a) for a in arrays]


def supported(rows: int, w: mx.array, scales: mx.array | None = None, group_size: int = 0, bits: int = 0) -> bool:
    """Whether `product` takes a product of `rows` rows by this matrix (False without the kernels)."""
    library = _library()
    if library is None or rows > (MAX_ROWS if scales is None and w.dtype == mx.float32 else WIDE_ROWS) or w.ndim != 2:
        return False
    if scales is None:
        return w.dtype in KINDS and bool(library.supported(rows, w.shape[1], KINDS[w.dtype], 0, 0))
    if w.dtype != mx.uint32 or scales.dtype not in KINDS:
        return False
    return bool(library.supported(rows, w.shape[1] * 32 // bits, QUANTIZED, group_size, bits))


def product(
    x: mx.array,
    w: mx.array,
    scales: mx.array | None = None,
    biases: mx.array | None = None,
    group_size: int = 0,
    bits: int = 0,
) -> mx.array:
    """x @ W.T, (..., in) x (out, in) -> (..., out) float32, computed now; W float or packed (MLX's affine
    quantization, `scales` and `biases` given). Only for what `supported` takes."""
    quantized = scales is not None
    k = w.shape[1] * 32 // bits if quantized else w.shape[1]
    rows, n = x.size // k, w.shape[0]
    flat = mx.contiguous(x.reshape(rows, k).astype(mx.float32))
    if quantized:
        xs, ws, ss, bs = _host(flat, w, _bits(scales), _bits(biases))
    else:
        (xs, ws), ss, bs = _host(flat, _bits(w)), None, None
    kind = QUANTIZED if quantized else KINDS[w.dtype]
    y = multiply(xs, ws, kind, ss, bs, KINDS[scales.dtype] if quantized else 0, group_size, bits)
    return mx.array(y).reshape(*x.shape[:-1], n)


def multiply(
    x: np.ndarray,
    w: np.ndarray,
    kind: int,
    scales: np.ndarray | None = None,
    biases: np.ndarray | None = None,
    scale_kind: int = 0,
    group_size: int = 0,
    bits: int = 0,
) -> np.ndarray:
    """`product` on host arrays: x (rows, in) float32, w (out, in) of `kind` (16-bit as their bits) or packed
    (out, in * bits / 32) uint32 with its scales and biases of `scale_kind`; all C-contiguous."""
    library = _library()
    assert library is not None
    rows, n = x.shape[0], w.shape[0]
    y = np.empty((rows, n), np.float32)
    status = library.product(
        rows,
        n,
        x.shape[1],
        x.ctypes.data,
        kind,
        w.ctypes.data,
        scales.ctypes.data if scales is not None else None,
        biases.ctypes.data if biases is not None else None,
        scale_kind,
        group_size,
        bits,
        y.ctypes.data,
        _threads(),
    )
    _check(status)
    return y


class Operands:
    """One matrix of a fused call on the host: W float or packed (MLX's affine quantization, `scales` and
    `biases` given), and the bias added to its result if any; evaluated now, read in place afterwards."""

    def __init__(
        self,
        w: mx.array,
        scales: mx.array | None = None,
        biases: mx.array | None = None,
        group_size: int = 0,
        bits: int = 0,
        bias: mx.array | None = None,
    ):
        quantized = scales is not None
        arrays = (
            [_bits(w)]
            + ([_bits(scales), _bits(biases)] if quantized else [])
            + ([_bits(bias)] if bias is not None else [])
        )
        host = _host(*arrays)
        ws, rest = host[0], host[1:]
        ss, bs = (rest[0], rest[1]) if quantized else (None, None)
        b = rest[-1] if bias is not None else None
        self._set(
            ws,
            QUANTIZED if quantized else KINDS[w.dtype],
            (ss, bs, KINDS[scales.dtype], group_size, bits) if quantized else None,
            (b, KINDS[bias.dtype]) if bias is not None else None,
        )

    def _set(self, w: np.ndarray, kind: int, quantized: tuple | None, bias: tuple | None) -> None:
        ss, bs, sdtype, group_size, bits = quantized or (None, None, 0, 0, 0)
        b, bias_kind = bias or (None, 0)
        self.host = [a for a in (w, ss, bs, b) if a is not None]  # kept: the struct points into them
        self.matrix = Matrix(
            kind,
            w.shape[0],
            w.ctypes.data,
            ss.ctypes.data if ss is not None else None,
            bs.ctypes.data if bs is not None else None,
            sdtype,
            group_size,
            bits,
            b.ctypes.data if b is not None else None,
            bias_kind,
        )

    @property
    def outputs(self) -> int:
        return self.matrix.N


def stacked(
    w: mx.array, scales: mx.array | None = None, biases: mx.array | None = None, group_size: int = 0, bits: int = 0
) -> list[Operands]:
    """Each matrix of stacked weights (experts, out, in), one `Operands` each, all read from one evaluation."""
    quantized = scales is not None
    host = _host(*([_bits(w), _bits(scales), _bits(biases)] if quantized else [_bits(w)]))
    kind = QUANTIZED if quantized else KINDS[w.dtype]
    operands = []
    for e in range(w.shape[0]):
        one = Operands.__new__(Operands)
        rest = (host[1][e], host[2][e], KINDS[scales.dtype], group_size, bits) if quantized else None
        one._set(host[0][e], kind, rest, None)
        operands.append(one)
    return operands


def kept(owner: object, params: tuple, make: Callable[[], T]) -> T:
    """make() (a layer's operands), kept on `owner` while its parameters `params` stay the same arrays:
    loading weights and training's updates replace the arrays, and are seen; writing into a weight in place
    (`w[i] = v`) is not, and is not something generation's callers do."""
    held = owner.__dict__.get("_kernel_operands")
    if held is not None and len(held[0]) == len(params) and all(a is b for a, b in zip(held[0], params)):
        return held[1]
    made = make()
    owner.__dict__["_kernel_operands"] = (params, made)
    return made


def host(x: mx.array) -> np.ndarray:
    """x (..., n) as float32 rows (rows, n) on the host, evaluated now (no new MLX operation for a float32 x:
    each evaluation costs ~0.1 ms, an evaluated array none)."""
    if x.dtype != mx.float32:
        x = x.astype(mx.float32)
    (xs,) = _host(x)
    return xs.reshape(-1, x.shape[-1])


def vector(a: mx.array) -> tuple[np.ndarray, int]:
    """A vector (a norm's weight) on the host, with its kind."""
    (v,) = _host(_bits(a))
    return v, KINDS[a.dtype]


def _check(status: int) -> None:
    if status != 0:
        raise MemoryError("few-row product: out of memory for its row buffers")


def _outputs(rows: int, matrices: list[Operands]) -> tuple[list[np.ndarray], ctypes.Array, ctypes.Array]:
    """The result arrays of a call over several matrices, with the C arrays of their structs and pointers."""
    ys = [np.empty((rows, m.outputs), np.float32) for m in matrices]
    structs = (Matrix * len(matrices))(*[m.matrix for m in matrices])
    pointers = (ctypes.c_void_p * len(ys))(*[y.ctypes.data for y in ys])
    return ys, structs, pointers


def norm_products(
    x: np.ndarray, norm: tuple[np.ndarray, int], eps: float, matrices: list[Operands]
) -> list[np.ndarray]:
    """rms_norm(x) @ W_i.T (+ bias_i) for each matrix, x (rows, in) float32 on the host: the start of an
    attention block (q, k, v) or of an MLP (gate, up), in one call, the matrices shared out over the cores
    as one. Only for matrices `supported` takes (x's width a multiple of `lanes()`)."""
    library = _library()
    assert library is not None and 1 <= len(matrices) <= 4
    rows = x.shape[0]
    ys, structs, pointers = _outputs(rows, matrices)
    weight, kind = norm
    _check(
        library.norm_products(
            rows, x.shape[1], x.ctypes.data, weight.ctypes.data, kind, eps, len(matrices), structs, pointers, _threads()
        )
    )
    return ys


def products(x: np.ndarray, matrices: list[Operands]) -> list[np.ndarray]:
    """x @ W_i.T (+ bias_i) for each matrix, x (rows, in) float32 on the host, in one call (an expert's gate
    and up). Only for matrices `supported` takes."""
    library = _library()
    assert library is not None and 1 <= len(matrices) <= 4
    rows = x.shape[0]
    ys, structs, pointers = _outputs(rows, matrices)
    _check(library.products(rows, x.shape[1], x.ctypes.data, len(matrices), structs, pointers, _threads()))
    return ys


def residual_product(
    x: np.ndarray, residual: np.ndarray | None, matrix: Operands, gate: np.ndarray | None = None
) -> np.ndarray:
    """residual + a @ W.T, a = x or silu(gate) * x (rows, in), float32 on the host: the end of an attention
    block (o_proj) or of an MLP (down_proj), in one call; without a residual, a @ W.T (an expert's
    down_proj). Only for a matrix `supported` takes."""
    library = _library()
    assert library is not None
    rows = x.shape[0]
    y = np.empty((rows, matrix.outputs), np.float32)
    _check(
        library.residual_product(
            rows,
            x.shape[1],
            gate.ctypes.data if gate is not None else None,
            x.ctypes.data,
            residual.ctypes.data if residual is not None else None,
            ctypes.byref(matrix.matrix),
            y.ctypes.data,
            _threads(),
        )
    )
    return y


def exp(x: np.ndarray) -> np.ndarray:
    """e^x of a C-contiguous float32 array on the host (kernels.c's vexp, Cephes' expf: within 2 ulp for
    x <= 88; 0 below -87), on every core."""
    library = _library()
    assert library is not None and x.dtype == np.float32 and x.flags.c_contiguous
    y = np.empty_like(x)
    _check(library.exp_array(x.size, x.ctypes.data, y.ctypes.data, _threads()))
    return y
