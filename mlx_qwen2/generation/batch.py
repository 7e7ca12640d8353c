"""Continuous batching: sequences join and leave a running batch; `batch_generate` for a list of prompts.

The engine keeps a queue of requests, one sequence at a time in prefill (a chunk per step) and
the running batch, which advances one token per step for every sequence in it. Each step runs
one prefill chunk, then one decode step of the batch, so a long prompt delays the others by a
chunk at a time, not by its whole length. A sequence whose prompt is done joins the batch
(its cache merged in, left-padded); a finished or cancelled one leaves it, and its cache rows go
at the next step. Each sequence has its own sampler, processors, stop strings, token budget and
random key. Knows nothing of HTTP or files.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import mlx.core as mx

from ..cache import make_cache
from ..cache.batch import BatchKVCache
from ..cache.prefix import PrefixCache
from ..errors import UserError
from ..model import Model
from ..sample import LogitsProcessor, make_logits_processors, make_sampler
from ..tokenizer import Tokenizer
from .settings import GenerationConfig
from .step import check_room, next_logits, pick, sampling_key
from .text import TextStream


@dataclass
class Request:
    """A prompt (token ids) and its own settings; `logits_processors` come after the config's."""

    prompt: list[int]
    config: GenerationConfig = field(default_factory=GenerationConfig)
    id: Any = None
    logits_processors: list[LogitsProcessor] = field(default_factory=list)


@dataclass
class Event:
    """One new token of one sequence (or its end)."""

    id: Any
    token: int | None
    text: str
    finish_reason: str | None
    prompt_tokens: int
    generation_tokens: int
    cached_tokens: int
    batch_size: int


class _Sequence:
    """A request being served: what is left of its prompt, its cache until it joins, its output so far."""

    def __init__(self, request: Request, tokenizer: Tokenizer, context: int):
        check_room(request.prompt, 0, context)
        config = request.config
        self.request, self.id = request, request.id
        self.pending = list(request.prompt)  # prompt tokens not yet through the model
        self.cache: list[Any] | None = None
        self.cached = 0
        self.sampler = make_sampler(config.temp, config.top_p, config.top_k, config.min_p)
        self.processors = make_logits_processors(config.repetition_penalty, config.repetition_context_size)
        self.processors += request.logits_processors
        self.key = sampling_key(config.seed)
        self.history = mx.array(request.prompt)
        self.text = TextStream(tokenizer, config.stop, min(config.max_tokens, context - len(request.prompt)))
        self.generated: list[int] = []
        self.last: mx.array | None = None  # the token to feed next, (1,)

    def draw(self, logits: mx.array) -> mx.array:
        """The next token (1,) from this sequence's logits (1, vocab)."""
        self.key, sub = mx.random.split(self.key)
        token = pick(logits, self.history, self.processors, self.sampler, sub)
        if self.processors:
            self.history = mx.concatenate([self.history, token])
        return token


