"""Adapters and fine-tuning on tiny models: identities, fusion, gradients, training, resume, interop."""

from __future__ import annotations

import errno
import json
import math

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlx_qwen2 import lora as lora_module
from mlx_qwen2.convert import main as convert_main
from mlx_qwen2.fuse import main as fuse_main
from mlx_qwen2.loader import load
from mlx_qwen2.lora import main as lora_main
from mlx_qwen2.tuner.adapters import DoRALinear, LoRALinear, apply_adapters, fuse_adapters
from mlx_qwen2.tuner.data import Example, pack
from mlx_qwen2.tuner.trainer import (
    TrainConfig,
    gradient_checkpointing,
    loss_fn,
    make_optimizer,
    make_step,
    trainable_count,
)
from tests.tiny import make_checkpoint

IDS = mx.array([[3, 99, 250, 17, 400, 8, 61, 5, 77, 123]])


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    # a wider initialisation than transformers' 0.02: with a frozen head of 0.02-sized rows, no
    # hidden state can produce confident logits, and "overfits a tiny dataset" would be out of reach
    folder = tmp_path_factory.mktemp("base")
    return make_checkpoint(folder, hidden=128, intermediate=256, layers=3, seed=6, initializer_range=0.1)


@pytest.fixture(scope="module")
def qbase(base, tmp_path_factory):
    out = tmp_path_factory.mktemp("q") / "q"
    assert convert_main(["--hf-path", str(base), "--mlx-path", str(out), "-q", "--q-group-size", "32"]) == 0
    return out


def perturb(model: nn.Module, seed: int = 0, std: float = 0.02) -> None:
    """Give every adapter (ours or mlx-lm's) a non-zero update (a fresh one is the identity)."""
    key = mx.random.key(seed)
    for _, m in model.named_modules():
        if "lora_b" in m:
            key, sub = mx.random.split(key)
            m.lora_b = mx.random.normal(m.lora_b.shape, key=sub) * std
            if isinstance(m, DoRALinear):
                m.m = m.m * 1.1


@pytest.mark.parametrize("dora", [False, True])
@pytest.mark.parametrize("quantized", [False, True])
def test_fresh_adapters_change_nothing(base, qbase, dora, quantized):
    model, _ = load(qbase if quantized else base)
    before = np.array(model(IDS))
    apply_adapters(model, 2, rank=4, dora=dora)
    np.testing.assert_allclose(np.array(model(IDS)), before, atol=1e-4)


@pytest.mark.parametrize("dora", [False, True])
def test_fused_matches_adapted(base, dora):
    model, _ = load(base)
    apply_adapters(model, 3, rank=4, scale=2.0, dora=dora)
    perturb(model)
    adapted = np.array(model(IDS))
    assert np.abs(adapted - np.array(load(base)[0](IDS))).max() > 1e-3  # the adapters do something
    fuse_adapters(model)
    assert not any(isinstance(m, LoRALinear) for _, m in model.named_modules())
    np.testing.assert_allclose(np.array(model(IDS)), adapted, atol=1e-4)


def test_trainable_parameter_count(base):
    model, _ = load(base)
    apply_adapters(model, 2, rank=4, keys=["self_attn.q_proj", "mlp.down_proj"])
    # q_proj: 128 -> 128, down_proj: 256 -> 128; LoRA adds r * (in + out) each, on 2 layers
    assert trainable_count(model) == 2 * (4 * (128 + 128) + 4 * (256 + 128))
    dmodel, _ = load(base)
    apply_adapters(dmodel, 1, rank=2, keys=["self_attn.v_proj"], dora=True)
    # v_proj: 128 -> 64 (2 KV heads of 32); DoRA adds a magnitude per output row
    assert trainable_count(dmodel) == 2 * (128 + 64) + 64


def _loss(model, ids):
    logits = model(ids[:, :-1]).astype(mx.float32)
    return nn.losses.cross_entropy(logits, ids[:, 1:]).mean()


