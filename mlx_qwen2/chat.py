"""Interactive multi-turn chat that keeps the KV cache between turns.

python -m mlx_qwen2.chat --model Qwen/Qwen2-0.5B-Instruct
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator

from .cache import KVCache, make_cache
from .cli import add_dataclass_args, blas_hint, from_args, report_errors
from .errors import UserError
from .generation import GenerationConfig, GenerationResponse, stream_generate
from .loader import DTYPES, load
from .model import Model
from .tokenizer import Tokenizer


class ChatSession:
    """A conversation whose cache holds every token seen so far, so a turn costs only its new tokens."""

    def __init__(self, model: Model, tokenizer: Tokenizer, system: str | None = None):
        if not tokenizer.chat_template:
            raise UserError("this model has no chat template; use `python -m mlx_qwen2.generate` instead.")
        self.model, self.tokenizer = model, tokenizer
        self.system = system
        self.reset()

    def reset(self) -> None:
        self.messages: list[dict[str, str]] = [{"role": "system", "content": self.system}] if self.system else []
        self.cache: list[KVCache] = make_cache(len(self.model.layers))
        self.cached: list[int] = []  # the tokens whose keys/values are in the cache

    def send(self, text: str, config: GenerationConfig | None = None) -> Iterator[GenerationResponse]:
        """Add a user turn and stream the assistant's reply."""
        self.messages.append({"role": "user", "content": text})
        ids = self.tokenizer.apply_chat_template(self.messages, add_generation_prompt=True)
        reuse = _common_prefix(self.cached, ids)
        reuse = min(reuse, len(ids) - 1)  # at least one token must go through the model
        for c in self.cache:
            c.trim(c.offset - reuse)
        reply, generated = "", []
        for r in stream_generate(self.model, self.tokenizer, ids[reuse:], cache=self.cache, config=config):
            reply += r.text
            generated.append(r.token)
            yield r
        # The cache holds a prefix of prompt + reply: the decode loop may already
        # have fed the last token, or not, depending on why it stopped.
        self.cached = (ids + generated)[: self.cache[0].offset]
        self.messages.append({"role": "assistant", "content": reply})


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mlx_qwen2.chat", description="Chat with a Qwen2 instruct model.")
    p.add_argument("--model", required=True, help="local model folder or Hugging Face hub id")
    p.add_argument("--system", default=None, help="system message")
    p.add_argument("--dtype", choices=list(DTYPES), default=None, help="compute dtype")
    add_dataclass_args(p, GenerationConfig, skip=("stop",))
    return p


@report_errors
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    config = from_args(GenerationConfig, args)
    blas_hint()
    model, tokenizer = load(args.model, dtype=args.dtype)
    session = ChatSession(model, tokenizer, args.system)
    if sys.stdin.isatty():
        print("Type a message; '/reset' starts over, '/quit' or Ctrl-D ends.", file=sys.stderr)
    while True:
        try:
            text = input(">> ")
        except EOFError:
            print(file=sys.stderr)
            return 0
        if text.strip() == "/quit":
            return 0
        if text.strip() == "/reset":
            session.reset()
            continue
        for r in session.send(text, config):
            print(r.text, end="", flush=True)
        print()


if __name__ == "__main__":
    sys.exit(main())
