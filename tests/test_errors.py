"""Bad input: one clear line on stderr, a non-zero exit, no traceback, nothing lost."""

from __future__ import annotations

import json
import shutil

import pytest

from mlx_qwen2.convert import main as convert_main
from mlx_qwen2.generate import main as generate_main
from tests.tiny_gguf import write_gguf


def run(main, argv, capsys, match: str) -> None:
    rc = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc != 0
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert match in err[0], err[0]


@pytest.fixture
def copy_of(tiny_untied, tmp_path):
    dst = tmp_path / "model"
    shutil.copytree(tiny_untied, dst)
    return dst


def test_missing_folder(capsys, tmp_path):
    run(generate_main, ["--model", str(tmp_path / "nope")], capsys, "not found")


def test_config_not_qwen2(copy_of, capsys):
    config = json.loads((copy_of / "config.json").read_text())
    (copy_of / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))
    run(generate_main, ["--model", str(copy_of)], capsys, "not 'qwen2'")


def test_missing_config(copy_of, capsys):
    (copy_of / "config.json").unlink()
    run(generate_main, ["--model", str(copy_of)], capsys, "config.json not found")


def test_truncated_safetensors(copy_of, capsys):
    path = copy_of / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 1000])
    run(generate_main, ["--model", str(copy_of)], capsys, "truncated")


def test_corrupt_safetensors_header(copy_of, capsys):
    (copy_of / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    run(generate_main, ["--model", str(copy_of)], capsys, "not a valid safetensors")


def test_pickled_weights_refused(copy_of, capsys):
    (copy_of / "model.safetensors").unlink()
    (copy_of / "pytorch_model.bin").write_bytes(b"pickle")
    run(generate_main, ["--model", str(copy_of)], capsys, "pickled")


def test_prompt_longer_than_context(tiny_untied, capsys):
    prompt = " ".join(f"w{i}" for i in range(600))
    run(generate_main, ["--model", str(tiny_untied), "--prompt", prompt, "--no-chat-template"], capsys, "context")


@pytest.mark.parametrize(
    "flags, match",
    [
        (["--temp", "-1"], "temperature"),
        (["--top-p", "1.5"], "top-p"),
        (["--min-p", "2"], "min-p"),
        (["--top-k", "-3"], "top-k"),
    ],
)
def test_invalid_sampling(tiny_untied, capsys, flags, match):
    run(generate_main, ["--model", str(tiny_untied), *flags], capsys, match)


def test_gguf_wrong_sha256(tiny_untied, tmp_path, capsys):
    path = write_gguf(tiny_untied, tmp_path / "m.gguf")
    out = tmp_path / "out"
    run(convert_main, ["--gguf", str(path), "--mlx-path", str(out), "--sha256", "0" * 64], capsys, "sha256")
    assert not out.exists() and list(tmp_path.iterdir()) == [path]  # nothing half-written


def test_gguf_wrong_architecture(tiny_untied, tmp_path, capsys):
    path = write_gguf(tiny_untied, tmp_path / "m.gguf", arch="llama")
    run(convert_main, ["--gguf", str(path), "--mlx-path", str(tmp_path / "out")], capsys, "not qwen2")


def test_not_a_gguf(tmp_path, capsys):
    (tmp_path / "x.gguf").write_bytes(b"PK\x03\x04 definitely a zip")
    run(convert_main, ["--gguf", str(tmp_path / "x.gguf"), "--mlx-path", str(tmp_path / "o")], capsys, "not a GGUF")


def test_truncated_gguf(tiny_untied, tmp_path, capsys):
    path = write_gguf(tiny_untied, tmp_path / "m.gguf")
    path.write_bytes(path.read_bytes()[:-5000])
    run(convert_main, ["--gguf", str(path), "--mlx-path", str(tmp_path / "o")], capsys, "corrupt or truncated")


def test_hub_id_offline(monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    run(generate_main, ["--model", "Qwen/not-a-cached-model-xyz"], capsys, "local model folder")