@pytest.mark.parametrize("dora", [False, True])
def test_gradients_match_finite_differences(base, dora):
    model, _ = load(base)
    apply_adapters(model, 1, rank=2, keys=["self_attn.q_proj", "mlp.up_proj"], dora=dora)
    perturb(model, seed=1)
    grads = dict(tree_flatten(nn.value_and_grad(model, _loss)(model, IDS)[1]))
    layer = model.layers[-1].mlp.up_proj
    names = ["lora_a", "lora_b"] + (["m"] if dora else [])
    eps = 1e-2  # float32: a smaller step drowns the difference in rounding noise
    for name in names:
        g = np.array(grads[f"model.layers.2.mlp.up_proj.{name}"])
        flat_index = int(np.argmax(np.abs(g)))  # the largest component: well above float32 noise
        value = np.array(layer[name])
        estimates = []
        for sign in (1, -1):
            bumped = value.copy()
            bumped.reshape(-1)[flat_index] += sign * eps
            saved_m = layer.m if dora else None
            if dora and name != "m":
                # DoRA treats the row norm as a constant in backward: hold it at its current value
                n0 = mx.linalg.norm(layer.linear.weight + layer.delta(), axis=1)
                n1 = mx.linalg.norm(layer.linear.weight + _delta_with(layer, name, bumped), axis=1)
                layer.m = saved_m * n1 / n0
            layer[name] = mx.array(bumped)
            estimates.append(float(_loss(model, IDS)))
            layer[name] = mx.array(value)
            if dora:
                layer.m = saved_m
        fd = (estimates[0] - estimates[1]) / (2 * eps)
        assert abs(fd - g.reshape(-1)[flat_index]) <= 0.02 * abs(fd) + 1e-4, (name, fd, g.reshape(-1)[flat_index])


@pytest.mark.parametrize("dora", [False, True])
def test_quantized_base_gradients_match_mlx_layers(qbase, dora):
    """QLoRA through the CPU fast layers (custom backward, blocks) gives MLX's own layers' gradients."""
    grads = []
    for fast in (True, False):
        model, _ = load(qbase, fast=fast)
        mx.random.seed(0)  # the same lora_a
        apply_adapters(model, 3, rank=4, dora=dora)
        perturb(model, seed=2)
        grads.append(dict(tree_flatten(nn.value_and_grad(model, _loss)(model, IDS)[1])))
    assert type(model.layers[0].mlp.up_proj.linear) is nn.QuantizedLinear  # the fast=False run
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) >= 3 * 7 * 2
    for key, g in grads[0].items():
        np.testing.assert_allclose(np.array(g), np.array(grads[1][key]), atol=1e-5, rtol=1e-3, err_msg=key)


def _delta_with(layer, name, value):
    a = mx.array(value) if name == "lora_a" else layer.lora_a
    b = mx.array(value) if name == "lora_b" else layer.lora_b
    return (layer.scale * b.T) @ a.T


def write_data(folder, n_train=8, kind="text"):
    folder.mkdir(parents=True, exist_ok=True)
    rows = {
        "text": [{"text": f"The answer to question {i} is FORTY-TWO."} for i in range(n_train)],
        "chat": [
            {"messages": [{"role": "user", "content": f"q{i}?"}, {"role": "assistant", "content": "FORTY-TWO"}]}
            for i in range(n_train)
        ],
    }[kind]
    for split, n in (("train", n_train), ("valid", 2), ("test", 2)):
        (folder / f"{split}.jsonl").write_text("\n".join(json.dumps(r) for r in rows[:n]) + "\n")
    return folder


def metrics(folder):
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def test_overfits_tiny_dataset(base, tmp_path, capsys):
    data = write_data(tmp_path / "data", kind="chat")
    out = tmp_path / "adapters"
    argv = ["--model", str(base), "--train", "--data", str(data), "--adapter-path", str(out), "--iters", "40"]
    argv += [
        "--learning-rate",
        "1e-3",
        "--batch-size",
        "4",
        "--num-layers",
        "3",
        "--steps-per-report",
        "5",
        "--mask-prompt",
    ]
    argv += ["--steps-per-eval", "20", "--save-every", "20", "--warmup", "5"]
    assert lora_main(argv) == 0
    train_losses = [m["train_loss"] for m in metrics(out) if "train_loss" in m]
    assert train_losses[-1] < 0.3 * train_losses[0], train_losses
    err = capsys.readouterr().err
    assert "val loss" in err and "tok/s" in err and "peak mem" in err
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["fine_tune_type"] == "lora" and config["num_layers"] == 3
    assert (out / "adapters.safetensors").is_file() and (out / "best_adapters.safetensors").is_file()
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # matplotlib is a test dependency
    # --test with the saved adapters reports a lower loss than the base model
    test = ["--model", str(base), "--test", "--data", str(data), "--mask-prompt"]
    assert lora_main([*test, "--adapter-path", str(out)]) == 0
    adapted = float(capsys.readouterr().out.split("test loss ")[1].split(",")[0])
    empty = tmp_path / "none"
    empty.mkdir()
    (empty / "adapter_config.json").write_text(
        json.dumps({"fine_tune_type": "lora", "num_layers": 1, "lora_parameters": {"rank": 2, "scale": 1.0}})
    )
    model, _ = load(base)
    apply_adapters(model, 1, rank=2)
    mx.save_safetensors(str(empty / "adapters.safetensors"), dict(tree_flatten(model.trainable_parameters())))
    assert lora_main([*test, "--adapter-path", str(empty)]) == 0
    untouched = float(capsys.readouterr().out.split("test loss ")[1].split(",")[0])
    assert adapted < 0.5 * untouched


