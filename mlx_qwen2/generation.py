"""Token generation: `prefill`, `generate_step`, `stream_generate`, `generate`, and the stop-string matcher.

The command line is `python -m mlx_qwen2.generate` (generate.py); this module never prints.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import mlx.core as mx

from .cache import KVCache, make_cache
from .errors import UserError
from .model import Model
from .sample import LogitsProcessor, Sampler, make_logits_processors, make_sampler, validate_sampling
from .tokenizer import Tokenizer


@dataclass
class GenerationConfig:
    """Generation settings; the CLI's flags and defaults come from these fields."""

    max_tokens: int = field(default=256, metadata={"help": "most tokens to generate", "aliases": ("-m",)})
    temp: float = field(default=0.0, metadata={"help": "sampling temperature; 0 is greedy"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling mass; 1 disables"})
    top_k: int = field(default=0, metadata={"help": "sample among the k most likely tokens; 0 disables"})
    min_p: float = field(default=0.0, metadata={"help": "drop tokens below min-p x the top probability; 0 disables"})
    repetition_penalty: float = field(default=1.0, metadata={"help": "penalty for recent tokens; 1 disables"})
    repetition_context_size: int = field(default=20, metadata={"help": "how many recent tokens are penalised"})
    seed: int | None = field(default=None, metadata={"help": "random seed for sampling", "type": int})
    stop: list[str] = field(default_factory=list, metadata={"help": "stop at this string (repeatable)"})
    prefill_step_size: int = field(default=512, metadata={"help": "prompt tokens processed per chunk"})

    def __post_init__(self) -> None:
        validate_sampling(self.temp, self.top_p, self.top_k, self.min_p, self.repetition_penalty)
        if self.max_tokens < 0:
            raise UserError(f"max-tokens must be >= 0, got {self.max_tokens}")
        if self.prefill_step_size < 1:
            raise UserError(f"prefill-step-size must be >= 1, got {self.prefill_step_size}")


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


def prefill(model: Model, tokens: mx.array, cache: list[KVCache], step: int) -> mx.array:
    """Run whole chunks of the prompt through the model, filling the cache; returns the last chunk.

    The last chunk (1 to `step` tokens) goes through the first generation step in one pass, rather
    than all but its last token here and that token alone after: a pass over one token costs about
    as much as a pass over many, so this shortens the time to the first token by one decode step.
    """
    while tokens.size > step:
        model.model(tokens[None, :step], cache)  # the backbone only: these logits are not needed
        mx.eval([c.keys for c in cache])
        tokens = tokens[step:]
    return tokens


def generate_step(
    prompt: mx.array,
    model: Model,
    cache: list[KVCache],
    sampler: Sampler,
    logits_processors: Sequence[LogitsProcessor] = (),
    prefill_step_size: int = 512,
) -> Iterator[int]:
    """Yield token ids without end; the next token is computed while the current one is handed back."""
    history = prompt

    def step(tokens: mx.array) -> mx.array:
        nonlocal history
        logits = model.head(model.model(tokens[None], cache)[:, -1:, :])[:, 0, :]  # (1, vocab)
        for process in logits_processors:
            logits = process(history, logits)
        token = sampler(logits)
        if logits_processors:
            history = mx.concatenate([history, token])
        return token

    y = step(prefill(model, prompt, cache, prefill_step_size))
    mx.async_eval(y)
    while True:
        next_y = step(y)
        mx.async_eval(next_y)
        yield int(y.item())
        y = next_y


class StopMatcher:
    """Finds stop strings in streamed text, holding back a tail that could be the start of one.

    Feed text pieces in order; each call returns the text that is safe to emit and whether a
    stop string was found (the text is then cut before it). The server reuses this.
    """

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self.pending = ""

    def feed(self, text: str, final: bool = False) -> tuple[str, bool]:
        """(text to emit, stopped); with `final`, nothing more follows, so nothing is held back."""
        self.pending += text
        hit = min((i for s in self.stops if (i := self.pending.find(s)) >= 0), default=-1)
        if hit >= 0:
            out, self.pending = self.pending[:hit], ""
            return out, True
        keep = 0 if final else held_back(self.pending, self.stops)
        out, self.pending = self.pending[: len(self.pending) - keep], self.pending[len(self.pending) - keep :]
        return out, False


def held_back(text: str, stops: Sequence[str]) -> int:
    """Length of the longest tail of `text` that could begin a stop string."""
    longest = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), longest, -1):
            if text.endswith(s[:k]):
                longest = k
                break
    return longest


def check_room(ids: list[int], cache: list[KVCache], context: int) -> None:
    """UserError when the prompt (plus what is cached) leaves no room in the model's context."""
    if not ids:
        raise UserError("the prompt is empty")
    if cache[0].offset + len(ids) >= context:
        raise UserError(
            f"the prompt has {len(ids)} tokens (plus {cache[0].offset} cached) and the model's context is {context}; "
            "shorten the prompt."
        )


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
    cache: list[KVCache] | None = None,
    config: GenerationConfig | None = None,
    sampler: Sampler | None = None,
    **settings: object,
) -> Iterator[GenerationResponse]:
    """Generate from a prompt (text or token ids), yielding text pieces with statistics.

    `settings` override fields of `config` (max_tokens=..., temp=..., stop=[...]).
    Pass a `cache` from `make_cache` to keep the conversation between calls;
    the prompt is then only the new tokens.
    """
    config = dataclasses.replace(config or GenerationConfig(), **settings)
    ids = tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
    cache = cache if cache is not None else make_cache(len(model.layers))
    context = model.args.context_length
    check_room(ids, cache, context)
    max_tokens = min(config.max_tokens, context - cache[0].offset - len(ids))
    if config.seed is not None:
        mx.random.seed(config.seed)
    sampler = sampler or make_sampler(config.temp, config.top_p, config.top_k, config.min_p)
    processors = make_logits_processors(config.repetition_penalty, config.repetition_context_size)
    detok, stops, clock = tokenizer.detokenizer(), StopMatcher(config.stop), _Clock(len(ids))
    tokens = generate_step(mx.array(ids), model, cache, sampler, processors, config.prefill_step_size)
    for n, token in enumerate(tokens if max_tokens > 0 else (), start=1):
        if n == 1:
            clock.first_token()
        finish = "stop" if token in tokenizer.eos_token_ids else "length" if n == max_tokens else None
        piece = detok.finalize() if finish == "stop" else detok.add_token(token)
        if finish == "length":
            piece += detok.finalize()
        text, stopped = stops.feed(piece, final=finish is not None)
        finish = "stop" if stopped else finish
        yield GenerationResponse(
            text=text,
            token=token,
            prompt_tokens=len(ids),
            prompt_tps=clock.prompt_tps,
            generation_tokens=n,
            generation_tps=clock.generation_tps(n),
            peak_memory=mx.get_peak_memory() / 1e9,
            finish_reason=finish,
        )
        if finish:
            break
    tokens.close()


def generate(model: Model, tokenizer: Tokenizer, prompt: str | Sequence[int], **settings: object) -> str:
    """Generate and return the whole text."""
    return "".join(r.text for r in stream_generate(model, tokenizer, prompt, **settings))
