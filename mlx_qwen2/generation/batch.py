"""Continuous batching: sequences join and leave a running batch; `batch_generate` for a list of prompts.

The engine keeps a queue of requests, a group in prefill (the waiting prompts that fit in the
batch, left-padded into one pass and fed a chunk per step; prompts with prefix-cache hits go in
groups of their own, each from its cached prefix, see `Engine._hits`) and the running batch, which advances one token per step for every
sequence in it. Each step runs one prefill chunk, then one decode step of the batch (a chunk that
ends a prompt hands its first tokens out first, and the decode step comes with the next call), so a
long prompt delays the others by a chunk at a time, not by its whole length. Sequences whose prompt is
done join the batch (their cache rows merged in, left-padded); a finished or cancelled one leaves
it, and its cache rows go at the next step. Each sequence has its own sampler, processors, stop strings, token budget and
random key. Knows nothing of HTTP or files.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import mlx.core as mx
import numpy as np

from ..backends.cpu.layers import inference, settle
from ..backends.metal import kv_bytes_per_token, wired_limit
from ..cache.batch import BatchKVCache
from ..cache.config import CacheConfig
from ..cache.prefix import PrefixCache
from ..errors import UserError
from ..models import Model
from ..sample import LogitsProcessor, make_logits_processors, make_sampler
from ..tokenizer import Tokenizer
from .settings import GenerationConfig
from .speculative import (
    Adaptive,
    DraftProposer,
    LookupProposer,
    SpeculativeConfig,
    SpeculativeStats,
    check_step,
)
from .step import check_room, next_logits, pick, sampling_key
from .text import TextStream

HIT_SLACK = 16  # cached tokens a prefix-cache hit may give back to be prefilled with others (`Engine._hits`)


@dataclass
class Request:
    """A prompt (token ids) and its own settings; `logits_processors` come after the config's.

    With `logprobs` k (0 or more), each event carries the drawn token's log-probability under the
    model (the log-softmax of its logits, before any processor or sampler) and the k most likely tokens'.
    With `prompt_logprobs` k, the first event also carries the same for every prompt token after the first
    (the prompt is then prefilled alone, without the prefix cache). `config.max_tokens` 0 generates nothing:
    one event, no token, "length" (scoring a prompt).
    """

    prompt: list[int]
    config: GenerationConfig = field(default_factory=GenerationConfig)
    id: Any = None
    logits_processors: list[LogitsProcessor] = field(default_factory=list)
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    # Proposals (lookup, or the engine's draft) while it runs alone; its processors must then be functions
    # of the history they are given (a grammar mask that advances with each call is not).
    speculative: SpeculativeConfig | None = None


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
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None
    speculative: SpeculativeStats | None = None  # the sequence's proposals so far, if it has a proposer
    prompt_logprobs: list[_Scores] | None = None  # on a first event, when asked for: one per prompt token


class _Sequence:
    """A request being served: what is left of its prompt, its cache until it joins, its output so far."""

    def __init__(self, request: Request, tokenizer: Tokenizer, context: int, draft: Model | None, vocab: int):
        check_room(request.prompt, 0, context)
        config = request.config
        self.request, self.id = request, request.id
        self.pending = list(request.prompt)  # prompt tokens not yet through the model
        self.cache: list[Any] | None = None  # a cached prefix of the prompt, from the prefix cache
        self.cached = 0
        self.looked_up = request.prompt_logprobs is not None  # every prompt position goes through the model
        self.prompt_scores: list[_Scores] | None = None if request.prompt_logprobs is None else [(None, None)]
        self.sampler = make_sampler(config.temp, config.top_p, config.top_k, config.min_p)
        self.processors = make_logits_processors(config.repetition_penalty, config.repetition_context_size)
        self.processors += request.logits_processors
        self.key = sampling_key(config.seed)
        self.history = mx.array(request.prompt)
        self.text = TextStream(tokenizer, config.stop, min(config.max_tokens, context - len(request.prompt)))
        self.generated: list[int] = []
        self.last: mx.array | None = None  # the token to feed next, (1,)
        self.greedy = config.temp == 0 and not self.processors  # then the whole batch's argmax serves
        self.sampling = config.sampling
        self.proposer, spec = None, request.speculative
        if spec is not None and spec.prompt_lookup is not None:
            self.proposer = LookupProposer(spec.prompt_lookup)
        elif spec is not None:
            if draft is None:
                raise UserError("this request asks for a draft model's proposals, and none was loaded")
            self.proposer = DraftProposer(draft, vocab, self.sampling, self.processors)
        if self.proposer is not None:
            self.adapt, self.rng = Adaptive(spec.num_draft_tokens), np.random.default_rng(config.seed)
            self.stats = SpeculativeStats()

    def draw(self, logits: mx.array) -> mx.array:
        """The next token (1,) from this sequence's logits (1, vocab)."""
        self.key, sub = mx.random.split(self.key)
        token = pick(logits, self.history, self.processors, self.sampler, sub)
        if self.processors:
            self.history = mx.concatenate([self.history, token])
        return token


