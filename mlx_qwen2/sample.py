"""Pure functions from logits to a next token; `make_sampler` composes them.

Logits are (B, vocab). Filters return logits with excluded entries at -inf,
so they compose in any order before the final draw.
"""

from __future__ import annotations

from collections.abc import Callable

import mlx.core as mx
import numpy as np

from .errors import UserError

Sampler = Callable[..., mx.array]  # (logits (B, vocab), key=None) -> token ids (B,)
LogitsProcessor = Callable[[mx.array, mx.array], mx.array]  # (history ids, logits) -> logits


def validate_sampling(
    temp: float = 0.0, top_p: float = 1.0, top_k: int = 0, min_p: float = 0.0, repetition_penalty: float = 1.0
) -> None:
    """Raise UserError naming the first sampling setting out of range."""
    if temp < 0:
        raise UserError(f"temperature must be >= 0 (0 means greedy), got {temp}")
    if not 0 < top_p <= 1:
        raise UserError(f"top-p must be in (0, 1], got {top_p}")
    if top_k < 0:
        raise UserError(f"top-k must be >= 0 (0 disables it), got {top_k}")
    if not 0 <= min_p < 1:
        raise UserError(f"min-p must be in [0, 1), got {min_p}")
    if repetition_penalty <= 0:
        raise UserError(f"repetition penalty must be > 0 (1 disables it), got {repetition_penalty}")


def greedy(logits: mx.array, key: mx.array | None = None) -> mx.array:
    return mx.argmax(logits, axis=-1)


def apply_top_k(logits: mx.array, k: int) -> mx.array:
    """Keep the k largest logits."""
    vocab = logits.shape[-1]
    if k <= 0 or k >= vocab:
        return logits
    kth = mx.partition(logits, vocab - k, axis=-1)[..., vocab - k, None]  # the k-th largest, without a sort
    return mx.where(logits < kth, -mx.inf, logits)


TOP_P_CANDIDATES = 1024  # the most likely tokens top-p looks at first (a large vocabulary is not sorted whole)


def apply_top_p(logits: mx.array, p: float) -> mx.array:
    """Keep the smallest set of tokens whose probability mass reaches p.

    A large vocabulary is not sorted whole: its TOP_P_CANDIDATES most likely tokens are taken out (a
    partition) and sorted, and when their mass reaches p in every row (one check on the host) the set lies
    among them. Otherwise (a flat distribution) the whole vocabulary is sorted."""
    if p >= 1.0:
        return logits
    n, lse = TOP_P_CANDIDATES, mx.logsumexp(logits, axis=-1, keepdims=True)  # lse: for either path
    if logits.shape[-1] > 2 * n:
        top = mx.argpartition(-logits, n - 1, axis=-1)[..., :n]  # the n most likely, in no order
        values = mx.take_along_axis(logits, top, axis=-1)
        order = mx.argsort(-values, axis=-1)
        top, values = mx.take_along_axis(top, order, axis=-1), mx.take_along_axis(values, order, axis=-1)
        before, total = _masses(values, lse)
        if bool((total >= p).all()):  # a host sync
            kept = mx.where(before >= p, -mx.inf, values)
            return mx.put_along_axis(mx.full(logits.shape, -mx.inf, logits.dtype), top, kept, axis=-1)
    order = mx.argsort(-logits, axis=-1)
    values = mx.take_along_axis(logits, order, axis=-1)
    before, _ = _masses(values, lse)
    return mx.put_along_axis(logits, order, mx.where(before >= p, -mx.inf, values), axis=-1)  # a scatter back


def _masses(values: mx.array, lse: mx.array) -> tuple[mx.array, mx.array]:
    """For logits `values` (..., n), most likely first, and the log of the whole vocabulary's normalizer: the
    probability mass strictly before each, and the mass of all n."""
    probs = mx.exp(values - lse)
    mass = mx.cumsum(probs, axis=-1)
    return mass - probs, mass[..., -1]