class Engine:
    """Serve requests in a continuous batch of at most `max_batch` sequences; `step()` advances it."""

    def __init__(
        self,
        model: Model,
        tokenizer: Tokenizer,
        max_batch: int = 8,
        prefill_step_size: int = 512,
        prefix_cache: PrefixCache | None = None,
        make_layer_caches: Callable[[], list[Any]] | None = None,
    ):
        if max_batch < 1:
            raise UserError(f"max-batch must be at least 1, got {max_batch}")
        self.model, self.tokenizer = model, tokenizer
        self.max_batch, self.prefill_step_size = max_batch, prefill_step_size
        self.prefix_cache = prefix_cache
        self.make_layer_caches = make_layer_caches or (lambda: make_cache(len(model.layers)))
        self.waiting: deque[_Sequence] = deque()
        self.prefilling: _Sequence | None = None
        self.running: list[_Sequence] = []
        self.batch_cache: list[BatchKVCache] | None = None
        self._cancelled: set[Any] = set()
        self._ids = itertools.count()

    def add(self, request: Request) -> Any:
        """Queue a request; returns its id (the request's, or a new one). UserError for a prompt that cannot fit."""
        if request.id is None:
            request = replace(request, id=next(self._ids))
        self.waiting.append(_Sequence(request, self.tokenizer, self.model.args.context_length))
        return request.id

    def cancel(self, request_id: Any) -> None:
        """Stop a sequence; its cache is freed at the next step."""
        self._cancelled.add(request_id)

    @property
    def busy(self) -> bool:
        return bool(self.waiting or self.prefilling or self.running)

    @property
    def cache_bytes(self) -> int:
        single = self.prefilling.cache if self.prefilling and self.prefilling.cache else []
        return sum(c.nbytes for c in [*(self.batch_cache or []), *single])

    def step(self) -> list[Event]:
        """One prefill chunk (if a sequence waits and the batch has room), then one decode step of the batch."""
        self._drop_cancelled()
        events = []
        if self.prefilling is None and self.waiting and len(self.running) < self.max_batch:
            self.prefilling = self.waiting.popleft()
            self._start(self.prefilling)
        if self.prefilling is not None:
            events += self._prefill_chunk(self.prefilling)
        if self.running:
            events += self._decode()
        return events

    def _start(self, seq: _Sequence) -> None:
        if self.prefix_cache is not None:
            seq.cached, seq.cache = self.prefix_cache.fetch(seq.pending)
        if seq.cache is None:
            seq.cache, seq.cached = self.make_layer_caches(), 0
        seq.pending = seq.pending[seq.cached :]

    def _prefill_chunk(self, seq: _Sequence) -> list[Event]:
        step = self.prefill_step_size
        if len(seq.pending) > step:
            self.model.model(mx.array([seq.pending[:step]]), seq.cache)
            mx.eval([c.state for c in seq.cache])
            seq.pending = seq.pending[step:]
            return []
        token = seq.draw(next_logits(self.model, mx.array([seq.pending]), seq.cache))
        mx.eval(token)
        seq.pending = []
        if self.prefix_cache is not None:
            self.prefix_cache.store(seq.request.prompt, seq.cache)
        self.prefilling = None
        event = self._emit(seq, token, batch_size=len(self.running) + 1)
        if event.finish_reason is None:
            self._join(seq)
        return [event]

    def _join(self, seq: _Sequence) -> None:
        rows = [None] * len(seq.cache) if self.batch_cache is None else self.batch_cache
        self.batch_cache = [BatchKVCache.merge([old, new]) for old, new in zip(rows, seq.cache)]
        seq.cache = None  # its keys and values live in the batch now
        self.running.append(seq)

    def _decode(self) -> list[Event]:
        inputs = mx.concatenate([seq.last for seq in self.running])[:, None]  # (B, 1)
        logits = next_logits(self.model, inputs, self.batch_cache)  # (B, vocab)
        tokens = [seq.draw(logits[i : i + 1]) for i, seq in enumerate(self.running)]
        mx.eval(tokens)
        size = len(self.running)
        events = [self._emit(seq, token, size) for seq, token in zip(self.running, tokens)]
        self._leave([i for i, e in enumerate(events) if e.finish_reason is not None])
        return events

    def _emit(self, seq: _Sequence, token: mx.array, batch_size: int) -> Event:
        value = int(token.item())
        seq.generated.append(value)
        seq.last = token
        text, finish = seq.text.add(value)
        prompt = len(seq.request.prompt)
        return Event(seq.id, value, text, finish, prompt, len(seq.generated), seq.cached, batch_size)

    def _leave(self, rows: list[int], finished: bool = True) -> None:
        """Take these rows out of the batch; finished ones first go to the prefix cache, if there is one."""
        if not rows:
            return
        if finished and self.prefix_cache is not None:
            for i in rows:  # the conversation so far, for a next turn that repeats it
                seq = self.running[i]
                held = seq.request.prompt + seq.generated[:-1]  # the last token was never fed
                self.prefix_cache.store(held, [c.row(i) for c in self.batch_cache])
        keep = [i for i in range(len(self.running)) if i not in set(rows)]
        self.running = [self.running[i] for i in keep]
        if not keep:
            self.batch_cache = None
            return
        for c in self.batch_cache:
            c.filter(keep)

    def _drop_cancelled(self) -> None:
        if not self._cancelled:
            return
        gone, self._cancelled = self._cancelled, set()
        self.waiting = deque(s for s in self.waiting if s.id not in gone)
        if self.prefilling is not None and self.prefilling.id in gone:
            self.prefilling = None
        self._leave([i for i, s in enumerate(self.running) if s.id in gone], finished=False)


@dataclass
class BatchResult:
    """What one prompt of `batch_generate` produced."""

    text: str
    tokens: list[int]
    prompt_tokens: int
    generation_tokens: int
    finish_reason: str | None
    cached_tokens: int = 0


def batch_generate(
    model: Model,
    tokenizer: Tokenizer,
    prompts: Sequence[str | Sequence[int]],
    config: GenerationConfig | Sequence[GenerationConfig] | None = None,
    max_batch: int = 8,
    on_result: Callable[[int, BatchResult], None] | None = None,
    **settings: object,
) -> list[BatchResult]:
    """Generate for every prompt (text or token ids), up to `max_batch` at a time; results in prompt order.

    `config` is one for all or one per prompt; `settings` override fields of each
    (max_tokens=..., temp=...). `on_result(index, result)` is called as each one finishes.
    """
    configs = _configs(config, len(prompts), settings)
    engine = Engine(model, tokenizer, max_batch, configs[0].prefill_step_size if configs else 512)
    results: dict[int, BatchResult] = {}
    partial: dict[int, list[Event]] = {i: [] for i in range(len(prompts))}
    for i, (prompt, cfg) in enumerate(zip(prompts, configs)):
        ids = tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if cfg.max_tokens == 0:  # nothing to generate: the prompt is still checked
            check_room(ids, 0, model.args.context_length)
            results[i] = BatchResult("", [], len(ids), 0, "length")
        else:
            engine.add(Request(ids, cfg, id=i))
    while engine.busy:
        for event in engine.step():
            partial[event.id].append(event)
            if event.finish_reason is not None:
                results[event.id] = _result(partial.pop(event.id))
                if on_result is not None:
                    on_result(event.id, results[event.id])
    return [results[i] for i in range(len(prompts))]


def _configs(config: Any, n: int, settings: dict[str, object]) -> list[GenerationConfig]:
    if config is None or isinstance(config, GenerationConfig):
        config = [config or GenerationConfig()] * n
    if len(config) != n:
        raise UserError(f"{len(config)} configs for {n} prompts; give one, or one per prompt.")
    return [replace(c, **settings) for c in config]


def _result(events: Iterable[Event]) -> BatchResult:
    events = list(events)
    last = events[-1]
    tokens = [e.token for e in events if e.token is not None]
    text = "".join(e.text for e in events)
    return BatchResult(text, tokens, last.prompt_tokens, last.generation_tokens, last.finish_reason, last.cached_tokens)
