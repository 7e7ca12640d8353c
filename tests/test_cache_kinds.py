"""Cache kinds against their oracles: a rotating cache equals a recompute over its window, a quantized one
stays near the float cache, a prompt-cache file continues exactly where it was saved."""

from __future__ import annotations

import json
import shutil

import mlx.core as mx
import numpy as np
import pytest

from mlx_qwen2 import generate, load, stream_generate
from mlx_qwen2.cache import KVCache, make_cache
from mlx_qwen2.cache.config import CacheConfig
from mlx_qwen2.cache.prefix import PrefixCache
from mlx_qwen2.cache.quantized import QuantizedKVCache
from mlx_qwen2.cache.rotating import RotatingKVCache
from mlx_qwen2.cache_prompt import main as cache_prompt_main
from mlx_qwen2.errors import UserError
from mlx_qwen2.generate import main as generate_main
from mlx_qwen2.generation import Engine, GenerationConfig, Request
from mlx_qwen2.generation.speculative import SpeculativeConfig
from tests.tiny import make_checkpoint

IDS = [(7 * i + 3) % 300 + 5 for i in range(40)]


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    """head_dim 32: wide enough for the quantized cache's groups."""
    folder = make_checkpoint(tmp_path_factory.mktemp("wide"), hidden=128, heads=4, kv_heads=2, layers=2, seed=3)
    model, tok = load(folder)
    tok.eos_token_ids = set()
    return folder, model, tok


def window_logits(model, ids: list[int], max_size: int, keep: int) -> np.ndarray:
    """Oracle: the whole sequence in one pass, each query masked to the kept prefix and its recent window."""
    n = len(ids)
    p, a = np.arange(n)[:, None], np.arange(n)[None]
    mask = mx.array((a <= p) & ((a < keep) | (a > p - (max_size - keep))))
    h = model.model.embed_tokens(mx.array([ids]))
    for layer in model.layers:
        h = layer(h, mask, None)
    return np.array(model.head(model.model.norm(h))[0])


@pytest.mark.parametrize("chunk", [5, 16, 40])
def test_rotating_cache_equals_a_recompute_over_its_window(wide, chunk):
    _, model, _ = wide
    cache = [RotatingKVCache(16, keep=4, step=8) for _ in model.layers]
    got = []
    for start in range(0, len(IDS), chunk):  # chunked prefill across the window's edge
        got.append(np.array(model(mx.array([IDS[start : start + chunk]]), cache)[0]))
    ids = list(IDS)
    for _ in range(12):  # then one token at a time, the ring wrapping round
        token = int(got[-1][-1].argmax())
        ids.append(token)
        got.append(np.array(model(mx.array([[token]]), cache)[0]))
    oracle = window_logits(model, ids, 16, 4)
    np.testing.assert_allclose(np.concatenate(got), oracle[: len(ids)], atol=2e-4)
    assert cache[0].size == 16 and cache[0].offset == len(ids)
    # and it is not the full-attention result: the window matters here
    full = np.array(model(mx.array([ids]))[0])
    assert np.abs(full[-1] - oracle[len(ids) - 1]).max() > 1e-3


def test_rotating_generation_matches_the_window_oracle(wide):
    _, model, tok = wide
    tokens = [r.token for r in stream_generate(model, tok, IDS, max_tokens=10, cache_config=CacheConfig(16, 4))]
    ids = list(IDS)
    for _ in range(10):
        ids.append(int(window_logits(model, ids, 16, 4)[-1].argmax()))
    assert tokens == ids[len(IDS) :]


@pytest.mark.parametrize("bits, tolerance", [(8, 0.02), (4, 0.25)])
def test_quantized_cache_stays_near_the_float_cache(wide, bits, tolerance):
    _, model, _ = wide
    ref = np.array(model(mx.array([IDS]), make_cache(len(model.layers)))[0])
    cache = [QuantizedKVCache(bits, 32) for _ in model.layers]
    got = np.concatenate([np.array(model(mx.array([IDS[i : i + 7]]), cache)[0]) for i in range(0, len(IDS), 7)])
    err = np.abs(got - ref).max() / np.abs(ref).max()
    assert err < tolerance, err  # relative to the largest logit
    assert err > 0  # it is really quantized
    float_bytes = sum(c.nbytes for c in make_and_fill(model, KVCache))
    assert sum(c.nbytes for c in cache) < float_bytes * (0.55 if bits == 8 else 0.3)


def make_and_fill(model, kind):
    cache = [kind() for _ in model.layers]
    for i in range(0, len(IDS), 7):
        model(mx.array([IDS[i : i + 7]]), cache)
    return cache


