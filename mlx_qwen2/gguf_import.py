"""A qwen2 or qwen2moe GGUF file -> a Hugging Face layout folder (safetensors, config, tokenizer).

Tensors are dequantized with the `gguf` package (maintained with llama.cpp);
the tokenizer is rebuilt with `tokenizers` from the vocabulary and merges in
the GGUF metadata. The folder loads in mlx_qwen2 and in transformers.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
from gguf import GGUFReader
from gguf.quants import dequantize
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from .errors import UserError
from .writer import atomic_dir, save_weights, write_json

# Qwen2's pre-tokenizer split, as in its tokenizer.json.
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
GGUF_CONTROL, GGUF_USER_DEFINED = 3, 4  # tokenizer.ggml.token_type values

_LAYER_KEYS = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    # qwen2moe: the router, the shared expert and its gate (experts: _EXPERT_KEYS)
    "ffn_gate_inp": "mlp.gate",
    "ffn_gate_inp_shexp": "mlp.shared_expert_gate",
    "ffn_gate_shexp": "mlp.shared_expert.gate_proj",
    "ffn_up_shexp": "mlp.shared_expert.up_proj",
    "ffn_down_shexp": "mlp.shared_expert.down_proj",
}
# llama.cpp stacks a layer's experts into one tensor (experts, out, in); Hugging Face keeps one per expert.
_EXPERT_KEYS = {"ffn_gate_exps": "gate_proj", "ffn_up_exps": "up_proj", "ffn_down_exps": "down_proj"}
ARCHITECTURES = {"qwen2": "qwen2", "qwen2moe": "qwen2_moe"}  # GGUF architecture -> Hugging Face model_type
_GLOBAL_KEYS = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


def hf_key(gguf_name: str) -> str:
    """GGUF tensor name (blk.3.attn_q.weight) -> Hugging Face key (model.layers.3.self_attn.q_proj.weight);
    for stacked experts, a key with `{}` where the expert's index goes."""
    base, _, kind = gguf_name.rpartition(".")
    if m := re.fullmatch(r"blk\.(\d+)\.(\w+)", base):
        if m.group(2) in _EXPERT_KEYS:
            return f"model.layers.{m.group(1)}.mlp.experts.{{}}.{_EXPERT_KEYS[m.group(2)]}.{kind}"
        if m.group(2) in _LAYER_KEYS:
            return f"model.layers.{m.group(1)}.{_LAYER_KEYS[m.group(2)]}.{kind}"
    elif base in _GLOBAL_KEYS:
        return f"{_GLOBAL_KEYS[base]}.{kind}"
    raise UserError(f"unexpected tensor {gguf_name!r} in a qwen2 GGUF; is the file a Qwen2 model?")


