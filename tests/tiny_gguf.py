"""Write a tiny GGUF (F32 tensors, byte-level BPE metadata) from a tiny Hugging Face folder, qwen2 or qwen2moe
(experts stacked as llama.cpp stores them)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import gguf
import numpy as np
from safetensors.numpy import load_file

from mlx_qwen2.gguf_import import _EXPERT_KEYS, _GLOBAL_KEYS, _LAYER_KEYS


def gguf_name(hf_key: str) -> str:
    module, _, kind = hf_key.rpartition(".")
    for g, h in _GLOBAL_KEYS.items():
        if module == h:
            return f"{g}.{kind}"
    parts = module.split(".", 3)  # model, layers, N, rest
    inverse = {v: k for k, v in _LAYER_KEYS.items()}
    return f"blk.{parts[2]}.{inverse[parts[3]]}.{kind}"


def gguf_tensors(weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """GGUF names and arrays: experts stacked per layer, the shared-expert gate a vector (as llama.cpp writes)."""
    out, experts = {}, {}
    for key, value in weights.items():
        if m := re.fullmatch(r"model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(\w+)\.weight", key):
            experts.setdefault((m.group(1), m.group(3)), {})[int(m.group(2))] = value
        elif key.endswith("shared_expert_gate.weight"):
            out[gguf_name(key)] = value.reshape(-1)
        else:
            out[gguf_name(key)] = value
    inverse = {v: k for k, v in _EXPERT_KEYS.items()}
    for (layer, proj), by_index in experts.items():
        out[f"blk.{layer}.{inverse[proj]}.weight"] = np.stack([by_index[e] for e in sorted(by_index)])
    return out


def write_gguf(folder: Path, path: Path, arch: str | None = None) -> Path:
    """`arch` defaults to the folder's (qwen2 or qwen2moe); another name writes a file of that architecture."""
    config = json.loads((folder / "config.json").read_text())
    arch = arch or ("qwen2moe" if config["model_type"] == "qwen2_moe" else "qwen2")
    tok = json.loads((folder / "tokenizer.json").read_text())
    chat = json.loads((folder / "tokenizer_config.json").read_text())["chat_template"]
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(config["num_hidden_layers"])
    w.add_context_length(config["max_position_embeddings"])
    w.add_embedding_length(config["hidden_size"])
    w.add_feed_forward_length(config["intermediate_size"])
    w.add_head_count(config["num_attention_heads"])
    w.add_head_count_kv(config["num_key_value_heads"])
    w.add_rope_freq_base(config["rope_parameters"]["rope_theta"])
    w.add_layer_norm_rms_eps(config["rms_norm_eps"])
    if arch == "qwen2moe":
        w.add_expert_count(config["num_experts"])
        w.add_expert_used_count(config["num_experts_per_tok"])
        w.add_expert_feed_forward_length(config["moe_intermediate_size"])
        w.add_expert_shared_feed_forward_length(config["shared_expert_intermediate_size"])
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    vocab = dict(tok["model"]["vocab"])
    added = {t["content"]: t["id"] for t in tok["added_tokens"]}
    tokens = sorted({**vocab, **added}.items(), key=lambda kv: kv[1])
    # pad to the model's vocabulary, as real Qwen2 GGUFs do
    names = [t for t, _ in tokens] + [f"[PAD{i}]" for i in range(len(tokens), config["vocab_size"])]
    types = [3 if t in added else 5 if t.startswith("[PAD") else 1 for t in names]
    w.add_token_list(names)
    w.add_token_types(types)
    w.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in tok["model"]["merges"]])
    w.add_eos_token_id(added["<|im_end|>"])
    w.add_bos_token_id(added["<|endoftext|>"])
    w.add_pad_token_id(added["<|endoftext|>"])
    w.add_chat_template(chat)
    for name, value in gguf_tensors(load_file(str(folder / "model.safetensors"))).items():
        w.add_tensor(name, np.ascontiguousarray(value.astype(np.float32)))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