def test_quantized_kv_start_switches_part_way(wide):
    _, model, tok = wide
    config = CacheConfig(kv_bits=8, kv_group_size=32, quantized_kv_start=30)
    cache = config.make(len(model.layers))
    assert isinstance(cache[0], KVCache)
    tokens = [r.token for r in stream_generate(model, tok, IDS[:20], cache=cache, max_tokens=15, cache_config=config)]
    assert isinstance(cache[0], QuantizedKVCache) and len(tokens) == 15


def test_cache_settings_are_checked():
    with pytest.raises(UserError, match="kept prefix"):
        CacheConfig(max_kv_size=4, kv_keep=4)
    with pytest.raises(UserError, match="--kv-bits 3"):
        CacheConfig(kv_bits=3)
    with pytest.raises(UserError, match="kept prefix"):
        RotatingKVCache(2, keep=4)


def test_prompt_cache_file_continues_exactly(wide, tmp_path, capsys):
    folder, model, tok = wide
    text, more = "The quick brown fox jumps over the lazy dog. " * 4, " And then"
    path = tmp_path / "p.safetensors"
    assert cache_prompt_main(["--model", str(folder), "--prompt", text, "--prompt-cache-file", str(path)]) == 0
    argv = ["--model", str(folder), "--prompt-cache-file", str(path), "--prompt", more, "-m", "12", "--no-verbose"]
    capsys.readouterr()
    assert generate_main(argv) == 0
    out = capsys.readouterr().out
    ids = tok.encode(text) + tok.encode(more)  # oracle: the whole prompt at once, no cache file
    assert out == generate(model, tok, ids, max_tokens=12) + "\n"
    assert list(tmp_path.iterdir()) == [path]  # written atomically: no temporary left


def test_prompt_cache_file_for_a_quantized_cache(wide, tmp_path, capsys):
    folder, model, tok = wide
    path = tmp_path / "q.safetensors"
    argv = ["--model", str(folder), "--prompt", "Hello there, " * 5, "--prompt-cache-file", str(path)]
    assert cache_prompt_main([*argv, "--kv-bits", "8", "--kv-group-size", "32"]) == 0
    assert generate_main(["--model", str(folder), "--prompt-cache-file", str(path), "--prompt", " x", "-m", "3"]) == 0
    assert "KV cache" in capsys.readouterr().err


@pytest.fixture
def saved(wide, tmp_path):
    folder = wide[0]
    path = tmp_path / "p.safetensors"
    assert cache_prompt_main(["--model", str(folder), "--prompt", "Some text", "--prompt-cache-file", str(path)]) == 0
    return folder, path


def check_refused(argv, capsys, match):
    assert generate_main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and match in err[-1], err


def test_prompt_cache_for_another_model_is_refused(saved, tiny_untied, capsys):
    _, path = saved
    check_refused(["--model", str(tiny_untied), "--prompt-cache-file", str(path)], capsys, "another model")


def test_prompt_cache_for_another_tokenizer_is_refused(saved, tmp_path, capsys):
    folder, path = saved
    other = tmp_path / "other"
    shutil.copytree(folder, other)
    data = json.loads((other / "tokenizer.json").read_text())
    data["added_tokens"][0]["content"] = "<|renamed|>"
    (other / "tokenizer.json").write_text(json.dumps(data))
    check_refused(["--model", str(other), "--prompt-cache-file", str(path)], capsys, "another tokenizer")


@pytest.mark.parametrize("damage, match", [("truncate", "truncated"), ("garbage", "not a valid"), ("ours", "not a")])
def test_damaged_prompt_cache_file(saved, damage, match, capsys):
    folder, path = saved
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[:-100])
    elif damage == "garbage":
        path.write_bytes(b"\x00" * 50)
    else:
        shutil.copy(folder / "model.safetensors", path)  # a safetensors file, but not a prompt cache
    check_refused(["--model", str(folder), "--prompt-cache-file", str(path)], capsys, match)


def test_missing_prompt_cache_file(wide, tmp_path, capsys):
    check_refused(["--model", str(wide[0]), "--prompt-cache-file", str(tmp_path / "none")], capsys, "not found")


BATCH_PROMPTS = [IDS[:3], IDS[5:25], IDS, IDS[10:19]]


def run_engine(model, tok, prompts, budgets, cache_config, max_batch):
    """Every prompt through one engine (chunks of 5, rows joining as others leave); tokens per prompt and the
    widest the batch cache's buffer grew (columns allocated)."""
    engine = Engine(model, tok, max_batch=max_batch, prefill_step_size=5, cache_config=cache_config)
    for i, (ids, n) in enumerate(zip(prompts, budgets)):
        engine.add(Request(ids, GenerationConfig(max_tokens=n), id=i))
    out, widest = {}, 0
    while engine.busy:
        for e in engine.step():
            out.setdefault(e.id, []).append(e.token)
        if engine.batch_cache:  # columns allocated (a quantized cache holds triples)
            keys = engine.batch_cache[0].keys
            widest = max(widest, (keys[0] if isinstance(keys, tuple) else keys).shape[2])
    return [out[i] for i in range(len(prompts))], widest


