"""Speculative decoding: cheap proposals (a draft model, or n-grams looked up in the text so far) checked by
the target model in one pass, with output exactly the target's.

Greedy: the longest prefix of proposals equal to the target's own argmax is kept, plus the target's
token after it. Sampling: speculative sampling's rule (Leviathan et al. 2023; Chen et al. 2023): a
proposal x drawn from q is kept with probability min(1, p(x) / q(x)); the first one refused is replaced
by a draw from max(0, p - q), renormalised; when all are kept, one more token is drawn from p. p and q
are the distributions the plain sampler draws from (temperature, top-k, top-p, min-p applied to both
sides alike); prompt lookup proposes with q one-hot. So the tokens follow the target's distribution.
After each check the target's cache (and the draft's) is cut back to the kept tokens. Never prints.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
import numpy as np

from ..backends.cpu.layers import inference
from ..cache.kv import KVCache, make_cache
from ..cache.prefix import common_prefix
from ..errors import UserError
from ..models import Model
from ..sample import LogitsProcessor, probabilities
from .step import fill, next_logits


@dataclass
class SpeculativeConfig:
    """How tokens are proposed; the CLI's flags come from these fields."""

    draft_model: str | None = field(
        default=None, metadata={"help": "a small model of the same family that proposes tokens", "type": str}
    )
    num_draft_tokens: int = field(default=4, metadata={"help": "most tokens proposed per step (draft or lookup)"})
    prompt_lookup: int | None = field(
        default=None,
        metadata={"help": "propose what followed the last N tokens where they occurred before (no draft)", "type": int},
    )

    def __post_init__(self) -> None:
        if self.num_draft_tokens < 1:
            raise UserError(f"num-draft-tokens must be at least 1, got {self.num_draft_tokens}")
        if self.prompt_lookup is not None and self.prompt_lookup < 1:
            raise UserError(f"prompt-lookup is an n-gram size: at least 1, got {self.prompt_lookup}")
        if self.prompt_lookup is not None and self.draft_model is not None:
            raise UserError("give a draft model or prompt lookup, not both")

    @property
    def enabled(self) -> bool:
        return self.draft_model is not None or self.prompt_lookup is not None


