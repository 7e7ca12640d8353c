"""GGUF import on a tiny file: same weights, same tokenizer, same logits as the source folder."""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest
from transformers import AutoTokenizer

from mlx_qwen2.convert import main as convert_main
from mlx_qwen2.gguf_import import hf_key, sha256_of
from mlx_qwen2.loader import load
from tests.tiny import hf_logits, hf_model
from tests.tiny_gguf import write_gguf

TEXT = "Hello 你好 😀 def f(x):\n\treturn x  <|im_end|>"


@pytest.fixture(scope="module")
def tiny_gguf(tiny_untied, tmp_path_factory):
    return write_gguf(tiny_untied, tmp_path_factory.mktemp("gguf") / "tiny.gguf")


def test_import_reproduces_the_source(tiny_gguf, tiny_untied, tmp_path):
    out = tmp_path / "imported"
    assert convert_main(["--gguf", str(tiny_gguf), "--mlx-path", str(out), "--sha256", sha256_of(tiny_gguf)]) == 0
    ours, tok = load(out)
    ids = tok.encode(TEXT)
    assert ids == AutoTokenizer.from_pretrained(tiny_untied)(TEXT)["input_ids"]
    # transformers loads the imported folder, and it computes what the source computes
    np.testing.assert_allclose(hf_logits(hf_model(out), ids), hf_logits(hf_model(tiny_untied), ids), atol=1e-6)
    np.testing.assert_allclose(np.array(ours(mx.array([ids]))[0]), hf_logits(hf_model(tiny_untied), ids), atol=1e-4)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "qwen2" and config["tie_word_embeddings"] is False
    # End tokens, from a source other than the GGUF: the source folder's own tokenizer and generation config
    source_tok = AutoTokenizer.from_pretrained(tiny_untied)
    source_eos = json.loads((tiny_untied / "generation_config.json").read_text())["eos_token_id"]
    end_ids = [source_tok.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")]
    assert source_eos == end_ids  # what the source says, ...
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == end_ids  # ... the import says
    assert tok.eos_token_ids == set(end_ids)
    assert tok.chat_template and "<|im_start|>" in tok.chat_template


def test_key_mapping():
    assert hf_key("blk.3.attn_q.weight") == "model.layers.3.self_attn.q_proj.weight"
    assert hf_key("output.weight") == "lm_head.weight"
    with pytest.raises(ValueError, match="unexpected tensor"):
        hf_key("blk.0.ssm_conv.weight")


def test_gguf_straight_to_quantized(tiny_gguf, tmp_path):
    """Every convert option applies to a GGUF source too (here: quantize, and calibrate)."""
    for flags in (
        ["-q", "--q-group-size", "32"],
        ["--calibrate", "--q-group-size", "32", "--calibration-tokens", "512"],
    ):
        out = tmp_path / flags[0].strip("-")
        assert convert_main(["--gguf", str(tiny_gguf), "--mlx-path", str(out), *flags]) == 0
        config = json.loads((out / "config.json").read_text())
        assert config["quantization"]["group_size"] == 32
        model, _ = load(out)
        assert model.layers[0].mlp.up_proj.bits == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calibrate", "q"]  # the temporary import is gone
