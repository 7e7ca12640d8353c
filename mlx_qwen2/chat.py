"""Interactive multi-turn chat that keeps the KV cache between turns.

python -m mlx_qwen2.chat --model Qwen/Qwen2-0.5B-Instruct [--draft-model D | --prompt-lookup 3]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlx.core as mx

from .cache.config import CacheConfig
from .cache.files import load_prompt_cache, model_fingerprint, tokenizer_fingerprint
from .cache.prefix import PrefixCache, common_prefix
from .cli import (
    add_dataclass_args,
    add_parallel_flag,
    blas_hint,
    from_args,
    join_group,
    only_rank_zero_prints,
    report_errors,
)
from .errors import UserError
from .generation import GenerationConfig, GenerationResponse, stream_generate
from .generation.speculative import SpeculativeConfig
from .loader import DTYPES, load, load_draft, resolve_path
from .models import Model
from .parallel import barrier, common_seed, share_json
from .tokenizer import Tokenizer


class ChatSession:
    """A conversation whose cache holds every token seen so far, so a turn costs only its new tokens.

    Finished turns also go to a prefix cache (LRU, in memory): a conversation started again with
    the same beginning (after `reset()`, or one loaded from a prompt-cache file) prefills only
    what is new.
    """

    def __init__(
        self,
        model: Model,
        tokenizer: Tokenizer,
        system: str | None = None,
        prefix_cache: PrefixCache | None = None,
        cache_config: CacheConfig | None = None,
        draft: Model | None = None,
        speculative: SpeculativeConfig | None = None,
    ):
        if not tokenizer.chat_template:
            raise UserError("this model has no chat template; use `python -m mlx_qwen2.generate` instead.")
        self.model, self.tokenizer = model, tokenizer
        self.system = system
        self.cache_config = cache_config or CacheConfig()
        self.draft, self.speculative = draft, speculative
        self.prefix_cache = prefix_cache if prefix_cache is not None else PrefixCache()
        self.reset()

    def reset(self) -> None:
        self.messages: list[dict[str, str]] = [{"role": "system", "content": self.system}] if self.system else []
        self.cache: list[Any] = self.cache_config.make(len(self.model.layers))
        self.cached: list[int] = []  # the tokens whose keys/values are in the cache

    def _reuse(self, ids: list[int]) -> int:
        """Point the cache at the longest known prefix of `ids` (own cache or prefix cache); returns its length."""
        own = min(common_prefix(self.cached, ids), len(ids) - 1)  # at least one token must go through the model
        stored, caches = self.prefix_cache.fetch(ids)
        if stored > own:
            self.cache, self.cached = caches, ids[:stored]
            return stored
        for c in self.cache:
            c.trim(c.offset - own)
        return own

    def send(self, text: str, config: GenerationConfig | None = None) -> Iterator[GenerationResponse]:
        """Add a user turn and stream the assistant's reply."""
        self.messages.append({"role": "user", "content": text})
        ids = self.tokenizer.apply_chat_template(self.messages, add_generation_prompt=True)
        reuse = self._reuse(ids)
        reply, generated = "", []
        stream = stream_generate(
            self.model,
            self.tokenizer,
            ids[reuse:],
            cache=self.cache,
            config=config,
            cache_config=self.cache_config,
            draft=self.draft,
            speculative=self.speculative,
            history=ids[:reuse],
        )
        for r in stream:
            reply += r.text
            generated.append(r.token)
            yield dataclasses.replace(r, cached_tokens=reuse)
        # The cache holds a prefix of prompt + reply: the decode loop may already
        # have fed the last token, or not, depending on why it stopped.
        self.cached = (ids + generated)[: self.cache[0].offset]
        self.prefix_cache.store(self.cached, self.cache)
        self.messages.append({"role": "assistant", "content": reply})


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mlx_qwen2.chat", description="Chat with a Qwen2 instruct model.")
    p.add_argument("--model", required=True, help="local model folder or Hugging Face hub id")
    p.add_argument("--system", default=None, help="system message")
    p.add_argument("--dtype", choices=list(DTYPES), default=None, help="compute dtype")
    p.add_argument("--adapter-path", default=None, help="LoRA/DoRA adapters to apply")
    p.add_argument("--prompt-cache-file", default=None, help="a cache from `mlx_qwen2.cache_prompt --system ...`")
    add_parallel_flag(p)
    add_dataclass_args(p, GenerationConfig, skip=("stop",))
    add_dataclass_args(p, CacheConfig)
    add_dataclass_args(p, SpeculativeConfig)
    return p