def test_resume_continues_the_same_curve(base, tmp_path, monkeypatch):
    data = write_data(tmp_path / "data")
    common = ["--model", str(base), "--train", "--data", str(data), "--learning-rate", "5e-3", "--batch-size", "2"]
    common += ["--steps-per-report", "1", "--steps-per-eval", "100", "--num-layers", "2", "--seed", "3", "--iters", "8"]
    common += ["--save-every", "4", "--warmup", "2"]
    full, part = tmp_path / "full", tmp_path / "part"
    assert lora_main([*common, "--adapter-path", str(full)]) == 0

    real_report = lora_module.print_report

    def ctrl_c_at_step_6(r, metrics_file):
        real_report(r, metrics_file)
        if r.step == 6:
            raise KeyboardInterrupt  # after step 6's update; the last checkpoint is step 4's

    monkeypatch.setattr(lora_module, "print_report", ctrl_c_at_step_6)
    assert lora_main([*common, "--adapter-path", str(part)]) == 130
    monkeypatch.setattr(lora_module, "print_report", real_report)
    assert json.loads((part / "adapter_config.json").read_text())["step"] == 4
    assert lora_main([*common, "--adapter-path", str(part), "--resume"]) == 0
    a = {m["step"]: m["train_loss"] for m in metrics(full) if "train_loss" in m}
    b = {m["step"]: m["train_loss"] for m in metrics(part) if "train_loss" in m}  # resumed steps overwrite
    assert sorted(a) == sorted(b) == list(range(1, 9))
    np.testing.assert_allclose([b[s] for s in range(1, 9)], [a[s] for s in range(1, 9)], rtol=1e-4)


@pytest.mark.parametrize("dora", [False, True])
def test_fuse_cli_matches_adapted_model(base, qbase, tmp_path, dora):
    for src in (base, qbase):
        model, _ = load(src)
        apply_adapters(model, 2, rank=4, scale=4.0, dora=dora)
        perturb(model, seed=2)
        folder = tmp_path / f"adapters-{src.name}"
        folder.mkdir()
        mx.save_safetensors(str(folder / "adapters.safetensors"), dict(tree_flatten(model.trainable_parameters())))
        kind = "dora" if dora else "lora"
        config = {"fine_tune_type": kind, "num_layers": 2, "lora_parameters": {"rank": 4, "scale": 4.0, "dropout": 0.0}}
        (folder / "adapter_config.json").write_text(json.dumps(config))
        model.eval()
        adapted = np.array(model(IDS))
        out = tmp_path / f"fused-{src.name}"
        flags = ["--dequantize"] if src == qbase else []
        assert fuse_main(["--model", str(src), "--adapter-path", str(folder), "--save-path", str(out), *flags]) == 0
        fused, _ = load(out, fast=False)
        assert not any(isinstance(m, LoRALinear) for _, m in fused.named_modules())
        # a quantized base is dequantized here, so the fused model computes exactly the adapted function
        np.testing.assert_allclose(np.array(fused(IDS)), adapted, atol=1e-4)


