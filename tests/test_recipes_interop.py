"""Mixed-precision recipes, and on-disk interoperability with mlx-lm in both directions."""

from __future__ import annotations

import json

import mlx.core as mx
import mlx_lm
import numpy as np
import pytest

from mlx_qwen2.convert import main as convert_main
from mlx_qwen2.loader import load
from mlx_qwen2.quantize import is_sensitive_layer
from tests.tiny import make_checkpoint

IDS = [[3, 99, 250, 17, 400, 8, 61, 5]]


@pytest.fixture(scope="module", params=[True, False], ids=["tied", "untied"])
def src(request, tmp_path_factory):
    return make_checkpoint(
        tmp_path_factory.mktemp("src"), hidden=128, intermediate=256, layers=16, tied=request.param, seed=4
    )


def test_sensitive_layers():
    assert [i for i in range(16) if is_sensitive_layer(i, 16)] == [0, 1, 4, 7, 10, 13, 14, 15]


def test_recipe_puts_bits_where_it_claims(src, tmp_path):
    out = tmp_path / "mixed"
    assert convert_main(["--hf-path", str(src), "--mlx-path", str(out), "--quant-recipe", "mixed_3_6"]) == 0
    config = json.loads((out / "config.json").read_text())
    q = config["quantization"]
    assert q["bits"] == 3 and q == config["quantization_config"]
    tied = config["tie_word_embeddings"]
    output_layer = "model.embed_tokens" if tied else "lm_head"
    assert q[output_layer] == {"group_size": 64, "bits": 6}  # the output layer is protected, tied or not
    if not tied:
        assert "model.embed_tokens" not in q  # the input embedding alone stays at the low width
    for i in range(16):
        for name in ("self_attn.v_proj", "mlp.down_proj"):
            assert (f"model.layers.{i}.{name}" in q) == is_sensitive_layer(i, 16)
        assert f"model.layers.{i}.self_attn.q_proj" not in q
    model, _ = load(out)  # and the loader applies what the block says
    assert model.layers[0].self_attn.v_proj.bits == 6 and model.layers[2].self_attn.v_proj.bits == 3
    head = model.model.embed_tokens if tied else model.lm_head
    assert head.bits == 6


def our_logits(path) -> np.ndarray:
    model, _ = load(path, fast=False)  # the layers mlx-lm uses too: bit-exact comparison
    return np.array(model(mx.array(IDS)))


def lm_logits(path) -> np.ndarray:
    model, _ = mlx_lm.load(str(path))
    return np.array(model(mx.array(IDS)))


@pytest.mark.parametrize("flags", [["-q"], ["--quant-recipe", "mixed_4_6"], []], ids=["4bit", "recipe", "float"])
def test_mlx_lm_loads_ours(src, tmp_path, flags):
    out = tmp_path / "ours"
    assert convert_main(["--hf-path", str(src), "--mlx-path", str(out), *flags]) == 0
    np.testing.assert_array_equal(lm_logits(out), our_logits(out))


@pytest.mark.parametrize("bits, group", [(4, 64), (8, 32), (3, 128)])
def test_we_load_mlx_lms(src, tmp_path, bits, group):
    out = tmp_path / "theirs"
    mlx_lm.convert(str(src), str(out), quantize=True, q_bits=bits, q_group_size=group)
    np.testing.assert_array_equal(our_logits(out), lm_logits(out))
    # and the same math: our own conversion of the same source gives the same weights
    ours = tmp_path / "ours"
    assert (
        convert_main(
            ["--hf-path", str(src), "--mlx-path", str(ours), "-q", "--q-bits", str(bits), "--q-group-size", str(group)]
        )
        == 0
    )
    np.testing.assert_array_equal(our_logits(ours), our_logits(out))
