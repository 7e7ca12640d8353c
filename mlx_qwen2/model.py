"""Qwen2 / Qwen2.5 as MLX modules.

Attribute names equal the Hugging Face checkpoint keys, so weights load
without renaming. This module knows nothing of files, sampling, devices or how
caches are allocated: a cache is any object with `offset` and
`update_and_fetch(keys, values)`, passed in by the caller.
"""

from __future__ import annotations

import math
from dataclasses import MISSING, dataclass, fields
from typing import Any, Protocol

import mlx.core as mx
import mlx.nn as nn

from .errors import UserError, check_types


class Cache(Protocol):
    """What the model needs of a cache (mlx_qwen2.cache has the kinds)."""

    offset: int | mx.array  # positions seen; per row, (B,), for a batch of rows that began apart

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[Any, Any]: ...

    def make_mask(self, length: int) -> mx.array | str | None: ...


def attention(q: mx.array, keys: Any, values: Any, scale: float, mask: mx.array | str | None, cache: Any) -> mx.array:
    """Scaled dot-product attention, (B, H, L, D); over quantized keys/values when the cache holds them so."""
    bits = getattr(cache, "bits", None)
    if bits is None:
        return mx.fast.scaled_dot_product_attention(q, keys, values, scale=scale, mask=mask)
    B, H, L, D = q.shape
    n_kv = keys[0].shape[1]
    q = (q * scale).reshape(B, n_kv, H // n_kv, L, D)  # query heads grouped by the KV head they share
    group = cache.group_size
    k = [a[:, :, None] for a in keys]  # (B, Hkv, 1, T, ...): broadcast over the group
    v = [a[:, :, None] for a in values]
    scores = mx.quantized_matmul(q, *k, transpose=True, group_size=group, bits=bits)  # (B, Hkv, G, L, T)
    if isinstance(mask, str):
        T = scores.shape[-1]
        mask = mx.arange(T - L, T)[:, None] >= mx.arange(T)[None]  # causal, the last query on the last key
    if mask is not None:
        mask = mask if mask.ndim < 4 else mask[:, :, None]  # (B, 1, L, T) -> (B, 1, 1, L, T)
        scores = mx.where(mask, scores, mx.finfo(scores.dtype).min)
    weights = mx.softmax(scores.astype(mx.float32), axis=-1, precise=True).astype(q.dtype)
    out = mx.quantized_matmul(weights, *v, transpose=False, group_size=group, bits=bits)  # (B, Hkv, G, L, D)
    return out.reshape(B, H, L, D)


SUPPORTED_ROPE_TYPES = ("default", "linear", "yarn")
# The Linear layers of a decoder layer, by their path inside it.
PROJECTIONS = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)


