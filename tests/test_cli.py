"""The generate and chat command lines, run in-process on a tiny checkpoint."""

from __future__ import annotations

import io

from mlx_qwen2 import generate, load
from mlx_qwen2.chat import main as chat_main
from mlx_qwen2.generate import main as generate_main


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
    assert out.count(">> ") == 3  # two turns, then end of input
