"""Shard a built model over a group of processes (`mx.distributed`): tensor parallel or pipeline parallel.

Never inside a forward pass: the model's modules are replaced, before its weights are loaded, by ones of
the local shapes that do their own communication.

- Tensor parallel: each rank holds 1/N of every layer's attention heads (q, k, v rows; o_proj columns),
  MLP and shared-expert width (gate and up rows, down columns) and of every expert's width; attention
  and MLP outputs are summed over the ranks (`all_sum`, two per layer, of B x L x hidden). An untied
  output layer holds 1/N of the vocabulary, its logits gathered (`all_gather`). Replicated on every rank:
  the embedding, the norms, a tied output layer, MoE routers and shared-expert gates. Adapters are split
  as their layers are (`adapter_axis`).
- Pipeline parallel: each rank holds a contiguous block of layers; hidden states go from rank to rank
  (`send` / `recv`), and the last block's output is gathered to every rank, which applies the (replicated)
  norm and output layer, so every rank samples the same tokens. Replicated: embedding, norm, output layer.

Which slices a rank reads is `tensor_parallel_axis` (loader.py reads just those) or `shard_pipeline`'s
key map.
Knows nothing of files.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from .errors import UserError
from .models import Model, ModelArgs, MoeArgs, qwen2, qwen2_moe
from .models.base import retyped
from .models.experts import SwitchGLU
from .models.qwen2 import MLP, Attention, Qwen2Model
from .models.qwen2_moe import SparseMoeBlock

MODES = ("tensor", "pipeline")


class _Summed:
    """Mixed into a module whose output is a partial sum over the ranks: sums it."""

    group: mx.distributed.Group

    def __call__(self, *args: Any) -> mx.array:
        return mx.distributed.all_sum(super().__call__(*args), group=self.group)


class TensorParallelAttention(_Summed, Attention):
    """Attention over this rank's heads; the output summed over the ranks."""


class TensorParallelMLP(_Summed, MLP):
    """A SwiGLU over this rank's columns; the output summed over the ranks."""


class TensorParallelMoe(_Summed, SparseMoeBlock):
    """Routing on every rank (replicated router), experts and shared expert over this rank's columns."""


class _GatheredHead:
    """Mixed into a model whose output layer holds this rank's share of the vocabulary: the ranks' logits
    gathered, in rank order, into the whole vocabulary's on every rank."""

    group: mx.distributed.Group

    def head(self, h: mx.array) -> mx.array:
        local = super().head(h)  # (B, L, vocab / n)
        gathered = mx.distributed.all_gather(mx.moveaxis(local, -1, 0), group=self.group)  # along axis 0
        return mx.moveaxis(gathered, 0, -1)


class TensorParallelModel(_GatheredHead, qwen2.Model):
    """Dense Qwen2 with its output layer split by vocabulary over the ranks."""


class TensorParallelMoeModel(_GatheredHead, qwen2_moe.Model):
    """Qwen2-MoE with its output layer split by vocabulary over the ranks."""


def splits_head(args: ModelArgs, n: int) -> bool:
    """Whether tensor parallel splits the output layer by vocabulary: when it is its own matrix (not the
    tied embedding, which every rank needs whole to look tokens up) and the vocabulary divides by n."""
    return not args.tie_word_embeddings and args.vocab_size % n == 0