def apply_min_p(logits: mx.array, min_p: float) -> mx.array:
    """Drop tokens whose probability is below min_p times the top token's."""
    if min_p <= 0:
        return logits
    top = mx.max(logits, axis=-1, keepdims=True)
    # p_i / p_max = exp(l_i - l_max)
    return mx.where(logits - top < mx.log(mx.array(min_p, logits.dtype)), -mx.inf, logits)


def make_sampler(temp: float = 0.0, top_p: float = 1.0, top_k: int = 0, min_p: float = 0.0) -> Sampler:
    """A function (logits (B, vocab), key=None) -> token ids (B,); temp 0 is greedy.

    With a `key` (mx.random.key), the draw depends on it alone, so each sequence of a batch can
    have its own seed; without, MLX's global generator is used."""
    validate_sampling(temp, top_p, top_k, min_p)
    if temp == 0:
        return greedy

    def sample(logits: mx.array, key: mx.array | None = None) -> mx.array:
        return mx.random.categorical(filtered_logits(logits, temp, top_p, top_k, min_p), axis=-1, key=key)

    return sample


def filtered_logits(logits: mx.array, temp: float, top_p: float = 1.0, top_k: int = 0, min_p: float = 0.0) -> mx.array:
    """The logits a sampler with these settings (temp > 0) draws from: float32, scaled, filtered (-inf out)."""
    logits = logits.astype(mx.float32) / temp
    return apply_min_p(apply_top_p(apply_top_k(logits, top_k), top_p), min_p)


def probabilities(logits: mx.array, temp: float, top_p: float = 1.0, top_k: int = 0, min_p: float = 0.0) -> mx.array:
    """The distribution such a sampler draws from, (B, vocab); one-hot on the argmax for temp 0."""
    if temp == 0:
        return (mx.arange(logits.shape[-1]) == mx.argmax(logits, axis=-1, keepdims=True)).astype(mx.float32)
    return mx.softmax(filtered_logits(logits, temp, top_p, top_k, min_p), axis=-1)


def repetition_penalty_processor(penalty: float, context_size: int = 20) -> LogitsProcessor:
    """CTRL-style penalty on the last `context_size` tokens: divide positive logits, multiply negative."""

    def process(tokens: mx.array, logits: mx.array) -> mx.array:
        """tokens: (n,) ids seen so far; logits: (1, vocab)."""
        if tokens.size == 0:
            return logits
        ids = tokens[-context_size:]
        picked = logits[..., ids]
        picked = mx.where(picked < 0, picked * penalty, picked / penalty)
        logits[..., ids] = picked
        return logits

    return process


def make_logits_processors(repetition_penalty: float = 1.0, context_size: int = 20) -> list[LogitsProcessor]:
    validate_sampling(repetition_penalty=repetition_penalty)
    if repetition_penalty == 1.0:
        return []
    return [repetition_penalty_processor(repetition_penalty, context_size)]


def logit_bias_processor(bias: dict[int, float]) -> LogitsProcessor:
    """Add a fixed bias to some token ids' logits (OpenAI's `logit_bias`; -100 bans, +100 forces)."""
    ids = mx.array(list(bias.keys()))
    values = mx.array(list(bias.values()), dtype=mx.float32)

    def process(tokens: mx.array, logits: mx.array) -> mx.array:
        logits[..., ids] = logits[..., ids] + values.astype(logits.dtype)
        return logits

    return process


def penalty_processor(presence: float, frequency: float, start: int) -> LogitsProcessor:
    """OpenAI's presence and frequency penalties over the tokens generated so far (those from `start` on):
    each token seen loses `presence` once plus `frequency` per time it was generated."""

    def process(tokens: mx.array, logits: mx.array) -> mx.array:
        generated = np.asarray(tokens[start:])
        if generated.size == 0:
            return logits
        ids, counts = np.unique(generated, return_counts=True)
        penalty = mx.array(presence + frequency * counts.astype(np.float32))
        picked = mx.array(ids)
        logits[..., picked] = logits[..., picked] - penalty.astype(logits.dtype)
        return logits

    return process