def sha256_of(path: Path, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def qwen2_tokenizer(vocab: dict[str, int], merges: list[tuple[str, str]], added: list[AddedToken]) -> Tokenizer:
    """Qwen2's byte-level BPE tokenizer (NFC, Qwen2 split, no prefix space) from its parts."""
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=False, ignore_merges=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    tok.add_tokens(added)
    return tok


def _open(path: Path) -> GGUFReader:
    if not path.is_file():
        raise UserError(f"GGUF file {path} not found.")
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise UserError(f"{path} is not a GGUF file (bad magic number).")
    try:
        return GGUFReader(str(path))
    except (ValueError, IndexError, OSError) as e:
        raise UserError(f"{path} is a corrupt or truncated GGUF file ({e}); download it again.") from e


def _meta(reader: GGUFReader) -> dict[str, Any]:
    skip = {"tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type"}
    return {k: f.contents() for k, f in reader.fields.items() if k not in skip and not k.startswith("GGUF.")}


def gguf_config(meta: dict[str, Any], vocab_size: int, tied: bool, eos: list[int]) -> dict[str, Any]:
    """A Hugging Face Qwen2 config.json from GGUF metadata."""
    a = "qwen2."
    layers = int(meta[a + "block_count"])
    return {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "hidden_size": int(meta[a + "embedding_length"]),
        "intermediate_size": int(meta[a + "feed_forward_length"]),
        "num_hidden_layers": layers,
        "num_attention_heads": int(meta[a + "attention.head_count"]),
        "num_key_value_heads": int(meta.get(a + "attention.head_count_kv", meta[a + "attention.head_count"])),
        "max_position_embeddings": int(meta.get(a + "context_length", 32768)),
        # stored as float32: 1e-6 reads back as 9.99999997e-07
        "rms_norm_eps": float(str(np.float32(meta[a + "attention.layer_norm_rms_epsilon"]))),
        "rope_theta": float(meta.get(a + "rope.freq_base", 10000.0)),
        "vocab_size": vocab_size,
        "tie_word_embeddings": tied,
        "hidden_act": "silu",
        "use_sliding_window": False,
        "max_window_layers": layers,
        "attention_dropout": 0.0,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": eos[0] if len(eos) == 1 else eos,
        "torch_dtype": "float32",
    }


def moe_config(meta: dict[str, Any], shapes: dict[str, list[int]]) -> dict[str, Any]:
    """The Qwen2-MoE keys of config.json from qwen2moe metadata, and which layers are sparse from the tensors.

    GGUF has no `decoder_sparse_step` or `mlp_only_layers`: a layer is sparse when it has a router
    (`ffn_gate_inp`), and the dense ones are listed in `mlp_only_layers`. Nor has it `norm_topk_prob`:
    llama.cpp never renormalises qwen2moe's top-k weights, i.e. false, as in Qwen1.5-MoE and Qwen2-57B-A14B."""
    a = "qwen2moe."
    layers = int(meta[a + "block_count"])
    dense = [i for i in range(layers) if f"blk.{i}.ffn_gate_inp.weight" not in shapes]
    sparse = next((i for i in range(layers) if i not in dense), None)
    if sparse is None:
        raise UserError("the qwen2moe GGUF has no router tensor (ffn_gate_inp) in any layer; is it complete?")
    shared = meta.get(a + "expert_shared_feed_forward_length") or shapes[f"blk.{sparse}.ffn_up_shexp.weight"][1]
    experts_ff = meta.get(a + "expert_feed_forward_length") or shapes[f"blk.{sparse}.ffn_up_exps.weight"][1]
    return {
        "architectures": ["Qwen2MoeForCausalLM"],
        "model_type": "qwen2_moe",
        "num_experts": int(meta[a + "expert_count"]),
        "num_experts_per_tok": int(meta[a + "expert_used_count"]),
        "moe_intermediate_size": int(experts_ff),
        "shared_expert_intermediate_size": int(shared),
        "norm_topk_prob": False,
        "decoder_sparse_step": 1,
        "mlp_only_layers": dense,
        "intermediate_size": int(meta.get(a + "feed_forward_length", experts_ff)),
    }


def _tokenizer_files(reader: GGUFReader, meta: dict[str, Any]) -> tuple[Tokenizer, dict[str, Any], list[int]]:
    if meta.get("tokenizer.ggml.model") != "gpt2":
        raise UserError(
            f"GGUF tokenizer is {meta.get('tokenizer.ggml.model')!r}; qwen2 models use byte-level BPE (gpt2)."
        )
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    types = reader.fields["tokenizer.ggml.token_type"].contents()
    merges = [tuple(m.split(" ", 1)) for m in reader.fields["tokenizer.ggml.merges"].contents()]
    added = [
        AddedToken(t, special=k == GGUF_CONTROL, normalized=False)
        for t, k in zip(tokens, types)
        if k in (GGUF_CONTROL, GGUF_USER_DEFINED)
    ]
    tok = qwen2_tokenizer({t: i for i, t in enumerate(tokens)}, merges, added)
    name = {
        k: tokens[meta[f"tokenizer.ggml.{k}_token_id"]]
        for k in ("bos", "eos", "padding")
        if f"tokenizer.ggml.{k}_token_id" in meta
    }
    eos = [meta["tokenizer.ggml.eos_token_id"]] if "eos" in name else []
    if "<|endoftext|>" in tokens and tokens.index("<|endoftext|>") not in eos:
        eos.append(tokens.index("<|endoftext|>"))  # Qwen2 instruct models stop on either
    config = {
        "tokenizer_class": "Qwen2Tokenizer",
        "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        "bos_token": None,
        "eos_token": name.get("eos"),
        "pad_token": name.get("padding"),
        "errors": "replace",
        "clean_up_tokenization_spaces": False,
        "split_special_tokens": False,
        "model_max_length": int(meta.get("qwen2.context_length", 32768)),
    }
    if "tokenizer.chat_template" in meta:
        config["chat_template"] = meta["tokenizer.chat_template"]
    return tok, config, eos


def _tensors(
    reader: GGUFReader, dtype: np.dtype, progress: Callable[[int, int], None] | None
) -> Iterator[tuple[str, mx.array]]:
    """Dequantize one tensor at a time, so memory holds one output shard, not the whole model."""
    for i, t in enumerate(reader.tensors):
        data = dequantize(t.data, t.tensor_type)
        shape = tuple(int(d) for d in reversed(t.shape))  # GGUF lists dims innermost first
        key, w = hf_key(t.name), mx.array(data.reshape(shape).astype(dtype))
        if "{}" in key:  # stacked experts (E, out, in): one tensor per expert
            yield from ((key.format(e), w[e]) for e in range(w.shape[0]))
        elif ".shared_expert_gate." in key:
            yield key, w.reshape(1, -1)  # llama.cpp may store it as a vector; Hugging Face's is (1, hidden)
        else:
            yield key, w
        if progress:
            progress(i + 1, len(reader.tensors))


def import_gguf(
    gguf_path: str | Path,
    out: str | Path,
    dtype: str = "float32",
    sha256: str | None = None,
    force: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Write a Hugging Face layout folder for a qwen2 GGUF; returns the folder."""
    gguf_path, out = Path(gguf_path), Path(out)
    if dtype not in ("float32", "float16"):
        raise UserError(f"--dtype {dtype} is not available for a GGUF import; use float32 or float16.")
    reader = _open(gguf_path)
    meta = _meta(reader)
    arch = meta.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise UserError(
            f"{gguf_path} holds a {arch!r} model, not qwen2 or qwen2moe; mlx_qwen2 imports Qwen2, Qwen2.5 and "
            "Qwen2-MoE GGUFs only."
        )
    if sha256 is not None and (found := sha256_of(gguf_path)) != sha256.lower():
        raise UserError(f"{gguf_path} has sha256 {found}, expected {sha256}: the file is corrupt or a different one.")
    if arch == "qwen2moe":  # the same keys under the architecture's prefix, plus the experts'
        meta = {k.replace("qwen2moe.", "qwen2.", 1): v for k, v in meta.items()} | meta
    tok, tok_config, eos = _tokenizer_files(reader, meta)
    shapes = {t.name: [int(d) for d in t.shape] for t in reader.tensors}
    if "token_embd.weight" not in shapes:
        raise UserError(f"{gguf_path} has no token_embd.weight tensor; is it a complete qwen2 model?")
    tied = "output.weight" not in shapes
    config = gguf_config(meta, shapes["token_embd.weight"][1], tied, eos)
    if arch == "qwen2moe":
        config.update(moe_config(meta, shapes))
    config["torch_dtype"] = dtype
    generation = {
        k: v for k, v in {"bos_token_id": config["bos_token_id"], "eos_token_id": eos}.items() if v is not None
    }
    if "tokenizer.ggml.padding_token_id" in meta:
        generation["pad_token_id"] = meta["tokenizer.ggml.padding_token_id"]
    with atomic_dir(out, force) as tmp:
        save_weights(tmp, _tensors(reader, np.dtype(dtype), progress))
        tok.save(str(tmp / "tokenizer.json"))
        write_json(tmp / "tokenizer_config.json", tok_config)
        write_json(tmp / "config.json", config)
        write_json(tmp / "generation_config.json", generation)
    return out
