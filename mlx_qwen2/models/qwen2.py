"""Qwen2 / Qwen2.5 (dense) as MLX modules.

Attribute names equal the Hugging Face checkpoint keys, so weights load
without renaming. Knows nothing of files, sampling, devices or how caches are
allocated (see `base`). Other architectures of the family subclass `Model`
and choose each layer's MLP (`make_mlp`).
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from .base import Cache, ModelArgs, attention
from .rope import RoPE

# The Linear layers of a dense decoder layer, by their path inside it.
PROJECTIONS = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)


class Attention(nn.Module):
    # None: MLX's fused attention. A backend whose own e^x is slow may set one (backends/cpu), on the instance:
    # the scores are then computed explicitly (see base.attention).
    exp = None

    def __init__(self, args: ModelArgs):
        super().__init__()
        dim, self.n_heads, self.n_kv_heads = args.hidden_size, args.num_attention_heads, args.n_kv_heads
        self.head_dim = args.head_dim
        self.scale = self.head_dim**-0.5
        self.q_proj = nn.Linear(dim, self.n_heads * self.head_dim, bias=args.attention_bias)
        self.k_proj = nn.Linear(dim, self.n_kv_heads * self.head_dim, bias=args.attention_bias)
        self.v_proj = nn.Linear(dim, self.n_kv_heads * self.head_dim, bias=args.attention_bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, dim, bias=False)
        self.rope = RoPE(args)

    def __call__(self, x: mx.array, mask: mx.array | str | None, cache: Cache | None) -> mx.array:
        return self.o_proj(self.attend(self.q_proj(x), self.k_proj(x), self.v_proj(x), mask, cache))

    def attend(
        self, q: mx.array, k: mx.array, v: mx.array, mask: mx.array | str | None, cache: Cache | None
    ) -> mx.array:
        """Attention of projected queries, keys and values (B, L, heads x D) -> (B, L, H x D), before o_proj."""
        B, L, _ = q.shape
        q = q.reshape(B, L, self.n_heads, -1).transpose(0, 2, 1, 3)  # (B, H, L, D)
        k = k.reshape(B, L, self.n_kv_heads, -1).transpose(0, 2, 1, 3)  # (B, Hkv, L, D)
        v = v.reshape(B, L, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
        offset = cache.offset if cache is not None else 0
        q, k = self.rope(q, offset), self.rope(k, offset)
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)  # (B, Hkv, cached + L, D)
        out = attention(q, k, v, self.scale, mask, cache, self.exp)
        return out.transpose(0, 2, 1, 3).reshape(B, L, -1)


class MLP(nn.Module):
    silu = staticmethod(nn.silu)  # a backend may set one that computes the same faster (backends/cpu)

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden_dim, bias=False)
        self.up_proj = nn.Linear(dim, hidden_dim, bias=False)
        self.down_proj = nn.Linear(hidden_dim, dim, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(self.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs, mlp: nn.Module):
        super().__init__()
        self.self_attn = Attention(args)
        self.mlp = mlp
        self.input_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.post_attention_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)

    def __call__(self, x: mx.array, mask: mx.array | str | None, cache: Cache | None) -> mx.array:
        h = x + self.self_attn(self.input_layernorm(x), mask, cache)
        return h + self.mlp(self.post_attention_layernorm(h))


class Qwen2Model(nn.Module):
    def __init__(self, args: ModelArgs, mlps: list[nn.Module]):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = [DecoderLayer(args, mlp) for mlp in mlps]
        self.norm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)

    def __call__(self, inputs: mx.array, cache: list[Cache] | None = None) -> mx.array:
        h = self.embed_tokens(inputs)
        # Without a cache: "causal" for more than one token. With one, the cache knows (a batch with rows
        # of different lengths, or a rotating window, needs more than "causal").
        L = h.shape[1]
        mask = cache[0].make_mask(L) if cache is not None else "causal" if L > 1 else None
        return self.norm(self.run_layers(h, mask, cache))

    def run_layers(self, h: mx.array, mask: mx.array | str | None, cache: list[Cache] | None) -> mx.array:
        """The decoder layers on the embeddings (B, L, D); a pipeline stage runs only its own (see parallel)."""
        for i, layer in enumerate(self.layers):
            h = layer(h, mask, cache[i] if cache is not None else None)
        return h


class Model(nn.Module):
    """Qwen2 causal LM: token ids (B, L) -> logits (B, L, vocab)."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model_type = args.model_type
        self.model = Qwen2Model(args, [self.make_mlp(args, i) for i in range(args.num_hidden_layers)])
        if not args.tie_word_embeddings:
            self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)

    def __call__(self, inputs: mx.array, cache: list[Cache] | None = None) -> mx.array:
        return self.head(self.model(inputs, cache))

    @staticmethod
    def make_mlp(args: ModelArgs, index: int) -> nn.Module:
        """The MLP of layer `index`: for dense Qwen2, a SwiGLU of width intermediate_size."""
        return MLP(args.hidden_size, args.intermediate_size)

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
