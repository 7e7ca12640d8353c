"""Mixed-precision recipes, and on-disk interoperability with mlx-lm in both directions."""

from __future__ import annotations

import json

import mlx.core as mx
import mlx_lm
import numpy as np
import pytest
from mlx_lm.convert import mixed_quant_predicate_builder

from mlx_qwen2.convert import main as convert_main
from mlx_qwen2.loader import load
from mlx_qwen2.models import Model, ModelArgs
from mlx_qwen2.quant.affine import quantizable
from mlx_qwen2.quant.recipes import RECIPES, is_sensitive_layer, mlx_lm_recipe
from tests.tiny import make_checkpoint

IDS = [[3, 99, 250, 17, 400, 8, 61, 5]]


@pytest.fixture(scope="module", params=[True, False], ids=["tied", "untied"])
def src(request, tmp_path_factory):
    return make_checkpoint(
        tmp_path_factory.mktemp("src"), hidden=128, intermediate=256, layers=16, tied=request.param, seed=4
    )


@pytest.mark.parametrize("layers", [16, 24, 28, 36, 40, 48, 64, 80])
def test_our_reading_of_mlx_lms_recipe_is_mlx_lms(layers):
    """The size budget is mlx-lm's recipe: its own predicate decides, on every matrix of a model this deep."""
    model = Model(ModelArgs(64, layers, 64, 2, 32, num_key_value_heads=1))
    theirs = mixed_quant_predicate_builder("mixed_3_6", model)
    paths = [p for p, m in model.named_modules() if quantizable(m)] + ["lm_head"]
    for path in paths:
        assert mlx_lm_recipe(path, layers) == (theirs(path, None)["bits"] == 6), path


def _stored_bytes(folder) -> int:
    """Bytes of the tensors (the files' JSON headers differ a little between tools)."""
    return sum(a.nbytes for f in folder.glob("*.safetensors") for a in mx.load(str(f)).values())


@pytest.mark.parametrize("recipe", ["mixed_3_6", "mixed_3_4"])
def test_recipe_puts_bits_where_it_claims(src, tmp_path, recipe):
    low, high = RECIPES[recipe]
    out = tmp_path / "mixed"
    assert convert_main(["--hf-path", str(src), "--mlx-path", str(out), "--quant-recipe", recipe]) == 0
    config = json.loads((out / "config.json").read_text())
    q = config["quantization"]
    assert q["bits"] == low and q == config["quantization_config"]
    tied = config["tie_word_embeddings"]
    output_layer = "model.embed_tokens" if tied else "lm_head"
    assert q[output_layer] == {"group_size": 64, "bits": high}  # the output layer is protected, tied or not
    if not tied:
        assert "model.embed_tokens" not in q  # the input embedding alone stays at the low width
    downs = []
    for i in range(16):
        for name in ("self_attn.k_proj", "self_attn.v_proj"):  # every layer's
            assert q[f"model.layers.{i}.{name}"] == {"group_size": 64, "bits": high}
        for name in ("self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj"):
            assert f"model.layers.{i}.{name}" not in q
        if f"model.layers.{i}.mlp.down_proj" in q:
            downs.append(i)
    sensitive = [i for i in range(16) if is_sensitive_layer(i, 16)]
    assert set(downs) <= set(sensitive) and downs
    dropped = set(sensitive) - set(downs)
    assert all(abs(i - 7.5) <= abs(j - 7.5) for i in dropped for j in downs)  # the middle ones go first
    model, _ = load(out)  # and the loader applies what the block says
    assert model.layers[3].self_attn.k_proj.bits == high and model.layers[2].self_attn.q_proj.bits == low
    head = model.model.embed_tokens if tied else model.lm_head
    assert head.bits == high
    # no larger than mlx-lm's own recipe (plus, for tied models, the protected shared embedding)
    theirs = tmp_path / "theirs"
    mlx_lm.convert(str(src), str(theirs), quantize=True, q_group_size=64, quant_predicate=recipe)
    extra = 0
    if tied:
        embedding = model.model.embed_tokens
        extra = embedding.weight.size * 32 // high * (high - low) // 8
    assert _stored_bytes(out) <= _stored_bytes(theirs) + extra


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
