"""Single-stream generation: `stream_generate` (text pieces with statistics) and `generate` (the whole text).

The command line is `python -m mlx_qwen2.generate`; this module never prints.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import mlx.core as mx

from ..backends.cpu.layers import settle
from ..backends.metal import kv_bytes_per_token, wired_limit
from ..cache.config import CacheConfig
from ..errors import UserError
from ..models import Model
from ..sample import Sampler, make_logits_processors, make_sampler
from ..tokenizer import Tokenizer
from .settings import GenerationConfig
from .speculative import DraftProposer, LookupProposer, SpeculativeConfig, SpeculativeStats, speculative_generate_step
from .step import check_room, generate_step, sampling_key
from .text import TextStream


@dataclass
class GenerationResponse:
    """One streamed piece of output with running statistics."""

    text: str
    token: int | None
    prompt_tokens: int
    prompt_tps: float
    generation_tokens: int
    generation_tps: float
    peak_memory: float  # GB, MLX's own counter
    finish_reason: str | None = None  # "stop" (EOS or stop string), "length", or None while running
    cached_tokens: int = 0  # prompt tokens that were already in the cache
    cache_bytes: int = 0  # memory of the KV cache
    batch_size: int = 1  # sequences decoded together at this step
    target_passes: int = 0  # forward passes of the model so far (one per token, fewer with speculative decoding)
    draft_tokens: int = 0  # tokens proposed (speculative decoding)
    accepted_tokens: int = 0  # proposed tokens kept


class _Clock:
    """Prompt and generation speeds of one stream."""

    def __init__(self, prompt_tokens: int):
        self.prompt_tokens, self.tic = prompt_tokens, time.perf_counter()
        self.prompt_tps = self.gen_tic = 0.0

    def first_token(self) -> None:
        self.gen_tic = time.perf_counter()
        self.prompt_tps = self.prompt_tokens / (self.gen_tic - self.tic)

    def generation_tps(self, n: int) -> float:
        elapsed = time.perf_counter() - self.gen_tic
        return (n - 1) / elapsed if n > 1 and elapsed > 0 else 0.0


def stream_generate(
    model: Model,
    tokenizer: Tokenizer,
    prompt: str | Sequence[int],
    cache: list[Any] | None = None,
    config: GenerationConfig | None = None,
    sampler: Sampler | None = None,
    cache_config: CacheConfig | None = None,
    draft: Model | None = None,
    speculative: SpeculativeConfig | None = None,
    history: Sequence[int] = (),
    **settings: object,
) -> Iterator[GenerationResponse]:
    """Generate from a prompt (text or token ids), yielding text pieces with statistics.

    `settings` override fields of `config` (max_tokens=..., temp=..., stop=[...]).
    Pass a `cache` (from `mlx_qwen2.cache`) to keep the conversation between calls;
    the prompt is then only the new tokens. `cache_config` picks the kind of a new cache
    (rotating, quantized) and quantizes a float one part-way when it says so. A `draft` model
    (same tokenizer) or `speculative.prompt_lookup` turns on speculative decoding: the same tokens
    (greedy) or the same distribution (sampling), fewer passes of the model; `history` (the tokens
    already in `cache`) is what the proposals may draw on besides the prompt.
    """
    config = dataclasses.replace(config or GenerationConfig(), **settings)
    ids = tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
    cache_config = cache_config or CacheConfig()
    cache = cache if cache is not None else cache_config.make(len(model.layers))
    context, cached = model.args.context_length, cache[0].offset
    check_room(ids, cached, context)
    max_tokens = min(config.max_tokens, context - cached - len(ids))
    given_sampler, sampler = sampler, sampler or make_sampler(config.temp, config.top_p, config.top_k, config.min_p)
    processors = make_logits_processors(config.repetition_penalty, config.repetition_context_size)
    text, clock = TextStream(tokenizer, config.stop, max_tokens), _Clock(len(ids))
    stats = None
    if draft is not None or (speculative is not None and speculative.enabled):
        if given_sampler is not None:
            raise UserError("speculative decoding needs the sampler's settings, not a custom sampler")
        stats, spec = SpeculativeStats(), speculative or SpeculativeConfig()
        sampling = config.sampling
        if spec.prompt_lookup is not None:
            proposer = LookupProposer(spec.prompt_lookup)
        elif draft is not None:
            proposer = DraftProposer(draft, model.args.vocab_size, sampling, processors)
        else:
            raise UserError("speculative decoding needs a draft model (draft=...) or prompt lookup")
        tokens = speculative_generate_step(
            ids,
            model,
            cache,
            proposer,
            sampling,
            spec.num_draft_tokens,
            processors,
            config.prefill_step_size,
            config.seed,
            stats,
        )
    else:
        key = sampling_key(config.seed)
        after = cache_config.maybe_quantize if cache_config.kv_bits is not None else None
        tokens = generate_step(mx.array(ids), model, cache, sampler, processors, config.prefill_step_size, key, after)
    with wired_limit(model, (cached + len(ids) + max_tokens) * kv_bytes_per_token(model)):
        try:
            yield from _responses(tokens, max_tokens, text, clock, ids, cached, cache, stats)
        finally:
            settle()


def _responses(
    tokens: Iterator[int],
    max_tokens: int,
    text: TextStream,
    clock: _Clock,
    ids: list[int],
    cached: int,
    cache: list,
    stats: SpeculativeStats | None = None,
) -> Iterator[GenerationResponse]:
    for n, token in enumerate(tokens if max_tokens > 0 else (), start=1):
        if n == 1:
            clock.first_token()
        piece, finish = text.add(token)
        yield GenerationResponse(
            text=piece,
            token=token,
            prompt_tokens=len(ids),
            prompt_tps=clock.prompt_tps,
            generation_tokens=n,
            generation_tps=clock.generation_tps(n),
            peak_memory=mx.get_peak_memory() / 1e9,
            finish_reason=finish,
            cached_tokens=cached,
            cache_bytes=sum(c.nbytes for c in cache),
            target_passes=stats.passes if stats else n,
            draft_tokens=stats.proposed if stats else 0,
            accepted_tokens=stats.accepted if stats else 0,
        )
        if finish:
            break
    tokens.close()


def generate(model: Model, tokenizer: Tokenizer, prompt: str | Sequence[int], **settings: object) -> str:
    """Generate and return the whole text."""
    return "".join(r.text for r in stream_generate(model, tokenizer, prompt, **settings))
