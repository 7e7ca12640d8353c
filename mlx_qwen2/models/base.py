"""What every architecture of the family shares: hyper-parameters, the cache protocol, attention.

Knows nothing of files, sampling, devices or how caches are allocated: a cache is
any object with `offset`, `update_and_fetch(keys, values)` and `make_mask(length)`,
passed in by the caller.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import MISSING, dataclass, fields
from typing import Any, ClassVar, Protocol

import mlx.core as mx
import mlx.nn as nn

from ..errors import UserError, check_types

SUPPORTED_ROPE_TYPES = ("default", "linear", "yarn")


def retyped(module: nn.Module, cls: type, **attrs: Any) -> nn.Module:
    """The same module (its parameters, children and settings, plus `attrs`) as an instance of `cls`: a
    class that computes the same function another way (backends) or over a share of it (parallel)."""
    new = cls.__new__(cls)
    new.__dict__.update(module.__dict__)  # settings: group_size, bits, frozen state, ...
    dict.update(new, module)  # parameters and children (a Module is a dict of them): saving is unchanged
    new.__dict__.update(attrs)
    return new


class Cache(Protocol):
    """What the model needs of a cache (mlx_qwen2.cache has the kinds)."""

    offset: int | mx.array  # positions seen; per row, (B,), for a batch of rows that began apart

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[Any, Any]: ...

    def make_mask(self, length: int) -> mx.array | str | None: ...


# Most attention scores (rows x heads x queries x keys) the explicit path holds at once: 1 MB of float32.
# On CPU, 2^18 against 2^20: the 4-bit MoE benchmark's prefill as fast (335-340 against 336-339 tokens/s)
# with MLX's peak at 1.040-1.043x the weights against 1.050x (bfloat16 0.5B, 512 tokens: 1.016x against
# 1.021x); ad-hoc, in process.
SCORES_BLOCK = 1 << 18


def attention(
    q: mx.array,
    keys: Any,
    values: Any,
    scale: float,
    mask: mx.array | str | None,
    cache: Any,
    exp: Callable[[mx.array], mx.array] | None = None,
) -> mx.array:
    """Scaled dot-product attention, (B, H, L, D); over quantized keys/values when the cache holds them so.

    With `exp` (an elementwise e^x, for a backend whose own is slow) or a quantized cache, the scores are
    computed explicitly, for a block of queries at a time (at most SCORES_BLOCK scores, one block after
    the other: a long prompt's chunk never holds every head's queries x keys), and the weighted values are
    divided by the weights' sums afterwards (one pass less over the scores than a softmax)."""
    bits = getattr(cache, "bits", None)
    if bits is None and exp is None:
        return mx.fast.scaled_dot_product_attention(q, keys, values, scale=scale, mask=mask)
    B, H, L, D = q.shape
    n_kv, T = (keys[0] if bits else keys).shape[1:3]
    q = (q * scale).reshape(B, n_kv, H // n_kv, L, D)  # query heads grouped by the KV head they share
    if isinstance(mask, str):
        mask = mx.arange(T - L, T)[:, None] >= mx.arange(T)[None]  # causal, the last query on the last key
    if mask is not None:
        mask = mask if mask.ndim < 4 else mask[:, :, None]  # (B, 1, L, T) -> (B, 1, 1, L, T)
        if mask.dtype == mx.bool_:  # added to the scores, which it then holds
            mask = mx.where(mask, 0.0, mx.finfo(mx.float32).min)
    step = max(1, SCORES_BLOCK // (B * H * T))
    parts: list[mx.array] = []
    for i in range(0, L, step):
        block = q[..., i : i + step, :]
        if parts:
            block = mx.depends([block], [parts[-1]])[0]  # after the previous block: one block's scores at a time
        parts.append(_attend(block, keys, values, None if mask is None else mask[..., i : i + step, :], cache, exp))
    out = parts[0] if len(parts) == 1 else mx.concatenate(parts, axis=3)
    return out.reshape(B, H, L, D)


def _attend(q: mx.array, keys: Any, values: Any, bias: mx.array | None, cache: Any, exp: Callable | None) -> mx.array:
    """Attention of a block of scaled queries (B, Hkv, G, l, D) over all keys; (B, Hkv, G, l, D)."""
    B, n_kv, G, length, D = q.shape
    bits = getattr(cache, "bits", None)
    q = q.reshape(B, n_kv, G * length, D)
    if bits:
        scores = mx.quantized_matmul(q, *keys, transpose=True, group_size=cache.group_size, bits=bits)
    else:
        scores = q @ keys.swapaxes(-1, -2)  # (B, Hkv, G * l, T)
    scores = scores.reshape(B, n_kv, G, length, -1).astype(mx.float32)
    if bias is not None:
        scores = scores + bias
    weights = (exp or mx.exp)(scores - mx.stop_gradient(scores.max(axis=-1, keepdims=True)))
    total = weights.sum(axis=-1).reshape(B, n_kv, G * length, 1)
    weights = weights.astype(q.dtype).reshape(B, n_kv, G * length, -1)
    if bits:
        out = mx.quantized_matmul(weights, *values, transpose=False, group_size=cache.group_size, bits=bits)
    else:
        out = weights @ values  # (B, Hkv, G * l, D)
    return (out / total).astype(q.dtype).reshape(B, n_kv, G, length, D)


@dataclass
class ModelArgs:
    """Hyper-parameters of a dense Qwen2 / Qwen2.5 model, named as in Hugging Face's config.json."""

    MODEL_TYPE: ClassVar[str] = "qwen2"
    SIZES: ClassVar[tuple[str, ...]] = (
        "hidden_size",
        "num_hidden_layers",
        "intermediate_size",
        "num_attention_heads",
        "vocab_size",
    )

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
        """Build from a config.json dict, ignoring keys the model does not use; UserError for a config it cannot use."""
        model_type = config.get("model_type", "qwen2")
        if model_type != cls.MODEL_TYPE:
            raise UserError(f"model_type is {model_type!r}, not {cls.MODEL_TYPE!r}.")
        required = [f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING]
        missing = [k for k in required if k not in config]
        if missing:
            raise UserError(
                f"config.json lacks {', '.join(missing)}, which every {cls.MODEL_TYPE} config has; "
                "re-download or re-convert it."
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
        if self.model_type != self.MODEL_TYPE:
            raise UserError(f"model_type is {self.model_type!r}, not {self.MODEL_TYPE!r}.")
        for name in self.SIZES:
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
    def attention_bias(self) -> bool:
        """Whether q, k and v projections have biases (always, in dense Qwen2)."""
        return True

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
