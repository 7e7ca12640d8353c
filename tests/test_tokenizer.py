"""Tokenizer wrapper: streaming detokenizer, chat template and EOS ids against transformers."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from mlx_qwen2.loader import eos_ids
from mlx_qwen2.tokenizer import Tokenizer

TEXTS = [
    "Hello world",
    "你好，世界！今天天气很好。",
    "Emoji 😀🎉🚀 and café naïve",
    "def f(x):\n\treturn x ** 2  # squared\n\n\n   trailing   ",
    "<|im_start|>user\nhi<|im_end|>",
]


@pytest.fixture(scope="module")
def tok(tiny_untied) -> Tokenizer:
    return Tokenizer.from_folder(tiny_untied, eos_token_ids=[401])


@pytest.mark.parametrize("text", TEXTS)
def test_ids_and_round_trip_match_transformers(tok, tiny_untied, text):
    ref = AutoTokenizer.from_pretrained(tiny_untied)
    ids = tok.encode(text)
    assert ids == ref(text)["input_ids"]
    assert tok.decode(ids, skip_special_tokens=False) == text


@pytest.mark.parametrize("text", TEXTS)
def test_streamed_text_equals_full_decode(tok, text):
    ids = tok.encode(text)
    detok = tok.detokenizer()
    pieces = [detok.add_token(i) for i in ids] + [detok.finalize()]
    assert "".join(pieces) == tok.decode(ids)
    assert all("\ufffd" not in p for p in pieces)  # never half a character


def test_multibyte_character_is_held_until_complete(tok):
    ids = tok.encode("😀")
    assert len(ids) > 1  # the tiny vocabulary splits the emoji's four bytes
    detok = tok.detokenizer()
    assert [detok.add_token(i) for i in ids[:-1]] == [""] * (len(ids) - 1)
    assert detok.add_token(ids[-1]) == "😀"


def test_invalid_bytes_flush_as_replacement(tok):
    ids = tok.encode("😀")
    detok = tok.detokenizer()
    detok.add_token(ids[0])
    assert detok.finalize() == tok.decode(ids[:1])


def test_chat_template_matches_transformers(tok, tiny_untied):
    ref = AutoTokenizer.from_pretrained(tiny_untied)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "你好 😀"}]
    for gen in (True, False):
        expected = ref.apply_chat_template(messages, add_generation_prompt=gen, tokenize=False)
        assert tok.apply_chat_template(messages, add_generation_prompt=gen, tokenize=False) == expected
    assert tok.apply_chat_template(messages) == tok.encode(
        ref.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    )


def test_eos_ids_from_both_configs(tiny_untied):
    tok = Tokenizer.from_folder(tiny_untied, eos_token_ids=eos_ids(tiny_untied))
    assert tok.eos_token_ids == {tok.token_to_id("<|im_end|>"), tok.token_to_id("<|endoftext|>")}


def test_missing_template_is_a_clear_error(tok):
    bare = Tokenizer(tok._tokenizer)
    with pytest.raises(ValueError, match="no chat template"):
        bare.apply_chat_template([{"role": "user", "content": "x"}])


def test_chat_template_is_compiled_once_and_renders_each_call_anew(tok, monkeypatch):
    """Rendering again reuses the compiled template (a compile took 9-18 ms for Qwen2.5's here) and still renders
    what each call gives it; another template source compiles on its own."""
    import jinja2

    from mlx_qwen2 import tokenizer as module

    compiled = []
    real = jinja2.Environment.from_string
    monkeypatch.setattr(
        jinja2.Environment, "from_string", lambda self, *a, **kw: compiled.append(1) or real(self, *a, **kw)
    )
    module._compile_template.cache_clear()
    first = tok.apply_chat_template([{"role": "user", "content": "one"}], tokenize=False)
    second = tok.apply_chat_template([{"role": "user", "content": "two"}], tokenize=False)
    assert len(compiled) == 1 and "one" in first and "two" in second and "one" not in second
    other = Tokenizer(tok._tokenizer, chat_template="{{ messages[0]['content'] }}!")
    assert other.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False) == "x!"
    assert len(compiled) == 2
