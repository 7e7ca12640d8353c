"""e^x for MLX's CPU backend off Apple Silicon, and SiLU with it: computed with `mx.power`.

MLX's CPU exp, and the sigmoid, SiLU and softmax built on it, are vectorized
only where MLX is built with Accelerate on ARM (Apple Silicon; see MLX's
`backend/cpu/simd/type.h`). Elsewhere they take one element at a time: on
this x86_64 CPU 9-14 ns an element, while power, the C library's, takes ~3
ns. SiLU (every MLP, over B x L x intermediate values) and attention's
exponentials (L x T per head) are a large share of prefill there. Through
power, e^x is 2.9x and SiLU 3.5x faster (`python -m benchmarks.elementwise`),
equal to float32 rounding (e^x as float32(e)^x: a relative error of |x| x 3e-8).

In generation's passes attention's larger blocks of scores (prefill: HOST_EXP
or more) take the compiled kernels' vectorised e^x instead (`kernels.exp`, on
the host: one evaluation more a block): a million scores in 0.4 ms here, 1.0
with the evaluation and the copy back, against 8.3 through power and 16.6
through MLX's exp.

`use_fast_layers` sets them on the model's MLPs, experts and attention where
MLX's exp is the slow one. Knows nothing of models or files.
"""

from __future__ import annotations

import math
import platform
import sys
from functools import partial

import mlx.core as mx

from . import kernels
from .layers import in_inference

# Where MLX's CPU exp runs one element at a time: all but Apple Silicon (measured on Linux x86_64).
SLOW_EXP = not (sys.platform == "darwin" and platform.machine() == "arm64")
HOST_EXP = 1 << 16  # scores from which attention's e^x in generation's passes goes to the kernels


def exp(x: mx.array) -> mx.array:
    return mx.power(mx.array(math.e, x.dtype), x)


def attention_exp(x: mx.array) -> mx.array:
    """Attention's e^x (see above): the kernels' for a large float32 block in generation's passes, else `exp`."""
    if x.size >= HOST_EXP and x.dtype == mx.float32 and in_inference() and kernels.available():
        return mx.array(kernels.exp(kernels.host(x))).reshape(x.shape)
    return exp(x)


@partial(mx.compile, shapeless=True)  # one pass, in place, as MLX's own silu: no array of x's size held besides x
def silu(x: mx.array) -> mx.array:
    """x * sigmoid(x). e^-x is capped at e^88 (float32's largest power of e is e^88.7): below x = -88 SiLU is 0
    in float32 either way, and the cap keeps the gradient 0 there (x * inf / inf^2 would be NaN)."""
    return x / (1 + exp(mx.minimum(-x, 88.0)))