class _Prefill:
    """Sequences prefilled together: their prompts left-padded into one token matrix, and one cache."""

    def __init__(self, seqs: list[_Sequence], cache: list[BatchKVCache]):
        width = max(len(s.pending) for s in seqs)
        self.seqs, self.cache = seqs, cache
        self.tokens = mx.array([[0] * (width - len(s.pending)) + s.pending for s in seqs])  # (B, width)
        self.done = 0  # columns already through the model

    @property
    def left(self) -> int:
        return self.tokens.shape[1] - self.done


class Engine:
    """Serve requests in a continuous batch of at most `max_batch` sequences; `step()` advances it."""

    def __init__(
        self,
        model: Model,
        tokenizer: Tokenizer,
        max_batch: int = 8,
        prefill_step_size: int = 512,
        prefix_cache: PrefixCache | None = None,
        draft: Model | None = None,
        cache_config: CacheConfig | None = None,
    ):
        if max_batch < 1:
            raise UserError(f"max-batch must be at least 1, got {max_batch}")
        self.cache_config = cache_config or CacheConfig()
        if prefix_cache is not None and not self.cache_config.plain:
            raise UserError("the prefix cache keeps plain caches only; leave it out with --max-kv-size or --kv-bits.")
        self.model, self.tokenizer = model, tokenizer
        self.max_batch, self.prefill_step_size = max_batch, prefill_step_size
        self.prefix_cache, self.draft = prefix_cache, draft
        self.waiting: deque[_Sequence] = deque()
        self.prefilling: _Prefill | None = None
        self.running: list[_Sequence] = []
        self.batch_cache: list[BatchKVCache] | None = None
        self._cancelled: set[Any] = set()
        self._ids = itertools.count()

    def add(self, request: Request) -> Any:
        """Queue a request; returns its id (the request's, or a new one). UserError for a prompt that cannot fit."""
        if request.speculative is not None and not self.cache_config.plain:
            raise UserError("speculative decoding needs the plain cache; drop --max-kv-size and --kv-bits.")
        if request.id is None:
            request = replace(request, id=next(self._ids))
        args = self.model.args
        self.waiting.append(_Sequence(request, self.tokenizer, args.context_length, self.draft, args.vocab_size))
        return request.id

    def cancel(self, request_id: Any) -> None:
        """Stop a sequence; its cache is freed at the next step."""
        self._cancelled.add(request_id)

    @property
    def busy(self) -> bool:
        return bool(self.waiting or self.prefilling or self.running)

    @property
    def cache_bytes(self) -> int:
        prefill = self.prefilling.cache if self.prefilling else []
        return sum(c.nbytes for c in [*(self.batch_cache or []), *prefill])

    def step(self) -> list[Event]:
        """One prefill chunk (if sequences wait and the batch has room), then one decode step of the batch.

        When the chunk ends a prompt, its first tokens are returned at once and the decode step waits
        for the next call (the same work, the first token sooner).
        """
        self._drop_cancelled()
        events = []
        if self.prefilling is None and self.waiting and len(self.running) < self.max_batch:
            self.prefilling = self._group()
        if self.prefilling is not None:
            events += self._prefill_chunk(self.prefilling)
            if events:  # first tokens: hand them out now, the batch's decode step comes next
                return events
        if self.running:
            events += self._decode()
        return events

    def _fetch(self, seq: _Sequence) -> None:
        """Look the prompt up in the prefix cache (once per sequence)."""
        if self.prefix_cache is not None and not seq.looked_up:
            seq.cached, seq.cache = self.prefix_cache.fetch(seq.pending)
            seq.pending = seq.pending[seq.cached :]
        seq.looked_up = True

    def _group(self) -> _Prefill:
        """The next sequences to prefill together: as many as the batch has room for, all starting from an
        empty cache, or prefix-cache hits (`_hits`)."""
        first = self.waiting.popleft()
        self._fetch(first)
        if first.cache is not None:
            hits = self._hits(first)
            return _Prefill(hits, [BatchKVCache.merge(list(layer)) for layer in zip(*(s.cache for s in hits))])
        group = [first]
        while first.prompt_scores is None and self.waiting and len(self.running) + len(group) < self.max_batch:
            self._fetch(self.waiting[0])
            if self.waiting[0].cache is not None or self.waiting[0].prompt_scores is not None:
                break  # it goes in a group of its own, next
            group.append(self.waiting.popleft())
        width = max(len(s.pending) for s in group)
        pads = [width - len(s.pending) for s in group]
        return _Prefill(group, self.cache_config.make_batch(pads, len(self.model.layers)))

    def _hits(self, first: _Sequence) -> list[_Sequence]:
        """`first`, a prefix-cache hit, and the hits waiting right after it that one pass can prefill with it.

        Rows in a pass take the same number of new tokens (their cached prefixes are left-padded to one
        length, and padding only goes first), so a row with fewer pending tokens than the longest gives
        back its last cached ones, which go through the model again: a sequence joins only while that
        costs every row at most HIT_SLACK tokens, or a quarter of the longest row's. One pass instead of
        one per prompt: the weights are read once, and on the CPU a pass of a few rows costs about as much
        as one of sixteen (requests that share a system prompt arrive together, the server's usual case)."""
        group = [first]
        while self.waiting and len(self.running) + len(group) < self.max_batch:
            seq = self.waiting[0]
            self._fetch(seq)
            if seq.cache is None:
                break  # a miss (or a prompt to score): it starts the next group
            width = max(len(s.pending) for s in (*group, seq))
            if any(width - len(s.pending) > min(s.cached, max(HIT_SLACK, width // 4)) for s in (*group, seq)):
                break
            group.append(self.waiting.popleft())
        width = max(len(s.pending) for s in group)
        for s in group:
            back = width - len(s.pending)
            if back:
                for c in s.cache or []:
                    c.trim(back)
                s.cached -= back
                s.pending = s.request.prompt[s.cached :]
        return group

    @inference()
    def _prefill_chunk(self, group: _Prefill) -> list[Event]:
        step, scored = self.prefill_step_size, group.seqs[0].prompt_scores is not None
        if group.left > step:
            h = self.model.model(group.tokens[:, group.done : group.done + step], group.cache)
            if scored:
                self._score_prompt(group, h, group.done + step + 1)
            group.cache = self.cache_config.maybe_quantize_batch(group.cache)
            mx.eval([c.state for c in group.cache])
            group.done += step
            return []
        h = self.model.model(group.tokens[:, group.done :], group.cache)
        if scored:
            self._score_prompt(group, h[:, :-1], group.tokens.shape[1])
        logits = self.model.head(h[:, -1:, :])[:, 0, :]  # (B, vocab)
        tokens = self._draw(group.seqs, logits)
        self.prefilling = None
        size = len(self.running) + len(group.seqs)
        values = mx.concatenate(tokens).tolist()
        scores = _logprobs(group.seqs, logits, values)
        events = [self._emit(*args, size) for args in zip(group.seqs, values, tokens, scores)]
        if self.prefix_cache is not None:
            for i, seq in enumerate(group.seqs):
                self.prefix_cache.store(seq.request.prompt, [c.row(i) for c in group.cache])
        joining = [i for i, e in enumerate(events) if e.finish_reason is None]
        if joining:
            for c in group.cache:
                c.filter(joining)
            self._join([group.seqs[i] for i in joining], group.cache)
        return events

    def _score_prompt(self, group: _Prefill, h: mx.array, end: int) -> None:
        """Scores of the prompt tokens group.done + 1 .. end - 1 from the hidden states before them (one row)."""
        seq = group.seqs[0]
        targets = group.tokens[0, group.done + 1 : end]
        for start in range(0, targets.size, SCORE_BLOCK):  # the head over a few positions at a time
            logits = self.model.head(h[:, start : start + SCORE_BLOCK])[0]  # (L, vocab)
            seq.prompt_scores += _scores(logits, targets[start : start + SCORE_BLOCK], seq.request.prompt_logprobs)

    def _join(self, seqs: list[_Sequence], cache: list[BatchKVCache]) -> None:
        quantize = self.cache_config.maybe_quantize_batch
        if self.batch_cache is None:
            rows = [None] * len(cache)
        else:  # one kind in a batch: rows joining a quantized batch are quantized first
            rows, cache = self.batch_cache, quantize(cache, force=type(self.batch_cache[0]) is not type(cache[0]))
        self.batch_cache = quantize([type(new).merge([old, new]) for old, new in zip(rows, cache)])
        for seq in seqs:
            seq.cache = None  # its keys and values live in the batch now
        self.running += seqs

    def _draw(self, seqs: list[_Sequence], logits: mx.array) -> list[mx.array]:
        """Each row's next token, (1,) each: one argmax for the whole batch when every row is greedy."""
        if all(seq.greedy for seq in seqs):
            tokens = mx.argmax(logits, axis=-1)
            tokens = [tokens[i : i + 1] for i in range(len(seqs))]
        else:
            tokens = [seq.draw(logits[i : i + 1]) for i, seq in enumerate(seqs)]
        mx.eval(tokens)
        return tokens

    def _decode(self) -> list[Event]:
        if len(self.running) == 1 and self.running[0].proposer is not None and not self.waiting and not self.prefilling:
            return self._speculate(self.running[0])
        inputs = mx.concatenate([seq.last for seq in self.running])[:, None]  # (B, 1)
        logits = next_logits(self.model, inputs, self.batch_cache)  # (B, vocab)
        self.batch_cache = self.cache_config.maybe_quantize_batch(self.batch_cache)
        tokens = self._draw(self.running, logits)
        values = mx.concatenate(tokens).tolist()
        size = len(self.running)
        scores = _logprobs(self.running, logits, values)
        events = [self._emit(*args, size) for args in zip(self.running, values, tokens, scores)]
        self._leave([i for i, e in enumerate(events) if e.finish_reason is not None])
        return events

    def _speculate(self, seq: _Sequence) -> list[Event]:
        """One check of proposals for the only running sequence (speculative decoding, see speculative.py)."""
        history = seq.request.prompt + seq.generated
        new, logits, refused = check_step(
            self.model,
            self.batch_cache,
            seq.proposer,
            seq.adapt,
            history,
            seq.sampling,
            seq.processors,
            seq.rng,
            seq.stats,
        )
        scores = _logprobs([seq] * len(new), logits, new)
        events = []
        for value, score in zip(new, scores):
            events.append(self._emit(seq, value, mx.array([value]), score, 1))
            if events[-1].finish_reason is not None:
                break
        for c in self.batch_cache:  # refused, and kept past the end of the sequence
            c.trim(refused + len(new) - len(events))
        seq.proposer.sync(seq.request.prompt + seq.generated)
        if seq.processors:
            seq.history = mx.array(seq.request.prompt + seq.generated)
        if events[-1].finish_reason is not None:
            self._leave([0])
        return events

    def _emit(self, seq: _Sequence, value: int, token: mx.array, score: _Scores, batch_size: int) -> Event:
        prompt_scores, seq.prompt_scores = seq.prompt_scores, None
        if seq.request.config.max_tokens == 0:  # scoring the prompt only: the drawn token is not given out
            return Event(seq.id, None, "", "length", len(seq.request.prompt), 0, seq.cached, batch_size,
                         prompt_logprobs=prompt_scores)  # fmt: skip
        seq.generated.append(value)
        seq.last = token
        text, finish = seq.text.add(value)
        prompt = len(seq.request.prompt)
        stats = seq.stats if seq.proposer is not None else None
        return Event(
            seq.id,
            value,
            text,
            finish,
            prompt,
            len(seq.generated),
            seq.cached,
            batch_size,
            *score,
            stats,
            prompt_scores,
        )

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
            if not self.busy:
                mx.clear_cache()  # idle: give the freed buffers back
                settle()
            return
        for c in self.batch_cache:
            c.filter(keep)

    def _drop_cancelled(self) -> None:
        if not self._cancelled:
            return
        gone, self._cancelled = self._cancelled, set()
        self.waiting = deque(s for s in self.waiting if s.id not in gone)
        if self.prefilling is not None:
            keep = [i for i, seq in enumerate(self.prefilling.seqs) if seq.id not in gone]
            if not keep:
                self.prefilling = None
            elif len(keep) < len(self.prefilling.seqs):
                group = self.prefilling
                group.seqs, group.tokens = [group.seqs[i] for i in keep], group.tokens[mx.array(keep)]
                for c in group.cache:
                    c.filter(keep, trim=False)  # its columns still line up with the token matrix
        self._leave([i for i, s in enumerate(self.running) if s.id in gone], finished=False)


_Scores = tuple[float | None, list[tuple[int, float]] | None]  # (drawn token's logprob, top ones)
SCORE_BLOCK = 64  # prompt positions whose logits (vocab wide) are computed at once, for prompt_logprobs


def _scores(logits: mx.array, targets: mx.array, k: int) -> list[_Scores]:
    """Each position's log-probability of its target token and its k most likely tokens', best first."""
    logits = logits.astype(mx.float32)
    logp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)  # (L, vocab)
    chosen = mx.take_along_axis(logp, targets[:, None], axis=-1)[:, 0]
    top = mx.argpartition(-logp, k - 1, axis=-1)[:, :k] if k else mx.zeros((logp.shape[0], 0), dtype=mx.int32)
    values = mx.take_along_axis(logp, top, axis=-1)
    order = mx.argsort(-values, axis=-1)
    top, values = mx.take_along_axis(top, order, axis=-1), mx.take_along_axis(values, order, axis=-1)
    return [(c, list(zip(t, v))) for c, t, v in zip(chosen.tolist(), top.tolist(), values.tolist())]


def _logprobs(seqs: list[_Sequence], logits: mx.array, drawn: list[int]) -> list[_Scores]:
    """Log-probabilities for the rows whose request asked for them; (None, None) for the others."""
    rows = [i for i, seq in enumerate(seqs) if seq.request.logprobs is not None]
    scores: list[_Scores] = [(None, None)] * len(seqs)
    if not rows:
        return scores
    picked = logits[mx.array(rows)].astype(mx.float32)
    logp = picked - mx.logsumexp(picked, axis=-1, keepdims=True)  # (R, vocab)
    k = max(seqs[i].request.logprobs for i in rows)
    top = mx.argsort(-logp, axis=-1)[:, :k] if k else mx.zeros((len(rows), 0), dtype=mx.int32)
    chosen = mx.take_along_axis(logp, mx.array([[drawn[i]] for i in rows]), axis=-1)[:, 0]
    top_values = mx.take_along_axis(logp, top, axis=-1)
    chosen, top, top_values = chosen.tolist(), top.tolist(), top_values.tolist()
    for j, i in enumerate(rows):
        n = seqs[i].request.logprobs
        scores[i] = (chosen[j], list(zip(top[j][:n], top_values[j][:n])))
    return scores


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
    cache_config: CacheConfig | None = None,
    **settings: object,
) -> list[BatchResult]:
    """Generate for every prompt (text or token ids), up to `max_batch` at a time; results in prompt order.

    `config` is one for all or one per prompt; `settings` override fields of each
    (max_tokens=..., temp=...). `on_result(index, result)` is called as each one finishes. `cache_config`
    bounds (`max_kv_size`) or quantizes (`kv_bits`) the batch's cache.
    """
    configs = _configs(config, len(prompts), settings)
    step = configs[0].prefill_step_size if configs else 512
    engine = Engine(model, tokenizer, max_batch, step, cache_config=cache_config)
    results: dict[int, BatchResult] = {}
    partial: dict[int, list[Event]] = {i: [] for i in range(len(prompts))}
    for i, (prompt, cfg) in enumerate(zip(prompts, configs)):
        ids = tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if cfg.max_tokens == 0:  # nothing to generate: the prompt is still checked
            check_room(ids, 0, model.args.context_length)
            results[i] = BatchResult("", [], len(ids), 0, "length")
        else:
            engine.add(Request(ids, cfg, id=i))
    planned = sum(len(s.request.prompt) + s.request.config.max_tokens for s in engine.waiting)
    with wired_limit(model, planned * kv_bytes_per_token(model)):
        try:
            _run(engine, results, partial, on_result)
        finally:
            settle()
    return [results[i] for i in range(len(prompts))]


def _run(
    engine: Engine,
    results: dict[int, BatchResult],
    partial: dict[int, list[Event]],
    on_result: Callable[[int, BatchResult], None] | None,
) -> None:
    while engine.busy:
        for event in engine.step():
            partial[event.id].append(event)
            if event.finish_reason is not None:
                results[event.id] = _result(partial.pop(event.id))
                if on_result is not None:
                    on_result(event.id, results[event.id])


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