def test_mlx_lm_interop(base, tmp_path):
    import mlx_lm
    from mlx_lm.tuner.utils import linear_to_lora_layers
    from mlx_lm.tuner.utils import load_adapters as lm_load_adapters

    ours = tmp_path / "ours"
    model, _ = load(base, fast=False)
    apply_adapters(model, 2, rank=4, scale=3.0)
    perturb(model, seed=3)
    ours.mkdir()
    mx.save_safetensors(str(ours / "adapters.safetensors"), dict(tree_flatten(model.trainable_parameters())))
    config = {"fine_tune_type": "lora", "num_layers": 2, "lora_parameters": {"rank": 4, "scale": 3.0, "dropout": 0.0}}
    (ours / "adapter_config.json").write_text(json.dumps(config))
    lm_model, _ = mlx_lm.load(str(base))
    lm_load_adapters(lm_model, str(ours))
    np.testing.assert_allclose(np.array(lm_model(IDS)), np.array(model(IDS)), atol=1e-4)

    theirs = tmp_path / "theirs"
    theirs.mkdir()
    lm_model, _ = mlx_lm.load(str(base))
    lm_model.freeze()
    linear_to_lora_layers(lm_model, 3, {"rank": 2, "scale": 5.0, "dropout": 0.0})
    perturb(lm_model, seed=9)
    mx.save_safetensors(str(theirs / "adapters.safetensors"), dict(tree_flatten(lm_model.trainable_parameters())))
    config = {"fine_tune_type": "lora", "num_layers": 3, "lora_parameters": {"rank": 2, "scale": 5.0, "dropout": 0.0}}
    (theirs / "adapter_config.json").write_text(json.dumps(config))
    ours_model, _ = load(base, adapter_path=theirs, fast=False)
    np.testing.assert_allclose(np.array(ours_model(IDS)), np.array(lm_model(IDS)), atol=1e-4)


def run_error(argv, capsys, match):
    assert lora_main(argv) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("error: ") and match in err[-1], err


def test_bad_inputs(base, tmp_path, capsys):
    data = write_data(tmp_path / "data")
    train = ["--model", str(base), "--train", "--adapter-path", str(tmp_path / "a"), "--iters", "2"]
    run_error([*train, "--data", str(tmp_path / "nowhere")], capsys, "train.jsonl not found")
    (data / "train.jsonl").write_text('{"text": "fine"}\n{"text": 3}\n')
    run_error([*train, "--data", str(data)], capsys, "train.jsonl, line 2")
    (data / "train.jsonl").write_text("not json\n")
    run_error([*train, "--data", str(data)], capsys, "line 1")
    (data / "train.jsonl").write_text("\n")
    run_error([*train, "--data", str(data)], capsys, "no examples")
    config = tmp_path / "c.yaml"
    config.write_text("rank: 4\nbogus_option: 1\n")
    run_error([*train, "--data", str(data), "-c", str(config)], capsys, "bogus_option")
    assert not (tmp_path / "a").exists()  # nothing trained, nothing written


def test_adapter_for_another_model_shape(base, tmp_path, capsys):
    other = make_checkpoint(tmp_path / "other", hidden=64, layers=3, seed=7)
    model, _ = load(other)
    apply_adapters(model, 2, rank=4)
    folder = tmp_path / "a"
    folder.mkdir()
    mx.save_safetensors(str(folder / "adapters.safetensors"), dict(tree_flatten(model.trainable_parameters())))
    (folder / "adapter_config.json").write_text(
        json.dumps({"fine_tune_type": "lora", "num_layers": 2, "lora_parameters": {"rank": 4, "scale": 20.0}})
    )
    with pytest.raises(ValueError, match="do not fit this model"):
        load(base, adapter_path=folder)


def test_full_disk_keeps_last_good_checkpoint(base, tmp_path, monkeypatch, capsys):
    data = write_data(tmp_path / "data")
    out = tmp_path / "a"
    argv = ["--model", str(base), "--train", "--data", str(data), "--adapter-path", str(out), "--batch-size", "2"]
    argv += ["--save-every", "2", "--steps-per-eval", "100", "--learning-rate", "1e-2", "--num-layers", "1"]
    assert lora_main([*argv, "--iters", "2"]) == 0
    good = mx.load(str(out / "adapters.safetensors"))
    real_save = mx.save_safetensors

    def full_disk(path, *args, **kwargs):
        real_save(path, *args, **kwargs)  # a partial file appears, then the disk fills
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(mx, "save_safetensors", full_disk)
    run_error([*argv, "--iters", "4", "--resume"], capsys, "No space left")
    monkeypatch.setattr(mx, "save_safetensors", real_save)
    after = mx.load(str(out / "adapters.safetensors"))
    assert all(np.array_equal(np.array(good[k]), np.array(after[k])) for k in good)
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []  # no temporary files left


