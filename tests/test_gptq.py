"""GPTQ: packing matches MLX, and the calibrated error is lower than round-to-nearest's."""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest

from mlx_qwen2.convert import main as convert_main
from mlx_qwen2.loader import load
from mlx_qwen2.quant.dequantize import dequantize_model
from mlx_qwen2.quant.gptq import gptq, pack
from tests.tiny import make_checkpoint


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
def test_pack_matches_mlx(bits):
    w = mx.random.normal((8, 128), key=mx.random.key(bits))
    packed, scales, biases = mx.quantize(w, 32, bits)
    deq = np.array(mx.dequantize(packed, scales, biases, 32, bits))
    q = np.rint((deq - np.repeat(np.array(biases), 32, 1)) / np.repeat(np.array(scales), 32, 1)).astype(np.int64)
    assert (pack(q, bits) == np.array(packed)).all()


def correlated_inputs(n: int, dim: int, sample_seed: int, mix_seed: int = 1) -> np.ndarray:
    """Inputs from one distribution (fixed by `mix_seed`); `sample_seed` draws a fresh sample of it."""
    mix = np.random.default_rng(mix_seed).normal(size=(dim, dim)) / np.sqrt(dim)
    rng = np.random.default_rng(sample_seed)
    x = rng.normal(size=(n, dim)) @ mix + rng.normal(size=(n, dim)) * 0.1
    x[:, :4] *= 8  # a few outlier channels, as real activations have
    return x.astype(np.float32)


@pytest.mark.parametrize("bits", [3, 4])
def test_layer_output_error_below_round_to_nearest(bits):
    rng = np.random.default_rng(0)
    w = rng.normal(size=(64, 256)).astype(np.float32) * 0.05
    x = correlated_inputs(2048, 256, sample_seed=1)
    q, scales, biases = gptq(w, x.T.astype(np.float64) @ x, bits, 64)
    w_gptq = q * np.repeat(scales, 64, 1) + np.repeat(biases, 64, 1)
    packed, s, b = mx.quantize(mx.array(w), 64, bits)
    w_rtn = np.array(mx.dequantize(packed, s, b, 64, bits))
    x_test = correlated_inputs(512, 256, sample_seed=2)  # the same distribution, inputs the calibration never saw
    assert not (x_test[:, None, :8] == x[None, :, :8]).all(-1).any()  # no test row is a calibration row
    err_gptq = np.linalg.norm(x_test @ (w - w_gptq).T)
    err_rtn = np.linalg.norm(x_test @ (w - w_rtn).T)
    assert err_gptq < 0.8 * err_rtn


def test_calibrated_conversion(tmp_path):
    src = make_checkpoint(tmp_path / "src", hidden=128, intermediate=256, layers=2, seed=5)
    data = tmp_path / "cal.jsonl"
    data.write_text(
        "\n".join(json.dumps({"text": f"def f{i}(x):\n    return x * {i} + {i * i}\n"}) for i in range(200))
    )
    gq, rtn = tmp_path / "gptq", tmp_path / "rtn"
    flags = ["-q", "--q-bits", "3", "--q-group-size", "32"]
    argv = ["--hf-path", str(src), "--mlx-path", str(gq), "--calibrate", "--calibration-data", str(data), *flags]
    assert convert_main(argv) == 0
    assert convert_main(["--hf-path", str(src), "--mlx-path", str(rtn), *flags]) == 0
    config = json.loads((gq / "config.json").read_text())
    assert config["quantization"] == {"group_size": 32, "bits": 3, "mode": "affine"}
    ref, tok = load(src)
    # Held out: code of the same kind, but no line of it is in the calibration data.
    held_out = "def g(y):\n    return y - 3\n\ndef h(a, b):\n    return a * b + 1000\n\nclass Box:\n    size = 12\n"
    assert not any(line.strip() and line in data.read_text() for line in held_out.splitlines())
    ids = mx.array([tok.encode(held_out)])
    target = np.array(ref(ids))
    errors = {}
    for name, folder in (("gptq", gq), ("rtn", rtn)):
        model, _ = load(folder)
        quantized = np.array(model(ids))
        dequantize_model(model)  # float evaluation computes the same function
        np.testing.assert_allclose(np.array(model(ids)), quantized, atol=1e-3)
        errors[name] = np.linalg.norm(quantized - target)
    assert errors["gptq"] < errors["rtn"]


def test_bad_calibration_line(tiny_untied, tmp_path, capsys):
    data = tmp_path / "cal.jsonl"
    data.write_text('{"text": "ok"}\n{"txt": "wrong key"}\n')
    argv = ["--hf-path", str(tiny_untied), "--mlx-path", str(tmp_path / "o"), "--calibrate", "--q-group-size", "32"]
    assert convert_main([*argv, "--calibration-data", str(data)]) == 1
    assert "line 2" in capsys.readouterr().err