@report_errors
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    config, cache_config = from_args(GenerationConfig, args), from_args(CacheConfig, args)
    speculative = from_args(SpeculativeConfig, args)
    if speculative.enabled and not cache_config.plain:
        raise UserError("speculative decoding needs the plain cache; drop --max-kv-size and --kv-bits.")
    group = join_group()
    if group is not None:
        used = [flag for flag, on in (("--prompt-cache-file", args.prompt_cache_file),
                ("--draft-model", speculative.draft_model)) if on]  # fmt: skip
        if used:
            raise UserError(f"{', '.join(used)} cannot be used across ranks (mlx.launch).")
        config.seed = common_seed(group, config.seed)  # every rank samples the same tokens
        if group.rank() != 0:
            drain_stdin()
    with only_rank_zero_prints(group):
        code = chat(args, config, cache_config, speculative, group)
    if group is not None:
        barrier(group)  # the ranks leave together
    return code


def chat(
    args: argparse.Namespace,
    config: GenerationConfig,
    cache_config: CacheConfig,
    speculative: SpeculativeConfig,
    group: mx.distributed.Group | None,
) -> int:
    blas_hint()
    folder = resolve_path(args.model)
    model, tokenizer = load(
        folder, dtype=args.dtype, adapter_path=args.adapter_path, group=group, parallel=args.parallel
    )
    draft = load_draft(speculative.draft_model, tokenizer, args.dtype)
    prefix = PrefixCache()
    if args.prompt_cache_file:  # its tokens start the conversation: the session finds them as a prefix
        fingerprints = model_fingerprint(folder, args.adapter_path, args.dtype), tokenizer_fingerprint(folder)
        cache, tokens = load_prompt_cache(Path(args.prompt_cache_file), *fingerprints)
        prefix.store(tokens, cache)
    session = ChatSession(model, tokenizer, args.system, prefix, cache_config, draft, speculative)
    if group is not None:  # mlx.launch passes typed lines on but never an end of input
        print("Type a message; '/reset' starts over, '/quit' ends.", file=sys.stderr)
    elif sys.stdin.isatty():
        print("Type a message; '/reset' starts over, '/quit' or Ctrl-D ends.", file=sys.stderr)
    while True:
        text = read_turn(group)
        if text is None or text.strip() == "/quit":
            return 0
        if text.strip() == "/reset":
            session.reset()
            continue
        for r in session.send(text, config):
            print(r.text, end="", flush=True)
        print()


def read_turn(group: mx.distributed.Group | None) -> str | None:
    """The user's next line (None at the end of input), read by rank 0 and sent to every rank."""
    text = None
    if group is None or group.rank() == 0:
        try:
            text = input(">> ")
        except EOFError:
            print(file=sys.stderr)
    return text if group is None else share_json(group, text)


def drain_stdin() -> None:
    """Read and drop what mlx.launch copies to this rank's stdin (rank 0 reads for all): a full pipe
    would stop the launcher passing input on."""

    def drop() -> None:  # the raw descriptor: a thread blocked in sys.stdin's buffer would stop the exit
        with contextlib.suppress(OSError):
            while os.read(0, 65536):
                pass

    threading.Thread(target=drop, daemon=True).start()


if __name__ == "__main__":
    sys.exit(main())
