"""From sampled tokens to text: streaming detokenization, stop strings, and why a sequence ends.

Shared by the single-stream generator and the batching engine (and the server after them).
"""

from __future__ import annotations

from collections.abc import Sequence

from ..tokenizer import Tokenizer


class StopMatcher:
    """Finds stop strings in streamed text, holding back a tail that could be the start of one.

    Feed text pieces in order; each call returns the text that is safe to emit and whether a
    stop string was found (the text is then cut before it).
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


class TextStream:
    """One sequence's output: each token in, (text to emit, finish reason or None) out.

    Finishes with "stop" at an end token (which adds no text) or a stop string, and with
    "length" at the `max_tokens`-th token.
    """

    def __init__(self, tokenizer: Tokenizer, stops: Sequence[str], max_tokens: int):
        self.eos = tokenizer.eos_token_ids
        self.detok = tokenizer.detokenizer()
        self.matcher = StopMatcher(stops)
        self.max_tokens = max_tokens
        self.count = 0

    def add(self, token: int) -> tuple[str, str | None]:
        self.count += 1
        finish = "stop" if token in self.eos else "length" if self.count >= self.max_tokens else None
        piece = self.detok.finalize() if finish == "stop" else self.detok.add_token(token)
        if finish == "length":
            piece += self.detok.finalize()
        text, stopped = self.matcher.feed(piece, final=finish is not None)
        return text, "stop" if stopped else finish