@dataclass
class ModelArgs:
    """Hyper-parameters, named as in Hugging Face's config.json."""

    hidden_size: int
    num_hidden_layers: int
    intermediate_size: int
    num_attention_heads: int
    vocab_size: int
    num_key_value_heads: int | None = None
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = False
    use_sliding_window: bool = False
    model_type: str = "qwen2"

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> ModelArgs:
        """Build from a config.json dict, ignoring keys Qwen2 does not use; UserError for a config it cannot use."""
        model_type = config.get("model_type", "qwen2")
        if model_type != "qwen2":
            raise UserError(
                f"model_type is {model_type!r}, not 'qwen2': mlx_qwen2 runs Qwen2 and Qwen2.5 dense checkpoints only."
            )
        required = [f.name for f in fields(cls) if f.default is MISSING]
        missing = [k for k in required if k not in config]
        if missing:
            raise UserError(
                f"config.json lacks {', '.join(missing)}, which every Qwen2 config has; re-download or re-convert it."
            )
        names = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in config.items() if k in names}
        check_types(cls, kwargs, "config.json")
        # transformers >= 5 writes `rope_parameters` (theta inside) instead of
        # `rope_theta` + `rope_scaling`.
        params = config.get("rope_parameters")
        if isinstance(params, dict):
            kwargs.setdefault("rope_theta", params.get("rope_theta", cls.rope_theta))
            if params.get("rope_type", params.get("type", "default")) != "default":
                kwargs.setdefault("rope_scaling", params)
        return cls(**kwargs)

    def __post_init__(self) -> None:
        if self.model_type != "qwen2":
            raise UserError(
                f"model_type is {self.model_type!r}, not 'qwen2': mlx_qwen2 runs Qwen2 and "
                "Qwen2.5 dense checkpoints only."
            )
        sizes = ("hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads", "vocab_size")
        for name in sizes:
            if getattr(self, name) < 1:
                raise UserError(f"config.json: {name} must be at least 1, got {getattr(self, name)}.")
        if self.use_sliding_window:
            raise UserError(
                "use_sliding_window is true in config.json, and sliding-window attention is "
                "not implemented; set it to false (Qwen2's released configs do) to use full "
                "attention."
            )
        if self.hidden_size % self.num_attention_heads:
            raise UserError("hidden_size must be a multiple of num_attention_heads")
        if self.num_attention_heads % self.n_kv_heads:
            raise UserError("num_attention_heads must be a multiple of num_key_value_heads")
        if self.rope_type not in SUPPORTED_ROPE_TYPES:
            raise UserError(
                f"rope_scaling type {self.rope_type!r} is not supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}."
            )

    @property
    def n_kv_heads(self) -> int:
        return self.num_key_value_heads or self.num_attention_heads

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def context_length(self) -> int:
        """Longest sequence the model supports (YaRN extends the original window by its factor)."""
        s = self.rope_scaling or {}
        if self.rope_type == "yarn" and s.get("original_max_position_embeddings") and s.get("factor"):
            return max(self.max_position_embeddings, int(s["original_max_position_embeddings"] * s["factor"]))
        return self.max_position_embeddings

    @property
    def rope_type(self) -> str:
        if not self.rope_scaling:
            return "default"
        return self.rope_scaling.get("rope_type", self.rope_scaling.get("type", "default"))


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


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        dim, self.n_heads, self.n_kv_heads = args.hidden_size, args.num_attention_heads, args.n_kv_heads
        self.head_dim = args.head_dim
        self.scale = self.head_dim**-0.5
        self.q_proj = nn.Linear(dim, self.n_heads * self.head_dim, bias=True)
        self.k_proj = nn.Linear(dim, self.n_kv_heads * self.head_dim, bias=True)
        self.v_proj = nn.Linear(dim, self.n_kv_heads * self.head_dim, bias=True)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, dim, bias=False)
        self.rope = RoPE(args)

    def __call__(self, x: mx.array, mask: mx.array | str | None, cache: Cache | None) -> mx.array:
        B, L, _ = x.shape
        q = self.q_proj(x).reshape(B, L, self.n_heads, -1).transpose(0, 2, 1, 3)  # (B, H, L, D)
        k = self.k_proj(x).reshape(B, L, self.n_kv_heads, -1).transpose(0, 2, 1, 3)  # (B, Hkv, L, D)
        v = self.v_proj(x).reshape(B, L, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
        offset = cache.offset if cache is not None else 0
        q, k = self.rope(q, offset), self.rope(k, offset)
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)  # (B, Hkv, cached + L, D)
        out = attention(q, k, v, self.scale, mask, cache)
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1))


class MLP(nn.Module):
    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden_dim, bias=False)
        self.up_proj = nn.Linear(dim, hidden_dim, bias=False)
        self.down_proj = nn.Linear(hidden_dim, dim, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(nn.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.self_attn = Attention(args)
        self.mlp = MLP(args.hidden_size, args.intermediate_size)
        self.input_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.post_attention_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)

    def __call__(self, x: mx.array, mask: mx.array | str | None, cache: Cache | None) -> mx.array:
        h = x + self.self_attn(self.input_layernorm(x), mask, cache)
        return h + self.mlp(self.post_attention_layernorm(h))


class Qwen2Model(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = [DecoderLayer(args) for _ in range(args.num_hidden_layers)]
        self.norm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)

    def __call__(self, inputs: mx.array, cache: list[Cache] | None = None) -> mx.array:
        h = self.embed_tokens(inputs)
        # Without a cache: "causal" for more than one token. With one, the cache knows (a batch with rows
        # of different lengths, or a rotating window, needs more than "causal").
        L = h.shape[1]
        mask = cache[0].make_mask(L) if cache is not None else "causal" if L > 1 else None
        for i, layer in enumerate(self.layers):
            h = layer(h, mask, cache[i] if cache is not None else None)
        return self.norm(h)


class Model(nn.Module):
    """Qwen2 causal LM: token ids (B, L) -> logits (B, L, vocab)."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model_type = args.model_type
        self.model = Qwen2Model(args)
        if not args.tie_word_embeddings:
            self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)

    def __call__(self, inputs: mx.array, cache: list[Cache] | None = None) -> mx.array:
        return self.head(self.model(inputs, cache))

    def head(self, h: mx.array) -> mx.array:
        """Hidden states (B, L, D) -> logits (B, L, vocab); generation applies it to the last position only."""
        if self.args.tie_word_embeddings:
            return self.model.embed_tokens.as_linear(h)
        return self.lm_head(h)

    @property
    def layers(self) -> list[DecoderLayer]:
        return self.model.layers

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """Drop checkpoint entries the module does not hold (rotary tables, a tied head)."""
        weights = {k: v for k, v in weights.items() if "rotary_emb.inv_freq" not in k}
        if self.args.tie_word_embeddings:
            weights.pop("lm_head.weight", None)
        return weights
