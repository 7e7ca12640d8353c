"""The batching engine against its oracle: each sequence gives exactly what it gives alone."""

from __future__ import annotations

import json
import sys

import mlx.core as mx
import numpy as np
import pytest

from mlx_qwen2 import generate, load, stream_generate
from mlx_qwen2.cache.prefix import PrefixCache
from mlx_qwen2.errors import UserError
from mlx_qwen2.generate import main as generate_main
from mlx_qwen2.generation import Engine, GenerationConfig, Request, batch_generate

generate_cli = sys.modules["mlx_qwen2.generate"]
PROMPTS = ["Hi", "The quick brown fox jumps over the lazy dog again and again", "def add(a, b):", "你好，世界"]


@pytest.fixture(scope="module")
def loaded(tiny_untied):
    model, tokenizer = load(tiny_untied)
    tokenizer.eos_token_ids = set()  # random weights: never stop early, so lengths are what we ask
    return model, tokenizer


def alone(model, tok, prompt, **settings) -> list[int]:
    return [r.token for r in stream_generate(model, tok, prompt, **settings)]


@pytest.mark.parametrize("max_batch", [1, 2, 4])
def test_each_sequence_of_a_batch_equals_it_alone(loaded, max_batch):
    model, tok = loaded
    # different prompt lengths, prompts chunked (4 tokens a step), sequences joining as others leave
    configs = [GenerationConfig(max_tokens=n, prefill_step_size=4) for n in (9, 5, 12, 3)]
    results = batch_generate(model, tok, PROMPTS, configs, max_batch=max_batch)
    for prompt, config, result in zip(PROMPTS, configs, results):
        expected = alone(model, tok, prompt, config=config)
        assert result.tokens == expected, prompt
        assert result.text == tok.decode(expected) and result.finish_reason == "length"
        assert result.prompt_tokens == len(tok.encode(prompt)) and result.generation_tokens == len(expected)


def test_sampling_with_a_seed_per_sequence(loaded):
    model, tok = loaded
    configs = [GenerationConfig(max_tokens=8, temp=1.0, seed=s) for s in (1, 2, 3)]
    results = batch_generate(model, tok, PROMPTS[:3], configs, max_batch=3)
    for prompt, config, result in zip(PROMPTS, configs, results):
        assert result.tokens == alone(model, tok, prompt, config=config)  # the seed, not the batch, decides
    assert results[0].tokens != batch_generate(model, tok, PROMPTS[:1], configs[1])[0].tokens


def test_stop_strings_and_penalties_per_sequence(loaded):
    model, tok = loaded
    full = "".join(r.text for r in stream_generate(model, tok, PROMPTS[1], max_tokens=20))
    configs = [
        GenerationConfig(max_tokens=20, stop=[full[8:11]]),
        GenerationConfig(max_tokens=10, repetition_penalty=2.0, repetition_context_size=4),
        GenerationConfig(max_tokens=10),
    ]
    prompts = [PROMPTS[1], PROMPTS[2], PROMPTS[2]]
    results = batch_generate(model, tok, prompts, configs, max_batch=3)
    assert results[0].text == full[: full.find(full[8:11])] and results[0].finish_reason == "stop"
    assert results[1].tokens == alone(model, tok, prompts[1], config=configs[1])
    assert results[1].tokens != results[2].tokens  # the penalty applied to that row only
    assert results[2].tokens == alone(model, tok, prompts[2], config=configs[2])


def run(engine: Engine) -> dict:
    out: dict = {}
    while engine.busy:
        for e in engine.step():
            out.setdefault(e.id, []).append(e)
    return out


