"""Tiny random Qwen2 checkpoints in Hugging Face layout, built in-process.

The weights come from transformers' own Qwen2ForCausalLM or Qwen2MoeForCausalLM
(random init), so the same folder serves as input to mlx_qwen2 and as the
reference model.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen2MoeConfig,
    Qwen2MoeForCausalLM,
)

from mlx_qwen2.convert import main as convert_main
from mlx_qwen2.gguf_import import qwen2_tokenizer

QWEN2_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = [
    "The quick brown fox jumps over the lazy dog. " * 3,
    "def add(a, b):\n    return a + b\n\nclass Point:\n    x: int = 0\n",
    "你好，世界！今天天气很好。我们去公园散步吧。",
    "Emoji 😀🎉🚀 and accents: café naïve résumé.  Tabs\tand\n\nnewlines   spaces.",
    "Numbers 12345 and symbols #$%&*()[]{} <html></html>",
]


def tiny_tokenizer(vocab_size: int = 400) -> Tokenizer:
    """A byte-level BPE with Qwen2's pre-tokenizer and special tokens, trained on a small corpus."""
    scratch = qwen2_tokenizer({}, [], [])
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    scratch.model = models.BPE()
    scratch.train_from_iterator(CORPUS * 5, trainer=trainer)
    data = json.loads(scratch.to_str())["model"]
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in data["merges"]]
    added = [AddedToken(t, special=True, normalized=False) for t in SPECIALS]
    return qwen2_tokenizer(data["vocab"], merges, added)


def make_checkpoint(
    folder: Path,
    tied: bool = False,
    heads: int = 4,
    kv_heads: int = 2,
    layers: int = 2,
    hidden: int = 64,
    intermediate: int | None = None,
    rope_scaling: dict[str, Any] | None = None,
    max_position_embeddings: int = 512,
    seed: int = 0,
    initializer_range: float = 0.02,
) -> Path:
    """Write a random Qwen2 checkpoint (safetensors, config, tokenizer) to `folder`."""
    tok = tiny_tokenizer()
    eos = tok.token_to_id("<|im_end|>")
    config = Qwen2Config(
        vocab_size=512,
        hidden_size=hidden,
        intermediate_size=intermediate or 2 * hidden + 32,  # 160 for 64: only group size 32 divides it
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=max_position_embeddings,
        rope_theta=10000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=tied,
        rope_scaling=rope_scaling,
        bos_token_id=tok.token_to_id("<|endoftext|>"),
        eos_token_id=eos,
        initializer_range=initializer_range,
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config).to(torch.float32).eval()
    with torch.no_grad():  # random biases, so a bug in their use cannot hide behind zeros
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0, 0.5)
            layer.input_layernorm.weight.normal_(1, 0.2)
    return _save(model, folder, tok)


def _save(model: PreTrainedModel, folder: Path, tok: Tokenizer) -> Path:
    """The checkpoint, with the tokenizer files and the top-level rope_theta that hub configs carry."""
    model.save_pretrained(folder, safe_serialization=True)
    # Hub checkpoints (written by transformers 4) carry a top-level rope_theta; tools like
    # mlx-lm read only that, so write it too, as the released Qwen2 configs have it.
    saved = json.loads((folder / "config.json").read_text())
    saved["rope_theta"] = saved.get("rope_parameters", {}).get("rope_theta", 10000.0)
    (folder / "config.json").write_text(json.dumps(saved, indent=2))
    tok.save(str(folder / "tokenizer.json"))
    tok_config = {"chat_template": QWEN2_CHAT_TEMPLATE, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}
    (folder / "tokenizer_config.json").write_text(json.dumps(tok_config))
    eos = tok.token_to_id("<|im_end|>")
    gen = {"eos_token_id": [eos, tok.token_to_id("<|endoftext|>")]}
    (folder / "generation_config.json").write_text(json.dumps(gen))
    return folder


def make_moe_checkpoint(
    folder: Path,
    tied: bool = False,
    layers: int = 4,
    hidden: int = 64,
    experts: int = 8,
    top_k: int = 2,
    norm_topk_prob: bool = False,
    decoder_sparse_step: int = 1,
    mlp_only_layers: list[int] | None = None,
    moe_intermediate: int = 32,
    seed: int = 0,
    **extra: Any,
) -> Path:
    """Write a random Qwen2-MoE checkpoint (GQA: 4 heads, 2 KV heads) to `folder`."""
    tok = tiny_tokenizer()
    config = Qwen2MoeConfig(
        vocab_size=512,
        hidden_size=hidden,
        intermediate_size=96,
        moe_intermediate_size=moe_intermediate,
        shared_expert_intermediate_size=64,
        num_experts=experts,
        num_experts_per_tok=top_k,
        norm_topk_prob=norm_topk_prob,
        decoder_sparse_step=decoder_sparse_step,
        mlp_only_layers=mlp_only_layers or [],
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rope_theta=10000.0,
        tie_word_embeddings=tied,
        bos_token_id=tok.token_to_id("<|endoftext|>"),
        eos_token_id=tok.token_to_id("<|im_end|>"),
        **extra,
    )
    torch.manual_seed(seed)
    model = Qwen2MoeForCausalLM(config).to(torch.float32).eval()
    with torch.no_grad():  # weights large enough that routing, experts and the shared gate all matter
        for name, p in model.named_parameters():
            if ".mlp." in name and "norm" not in name:
                p.normal_(0, 0.5 if "gate.weight" in name else 0.1)
            elif name.endswith("_proj.bias"):
                p.normal_(0, 0.5)
    return _save(model, folder, tok)


def quantized_copy(src: Path, out: Path) -> Path:
    """`src` converted to 4 bits, group size 32 (the tiny widths are multiples of 32, not of 64)."""
    assert convert_main(["--hf-path", str(src), "--mlx-path", str(out), "-q", "--q-group-size", "32"]) == 0
    return out


def hf_model(folder: Path) -> PreTrainedModel:
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def hf_logits(model: PreTrainedModel, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


def hf_greedy(model: PreTrainedModel, ids: list[int], n: int) -> list[int]:
    """Greedy continuation with transformers' own KV cache; no generation utilities, no EOS handling."""
    # transformers renames `past_key_values` to `cache` in 5.x; use whichever this version takes.
    cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    out = []
    with torch.no_grad():
        step = model(torch.tensor([ids]), use_cache=True)
        for _ in range(n):
            out.append(int(step.logits[0, -1].argmax()))
            past = {cache_arg: step.past_key_values}
            step = model(torch.tensor([[out[-1]]]), use_cache=True, **past)
    return out