def test_gradient_checkpointing_recomputes_and_gives_the_same_gradients(base, monkeypatch):
    model, _ = load(base)
    apply_adapters(model, 3, rank=4)  # every layer: the backward pass goes through all three
    perturb(model, seed=5)
    calls = []
    real_attention = type(model.layers[0].self_attn).__call__

    def counted(self, *args):
        calls.append(1)
        return real_attention(self, *args)

    monkeypatch.setattr(type(model.layers[0].self_attn), "__call__", counted)
    plain = dict(tree_flatten(nn.value_and_grad(model, _loss)(model, IDS)[1]))
    plain_calls = len(calls)
    calls.clear()
    layer_class = type(model.layers[0])
    with gradient_checkpointing(model):
        again = dict(tree_flatten(nn.value_and_grad(model, _loss)(model, IDS)[1]))
        checkpointed_calls = len(calls)
        other, _ = load(base)  # another model of the same class is untouched
        assert type(other.layers[0]) is layer_class
    assert plain_calls == 3  # one forward pass per layer
    assert checkpointed_calls == 2 * plain_calls  # and each again in the backward pass
    assert type(model.layers[0]) is layer_class  # restored on exit
    for k in plain:
        np.testing.assert_allclose(np.array(again[k]), np.array(plain[k]), atol=1e-6)


def test_long_sequences_are_truncated_with_a_count(base, tmp_path, capsys):
    data = write_data(tmp_path / "data")
    out = tmp_path / "a"
    argv = ["--model", str(base), "--train", "--data", str(data), "--adapter-path", str(out), "--iters", "1"]
    assert lora_main([*argv, "--max-seq-length", "8", "--batch-size", "2", "--num-layers", "2"]) == 0
    err = capsys.readouterr().err
    assert "warning: 8 of 8 train sequences were longer than 8 tokens" in err
    assert "warning: 2 of 2 valid sequences" in err


def test_early_stopping(base, tmp_path):
    data = write_data(tmp_path / "data")
    out = tmp_path / "a"
    # a learning rate of 0 never improves the validation loss: stop after 2 evaluations without progress
    argv = ["--model", str(base), "--train", "--data", str(data), "--adapter-path", str(out), "--iters", "50"]
    argv += ["--learning-rate", "0", "--steps-per-eval", "1", "--early-stop", "2", "--steps-per-report", "1"]
    argv += ["--num-layers", "2", "--batch-size", "2"]
    assert lora_main(argv) == 0
    steps = [m["step"] for m in metrics(out) if "train_loss" in m]
    assert max(steps) == 3  # step 1 sets the best, steps 2 and 3 do not beat it


def schedule_run(base, tmp_path, flags):
    data = write_data(tmp_path / "data")
    out = tmp_path / "a"
    argv = ["--model", str(base), "--train", "--data", str(data), "--adapter-path", str(out)]
    argv += ["--iters", "4", "--num-layers", "1", "--steps-per-report", "1", "--learning-rate", "1e-3", *flags]
    assert lora_main(argv) == 0
    return [m["learning_rate"] for m in metrics(out) if "train_loss" in m], out


def test_cosine_decay_by_value(base, tmp_path):
    rates, _ = schedule_run(base, tmp_path, [])
    # step k of 4 uses the schedule's value at k - 1: from the peak towards 10% of it along half a cosine
    expected = [1e-4 + 0.5 * (1 + math.cos(math.pi * (k - 1) / 4)) * 9e-4 for k in range(1, 5)]
    np.testing.assert_allclose(rates, expected, rtol=1e-5)


@pytest.mark.parametrize("flags", [["--no-cosine-decay"], ["--no-cosine-decay", "--warmup", "2"]])
def test_constant_schedules(base, tmp_path, flags):
    rates, _ = schedule_run(base, tmp_path, flags)
    if "--warmup" in flags:
        np.testing.assert_allclose(rates, [0, 5e-4, 1e-3, 1e-3], rtol=1e-5)  # warms up linearly, then stays
    else:
        np.testing.assert_allclose(rates, [1e-3] * 4, rtol=1e-5)


