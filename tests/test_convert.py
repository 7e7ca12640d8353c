"""Conversion: quantize -> save -> load round trips, dequantize, atomic output, bad input."""

from __future__ import annotations

import errno
import json
import shutil

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from mlx_qwen2.backends.cpu import layers as fast_layers
from mlx_qwen2.convert import main as convert_main
from mlx_qwen2.loader import load, load_model
from mlx_qwen2.quant.affine import quantize_model
from mlx_qwen2.writer import save_weights
from tests.tiny import make_checkpoint

IDS = [[3, 99, 250, 17, 400, 8, 61, 5]]


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    # every supported group size divides 128 and 256
    return make_checkpoint(tmp_path_factory.mktemp("conv"), hidden=128, intermediate=256, tied=True, seed=3)


def logits(model) -> np.ndarray:
    return np.array(model(mx.array(IDS)))


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
@pytest.mark.parametrize("group", [32, 64, 128])
def test_quantize_save_load_round_trip(src, tmp_path, bits, group):
    out = tmp_path / "q"
    assert (
        convert_main(
            ["--hf-path", str(src), "--mlx-path", str(out), "-q", "--q-bits", str(bits), "--q-group-size", str(group)]
        )
        == 0
    )
    in_memory = load_model(src)
    quantize_model(in_memory, bits, group)
    loaded, _ = load(out, fast=False)  # MLX's own quantized layers: bit-exact comparison
    assert isinstance(loaded.layers[0].mlp.down_proj, nn.QuantizedLinear)
    assert loaded.layers[0].self_attn.q_proj.bits == bits
    np.testing.assert_array_equal(logits(loaded), logits(in_memory))
    config = json.loads((out / "config.json").read_text())
    assert (
        config["quantization"] == config["quantization_config"] == {"group_size": group, "bits": bits, "mode": "affine"}
    )
    assert (out / "tokenizer.json").is_file() and (out / "generation_config.json").is_file()


def test_dequantize_recovers_weights_within_quantization_error(src, tmp_path):
    q, f = tmp_path / "q", tmp_path / "f"
    assert (
        convert_main(["--hf-path", str(src), "--mlx-path", str(q), "-q", "--q-bits", "4", "--q-group-size", "32"]) == 0
    )
    assert convert_main(["--hf-path", str(q), "--mlx-path", str(f), "--dequantize"]) == 0
    original, back, quant = load_model(src), load_model(f), load_model(q)
    assert "quantization" not in json.loads((f / "config.json").read_text())
    w = np.array(original.layers[0].mlp.up_proj.weight)
    w_back = np.array(back.layers[0].mlp.up_proj.weight)
    scales = np.array(quant.layers[0].mlp.up_proj.scales)  # (out, in / group)
    step = np.repeat(np.abs(scales), 32, axis=1)  # one quantization step per group (scales may be negative)
    err = np.abs(w - w_back)
    # MLX snaps the zero point to the grid, so the error is within one step, and a quarter step on average
    assert (err <= step + 1e-6).all() and (err / step).mean() < 0.3
    np.testing.assert_allclose(logits(back), logits(quant), atol=1e-4)  # the same function, in float


def test_cast_dtype(src, tmp_path):
    out = tmp_path / "bf16"
    assert convert_main(["--hf-path", str(src), "--mlx-path", str(out), "--dtype", "bfloat16"]) == 0
    model, _ = load(out)
    assert model.layers[0].mlp.up_proj.weight.dtype == mx.bfloat16


def test_existing_output_refused_then_forced(src, tmp_path, capsys):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    assert convert_main(["--hf-path", str(src), "--mlx-path", str(out)]) == 1
    assert "--force" in capsys.readouterr().err and (out / "keep.txt").read_text() == "precious"
    assert convert_main(["--hf-path", str(src), "--mlx-path", str(out), "--force"]) == 0
    assert not (out / "keep.txt").exists() and (out / "config.json").is_file()


@pytest.mark.parametrize(
    "failure, rc", [(KeyboardInterrupt(), 130), (OSError(errno.ENOSPC, "No space left on device"), 1)]
)
def test_interrupt_or_full_disk_leaves_nothing(src, tmp_path, monkeypatch, capsys, failure, rc):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("old model")

    def fail(*args, **kwargs):
        raise failure

    monkeypatch.setattr(mx, "save_safetensors", fail)
    assert convert_main(["--hf-path", str(src), "--mlx-path", str(out), "--force", "-q"]) == rc
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o"]  # no partial folder left behind
    assert (out / "keep.txt").read_text() == "old model"  # the previous output is intact
    err = capsys.readouterr().err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    "flags, match",
    [
        (["-q", "--q-bits", "7"], "--q-bits 7"),
        (["-q", "--q-group-size", "48"], "--q-group-size 48"),
    ],
)
def test_bad_quantization_settings(src, tmp_path, capsys, flags, match):
    assert convert_main(["--hf-path", str(src), "--mlx-path", str(tmp_path / "o"), *flags]) == 1
    assert match in capsys.readouterr().err


