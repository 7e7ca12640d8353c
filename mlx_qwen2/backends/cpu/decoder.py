"""A decoder layer for MLX's CPU backend whose few-row passes run as four calls of the compiled kernels.

Each MLX evaluation the CPU backend runs costs 0.1-0.15 ms on this machine, whatever it computes (the
work goes to the stream's thread, and the caller waits for it). A decoder layer decoding a batch made
seven of them, one before each product the kernels computed (`layers._kernel`), and ran the norms,
residuals and SiLU between them as MLX operations: ~80 ms of a 250 ms decode step of the 0.5B model
(8 float32 rows), beside ~140 ms of products. Here, in generation's passes of up to kernels.MAX_ROWS
rows, the layer's work outside attention is done by the kernels, on the host's arrays, in four calls:

    q, k, v = rms_norm(x) @ (Wq, Wk, Wv) + biases       (kernels.norm_products)
    h = x + attention(q, k, v) @ Wo                      (MLX's attention, then kernels.residual_product)
    g, u = rms_norm(h) @ (Wg, Wu)                        (kernels.norm_products)
    y = h + (silu(g) * u) @ Wd                           (kernels.residual_product)

so one MLX evaluation a layer remains: attention's (RoPE, the cache, the scores), which stays MLX's, with
the cache protocol. An MoE layer's sparse block (router, experts, shared expert) is done on the host too
(`_sparse_block`), with no MLX operation: the 4-bit MoE benchmark's decode went from 19 to 23 tokens/s
(the MLX path synced on the host for the routes and evaluated ~8 times a layer). The same function as
`DecoderLayer`'s, to float32 rounding; anything else (training, prefill, LoRA or tensor-parallel layers,
adapters on the experts, MLX_QWEN2_KERNELS=off) takes `DecoderLayer`'s own path. Knows nothing of files.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ...models.qwen2 import MLP, Attention, DecoderLayer
from ...models.qwen2_moe import SparseMoeBlock
from . import kernels, layers
from .experts import host_mixture, mixture_operands

_LINEAR = (layers.UpcastingLinear, layers.DequantizingLinear)


def _operands(layer: nn.Module) -> kernels.Operands | None:
    """The kernels' operands for a (CPU) Linear layer; None where the kernels do not take it (another kind
    of layer, a size they cannot)."""
    if type(layer) not in _LINEAR:
        return None
    params = (layer.weight, layer.get("scales"), layer.get("biases"), layer.get("bias"))

    def make() -> kernels.Operands | None:
        w, scales, biases, bias = params
        group_size, bits = (layer.group_size, layer.bits) if scales is not None else (0, 0)
        if not kernels.supported(1, w, scales, group_size, bits):
            return None
        return kernels.Operands(w, scales, biases, group_size, bits, bias)

    return kernels.kept(layer, params, make)


def _norm(norm: nn.Module) -> tuple[tuple, float] | None:
    """An RMSNorm's weight on the host and its eps; None for another kind of norm."""
    if type(norm) is not nn.RMSNorm:
        return None
    return kernels.kept(norm, (norm.weight,), lambda: (kernels.vector(norm.weight), norm.eps))