@pytest.mark.parametrize("name", ["sgd", "adam", "adamw"])
def test_optimizer_step_by_value(base, name):
    """One step on one batch: SGD moves each parameter by exactly -lr * gradient; Adam(W) does not."""
    model, _ = load(base)
    apply_adapters(model, 1, rank=4)
    perturb(model, seed=4)
    tokens, weights = IDS, mx.ones(IDS.shape)
    before = dict(tree_flatten(model.trainable_parameters()))
    grads = dict(tree_flatten(nn.value_and_grad(model, loss_fn)(model, tokens, weights)[1]))
    optimizer = make_optimizer(TrainConfig(optimizer=name, learning_rate=0.1, cosine_decay=False))
    make_step(model, optimizer, TrainConfig(grad_accumulation=1))(iter([(tokens, weights)]))
    after = dict(tree_flatten(model.trainable_parameters()))
    sgd_like = all(np.allclose(after[k], before[k] - 0.1 * np.array(grads[k]), atol=1e-6) for k in before)
    assert sgd_like == (name == "sgd")
    assert isinstance(optimizer, {"sgd": optim.SGD, "adam": optim.Adam, "adamw": optim.AdamW}[name])


def test_sgd_from_the_command_line(base, tmp_path):
    _, out = schedule_run(base, tmp_path, ["--optimizer", "sgd"])
    state = mx.load(str(out / "optimizer.safetensors"))
    assert state and not any(k.endswith(".m") for k in state)  # Adam would keep first moments ("m")


def test_alpha_sets_the_scale(base, tmp_path):
    data = write_data(tmp_path / "data")
    out = tmp_path / "a"
    argv = ["--model", str(base), "--train", "--data", str(data), "--adapter-path", str(out), "--iters", "1"]
    assert lora_main([*argv, "--num-layers", "1", "--rank", "4", "--alpha", "16"]) == 0
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["lora_parameters"]["scale"] == 4.0  # alpha / rank
    model, _ = load(base, adapter_path=out)
    assert model.layers[-1].self_attn.q_proj.scale == 4.0


def test_full_fine_tuning(base, tmp_path):
    data = write_data(tmp_path / "data")
    out = tmp_path / "a"
    argv = ["--model", str(base), "--train", "--data", str(data), "--adapter-path", str(out), "--iters", "3"]
    argv += ["--fine-tune-type", "full", "--num-layers", "1", "--learning-rate", "1e-3", "--batch-size", "2"]
    assert lora_main(argv) == 0
    saved = mx.load(str(out / "adapters.safetensors"))
    original = dict(tree_flatten(load(base)[0].parameters()))
    # exactly the parameters of the last layer are saved, and each of them changed
    assert set(saved) == {k for k in original if k.startswith("model.layers.2.")}
    assert all(not np.array_equal(np.array(saved[k]), np.array(original[k])) for k in saved if "norm" not in k)
    tuned, _ = load(base, adapter_path=out)  # the saved layer goes back into a fresh model
    manual, _ = load(base)
    manual.load_weights(list(saved.items()), strict=False)
    np.testing.assert_allclose(np.array(tuned(IDS)), np.array(manual(IDS)), atol=1e-6)
    assert np.abs(np.array(tuned(IDS)) - np.array(load(base)[0](IDS))).max() > 1e-4


def test_pack_concatenates_and_cuts():
    examples = [Example([1, 2, 3], [0, 1, 1]), Example([4, 5], [1, 0]), Example([6, 7, 8, 9, 10], [1, 1, 1, 1, 0])]
    packed = pack(examples, 4)
    assert [e.tokens for e in packed] == [[1, 2, 3, 4], [5, 6, 7, 8], [9, 10]]
    assert [e.weights for e in packed] == [[0, 1, 1, 1], [0, 1, 1, 1], [1, 0]]  # each weight stays with its token
    one_left = pack([*examples[:2], Example([6, 7, 8, 9], [1] * 4)], 4)
    assert [e.tokens for e in one_left] == [[1, 2, 3, 4], [5, 6, 7, 8]]  # a last row of one token: no target, dropped


def test_pack_sequences_from_the_command_line(base, tmp_path):
    data = write_data(tmp_path / "data", n_train=6)
    out = tmp_path / "a"
    argv = ["--model", str(base), "--train", "--data", str(data), "--adapter-path", str(out), "--iters", "2"]
    argv += ["--pack-sequences", "--max-seq-length", "16", "--num-layers", "1", "--batch-size", "1"]
    argv += ["--steps-per-report", "1"]
    assert lora_main(argv) == 0
    trained = [m["trained_tokens"] for m in metrics(out) if "train_loss" in m]
    assert trained[0] == 15  # a full packed row of 16 tokens: 15 next-token targets
