"""Speculative decoding against plain decoding: the same greedy tokens, the same sampling distribution
(chi-square against the exact one), the same cache after a refused proposal; and its bad input."""

from __future__ import annotations

import io
import math

import mlx.core as mx
import numpy as np
import pytest

from mlx_qwen2 import load, stream_generate
from mlx_qwen2.cache.kv import make_cache
from mlx_qwen2.chat import main as chat_main
from mlx_qwen2.errors import UserError
from mlx_qwen2.generate import main as generate_main
from mlx_qwen2.generation import Engine, GenerationConfig, Request, SpeculativeConfig
from mlx_qwen2.generation.speculative import (
    Adaptive,
    DraftProposer,
    LookupProposer,
    SpeculativeStats,
    speculative_generate_step,
)
from mlx_qwen2.generation.step import fill
from mlx_qwen2.sample import probabilities
from mlx_qwen2.tokenizer import check_same_vocab
from tests.tiny import make_checkpoint, tiny_tokenizer

REPEATING = "def add(a, b):\n    return a + b\n\nclass Point:\n    x: int = 0\n" * 2 + "def add(a, b):\n"
PLAIN = "Numbers 12345 and symbols #$%&*()"
ALPHA = 0.001  # significance level of the chi-square tests


@pytest.fixture(scope="module")
def target(tiny_untied):
    return load(tiny_untied)


@pytest.fixture(scope="module")
def other(tiny_tied):
    """Another random model with the same tokenizer: its proposals are mostly refused."""
    return load(tiny_tied)[0]


def tokens(model, tokenizer, prompt, n=40, **kw):
    out = list(stream_generate(model, tokenizer, tokenizer.encode(prompt), max_tokens=n, **kw))
    return [r.token for r in out], out[-1]


@pytest.mark.parametrize("prompt", [REPEATING, PLAIN])
def test_greedy_speculation_equals_plain_greedy(target, other, prompt):
    model, tokenizer = target
    plain, _ = tokens(model, tokenizer, prompt)
    rates = {}
    for name, kw in {
        "self draft": {"draft": model},
        "other draft": {"draft": other},
        "lookup 3": {"speculative": SpeculativeConfig(prompt_lookup=3, num_draft_tokens=6)},
        "lookup 1": {"speculative": SpeculativeConfig(prompt_lookup=1)},
    }.items():
        got, last = tokens(model, tokenizer, prompt, **kw)
        assert got == plain, name
        assert last.draft_tokens > 0
        rates[name] = last.accepted_tokens / last.draft_tokens
    assert rates["self draft"] == 1.0 and rates["other draft"] < 0.5  # mostly kept, mostly refused


def test_speculation_with_a_repetition_penalty_equals_plain(target, other):
    model, tokenizer = target
    plain, _ = tokens(model, tokenizer, PLAIN, repetition_penalty=1.3)
    assert tokens(model, tokenizer, PLAIN, repetition_penalty=1.3, draft=other)[0] == plain
    lookup = SpeculativeConfig(prompt_lookup=2)
    assert tokens(model, tokenizer, PLAIN, repetition_penalty=1.3, speculative=lookup)[0] == plain


def chi2_sf(x: float, df: int) -> float:
    """P(X > x) for a chi-square variable with df degrees of freedom (series of the lower incomplete gamma)."""
    a, h = df / 2, x / 2
    term = total = 1.0 / a
    for n in range(1, 1000):
        term *= h / (a + n)
        total += term
    return 1.0 - math.exp(a * math.log(h) - h - math.lgamma(a)) * total


def chi2(counts: dict, expected: dict, n: int) -> tuple[float, int]:
    keys = [k for k in expected if expected[k] * n >= 5]  # cells too small to test are pooled into one
    rest_exp = n - sum(expected[k] * n for k in keys)
    rest_obs = n - sum(counts.get(k, 0) for k in keys)
    stat = sum((counts.get(k, 0) - expected[k] * n) ** 2 / (expected[k] * n) for k in keys)
    if rest_exp >= 5:
        stat += (rest_obs - rest_exp) ** 2 / rest_exp
        return stat, len(keys)
    return stat, len(keys) - 1