@pytest.mark.parametrize("max_batch", [2, 4])
def test_a_batch_with_a_bounded_cache_equals_each_prompt_alone(wide, max_batch):
    _, model, tok = wide
    config = CacheConfig(16, 4)
    budgets = [40, 30, 12, 35]  # past the window and past several compactions
    got, widest = run_engine(model, tok, BATCH_PROMPTS, budgets, config, max_batch)
    for ids, n, tokens in zip(BATCH_PROMPTS, budgets, got):
        alone = [r.token for r in stream_generate(model, tok, ids, max_tokens=n, cache_config=config)]
        assert tokens == alone
    assert widest <= 16 + 4 + 5  # the window, a compaction's worth (a quarter of it), a prefill chunk
    plain, _ = run_engine(model, tok, BATCH_PROMPTS, budgets, CacheConfig(), max_batch)
    assert plain != got  # the window changed the outcome: the test can tell


@pytest.mark.parametrize("bits", [8, 4])
def test_a_batch_with_a_quantized_cache_equals_each_prompt_alone(wide, bits):
    _, model, tok = wide
    config = CacheConfig(kv_bits=bits, kv_group_size=32)
    budgets = [20, 12, 8, 16]
    got, _ = run_engine(model, tok, BATCH_PROMPTS, budgets, config, 3)
    for ids, n, tokens in zip(BATCH_PROMPTS, budgets, got):
        alone = [r.token for r in stream_generate(model, tok, ids, max_tokens=n, cache_config=config)]
        assert tokens == alone


def test_a_batch_switches_to_the_quantized_cache_once_its_longest_row_is_past_the_start(wide):
    _, model, tok = wide
    config = CacheConfig(kv_bits=8, kv_group_size=32, quantized_kv_start=30)
    engine = Engine(model, tok, max_batch=2, cache_config=config)
    engine.add(Request(IDS[:20], GenerationConfig(max_tokens=20)))
    kinds = []
    while engine.busy:
        engine.step()
        if engine.batch_cache:
            kinds.append((engine.batch_cache[0].size, type(engine.batch_cache[0]).__name__))
    assert kinds[0][1] == "BatchKVCache" and kinds[-1][1] == "BatchQuantizedKVCache"
    assert all((size >= 30) == (kind != "BatchKVCache") for size, kind in kinds), kinds
    # a row that joins a quantized batch is quantized with it
    engine.add(Request(IDS[:25], GenerationConfig(max_tokens=40), id="long"))
    engine.step()
    engine.add(Request(IDS[:4], GenerationConfig(max_tokens=5), id="short"))
    while engine.busy:
        engine.step()
        if engine.batch_cache:
            assert len(engine.batch_cache[0].left_pad) == len(engine.running)


def test_cache_kinds_in_a_batch_refuse_what_they_cannot_do(wide):
    _, model, tok = wide
    with pytest.raises(UserError, match="prefix cache keeps plain caches"):
        Engine(model, tok, prefix_cache=PrefixCache(), cache_config=CacheConfig(16, 4))
    engine = Engine(model, tok, cache_config=CacheConfig(kv_bits=8, kv_group_size=32))
    with pytest.raises(UserError, match="speculative decoding needs the plain cache"):
        engine.add(Request(IDS, speculative=SpeculativeConfig(prompt_lookup=2)))


@pytest.mark.parametrize(
    "flags", [["--max-kv-size", "16", "--kv-keep", "2"], ["--kv-bits", "8", "--kv-group-size", "32"]]
)
def test_prompts_file_with_a_cache_kind_gives_what_each_prompt_gives_alone(wide, flags, tmp_path, capsys):
    folder, model, tok = wide
    prompts = ["The quick brown fox jumps over the lazy dog", "Hi", "def add(a, b):"]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    argv = ["--model", str(folder), "--prompts-file", str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "o"),
            "--no-chat-template", "-m", "30", "--max-batch", "2", *flags]  # fmt: skip
    assert generate_main(argv) == 0
    rows = {r["line"]: r for r in map(json.loads, (tmp_path / "o").read_text().splitlines())}
    config = CacheConfig(16, 2) if "--max-kv-size" in flags else CacheConfig(kv_bits=8, kv_group_size=32)
    for line, prompt in enumerate(prompts, start=1):
        alone = generate(model, tok, tok.encode(prompt), max_tokens=30, cache_config=config)
        assert rows[line]["text"] == alone