def test_group_size_must_divide_input_dimension(tiny_untied, tmp_path, capsys):
    # the default tiny model's MLP has 160 inputs to down_proj: 64 does not divide it
    assert (
        convert_main(["--hf-path", str(tiny_untied), "--mlx-path", str(tmp_path / "o"), "-q", "--q-group-size", "64"])
        == 1
    )
    assert "does not divide the input dimension 160" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_requantizing_refused(src, tmp_path, capsys):
    q = tmp_path / "q"
    assert convert_main(["--hf-path", str(src), "--mlx-path", str(q), "-q", "--q-group-size", "32"]) == 0
    assert convert_main(["--hf-path", str(q), "--mlx-path", str(tmp_path / "qq"), "-q"]) == 1
    assert "already quantized" in capsys.readouterr().err


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("block", [1 << 20, 1000])  # whole matrices, and row blocks of ~1000 weights
def test_fast_layers_compute_the_same_function(src, tmp_path, dtype, block, monkeypatch):
    """The CPU fast paths (dequantize for many tokens, float32 products, row blocks) against MLX's own layers."""
    monkeypatch.setattr(fast_layers, "COPY_BLOCK", block)
    monkeypatch.setattr(fast_layers, "SMALL_COPY_BLOCK", block)
    monkeypatch.setattr(fast_layers, "PRODUCT_BLOCK", block)
    out = tmp_path / "q"
    assert (
        convert_main(["--hf-path", str(src), "--mlx-path", str(out), "-q", "--q-group-size", "32", "--dtype", dtype])
        == 0
    )
    plain, _ = load(out, fast=False)
    fast, _ = load(out)
    assert type(fast.layers[0].mlp.up_proj).__name__ == "DequantizingLinear"
    assert fast.layers[0].mlp.up_proj.scales.dtype == plain.layers[0].mlp.up_proj.scales.dtype  # nothing added
    assert type(plain.layers[0].mlp.up_proj) is nn.QuantizedLinear
    for ids in (IDS, [IDS[0][:1]], [IDS[0][: fast_layers.SMALL + 1]]):  # many tokens, one, just over SMALL
        a, b = np.array(fast(mx.array(ids)).astype(mx.float32)), np.array(plain(mx.array(ids)).astype(mx.float32))
        tol = 1e-4 if dtype == "float32" else 0.05 * np.abs(b).max()  # bfloat16 rounds at ~1e-2 relative
        np.testing.assert_allclose(a, b, atol=tol)


def test_non_qwen2_source(src, tmp_path, capsys):
    bad = tmp_path / "llama"
    shutil.copytree(src, bad)
    config = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))
    assert convert_main(["--hf-path", str(bad), "--mlx-path", str(tmp_path / "o"), "-q"]) == 1
    assert "not 'qwen2'" in capsys.readouterr().err and not (tmp_path / "o").exists()


def test_shards_and_index(src, tmp_path):
    weights = {k: v for k, v in mx.load(str(src / "model.safetensors")).items()}
    out = tmp_path / "sharded"
    out.mkdir()
    names = save_weights(out, weights.items(), max_shard_bytes=200_000)
    assert len(names) > 2 and names[0] == f"model-00001-of-{len(names):05d}.safetensors"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(weights) and set(index["weight_map"].values()) == set(names)
    for name in names:  # each shard within the limit (a single tensor larger than it gets a shard of its own)
        assert (out / name).stat().st_size < 200_000 + max(v.nbytes for v in weights.values()) + 10_000
    (out / "config.json").write_text((src / "config.json").read_text())
    np.testing.assert_array_equal(logits(load_model(out)), logits(load_model(src)))


def test_upload_offline_keeps_the_folder(src, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "o"
    assert convert_main(["--hf-path", str(src), "--mlx-path", str(out), "--upload-repo", "me/model"]) == 1
    err = capsys.readouterr().err
    assert "could not upload" in err and "kept" in err and (out / "config.json").is_file()