def test_join_mid_way_and_cancel(loaded):
    model, tok = loaded
    engine = Engine(model, tok, max_batch=4, prefill_step_size=3)
    ids = [tok.encode(p) for p in PROMPTS]
    engine.add(Request(ids[0], GenerationConfig(max_tokens=10), id="a"))
    engine.add(Request(ids[1], GenerationConfig(max_tokens=10), id="b"))
    events: dict = {}
    for _ in range(6):
        for e in engine.step():
            events.setdefault(e.id, []).append(e)
    engine.add(Request(ids[2], GenerationConfig(max_tokens=10), id="c"))  # joins a running batch
    engine.cancel("b")
    for e in engine.step():
        events.setdefault(e.id, []).append(e)
    assert "b" not in [s.id for s in engine.running]  # cancelled: gone at the next step
    assert engine.batch_cache is None or engine.batch_cache[0].keys.shape[0] == len(engine.running)
    for k, v in run(engine).items():
        events.setdefault(k, []).extend(v)
    for name, prompt in (("a", ids[0]), ("c", ids[2])):
        assert [e.token for e in events[name]] == alone(model, tok, prompt, max_tokens=10)
    assert max(e.batch_size for e in events["a"]) >= 2
    assert not engine.busy and engine.batch_cache is None  # everything freed


def test_a_long_prompt_does_not_stall_the_batch(loaded):
    model, tok = loaded
    engine = Engine(model, tok, max_batch=4, prefill_step_size=4)
    engine.add(Request(tok.encode("Hi"), GenerationConfig(max_tokens=30), id="short"))
    engine.step()  # its prefill
    engine.add(Request(tok.encode(PROMPTS[1] * 3), GenerationConfig(max_tokens=2), id="long"))
    per_step = [[e.id for e in engine.step()] for _ in range(5)]
    assert all("short" in ids for ids in per_step)  # a token every step while the long prompt is chunked


def test_prefix_cache_prefills_only_the_new_tokens(loaded, monkeypatch):
    model, tok = loaded
    system = "You are terse. " * 12
    first, second = tok.encode(system + "Tell me a joke."), tok.encode(system + "Name a color.")
    seen = []
    real = type(model.model).__call__

    def counting(self, inputs, cache=None):
        seen.append(inputs.shape[0] * inputs.shape[1])
        return real(self, inputs, cache)

    monkeypatch.setattr(type(model.model), "__call__", counting)
    prefix = PrefixCache(max_entries=4)
    engine = Engine(model, tok, max_batch=2, prefix_cache=prefix)
    engine.add(Request(first, GenerationConfig(max_tokens=4), id=1))
    run(engine)
    seen.clear()
    engine.add(Request(second, GenerationConfig(max_tokens=4), id=2))
    events = run(engine)[2]
    shared = next(i for i, (x, y) in enumerate(zip(first, second)) if x != y)
    assert events[0].cached_tokens == shared and prefix.hits == 1
    assert seen[0] == len(second) - shared  # the prefill saw only what was not cached
    assert [e.token for e in events] == alone(model, tok, second, max_tokens=4)


def test_prefix_cache_hits_are_prefilled_together(loaded, monkeypatch):
    """Hits that wait together go in one pass, each row's pending tokens made as many as the longest's by
    giving back a few cached ones; a hit with far more new tokens goes in a pass of its own."""
    model, tok = loaded
    system = "You are terse. " * 12
    questions = ["Tell me a joke.", "Name a color.", "Say hi to me now.", "Count."]
    long = " ".join(["Describe the whole history of the world in great detail, please"] * 5)
    prompts = [tok.encode(system + q) for q in [*questions, long]]
    prefix = PrefixCache(max_entries=8)
    engine = Engine(model, tok, max_batch=8, prefix_cache=prefix)
    seed = tok.encode(system + "Hello there.")
    engine.add(Request(seed, GenerationConfig(max_tokens=2)))
    run(engine)
    seen = []
    real = type(model.model).__call__

    def counting(self, inputs, cache=None):
        seen.append(tuple(inputs.shape))
        return real(self, inputs, cache)

    monkeypatch.setattr(type(model.model), "__call__", counting)
    for i, ids in enumerate(prompts):
        engine.add(Request(ids, GenerationConfig(max_tokens=6), id=i, logprobs=0))
    events = run(engine)
    monkeypatch.undo()
    shared = [next(i for i, (x, y) in enumerate(zip(seed, ids)) if x != y) for ids in prompts]  # cached
    width = max(len(ids) - n for ids, n in zip(prompts[:4], shared))
    assert len({len(ids) - n for ids, n in zip(prompts[:4], shared)}) > 1  # some rows give cached tokens back
    assert seen[0] == (4, width)  # the four short hits in one pass
    assert seen[1] == (1, len(prompts[4]) - shared[4])  # the long one alone
    for i, ids in enumerate(prompts):
        tokens = [e.token for e in events[i]]
        assert tokens == alone(model, tok, ids, max_tokens=6), i
        # the log-probabilities of one pass over the whole sequence, no cache: a given-back token kept
        # twice, or one lost, would shift every row's positions and scores (the tiny model's greedy tokens
        # alone might not show it)
        logits = model(mx.array(ids + tokens[:-1])[None])[0, len(ids) - 1 :].astype(mx.float32)
        expected = (logits - mx.logsumexp(logits, axis=-1, keepdims=True))[mx.arange(len(tokens)), mx.array(tokens)]
        np.testing.assert_allclose([e.logprob for e in events[i]], np.array(expected), atol=1e-4)
        assert events[i][0].cached_tokens == len(ids) - (width if i < 4 else len(ids) - shared[i])
    assert prefix.hits == 5


