"""The model's two generation passes: `prefill` (prompt chunks into the cache) and one decode step.

gpt-fast's shape: small named functions, the natural units to compile. Both the single-stream
generator and the batching engine are built from these. Never prints.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import mlx.core as mx

from ..backends.cpu.layers import inference, prefill_rows
from ..errors import UserError
from ..models import Model
from ..sample import LogitsProcessor, Sampler


@inference()
def prefill(
    model: Model, tokens: mx.array, cache: list[Any], step: int, after: Callable[[list[Any]], None] | None = None
) -> mx.array:
    """Run whole chunks of the prompt through the model, filling the cache; returns the last chunk.

    The last chunk (1 to `step` tokens) goes through the first generation step in one pass, rather
    than all but its last token here and that token alone after: a pass over one token costs about
    as much as a pass over many, so this shortens the time to the first token by one decode step.
    """
    step = prefill_rows(model, step)  # on CPU, shorter passes where the kernels take the products
    while tokens.size > step:
        model.model(tokens[None, :step], cache)  # the backbone only: these logits are not needed
        mx.eval([c.state for c in cache])
        if after is not None:
            after(cache)
        tokens = tokens[step:]
    return tokens


@inference()
def fill(model: Model, tokens: list[int], cache: list[Any], step: int = 512) -> None:
    """Run all of `tokens` through the model into the cache, in chunks; no logits (for a prompt cache)."""
    last = prefill(model, mx.array(tokens), cache, step)
    model.model(last[None], cache)
    mx.eval([c.state for c in cache])


@inference()
def next_logits(model: Model, tokens: mx.array, cache: list[Any]) -> mx.array:
    """Logits (B, vocab) of the position after `tokens` (B, L), the cache extended by them."""
    return model.head(model.model(tokens, cache)[:, -1:, :])[:, 0, :]


def sampling_key(seed: int | None) -> mx.array:
    """The random key a sequence draws its tokens from: from its seed, or a fresh one."""
    return mx.random.key(seed if seed is not None else random.getrandbits(63))


def pick(
    logits: mx.array, history: mx.array, processors: Sequence[LogitsProcessor], sampler: Sampler, key: mx.array
) -> mx.array:
    """One sequence's next token (1,) from its logits (1, vocab): processors, then the sampler."""
    for process in processors:
        logits = process(history, logits)
    return sampler(logits, key=key)


def generate_step(
    prompt: mx.array,
    model: Model,
    cache: list[Any],
    sampler: Sampler,
    logits_processors: Sequence[LogitsProcessor] = (),
    prefill_step_size: int = 512,
    key: mx.array | None = None,
    after: Callable[[list[Any]], None] | None = None,
) -> Iterator[int]:
    """Yield token ids without end; the next token is computed while the current one is handed back.

    Each draw uses its own split of `key` (default: a fresh key), so a seed fixes the whole stream.
    `after(cache)` runs after every pass (to change a cache's kind part-way, for instance).
    """
    history, key = prompt, key if key is not None else sampling_key(None)

    def step(tokens: mx.array) -> mx.array:
        nonlocal history, key
        key, sub = mx.random.split(key)
        token = pick(next_logits(model, tokens[None], cache), history, logits_processors, sampler, sub)
        if logits_processors:
            history = mx.concatenate([history, token])
        if after is not None:
            after(cache)
        return token

    y = step(prefill(model, prompt, cache, prefill_step_size, after))
    mx.async_eval(y)
    while True:
        next_y = step(y)
        mx.async_eval(next_y)
        yield int(y.item())
        y = next_y


def check_room(ids: Sequence[int], cached: int, context: int) -> None:
    """UserError when the prompt (plus what is cached) leaves no room in the model's context."""
    if not ids:
        raise UserError("the prompt is empty")
    if cached + len(ids) >= context:
        raise UserError(
            f"the prompt has {len(ids)} tokens (plus {cached} cached) and the model's context is {context}; "
            "shorten the prompt."
        )
