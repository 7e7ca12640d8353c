"""The generate and chat command lines, run in-process on a tiny checkpoint."""

from __future__ import annotations

import importlib
import io

import mlx.core as mx
import pytest

from mlx_qwen2 import cli, generate, load
from mlx_qwen2.backends.cpu import blas
from mlx_qwen2.chat import main as chat_main
from mlx_qwen2.errors import UserError
from mlx_qwen2.generate import main as generate_main

CLI_MODULES = ["generate", "chat", "convert", "lora", "fuse", "cache_prompt", "server"]


def test_generate_streams_and_reports(tiny_untied, capsys):
    assert generate_main(["--model", str(tiny_untied), "--prompt", "Hello", "--max-tokens", "5"]) == 0
    out, err = capsys.readouterr()
    model, tok = load(tiny_untied)
    ids = tok.apply_chat_template([{"role": "user", "content": "Hello"}])
    assert out == generate(model, tok, ids, max_tokens=5) + "\n"
    assert "Prompt:" in err and "Generation:" in err and "Peak memory:" in err
    assert "BLAS: " in err  # which BLAS the CPU backend uses, OpenBLAS or MLX's reference one


def test_prompt_from_stdin_without_template(tiny_untied, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("def add(a, b):"))
    argv = ["--model", str(tiny_untied), "--prompt", "-", "--no-chat-template", "-m", "4", "--no-verbose"]
    assert generate_main(argv) == 0
    out, err = capsys.readouterr()
    model, tok = load(tiny_untied)
    assert out == generate(model, tok, "def add(a, b):", max_tokens=4) + "\n" and err == ""


def test_chat_cli_two_turns(tiny_untied, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("Hi\nMore please\n"))
    assert chat_main(["--model", str(tiny_untied), "--max-tokens", "3"]) == 0
    out = capsys.readouterr().out
    # Oracle: the replies a fresh generation over the whole conversation gives, turn by turn.
    model, tok = load(tiny_untied)
    messages, replies = [], []
    for text in ("Hi", "More please"):
        messages.append({"role": "user", "content": text})
        reply = generate(model, tok, tok.apply_chat_template(messages, add_generation_prompt=True), max_tokens=3)
        messages.append({"role": "assistant", "content": reply})
        replies.append(reply)
    assert out == "".join(f">> {r}\n" for r in replies) + ">> "  # each prompt, its reply, then end of input


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", mx.float16])
def test_load_accepts_dtype_names(tiny_untied, dtype):
    model, _ = load(tiny_untied, dtype=dtype, fast=False)
    expected = dtype if isinstance(dtype, mx.Dtype) else getattr(mx, dtype)
    assert model.layers[0].mlp.up_proj.weight.dtype == expected


def test_load_rejects_unknown_dtype_names(tiny_untied):
    with pytest.raises(UserError, match="float32"):
        load(tiny_untied, dtype="float64")


@pytest.mark.parametrize("module", CLI_MODULES)
def test_help_in_process(module, capsys):
    main = importlib.import_module(f"mlx_qwen2.{module}" + (".main" if module == "server" else "")).main
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    assert f"python -m mlx_qwen2.{module}" in capsys.readouterr().out


def test_lora_help_shows_percent_signs(capsys):
    with pytest.raises(SystemExit):
        importlib.import_module("mlx_qwen2.lora").main(["--help"])
    assert "10% of the peak" in capsys.readouterr().out


def test_openblas_hint_once_on_the_reference_blas(tiny_untied, capsys, monkeypatch):
    monkeypatch.setattr(blas, "in_use", blas.REFERENCE)
    monkeypatch.setattr(cli, "_hinted", False)
    monkeypatch.delenv("MLX_QWEN2_BLAS", raising=False)
    argv = ["--model", str(tiny_untied), "--max-tokens", "1", "--no-verbose"]
    assert generate_main(argv) == 0 and generate_main(argv) == 0
    err = capsys.readouterr().err
    assert err.count("hint: ") == 1 and "apt install libopenblas0-pthread" in err
    monkeypatch.setattr(cli, "_hinted", False)
    monkeypatch.setenv("MLX_QWEN2_BLAS", "off")  # asked for: no hint
    assert generate_main(argv) == 0 and "hint" not in capsys.readouterr().err


def test_no_openblas_hint_with_openblas(tiny_untied, capsys, monkeypatch):
    monkeypatch.setattr(blas, "in_use", "OpenBLAS (libopenblas.so.0)")
    monkeypatch.setattr(cli, "_hinted", False)
    assert generate_main(["--model", str(tiny_untied), "--max-tokens", "1", "--no-verbose"]) == 0
    assert "hint" not in capsys.readouterr().err