def test_prefix_cache_bounds(loaded):
    model, tok = loaded
    prefix = PrefixCache(max_entries=2)
    for prompt in PROMPTS[:3]:
        engine = Engine(model, tok, prefix_cache=prefix)
        engine.add(Request(tok.encode(prompt), GenerationConfig(max_tokens=2)))
        run(engine)
    assert len(prefix) == 2
    one = prefix.nbytes
    small = PrefixCache(max_entries=8, max_bytes=one // 2)
    engine = Engine(model, tok, prefix_cache=small)
    for prompt in PROMPTS[:3]:
        engine.add(Request(tok.encode(prompt), GenerationConfig(max_tokens=2)))
    run(engine)
    assert small.nbytes <= one // 2


def test_bad_requests(loaded):
    model, tok = loaded
    engine = Engine(model, tok)
    with pytest.raises(UserError, match="context"):
        engine.add(Request([5] * 600))
    with pytest.raises(UserError, match="empty"):
        engine.add(Request([]))
    with pytest.raises(UserError, match="max-batch"):
        Engine(model, tok, max_batch=0)
    assert batch_generate(model, tok, ["Hi"], max_tokens=0)[0].finish_reason == "length"


def test_batch_cache_rows_match_their_sequences(loaded):
    """The merged cache of rows of different lengths holds each row's keys, right-aligned and masked."""
    model, tok = loaded
    engine = Engine(model, tok, max_batch=3)
    prompts = [tok.encode(p) for p in PROMPTS[:3]]
    for i, ids in enumerate(prompts):
        engine.add(Request(ids, GenerationConfig(max_tokens=50), id=i))
    for _ in range(4):
        engine.step()
    cache = engine.batch_cache[0]
    for row, seq in enumerate(engine.running):
        single = cache.row(row)
        assert single.offset == len(seq.request.prompt) + len(seq.generated) - 1
    mask = cache.make_mask(1)
    assert mask.shape == (3, 1, 1, cache.size + 1) and bool(mx.all(mask.sum(-1)[:, 0, 0] == cache.offset + 1))


def write_prompts(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


ROWS = [
    {"prompt": "Hi", "max_tokens": 5},
    {"prompt": "def add(a, b):", "max_tokens": 7, "id": "code"},
    {"messages": [{"role": "user", "content": "你好"}], "max_tokens": 4},
    {"prompt": "Once upon a time", "temp": 1.0, "seed": 3, "max_tokens": 6},
]


def test_prompts_file_round_trip_and_resume(tiny_untied, tmp_path, capsys, monkeypatch):
    prompts = write_prompts(tmp_path / "in.jsonl", ROWS)
    out = tmp_path / "out.jsonl"
    argv = ["--model", str(tiny_untied), "--prompts-file", str(prompts), "--output", str(out), "--max-batch", "2"]
    real = generate_cli.append_result
    written = []

    def interrupt_after_two(path, job, result):
        real(path, job, result)
        written.append(job.line)
        if len(written) == 2:
            with open(path, "a") as f:
                f.write('{"line": 9, "text": "half a li')  # the crash cut the next write short
            raise KeyboardInterrupt

    monkeypatch.setattr(generate_cli, "append_result", interrupt_after_two)
    assert generate_main(argv) == 130
    monkeypatch.setattr(generate_cli, "append_result", real)
    assert generate_main(argv) == 0
    assert "already in" in capsys.readouterr().err
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(r["line"] for r in rows) == [1, 2, 3, 4]  # each once: the first two were not run again
    model, tok = load(tiny_untied)
    for row in rows:
        spec = ROWS[row["line"] - 1]
        messages = spec.get("messages") or [{"role": "user", "content": spec["prompt"]}]
        ids = tok.apply_chat_template(messages, add_generation_prompt=True)
        settings = {k: v for k, v in spec.items() if k not in ("prompt", "messages", "id")}
        assert row["text"] == generate(model, tok, ids, **settings), row  # the same as alone
        assert row["id"] == spec.get("id", row["line"])
        assert row["prompt_tokens"] == len(ids) and row["finish_reason"] in ("stop", "length")


def test_prompts_are_prefilled_together_and_a_cancel_mid_prefill(loaded, monkeypatch):
    model, tok = loaded
    calls = []
    real = type(model.model).__call__

    def counting(self, inputs, cache=None):
        calls.append(tuple(inputs.shape))
        return real(self, inputs, cache)

    monkeypatch.setattr(type(model.model), "__call__", counting)
    engine = Engine(model, tok, max_batch=4, prefill_step_size=4)
    ids = [tok.encode(p) for p in PROMPTS]
    for i, prompt in enumerate(ids):
        engine.add(Request(prompt, GenerationConfig(max_tokens=6), id=i))
    engine.step()
    assert calls[0] == (4, 4)  # one pass for all four prompts, left-padded, chunk by chunk
    engine.cancel(1)  # while the group is still being prefilled
    events = run(engine)
    assert 1 not in events
    for i in (0, 2, 3):
        assert [e.token for e in events[i]] == alone(model, tok, ids[i], max_tokens=6)


@pytest.mark.parametrize("max_tokens", [0, 4])
def test_prompt_logprobs_equal_the_log_softmax_of_one_pass(loaded, max_tokens):
    model, tok = loaded
    ids = tok.encode(PROMPTS[1])
    engine = Engine(model, tok, max_batch=4, prefill_step_size=5, prefix_cache=PrefixCache())  # chunks of 5
    engine.add(Request(tok.encode(PROMPTS[0]), GenerationConfig(max_tokens=6), id="other"))
    engine.add(Request(ids, GenerationConfig(max_tokens=max_tokens), id="scored", prompt_logprobs=3))
    events = run(engine)["scored"]
    logits = model(mx.array([ids]))[0].astype(mx.float32)
    logp = np.array(logits - mx.logsumexp(logits, axis=-1, keepdims=True))
    scores = events[0].prompt_logprobs
    assert len(scores) == len(ids) and scores[0] == (None, None)
    for j, (chosen, top) in enumerate(scores[1:]):
        assert abs(chosen - logp[j, ids[j + 1]]) < 1e-4
        assert [t for t, _ in top] == list(np.argsort(-logp[j])[:3])
        np.testing.assert_allclose([v for _, v in top], np.sort(logp[j])[::-1][:3], atol=1e-4)
    if max_tokens == 0:
        assert [(e.token, e.finish_reason, e.generation_tokens) for e in events] == [(None, "length", 0)]
    else:
        assert [e.token for e in events] == alone(model, tok, ids, max_tokens=max_tokens)
        assert all(e.prompt_logprobs is None for e in events[1:])