class FusedDecoderLayer(DecoderLayer):
    """A DecoderLayer whose few-row passes in generation run through the compiled kernels (see above)."""

    def __call__(self, x: mx.array, mask: mx.array | str | None, cache) -> mx.array:
        rows = x.size // x.shape[-1]
        if not layers.in_inference() or rows > kernels.MAX_ROWS or not kernels.available():
            return super().__call__(x, mask, cache)
        # The CPU embeddings hand the layers float32: other activations, or a tensor-parallel attention, take
        # the plain path.
        if x.dtype != mx.float32 or type(self.self_attn) is not Attention:
            return super().__call__(x, mask, cache)
        a = self.self_attn
        qkv = [_operands(p) for p in (a.q_proj, a.k_proj, a.v_proj)]
        o, norm = _operands(a.o_proj), _norm(self.input_layernorm)
        if None in qkv or o is None or norm is None:
            return super().__call__(x, mask, cache)
        shape = x.shape
        xs = kernels.host(x)
        q, k, v = (mx.array(y).reshape(*shape[:-1], -1) for y in kernels.norm_products(xs, *norm, qkv))
        h = kernels.residual_product(kernels.host(a.attend(q, k, v, mask, cache)), xs, o)
        return self._mlp(h).reshape(shape)

    def _mlp(self, h) -> mx.array:
        """h + mlp(post_attention_layernorm(h)), h (rows, D) float32 on the host."""
        m, norm = self.mlp, _norm(self.post_attention_layernorm)
        if type(m) in (MLP, layers.BlockingMLP) and norm is not None:
            gate, up, down = (_operands(p) for p in (m.gate_proj, m.up_proj, m.down_proj))
            if gate is not None and up is not None and down is not None:
                g, u = kernels.norm_products(h, *norm, [gate, up])
                return mx.array(kernels.residual_product(u, h, down, gate=g))
        if type(m) is SparseMoeBlock and norm is not None:
            y = _sparse_block(m, norm, h)
            if y is not None:
                return mx.array(y)
        hm = mx.array(h)
        return hm + m(self.post_attention_layernorm(hm))


def _sparse_block(m: SparseMoeBlock, norm: tuple[tuple, float], h: np.ndarray) -> np.ndarray | None:
    """h + m(rms_norm(h)) for an MoE layer's block, h (rows, D) float32 on the host, with no MLX operation:

        x = rms_norm(h)                                                      (numpy)
        r, sg, su, s = x @ (W_router, Wg_shared, Wu_shared, W_shared_gate)   (kernels.products)
        experts, weights = top k of softmax(r)                               (numpy)
        e = sum of weights * expert(x) over each row's experts               (experts.host_mixture)
        y = h + e + (silu(sg) * su * sigmoid(s)) @ Wd_shared                 (kernels.residual_product)

    (the shared expert's scale sigmoid(s), one number a row, is moved before its down_proj). None, before
    any of it, where the kernels do not take one of its layers."""
    shared = m.shared_expert
    if type(shared) not in (MLP, layers.BlockingMLP):
        return None
    first = [_operands(p) for p in (m.gate, shared.gate_proj, shared.up_proj, m.shared_expert_gate)]
    down, routed_by = _operands(shared.down_proj), mixture_operands(m.switch_mlp)
    if None in first or down is None or routed_by is None:  # before any work: the plain path redoes it all
        return None
    (weight, kind), eps = norm
    x = h * (1 / np.sqrt(np.mean(h * h, axis=-1, keepdims=True) + eps)) * _float32(weight, kind)
    logits, sg, su, s = kernels.products(x, first)  # x is also the experts' input
    probs = np.exp(logits - logits.max(axis=-1, keepdims=True))
    probs /= probs.sum(axis=-1, keepdims=True)
    experts = np.argpartition(-probs, m.top_k - 1, axis=-1)[:, : m.top_k]
    weights = np.take_along_axis(probs, experts, axis=-1)
    if m.norm_topk_prob:
        weights /= weights.sum(axis=-1, keepdims=True)
    routed = host_mixture(routed_by, x, experts, weights)
    scaled = su / (1 + np.exp(-s))
    return kernels.residual_product(scaled, h + routed, down, gate=sg)


def _float32(weight: np.ndarray, kind: int) -> np.ndarray:
    """A norm's weight from `kernels.vector` (16-bit floats as their bits) as float32."""
    if kind == kernels.KINDS[mx.bfloat16]:
        return (weight.astype(np.uint32) << 16).view(np.float32)
    if kind == kernels.KINDS[mx.float16]:
        return weight.view(np.float16).astype(np.float32)
    return weight