@pytest.mark.parametrize("how", ["draft", "lookup"])
def test_speculative_sampling_follows_the_target_distribution(target, other, how):
    """The first two sampled tokens over 1,500 seeds against their exact distribution under the target."""
    model, tokenizer = target
    sampling = {"temp": 1.5, "top_p": 0.95, "top_k": 4, "min_p": 0.0}
    draft_sampling = {**sampling, "temp": 0.02, "top_p": 1.0}  # the tiny model is nearly flat: much colder
    base = tokenizer.encode("ab ab a")
    likely = tokens(model, tokenizer, "ab ab a", n=4)[0]
    prompt = base + likely + base  # lookup proposes the model's own likely tokens: some are kept
    p1 = np.array(probabilities(model(mx.array([prompt]))[0, -1:], **sampling)[0])
    exact1 = {int(t): float(p1[t]) for t in np.flatnonzero(p1)}
    exact2: dict[int, float] = {}
    for t1, w in exact1.items():
        p2 = np.array(probabilities(model(mx.array([prompt + [t1]]))[0, -1:], **sampling)[0])
        for t2 in np.flatnonzero(p2):
            exact2[int(t2)] = exact2.get(int(t2), 0.0) + w * float(p2[t2])
    n, first, second, stats = 1500, {}, {}, SpeculativeStats()
    for seed in range(n):
        # the draft: the target itself sampled colder, so q differs from p on the same support
        proposer = (
            DraftProposer(model, model.args.vocab_size, draft_sampling, []) if how == "draft" else LookupProposer(2)
        )
        step = speculative_generate_step(
            prompt, model, make_cache(len(model.layers)), proposer, sampling, 3, seed=seed, stats=stats
        )
        t1, t2 = next(step), next(step)
        first[t1] = first.get(t1, 0) + 1
        second[t2] = second.get(t2, 0) + 1
    assert min(stats.accepted, stats.proposed - stats.accepted) >= 100  # both branches of the rule, often
    for counts, exact in ((first, exact1), (second, exact2)):
        stat, df = chi2(counts, exact, n)
        assert chi2_sf(stat, df) > ALPHA, (counts, exact)


def test_chi2_sf_matches_known_values():
    assert chi2_sf(16.266, 3) == pytest.approx(0.001, rel=0.01)
    assert chi2_sf(3.841, 1) == pytest.approx(0.05, rel=0.01)


def test_the_cache_after_a_refused_proposal_equals_plain_decodings(target, other):
    model, tokenizer = target
    prompt = tokenizer.encode(PLAIN)
    cache, stats = make_cache(len(model.layers)), SpeculativeStats()
    proposer = DraftProposer(other, model.args.vocab_size, {"temp": 0.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0}, [])
    step = speculative_generate_step(
        prompt, model, cache, proposer, {"temp": 0.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0}, 4, stats=stats
    )
    out = []
    while len(out) < 12 or cache[0].offset != len(prompt) + len(out) - 1:  # stop right after a check
        out.append(next(step))
        assert len(out) < 200, "the cache never matched the tokens kept"
    assert stats.proposed > stats.accepted  # something was refused and cut back
    plain = make_cache(len(model.layers))
    fill(model, prompt + out[:-1], plain)
    for ours, theirs in zip(cache, plain):
        assert ours.offset == theirs.offset
        for a, b in zip(ours.state, theirs.state):
            np.testing.assert_allclose(np.array(a), np.array(b), atol=1e-5)
    assert proposer.tokens == (prompt + out)[: len(proposer.tokens)]  # the draft's cache holds only kept tokens


def test_proposals_pause_when_they_keep_failing():
    adapt = Adaptive(6)
    assert adapt.next() == 6
    adapt.update(6, 6)
    assert adapt.next() == 6
    for _ in range(3):
        adapt.update(adapt.next(), 0)
    assert [adapt.next() for _ in range(3)] == [0, 0, 3]  # paused 2 steps, then fewer proposals
    for _ in range(3):
        adapt.update(adapt.next(), 0)
    assert [adapt.next() for _ in range(5)] == [0, 0, 0, 0, 1]
    adapt.update(1, 1)
    assert adapt.next() == 3


def test_bad_speculative_settings_are_user_errors(target, tmp_path):
    with pytest.raises(UserError, match="num-draft-tokens"):
        SpeculativeConfig(num_draft_tokens=0)
    with pytest.raises(UserError, match="n-gram"):
        SpeculativeConfig(prompt_lookup=0)
    with pytest.raises(UserError, match="not both"):
        SpeculativeConfig(draft_model="d", prompt_lookup=2)
    other_vocab = tiny_tokenizer(vocab_size=300)
    model, tokenizer = target
    folder = make_checkpoint(tmp_path / "other-vocab")
    other_vocab.save(str(folder / "tokenizer.json"))
    with pytest.raises(UserError, match="tokenizer differs"):
        check_same_vocab(tokenizer, load(folder)[1])


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--num-draft-tokens", "0", "--prompt-lookup", "2"], "num-draft-tokens"),
        (["--prompt-lookup", "-1"], "n-gram"),
        (["--prompt-lookup", "2", "--kv-bits", "8"], "plain cache"),
        (["--prompt-lookup", "2", "--max-kv-size", "64"], "plain cache"),
    ],
)
def test_cli_refuses_bad_speculative_flags(tiny_untied, capsys, flags, message):
    assert generate_main(["--model", str(tiny_untied), "--prompt", "hi", *flags]) == 1
    assert message in capsys.readouterr().err


