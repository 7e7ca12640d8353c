"""Generation: greedy output against a full recompute, stop handling, statistics, chat cache reuse."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from mlx_qwen2 import generate, load, stream_generate
from mlx_qwen2.chat import ChatSession
from mlx_qwen2.generation import GenerationConfig, held_back


@pytest.fixture(scope="module")
def loaded(tiny_untied):
    model, tokenizer = load(tiny_untied)
    tokenizer.eos_token_ids = set()  # random weights: never stop early, so lengths are predictable
    return model, tokenizer


def recompute_greedy(model, ids: list[int], n: int) -> list[int]:
    out = list(ids)
    for _ in range(n):
        out.append(int(np.array(model(mx.array([out]))[0, -1]).argmax()))
    return out[len(ids) :]


def test_stream_equals_full_recompute_greedy(loaded):
    model, tok = loaded
    ids = tok.encode("The quick brown fox")
    responses = list(stream_generate(model, tok, ids, max_tokens=20, prefill_step_size=2))
    tokens = [r.token for r in responses]
    assert tokens == recompute_greedy(model, ids, 20)
    assert "".join(r.text for r in responses) == tok.decode(tokens)
    last = responses[-1]
    assert last.finish_reason == "length" and last.generation_tokens == 20 and last.prompt_tokens == len(ids)
    assert last.prompt_tps > 0 and last.generation_tps > 0 and last.peak_memory > 0


def test_generate_returns_text(loaded):
    model, tok = loaded
    text = generate(model, tok, "Hello", max_tokens=8)
    tokens = recompute_greedy(model, tok.encode("Hello"), 8)
    assert text == tok.decode(tokens)


def test_eos_stops(loaded):
    model, tok = loaded
    ids = tok.encode("def add(a, b):")
    greedy = recompute_greedy(model, ids, 12)
    k = next(i for i in range(1, 12) if greedy[i] not in greedy[:i])  # first token not seen before
    first = greedy[: k + 1]
    tok.eos_token_ids = {first[-1]}
    try:
        out = list(stream_generate(model, tok, ids, max_tokens=10))
    finally:
        tok.eos_token_ids = set()
    assert [r.token for r in out] == first and out[-1].finish_reason == "stop"
    assert "".join(r.text for r in out) == tok.decode(first[:-1])  # EOS itself is not text


def test_stop_string_is_cut_even_across_tokens(loaded):
    model, tok = loaded
    full = generate(model, tok, "café", max_tokens=30)
    stop = full[5:8]  # three characters somewhere in the middle
    pieces = list(stream_generate(model, tok, "café", max_tokens=30, stop=[stop]))
    assert "".join(r.text for r in pieces) == full[: full.find(stop)]
    assert pieces[-1].finish_reason == "stop"


def testheld_back():
    assert held_back("abc</", ["</s>"]) == 2
    assert held_back("abc", ["</s>"]) == 0
    assert held_back("x<", ["<|im_end|>", "<x"]) == 1


def test_seeded_sampling_reproducible(loaded):
    model, tok = loaded
    a = generate(model, tok, "Hello", max_tokens=10, temp=1.0, seed=42)
    b = generate(model, tok, "Hello", max_tokens=10, temp=1.0, seed=42)
    assert a == b


def test_prompt_longer_than_context(loaded):
    model, tok = loaded
    with pytest.raises(ValueError, match="context"):
        list(stream_generate(model, tok, [5] * 600, max_tokens=1))


def test_invalid_settings():
    with pytest.raises(ValueError, match="top-p"):
        GenerationConfig(top_p=2.0)
    with pytest.raises(ValueError, match="max-tokens"):
        GenerationConfig(max_tokens=-1)


def test_chat_reuses_cache_and_matches_fresh_generation(loaded):
    model, tok = loaded
    session = ChatSession(model, tok)
    config = GenerationConfig(max_tokens=6)
    first = "".join(r.text for r in session.send("Hi there", config))
    offset_after_first = session.cache[0].offset
    second_tokens = [r.token for r in session.send("Tell me more", config)]
    assert session.cache[0].offset > offset_after_first
    # Oracle: a fresh cache and the whole conversation rendered at once.
    messages = [
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": first},
        {"role": "user", "content": "Tell me more"},
    ]
    ids = tok.apply_chat_template(messages, add_generation_prompt=True)
    assert second_tokens == recompute_greedy(model, ids, 6)
