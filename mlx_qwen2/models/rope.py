"""Rotary position embedding: default, linear and YaRN scaling, as transformers computes them."""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn

from .base import ModelArgs


def yarn_inv_freq(args: ModelArgs) -> tuple[mx.array, float]:
    """YaRN inverse frequencies and attention factor, as transformers computes them."""
    s = args.rope_scaling or {}
    dim, base = args.head_dim, args.rope_theta
    orig = s.get("original_max_position_embeddings") or args.max_position_embeddings
    factor = s.get("factor") or args.max_position_embeddings / orig

    def get_mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = s.get("attention_factor")
    if attention_factor is None:
        if s.get("mscale") and s.get("mscale_all_dim"):
            attention_factor = get_mscale(factor, s["mscale"]) / get_mscale(factor, s["mscale_all_dim"])
        else:
            attention_factor = get_mscale(factor)

    def correction_dim(rotations: float) -> float:
        return dim * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(s.get("beta_fast") or 32), correction_dim(s.get("beta_slow") or 1)
    if s.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = mx.clip((mx.arange(dim // 2, dtype=mx.float32) - low) / (high - low), 0, 1)
    extrapolation = 1 - ramp
    pos_freqs = base ** (mx.arange(0, dim, 2, dtype=mx.float32) / dim)
    inv_freq = (1 / (factor * pos_freqs)) * ramp + (1 / pos_freqs) * extrapolation
    return inv_freq, float(attention_factor)


class RoPE(nn.Module):
    """Non-interleaved rotary embedding with default, linear or YaRN scaling."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.dims = args.head_dim
        self.base: float | None = args.rope_theta
        self.scale = 1.0
        self.mscale = 1.0
        if args.rope_type == "linear":
            self.scale = 1.0 / float(args.rope_scaling["factor"])
        elif args.rope_type == "yarn":
            inv_freq, self.mscale = yarn_inv_freq(args)
            self.base = None
            self._freqs = 1.0 / inv_freq  # mx.fast.rope takes periods, not inverse frequencies

    def __call__(self, x: mx.array, offset: int = 0) -> mx.array:
        if self.mscale != 1.0:  # rope is linear, so scaling before equals scaling cos/sin
            x = x * self.mscale
        freqs = self._freqs if self.base is None else None
        return mx.fast.rope(
            x, self.dims, traditional=False, base=self.base, scale=self.scale, offset=offset, freqs=freqs
        )