def test_cli_with_another_tokenizer_as_draft(tiny_untied, tmp_path, capsys):
    folder = make_checkpoint(tmp_path / "other-vocab")
    tiny_tokenizer(vocab_size=300).save(str(folder / "tokenizer.json"))
    assert generate_main(["--model", str(tiny_untied), "--prompt", "hi", "--draft-model", str(folder)]) == 1
    assert "tokenizer differs" in capsys.readouterr().err


def test_cli_reports_acceptance(tiny_untied, capsys):
    argv = ["--model", str(tiny_untied), "--prompt", REPEATING, "--no-chat-template", "--max-tokens", "20"]
    assert generate_main([*argv, "--draft-model", str(tiny_untied)]) == 0
    err = capsys.readouterr().err
    assert "Speculative: " in err and "(100%)" in err and "tokens per model pass" in err


@pytest.fixture(scope="module")
def real(real_folder):
    return load(real_folder)


@pytest.mark.real
@pytest.mark.slow
def test_real_model_speculation_equals_plain_greedy(real, real_folder):
    """Prompt lookup on a code edit (mostly kept) and on a question (mostly refused), and the model in
    bfloat16 drafting for itself in float32 (mostly kept): the same tokens as plain greedy."""
    model, tokenizer = real
    code = (
        "def mean(values):\n    total = 0\n    for v in values:\n        total += v\n    return total / len(values)\n"
    )
    edit = f"```python\n{code}```\nRename `total` to `acc`. Reply with the code only."
    draft = load(real_folder, dtype="bfloat16")[0]
    for text, kw, kept in (
        (edit, {"speculative": SpeculativeConfig(prompt_lookup=3, num_draft_tokens=8)}, 0.5),
        ("Why is the sky blue?", {"speculative": SpeculativeConfig(prompt_lookup=3)}, 0.0),
        (edit, {"draft": draft}, 0.5),
    ):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": text}])
        plain = [r.token for r in stream_generate(model, tokenizer, ids, max_tokens=24)]
        out = list(stream_generate(model, tokenizer, ids, max_tokens=24, **kw))
        assert [r.token for r in out] == plain
        assert out[-1].accepted_tokens >= kept * out[-1].draft_tokens


def test_the_engine_speculates_for_a_sequence_alone_and_decodes_plainly_in_a_batch(target, other):
    model, tokenizer = target
    ids = tokenizer.encode(REPEATING)
    plain, _ = tokens(model, tokenizer, REPEATING)
    for spec, draft in (
        (SpeculativeConfig(prompt_lookup=2), None),
        (SpeculativeConfig(), other),
        (SpeculativeConfig(), model),
    ):
        engine = Engine(model, tokenizer, draft=draft)
        engine.add(Request(ids, GenerationConfig(max_tokens=40), "a", speculative=spec, logprobs=2))
        events = []
        while engine.busy:
            events += engine.step()
            if len(events) == 10:  # a second sequence joins: the batch decodes plainly, then alone again
                engine.add(Request(tokenizer.encode(PLAIN), GenerationConfig(max_tokens=5), "b"))
        mine = [e for e in events if e.id == "a"]
        assert [e.token for e in mine] == plain
        assert mine[-1].speculative.proposed > 0 and mine[-1].speculative.passes < len(mine)
        logits = model(mx.array([ids + plain]))[0, len(ids) - 1 : -1].astype(mx.float32)
        logp = np.array(logits - mx.logsumexp(logits, axis=-1, keepdims=True))
        np.testing.assert_allclose([e.logprob for e in mine], logp[np.arange(len(plain)), plain], atol=1e-4)


@pytest.mark.parametrize("flags", [["--prompt-lookup", "2"], ["--draft-model", "DRAFT"]])
def test_chat_with_speculation_gives_the_plain_replies(tiny_untied, tiny_tied, capsys, monkeypatch, flags):
    conversation = "def add(a, b):\n" * 3 + "\nMore please\n"
    flags = [str(tiny_tied) if f == "DRAFT" else f for f in flags]
    monkeypatch.setattr("sys.stdin", io.StringIO(conversation))
    assert chat_main(["--model", str(tiny_untied), "--max-tokens", "12"]) == 0
    plain = capsys.readouterr().out
    monkeypatch.setattr("sys.stdin", io.StringIO(conversation))
    assert chat_main(["--model", str(tiny_untied), "--max-tokens", "12", *flags]) == 0
    assert capsys.readouterr().out == plain
