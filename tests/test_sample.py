"""Sampling functions against hand computations."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from mlx_qwen2.sample import (
    apply_min_p,
    apply_top_k,
    apply_top_p,
    make_logits_processors,
    make_sampler,
    repetition_penalty_processor,
)

PROBS = np.array([[0.5, 0.25, 0.15, 0.07, 0.03]], dtype=np.float32)
LOGITS = mx.array(np.log(PROBS))


def kept(logits: mx.array) -> list[int]:
    return [i for i, v in enumerate(np.array(logits)[0]) if np.isfinite(v)]


def test_greedy_is_argmax():
    assert make_sampler(0.0)(LOGITS).tolist() == [0]


def test_top_k():
    assert kept(apply_top_k(LOGITS, 2)) == [0, 1]
    assert kept(apply_top_k(LOGITS, 0)) == [0, 1, 2, 3, 4]


def test_top_p_keeps_smallest_set_reaching_p():
    assert kept(apply_top_p(LOGITS, 0.5)) == [0]
    assert kept(apply_top_p(LOGITS, 0.7)) == [0, 1]
    assert kept(apply_top_p(LOGITS, 0.8)) == [0, 1, 2]
    shuffled = mx.array(np.log(PROBS[:, [3, 0, 4, 2, 1]]))  # order must not matter
    assert kept(apply_top_p(shuffled, 0.8)) == [1, 3, 4]


@pytest.mark.parametrize("k", [1, 7, 40, 999])
@pytest.mark.parametrize("p", [0.3, 0.9, 0.99])
def test_filters_on_a_large_vocabulary_match_a_sort(k, p):
    """Rows of a 50k vocabulary (logits from a peaked and a flat distribution): top-k keeps exactly the k
    largest, top-p the sorted prefix whose mass before each token is under p (float32 sums: up to tokens at
    the boundary), the kept values untouched; top-p the same whether a row's set lies among the most likely
    tokens (peaked, p up to 0.9) or the whole row is sorted."""
    rng = np.random.default_rng(k)
    logits = np.stack([rng.normal(size=50_000) * 4, rng.normal(size=50_000) * 0.3]).astype(np.float32)
    ours_k = np.array(apply_top_k(mx.array(logits), k))
    ours_p = np.array(apply_top_p(mx.array(logits), p))  # one row flat: the whole vocabulary sorted
    alone = [np.array(apply_top_p(mx.array(row[None]), p))[0] for row in logits]  # peaked: among candidates
    for row, got_k, got_p, got_alone in zip(logits, ours_k, ours_p, alone, strict=True):
        np.testing.assert_array_equal(got_alone, got_p)
        order = np.argsort(-row)
        assert set(np.flatnonzero(np.isfinite(got_k))) == set(order[:k].tolist())
        probs = np.exp(row[order].astype(np.float64) - row.max())
        probs /= probs.sum()
        before = np.cumsum(probs) - probs
        differ = set(np.flatnonzero(np.isfinite(got_p))) ^ set(order[before < p].tolist())
        rank = np.argsort(order)  # where each token sits in the sorted order
        assert all(abs(before[rank[i]] - p) < 1e-3 for i in differ)  # float32 sums: only at the boundary
        assert len(differ) < 100
        for got in (got_k, got_p):
            np.testing.assert_array_equal(got[np.isfinite(got)], row[np.isfinite(got)])


def test_min_p():
    assert kept(apply_min_p(LOGITS, 0.3)) == [0, 1, 2]  # 0.15 >= 0.3 * 0.5, 0.07 is not


def test_sampling_follows_distribution_and_seed():
    sampler = make_sampler(temp=1.0)
    mx.random.seed(3)
    draws = np.array(sampler(mx.repeat(LOGITS, 20000, axis=0)))
    freq = np.bincount(draws, minlength=5) / draws.size
    np.testing.assert_allclose(freq, PROBS[0], atol=0.015)
    mx.random.seed(7)
    a = sampler(mx.repeat(LOGITS, 50, axis=0)).tolist()
    mx.random.seed(7)
    assert sampler(mx.repeat(LOGITS, 50, axis=0)).tolist() == a


def test_filters_compose_in_sampler():
    sampler = make_sampler(temp=0.8, top_k=2)
    assert set(np.array(sampler(mx.repeat(LOGITS, 2000, axis=0))).tolist()) == {0, 1}


def test_repetition_penalty_by_hand():
    logits = mx.array([[2.0, -1.0, 0.5, 3.0]])
    out = repetition_penalty_processor(2.0, context_size=2)(mx.array([3, 0, 1]), logits)
    # only the last two ids (0, 1) are penalised: 2.0 / 2, -1.0 * 2
    assert np.allclose(np.array(out), [[1.0, -2.0, 0.5, 3.0]])
    assert make_logits_processors(1.0) == []


@pytest.mark.parametrize(
    "kwargs", [{"temp": -1}, {"top_p": 0}, {"top_p": 1.5}, {"top_k": -2}, {"min_p": 1.0}, {"min_p": -0.1}]
)
def test_invalid_values_raise(kwargs):
    with pytest.raises(ValueError):
        make_sampler(**kwargs)


def test_invalid_repetition_penalty():
    with pytest.raises(ValueError, match="repetition"):
        make_logits_processors(0.0)
