"""Write a tiny GGUF (F32 tensors, byte-level BPE metadata) from a tiny Hugging Face folder."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
from safetensors.numpy import load_file

from mlx_qwen2.gguf_import import _GLOBAL_KEYS, _LAYER_KEYS


def gguf_name(hf_key: str) -> str:
    module, _, kind = hf_key.rpartition(".")
    for g, h in _GLOBAL_KEYS.items():
        if module == h:
            return f"{g}.{kind}"
    parts = module.split(".", 3)  # model, layers, N, rest
    inverse = {v: k for k, v in _LAYER_KEYS.items()}
    return f"blk.{parts[2]}.{inverse[parts[3]]}.{kind}"


def write_gguf(folder: Path, path: Path, arch: str = "qwen2") -> Path:
    config = json.loads((folder / "config.json").read_text())
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
    for key, value in load_file(str(folder / "model.safetensors")).items():
        w.add_tensor(gguf_name(key), np.ascontiguousarray(value.astype(np.float32)))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
