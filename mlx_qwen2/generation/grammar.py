"""Constrained decoding: a JSON schema or a Lark grammar becomes a logits processor that masks every token
the grammar does not allow next.

Built on llguidance (Microsoft's grammar engine behind Guidance; also used by llama.cpp and vLLM): it
compiles JSON schemas and Lark grammars lazily, computes a token mask in well under a millisecond per
step for a 150k vocabulary, needs no torch, and ships wheels for macOS arm64 and Linux. Knows nothing
of HTTP; the server and the Python API both use it.
"""

from __future__ import annotations

import json
from typing import Any

import llguidance
import mlx.core as mx
import numpy as np

from ..errors import UserError
from ..sample import LogitsProcessor
from ..tokenizer import Tokenizer


class Grammars:
    """Compiles grammars for one tokenizer and model vocabulary (the llguidance tokenizer is built once)."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int):
        eos = sorted(tokenizer.eos_token_ids)
        self.vocab_size = vocab_size
        self._tokenizer = llguidance.LLTokenizer(
            tokenizer.backend_json(), n_vocab=max(vocab_size, tokenizer.vocab_size), eos_token=eos
        )

    def json_schema(self, schema: dict[str, Any] | None) -> str:
        """A grammar for JSON text; `schema` None means any JSON object (OpenAI's `json_object`)."""
        schema = {"type": "object"} if schema is None else schema
        try:
            return llguidance.LLMatcher.grammar_from_json_schema(
                json.dumps(schema), defaults={"whitespace_flexible": False}
            )
        except ValueError as e:
            raise UserError(f"the JSON schema cannot be used: {e}") from e

    def lark(self, source: str) -> str:
        return llguidance.LLMatcher.grammar_from_lark(source)

    def check(self, grammar: str) -> None:
        """UserError when the grammar (or schema) does not compile, with llguidance's reason."""
        error = llguidance.LLMatcher.validate_grammar(grammar, self._tokenizer)
        if error:
            raise UserError(f"the grammar cannot be compiled: {error}")

    def processor(self, grammar: str, start: int) -> LogitsProcessor:
        """A processor for one sequence whose generated tokens begin at position `start` of its history."""
        matcher = llguidance.LLMatcher(self._tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise UserError(f"the grammar cannot be compiled: {matcher.get_error()}")
        return _GrammarMask(matcher, start, self.vocab_size)


class _GrammarMask:
    """Feeds the matcher the tokens drawn since the last call, then masks what it does not allow."""

    def __init__(self, matcher: llguidance.LLMatcher, start: int, vocab_size: int):
        self.matcher, self.seen, self.vocab_size = matcher, start, vocab_size

    def __call__(self, tokens: mx.array, logits: mx.array) -> mx.array:
        if tokens.size > self.seen:
            new = tokens[self.seen :].tolist()
            self.seen = tokens.size
            if not self.matcher.consume_tokens(new):
                # Only a token the mask allowed is ever drawn, so this is a bug, not a user error.
                raise RuntimeError(f"grammar rejected a token it allowed: {self.matcher.get_error()}")
        bits = np.unpackbits(np.frombuffer(self.matcher.compute_bitmask(), dtype=np.uint8), bitorder="little")
        allowed = mx.array(bits[: self.vocab_size].astype(np.bool_))
        return mx.where(allowed, logits, -mx.inf)