def check_tensor_parallel(args: ModelArgs, n: int, group_size: int | None = None) -> None:
    """UserError unless every split width divides by the number of ranks (and, quantized, into whole groups)."""
    widths = {"num_key_value_heads": args.n_kv_heads, "num_attention_heads": args.num_attention_heads,
              "intermediate_size": args.intermediate_size}  # fmt: skip
    if isinstance(args, MoeArgs):
        if all(args.is_sparse(i) for i in range(args.num_hidden_layers)):
            widths.pop("intermediate_size")  # no dense MLP to split
        widths["moe_intermediate_size"] = args.moe_intermediate_size
        widths["shared_expert_intermediate_size"] = args.shared_expert_intermediate_size
    bad = [f"{k} ({v})" for k, v in widths.items() if v % n]
    if bad:
        raise UserError(
            f"tensor parallel over {n} ranks needs widths that divide by {n}, and {', '.join(bad)} do not; "
            "use --parallel pipeline (any layer count and head count), or another number of ranks."
        )
    if group_size:  # a quantized checkpoint: each rank's share of an input dimension must be whole groups
        inputs = {"attention width": args.num_attention_heads * args.head_dim, **widths}
        inputs.pop("num_key_value_heads"), inputs.pop("num_attention_heads")
        short = [f"{k} / {n} = {v // n}" for k, v in inputs.items() if (v // n) % group_size]
        if short:
            raise UserError(
                f"tensor parallel over {n} ranks splits inputs into parts that are not whole quantization groups "
                f"of {group_size} ({', '.join(short)}); use --parallel pipeline, or quantize with a smaller "
                "--q-group-size."
            )


def shard_tensor_parallel(model: Model, group: mx.distributed.Group, group_size: int | None = None) -> Model:
    """Every layer's modules replaced by ones of this rank's shapes (fresh weights, to be loaded), and the
    output layer too where `splits_head`; returns the model (of a class that gathers the logits then).
    `group_size`: the checkpoint's quantization group size, if it is quantized."""
    n = group.size()
    args = model.args
    check_tensor_parallel(args, n, group_size)
    dim, head_dim = args.hidden_size, args.head_dim
    for layer in model.layers:
        a = layer.self_attn
        heads, kv = a.n_heads // n, a.n_kv_heads // n
        bias = args.attention_bias
        new = {"q_proj": nn.Linear(dim, heads * head_dim, bias=bias), "k_proj": nn.Linear(dim, kv * head_dim, bias=bias),
               "v_proj": nn.Linear(dim, kv * head_dim, bias=bias), "o_proj": nn.Linear(heads * head_dim, dim, bias=False)}  # fmt: skip
        a.update_modules(new)
        layer.self_attn = retyped(a, TensorParallelAttention, n_heads=heads, n_kv_heads=kv, group=group)
        m = layer.mlp
        if isinstance(m, SparseMoeBlock):
            m.switch_mlp = SwitchGLU(dim, args.moe_intermediate_size // n, args.num_experts)
            m.shared_expert = MLP(dim, args.shared_expert_intermediate_size // n)
            layer.mlp = retyped(m, TensorParallelMoe, group=group)
        else:
            layer.mlp = retyped(MLP(dim, args.intermediate_size // n), TensorParallelMLP, group=group)
    if not splits_head(args, n):
        return model
    model.lm_head = nn.Linear(dim, args.vocab_size // n, bias=False)
    cls = TensorParallelMoeModel if isinstance(model, qwen2_moe.Model) else TensorParallelModel
    return retyped(model, cls, group=group)


_ROWS = re.compile(
    r"\.(self_attn\.[qkv]_proj|mlp\.(shared_expert\.)?(gate|up)_proj|mlp\.experts\.\d+\.(gate|up)_proj)\."
)
_COLUMNS = re.compile(r"\.(self_attn\.o_proj|mlp\.(shared_expert\.)?down_proj|mlp\.experts\.\d+\.down_proj)\.")


def tensor_parallel_axis(key: str, split_head: bool = False) -> int | None:
    """The axis a checkpoint tensor is split along under tensor parallel, or None if every rank holds it all
    (`split_head`: whether the output layer is split, see `splits_head`)."""
    if key.startswith("lm_head."):
        return 0 if split_head else None
    if ".mlp.switch_mlp." in key:  # stacked experts (E, out, in)
        return -1 if ".down_proj." in key else 1
    if ".mlp.experts.gate_up_proj" in key or key.endswith(".mlp.experts.down_proj"):
        raise UserError(
            "this checkpoint holds its experts fused (transformers 5's in-memory layout), which tensor parallel "
            "cannot split; convert it with python -m mlx_qwen2.convert first."
        )
    if _ROWS.search(key):
        return 0
    if _COLUMNS.search(key):
        return -1
    return None


def adapter_axis(key: str, split_head: bool = False) -> int | None:
    """The axis an adapter tensor is split along under tensor parallel (None: every rank holds it all).

    LoRA's update (x A) B follows its layer's split: where the layer's output rows are split, so is B's
    output axis (A is replicated); where its input is split (o_proj, down_proj), so is A's input axis, and
    the ranks' partial updates are summed with the layer's. DoRA's magnitude follows the output rows; on a
    layer with a split input its row norms would span the ranks: refused. Full fine-tuning saves weights,
    split as the checkpoint's."""
    path, _, leaf = key.rpartition(".")
    if leaf not in ("lora_a", "lora_b", "m"):
        return tensor_parallel_axis(key, split_head)
    base = tensor_parallel_axis(path + ".weight")
    if base is None:
        return None
    experts = ".switch_mlp." in key  # A (E, r, in), B (E, out, r); a dense layer's: A (in, r), B (r, out)
    if base != -1:  # output rows split
        return 0 if leaf == "m" else (1 if experts else -1) if leaf == "lora_b" else None
    if leaf == "m":
        raise UserError(
            f"DoRA on {path} cannot be split over ranks (its row norms span them); fuse the adapters first "
            "(python -m mlx_qwen2.fuse), or use --parallel pipeline."
        )
    return (-1 if experts else 0) if leaf == "lora_a" else None


def local_part(w: mx.array, axis: int | None, rank: int, n: int) -> mx.array:
    """Rank `rank`'s part of `n` equal parts of `w` along `axis` (all of it for None)."""
    if axis is None:
        return w
    if w.shape[axis] % n:
        raise UserError(f"a tensor of shape {tuple(w.shape)} does not split into {n} equal parts along axis {axis}.")
    size = w.shape[axis] // n
    index = [slice(None)] * w.ndim
    index[axis] = slice(rank * size, (rank + 1) * size)
    return w[tuple(index)]


def stage_layers(num_layers: int, rank: int, n: int) -> range:
    """The contiguous block of layers of pipeline stage `rank` (the first stages take the remainder)."""
    if num_layers < n:
        raise UserError(f"pipeline parallel over {n} ranks needs at least {n} layers; the model has {num_layers}.")
    base, extra = divmod(num_layers, n)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (rank < extra))


class PipelineQwen2Model(Qwen2Model):
    """Runs this stage's layers: receives from the previous stage, sends to the next, gathers the last's."""

    group: mx.distributed.Group

    def run_layers(self, h: mx.array, mask: mx.array | str | None, cache: list | None) -> mx.array:
        rank, n = self.group.rank(), self.group.size()
        if rank > 0:
            h = mx.distributed.recv_like(h, rank - 1, group=self.group)
        h = super().run_layers(h, mask, cache)
        if rank < n - 1:
            h = mx.distributed.send(h, rank + 1, group=self.group)
        out = mx.distributed.all_gather(h, group=self.group)[-h.shape[0] :]  # the last stage's output
        # Evaluated here, so that the ranks' sends and receives happen in the order the forward passes were
        # made: a pass left lazy while the next one is built would be overtaken by any evaluation in between
        # (the CPU experts read their group sizes on the host), and the ranks would pair the wrong messages.
        mx.eval(out)
        return out


def shard_pipeline(model: Model, group: mx.distributed.Group) -> Callable[[str], str | None]:
    """In place: keep this rank's block of layers; returns checkpoint key -> this rank's key (None: not held)."""
    block = stage_layers(len(model.layers), group.rank(), group.size())
    model.model.layers = [model.model.layers[i] for i in block]
    model.model = retyped(model.model, PipelineQwen2Model, group=group)
    pattern = re.compile(r"^model\.layers\.(\d+)\.")

    def local_key(key: str) -> str | None:
        m = pattern.match(key)
        if not m:
            return key
        i = int(m.group(1))
        return f"model.layers.{i - block.start}.{key[m.end() :]}" if i in block else None

    return local_key


def check_same_everywhere(group: mx.distributed.Group, *values: object) -> None:
    """UserError on every rank unless all ranks were given the same values (model, settings)."""
    digest = int(hashlib.sha256(repr(values).encode()).hexdigest()[:6], 16)  # 24 bits: exact in float32
    seen = mx.distributed.all_gather(mx.array([digest], dtype=mx.float32), group=group)
    if len(set(seen.tolist())) > 1:
        raise UserError(
            "the ranks were started with different models or settings; give every rank the same command "
            "(mlx.launch runs one command everywhere)."
        )


def common_seed(group: mx.distributed.Group, seed: int | None) -> int:
    """A sampling seed the same on every rank: the one given, or one drawn by rank 0."""
    if seed is not None:
        return seed
    drawn = int.from_bytes(os.urandom(2), "little") if group.rank() == 0 else 0
    return int(mx.distributed.all_sum(mx.array([drawn], dtype=mx.float32), group=group)[0])


def barrier(group: mx.distributed.Group) -> None:
    """Return on every rank only once all ranks have reached it."""
    mx.eval(mx.distributed.all_sum(mx.zeros((1,)), group=group))


def share_json(group: mx.distributed.Group, value: Any) -> Any:
    """Rank 0's `value` (JSON-serialisable) on every rank; the others pass None. Two all_sums: the length,
    then the bytes (every rank but 0 adds zeros)."""
    data = json.dumps(value).encode() if group.rank() == 0 else b""
    size = int(mx.distributed.all_sum(mx.array([len(data)], dtype=mx.int32), group=group)[0])
    mine = mx.array(list(data), dtype=mx.int32) if data else mx.zeros((size,), dtype=mx.int32)
    shared = mx.distributed.all_sum(mine, group=group) if size else mx.zeros((0,), dtype=mx.int32)
    return json.loads(bytes(shared.astype(mx.uint8).tolist()).decode())