@dataclass
class SpeculativeStats:
    proposed: int = 0
    accepted: int = 0
    passes: int = 0  # forward passes of the target model (prefill not counted)

    @property
    def acceptance(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0


class Proposer:
    """Proposes up to k tokens after `history`; `q` (k, vocab) is what they were drawn from (None: one-hot)."""

    def propose(self, history: list[int], k: int, rng: np.random.Generator) -> tuple[list[int], np.ndarray | None]:
        raise NotImplementedError

    def sync(self, history: list[int]) -> None:
        """The history after a check (what was kept): drop any state beyond it."""


class LookupProposer(Proposer):
    """Prompt lookup: find the latest earlier occurrence of the last n tokens (n = N down to 1), propose
    what followed it."""

    def __init__(self, ngram: int):
        self.ngram = ngram

    def propose(self, history: list[int], k: int, rng: np.random.Generator) -> tuple[list[int], np.ndarray | None]:
        h = np.asarray(history)
        for n in range(min(self.ngram, len(h) - 1), 0, -1):
            windows = np.lib.stride_tricks.sliding_window_view(h[:-1], n)  # every earlier n-gram
            hits = np.flatnonzero((windows == h[-n:]).all(axis=1))
            if hits.size:
                start = int(hits[-1]) + n
                return h[start : start + k].tolist(), None
        return [], None


class DraftProposer(Proposer):
    """A draft model with its own cache, sampling with the target's settings (greedy for temp 0)."""

    def __init__(self, model: Model, vocab_size: int, sampling: dict[str, Any], processors: Sequence[LogitsProcessor]):
        self.model, self.vocab_size, self.sampling, self.processors = model, vocab_size, sampling, processors
        self.cache = make_cache(len(model.layers))
        self.tokens: list[int] = []  # what the draft's cache holds

    def propose(self, history: list[int], k: int, rng: np.random.Generator) -> tuple[list[int], np.ndarray | None]:
        feed = history[len(self.tokens) :]
        if len(feed) > 1:
            fill(self.model, feed[:-1], self.cache)
            self.tokens += feed[:-1]
        token, out, qs = feed[-1], [], []
        for _ in range(k):
            logits = _fit(next_logits(self.model, mx.array([[token]]), self.cache), self.vocab_size)
            self.tokens.append(token)
            for process in self.processors:
                logits = process(mx.array(history + out), logits)
            if self.sampling["temp"] == 0:
                token = int(mx.argmax(logits, axis=-1).item())
            else:
                q = np.array(probabilities(logits, **self.sampling)[0], dtype=np.float64)
                token = int(rng.choice(q.size, p=q / q.sum()))
                qs.append(q)
            out.append(token)
        return out, np.stack(qs) if qs else None

    def sync(self, history: list[int]) -> None:
        keep = common_prefix(self.tokens, history)
        for c in self.cache:
            c.trim(len(self.tokens) - keep)
        self.tokens = self.tokens[:keep]


def _fit(logits: mx.array, vocab: int) -> mx.array:
    """Draft logits over the target's vocabulary (checkpoints of one family pad their embeddings differently)."""
    width = logits.shape[-1]
    if width >= vocab:
        return logits[..., :vocab]
    return mx.concatenate([logits, mx.full((*logits.shape[:-1], vocab - width), -mx.inf, logits.dtype)], axis=-1)


class Adaptive:
    """How many tokens to propose next: grows by 2 after a fully kept proposal, shrinks by 1 otherwise;
    after 3 proposals in a row with nothing kept, proposals pause, for 2, 4, ... up to 32 steps."""

    def __init__(self, most: int):
        self.most, self.k, self.misses, self.pause, self.wait = most, most, 0, 1, 0

    def next(self) -> int:
        if self.wait:
            self.wait -= 1
            return 0
        return self.k

    def update(self, proposed: int, kept: int) -> None:
        if not proposed:
            return
        self.k = min(self.most, self.k + 2) if kept == proposed else max(1, self.k - 1)
        self.misses = 0 if kept else self.misses + 1
        if kept:
            self.pause = 1
        elif self.misses >= 3:
            self.pause = min(32, self.pause * 2)
            self.wait, self.misses = self.pause, 0


def speculative_generate_step(
    prompt: list[int],
    model: Model,
    cache: list[Any],
    proposer: Proposer,
    sampling: dict[str, Any],
    most: int,
    processors: Sequence[LogitsProcessor] = (),
    prefill_step_size: int = 512,
    seed: int | None = None,
    stats: SpeculativeStats | None = None,
    context: Sequence[int] = (),
) -> Iterator[int]:
    """Yield token ids without end, several per target pass when proposals are kept.

    `sampling` holds temp, top_p, top_k, min_p; `seed` fixes every draw. The cache must be a plain one
    (it is cut back after each check); `stats` counts proposals, kept tokens and target passes.
    `context` is what the cache already holds before `prompt` (the proposers look at it too).
    """
    if any(not isinstance(c, KVCache) for c in cache):
        raise UserError("speculative decoding needs the plain KV cache; leave out --max-kv-size and --kv-bits.")
    stats = stats if stats is not None else SpeculativeStats()
    rng, adapt = np.random.default_rng(seed), Adaptive(most)
    history = list(context) + list(prompt)
    if len(prompt) > 1:
        fill(model, list(prompt[:-1]), cache, prefill_step_size)  # the last prompt token goes with the first check
    while True:
        new, _, refused = check_step(model, cache, proposer, adapt, history, sampling, processors, rng, stats)
        for c in cache:
            c.trim(refused)
        history += new
        proposer.sync(history)
        yield from new


@inference()
def check_step(
    model: Model,
    cache: list[Any],
    proposer: Proposer,
    adapt: Adaptive,
    history: list[int],
    sampling: dict[str, Any],
    processors: Sequence[LogitsProcessor],
    rng: np.random.Generator,
    stats: SpeculativeStats,
) -> tuple[list[int], mx.array, int]:
    """One check: propose after `history` (whose last token is not in `cache` yet), run the model over that
    token and the proposals, keep what passes. Returns the new tokens (kept proposals, then the model's
    own), their rows of logits (len(new), vocab), and how many refused positions the cache now holds."""
    k = adapt.next()
    drafts, q = proposer.propose(history, k, rng) if k else ([], None)
    logits = model.head(model.model(mx.array([history[-1:] + drafts]), cache))[0]  # (k + 1, vocab)
    logits = processed_rows(logits, history, drafts, processors)
    kept, token = check_proposals(logits, drafts, q, sampling, rng)
    stats.passes, stats.proposed, stats.accepted = stats.passes + 1, stats.proposed + len(drafts), stats.accepted + kept
    adapt.update(len(drafts), kept)
    return drafts[:kept] + [token], logits[: kept + 1], len(drafts) - kept


def processed_rows(
    logits: mx.array, history: list[int], drafts: list[int], processors: Sequence[LogitsProcessor]
) -> mx.array:
    """Row i sees the history plus the first i proposals, as plain decoding would have."""
    if not processors:
        return logits
    rows = []
    for i in range(logits.shape[0]):
        row = logits[i : i + 1]
        for process in processors:
            row = process(mx.array(history + drafts[:i]), row)
        rows.append(row)
    return mx.concatenate(rows)


def check_proposals(
    logits: mx.array, drafts: list[int], q: np.ndarray | None, sampling: dict[str, Any], rng: np.random.Generator
) -> tuple[int, int]:
    """(how many proposals are kept, the target's token after them)."""
    if sampling["temp"] == 0:
        best = mx.argmax(logits, axis=-1).tolist()
        kept = 0
        while kept < len(drafts) and drafts[kept] == best[kept]:
            kept += 1
        return kept, best[kept]
    p = np.array(probabilities(logits, **sampling), dtype=np.float64)  # (k + 1, vocab)
    for i, x in enumerate(drafts):
        qx = 1.0 if q is None else q[i, x]
        if rng.random() < min(1.0, p[i, x] / qx):
            continue
        residual = p[i].copy()
        if q is None:
            residual[x] = 0.0
        else:
            residual = np.maximum(residual - q[i], 0.0)
        if residual.sum() <= 0:  # p == q up to rounding: then the proposal is never refused but by rounding
            residual = p[i]
        return i, int(rng.choice(residual.size, p=residual / residual.sum()))
    last = p[len(drafts)]
    return len(drafts), int(rng.choice(last.size, p=last / last.sum()))
