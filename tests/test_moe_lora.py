"""Adapters on a tiny Qwen2-MoE: identities, fusion, gradients through the router, mlx-lm interop, the CLI."""

from __future__ import annotations

import json

import mlx.core as mx
import mlx.nn as nn
import mlx_lm
import numpy as np
import pytest
from mlx.utils import tree_flatten
from mlx_lm.tuner.utils import linear_to_lora_layers

from mlx_qwen2.errors import UserError
from mlx_qwen2.fuse import main as fuse_main
from mlx_qwen2.loader import load
from mlx_qwen2.lora import main as lora_main
from mlx_qwen2.tuner.adapters import (
    EXPERTS,
    ROUTERS,
    LoRASwitchLinear,
    adapter_config,
    apply_adapters,
    fuse_adapters,
)
from tests import test_lora as lora_tests
from tests.test_lora import write_data
from tests.tiny import make_moe_checkpoint, quantized_copy

IDS = mx.array([[3, 99, 250, 17, 400, 8, 61, 5, 77, 123, 45, 311, 2, 90, 167, 222, 14, 480, 36, 71]])
ALL = None  # apply_adapters' default keys
SEED = 0
EPS = 3e-3  # finite-difference step: small enough that no token changes experts, large enough for float32


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return make_moe_checkpoint(tmp_path_factory.mktemp("moe_base"), decoder_sparse_step=2, seed=5)


@pytest.fixture(scope="module")
def qbase(base, tmp_path_factory):
    return quantized_copy(base, tmp_path_factory.mktemp("moe_q") / "q")


def perturb(model: nn.Module, seed: int = 0) -> None:
    lora_tests.perturb(model, seed, std=0.05)


def adapted_paths(model: nn.Module) -> set[str]:
    return {k.rpartition(".")[0] for k, _ in tree_flatten(model.trainable_parameters())}


@pytest.mark.parametrize("keys", [ALL, (*EXPERTS, *ROUTERS, "self_attn.q_proj")], ids=["default", "experts"])
@pytest.mark.parametrize("quantized", [False, True])
def test_fresh_adapters_change_nothing_and_fused_equals_adapted(base, qbase, keys, quantized):
    model, _ = load(qbase if quantized else base)
    before = np.array(model(IDS))
    apply_adapters(model, 4, rank=4, scale=2.0, keys=keys)
    paths = adapted_paths(model)
    if keys is ALL:  # attention and the shared expert of sparse layers, every projection of dense ones
        assert "model.layers.1.mlp.shared_expert.up_proj" in paths and "model.layers.0.mlp.up_proj" in paths
        assert not any("switch_mlp" in p or p.endswith((".mlp.gate", "shared_expert_gate")) for p in paths)
    else:
        assert isinstance(model.layers[1].mlp.switch_mlp.down_proj, LoRASwitchLinear)
        assert "model.layers.3.mlp.gate" in paths and "model.layers.0.mlp.up_proj" not in paths
    np.testing.assert_allclose(np.array(model(IDS)), before, atol=1e-5)
    perturb(model)
    adapted = np.array(model(IDS))
    assert np.abs(adapted - before).max() > 1e-3
    fuse_adapters(model, dequantize=True)
    assert not adapted_paths(model) - {""} or not any(isinstance(m, LoRASwitchLinear) for _, m in model.named_modules())
    np.testing.assert_allclose(np.array(model(IDS)), adapted, atol=1e-4)


def _token_losses(model, ids):
    return nn.losses.cross_entropy(model(ids[:, :-1]).astype(mx.float32), ids[:, 1:])


def _loss(model, ids):
    return _token_losses(model, ids).mean()


def _loss64(model, ids) -> float:
    """The mean in float64: a float32 mean rounds away part of the small differences measured here."""
    return float(np.array(_token_losses(model, ids), dtype=np.float64).mean())


@pytest.mark.parametrize("path", ["mlp.gate", "mlp.shared_expert_gate", "mlp.switch_mlp.down_proj"])
def test_gradients_match_finite_differences(base, path):
    """Through the router (its softmax weights on the chosen experts), the shared gate, and the experts."""
    model, _ = load(base)
    mx.random.seed(SEED)  # lora_a's initial values
    apply_adapters(model, 1, rank=2, scale=8.0, keys=[path])
    perturb(model, seed=1)
    layer = dict(model.layers[-1].named_modules())[path]
    grads = dict(tree_flatten(nn.value_and_grad(model, _loss)(model, IDS)[1]))
    for name in ("lora_a", "lora_b"):
        # The derivative along the gradient's own direction, which must be its norm: a step along the whole
        # gradient moves the loss far more than one along its largest component, above float32's noise.
        g = np.array(grads[f"model.layers.3.{path}.{name}"])
        norm = float(np.linalg.norm(g))
        value = np.array(layer[name])
        estimates = []
        for sign in (1, -1):
            layer[name] = mx.array(value + sign * EPS * g / norm)
            estimates.append(_loss64(model, IDS))
        layer[name] = mx.array(value)
        fd = (estimates[0] - estimates[1]) / (2 * EPS)
        assert norm > 1e-3 and abs(fd - norm) <= 0.02 * norm, (name, fd, norm)


def test_dora_on_experts_is_refused(base):
    model, _ = load(base)
    with pytest.raises(UserError, match="DoRA is not available for MoE experts"):
        apply_adapters(model, 2, keys=list(EXPERTS), dora=True)
    apply_adapters(load(base)[0], 2, dora=True)  # on attention and the shared expert it is


def test_mlx_lm_interop(tmp_path):
    """mlx-lm's default adapters (every Linear and the experts, no keys in the config) load here, and ours there.

    mlx-lm makes every layer sparse (it ignores decoder_sparse_step), so the base here is all sparse."""
    base = make_moe_checkpoint(tmp_path / "sparse", seed=6)
    lm_model, _ = mlx_lm.load(str(base))
    lm_model.freeze()
    linear_to_lora_layers(lm_model, 2, {"rank": 2, "scale": 3.0, "dropout": 0.0})
    perturb(lm_model, seed=4)
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    mx.save_safetensors(str(theirs / "adapters.safetensors"), dict(tree_flatten(lm_model.trainable_parameters())))
    config = {"fine_tune_type": "lora", "num_layers": 2, "lora_parameters": {"rank": 2, "scale": 3.0, "dropout": 0.0}}
    (theirs / "adapter_config.json").write_text(json.dumps(config))
    ours, _ = load(base, adapter_path=theirs, fast=False)
    assert isinstance(ours.layers[3].mlp.switch_mlp.up_proj, LoRASwitchLinear)
    assert "model.layers.3.mlp.gate" in adapted_paths(ours)  # their default adapts the router too
    np.testing.assert_allclose(np.array(ours(IDS)), np.array(lm_model(IDS)), atol=1e-5)
    assert np.abs(np.array(ours(IDS)) - np.array(load(base, fast=False)[0](IDS))).max() > 1e-3

    model, _ = load(base, fast=False)  # and ours, experts included, in mlx-lm
    apply_adapters(model, 2, rank=4, scale=2.0, keys=[*EXPERTS, "self_attn.v_proj", "mlp.shared_expert.down_proj"])
    perturb(model, seed=5)
    folder = tmp_path / "ours"
    folder.mkdir()
    mx.save_safetensors(str(folder / "adapters.safetensors"), dict(tree_flatten(model.trainable_parameters())))
    keys = [*EXPERTS, "self_attn.v_proj", "mlp.shared_expert.down_proj"]
    config = adapter_config("lora", 2, 4, 2.0, 0.0, tuple(keys))
    (folder / "adapter_config.json").write_text(json.dumps(config))
    lm_model, _ = mlx_lm.load(str(base), adapter_path=str(folder))
    np.testing.assert_allclose(np.array(lm_model(IDS)), np.array(model(IDS)), atol=1e-5)


def test_train_and_fuse_from_the_command_line(base, qbase, tmp_path):
    data = write_data(tmp_path / "data")
    keys = ",".join(["self_attn.q_proj", "mlp.shared_expert.up_proj", *EXPERTS])
    for src in (base, qbase):  # LoRA and QLoRA
        out = tmp_path / f"adapters-{src.name}"
        flags = ["--model", str(src), "--train", "--data", str(data), "--iters", "3", "--batch-size", "2"]
        flags += ["--num-layers", "2", "--keys", keys, "--adapter-path", str(out), "--learning-rate", "1e-2"]
        assert lora_main(flags) == 0
        saved = mx.load(str(out / "adapters.safetensors"))
        assert saved["model.layers.3.mlp.switch_mlp.gate_proj.lora_a"].shape == (8, 8, 64)  # (experts, rank, in)
        adapted, _ = load(src, adapter_path=out, fast=False)
        expected = np.array(adapted(IDS))
        fused = tmp_path / f"fused-{src.name}"
        flags = ["--dequantize"] if src == qbase else []
        assert fuse_main(["--model", str(src), "--adapter-path", str(out), "--save-path", str(fused), *flags]) == 0
        np.testing.assert_allclose(np.array(load(fused, fast=False)[0](IDS)), expected, atol=1e-4)
