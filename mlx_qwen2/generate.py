"""`python -m mlx_qwen2.generate`: stream a completion to stdout, statistics to stderr; or a file of prompts.

python -m mlx_qwen2.generate --model Qwen/Qwen2-0.5B-Instruct --prompt "Hello"
python -m mlx_qwen2.generate --model M --prompts-file in.jsonl --output out.jsonl [--max-batch 8]
python -m mlx_qwen2.generate --model M --prompt P --draft-model D [--num-draft-tokens 4]   # or --prompt-lookup 3
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import mlx.core as mx

from .backends.cpu import blas
from .cache.config import CacheConfig
from .cache.files import load_prompt_cache, model_fingerprint, tokenizer_fingerprint
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
from .generation import BatchResult, GenerationConfig, GenerationResponse, batch_generate, stream_generate
from .generation.speculative import SpeculativeConfig
from .loader import DTYPES, load, load_draft, resolve_path
from .models import Model
from .parallel import barrier, common_seed
from .prompts_file import append_result, done_lines, read_jobs
from .tokenizer import Tokenizer, prompt_ids


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mlx_qwen2.generate", description="Generate text with a Qwen2 model.")
    p.add_argument("--model", required=True, help="local model folder or Hugging Face hub id")
    p.add_argument("--prompt", "-p", default="Hello", help="the prompt; '-' reads it from stdin")
    p.add_argument("--system", default=None, help="system message (chat template only)")
    p.add_argument(
        "--chat-template",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="wrap the prompt in the model's chat template (default: when the model has one)",
    )
    p.add_argument("--dtype", choices=list(DTYPES), default=None, help="compute dtype")
    p.add_argument(
        "--fast",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="use the fastest layers for this device (on CPU: float32 products for quantized and 16-bit weights)",
    )
    p.add_argument("--adapter-path", default=None, help="LoRA/DoRA adapters to apply (a folder from mlx_qwen2.lora)")
    p.add_argument("--verbose", action=argparse.BooleanOptionalAction, default=True, help="print statistics")
    p.add_argument("--prompt-cache-file", default=None, help="start from this saved cache; the prompt continues it")
    p.add_argument("--prompts-file", default=None, help="a .jsonl of prompts (one request a line) to run in batches")
    p.add_argument("--output", default=None, help="with --prompts-file: the .jsonl results go here (resumable)")
    p.add_argument("--max-batch", type=int, default=8, help="with --prompts-file: most sequences decoded together")
    add_parallel_flag(p)
    add_dataclass_args(p, GenerationConfig)
    add_dataclass_args(p, CacheConfig)
    add_dataclass_args(p, SpeculativeConfig)
    return p


def read_stdin() -> str:
    try:
        return sys.stdin.read()
    except UnicodeDecodeError as e:
        raise UserError(f"the prompt on stdin is not {e.encoding} text ({e.reason} at byte {e.start}).") from e


def print_stats(last: GenerationResponse) -> None:
    print("=" * 10, file=sys.stderr)
    cached = f" (+{last.cached_tokens} cached)" if last.cached_tokens else ""
    print(f"Prompt: {last.prompt_tokens} tokens{cached}, {last.prompt_tps:.3f} tokens-per-sec", file=sys.stderr)
    print(f"Generation: {last.generation_tokens} tokens, {last.generation_tps:.3f} tokens-per-sec", file=sys.stderr)
    if last.draft_tokens:
        share = last.accepted_tokens / last.draft_tokens
        per_pass = last.generation_tokens / max(last.target_passes, 1)
        print(
            f"Speculative: {last.accepted_tokens}/{last.draft_tokens} proposed tokens accepted ({share:.0%}), "
            f"{per_pass:.2f} tokens per model pass",
            file=sys.stderr,
        )
    print(f"Peak memory: {last.peak_memory:.3f} GB, KV cache: {last.cache_bytes / 1e6:.1f} MB", file=sys.stderr)
    print(f"Device: {mx.default_device()}, BLAS: {blas.in_use}", file=sys.stderr)


def run_prompts_file(
    args: argparse.Namespace, config: GenerationConfig, cache_config: CacheConfig, model: Model, tokenizer: Tokenizer
) -> int:
    """Every prompt of the file not yet in the output, in batches; a line of results as each finishes."""
    output = Path(args.output)
    use_template = args.chat_template is not False
    jobs = read_jobs(Path(args.prompts_file), tokenizer, config, model.args.context_length, use_template)
    done = done_lines(output)
    todo = [j for j in jobs if j.line not in done]
    print(f"{len(jobs)} prompts, {len(jobs) - len(todo)} already in {output}", file=sys.stderr)
    progress = Progress(len(todo))

    def finished(i: int, result: BatchResult) -> None:
        append_result(output, todo[i], result)
        progress.add(result.generation_tokens)

    configs = [j.config for j in todo]
    ids = [j.ids for j in todo]
    batch_generate(model, tokenizer, ids, configs, args.max_batch, finished, cache_config)
    progress.close()
    return 0


class Progress:
    """`done/total, tokens/s` on stderr: one line rewritten on a terminal, a line per tenth otherwise."""

    def __init__(self, total: int):
        self.total, self.done, self.tokens, self.tic = total, 0, 0, time.perf_counter()
        self.tty = sys.stderr.isatty()

    def add(self, tokens: int) -> None:
        self.done, self.tokens = self.done + 1, self.tokens + tokens
        rate = self.tokens / max(time.perf_counter() - self.tic, 1e-9)
        line = f"{self.done}/{self.total} done, {rate:.1f} generated tokens/s"
        if self.tty:
            print(f"\r{line}", end="", file=sys.stderr, flush=True)
        elif self.done == self.total or self.done % max(1, self.total // 10) == 0:
            print(line, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.tty and self.done:
            print(file=sys.stderr)


def check_flags(args: argparse.Namespace, cache_config: CacheConfig, speculative: SpeculativeConfig) -> None:
    if speculative.enabled and not cache_config.plain:
        raise UserError("speculative decoding needs the plain cache; drop --max-kv-size and --kv-bits.")
    if args.prompts_file is not None:
        if speculative.enabled:
            raise UserError(
                "--prompts-file decodes in batches, without speculation; drop --draft-model, --prompt-lookup."
            )
        if args.output is None:
            raise UserError("--prompts-file needs --output, the .jsonl file the results go to.")
        if args.prompt_cache_file:
            raise UserError("--prompts-file starts every prompt afresh; drop --prompt-cache-file.")
        if args.max_batch < 1:
            raise UserError(f"--max-batch must be at least 1, got {args.max_batch}")
    elif args.output is not None:
        raise UserError("--output goes with --prompts-file; a single prompt's text goes to stdout.")


@report_errors
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    config, cache_config = from_args(GenerationConfig, args), from_args(CacheConfig, args)
    speculative = from_args(SpeculativeConfig, args)
    check_flags(args, cache_config, speculative)
    group = join_group()
    if group is not None:
        check_parallel_flags(args, speculative)
        config.seed = common_seed(group, config.seed)  # every rank samples the same tokens
    with only_rank_zero_prints(group):
        code = generate(args, config, cache_config, speculative, group)
    if group is not None:
        barrier(group)  # the ranks leave together: one closing its sockets early makes the others' MLX log errors
    return code


def check_parallel_flags(args: argparse.Namespace, speculative: SpeculativeConfig) -> None:
    """Under mlx.launch, generate runs one prompt given on the command line."""
    used = [flag for flag, on in (("--prompts-file", args.prompts_file), ("--prompt-cache-file", args.prompt_cache_file),
            ("--draft-model", speculative.draft_model), ("--prompt -", args.prompt == "-")) if on]  # fmt: skip
    if used:
        raise UserError(
            f"{', '.join(used)} cannot be used across ranks (mlx.launch); run one prompt given as --prompt."
        )


def generate(
    args: argparse.Namespace,
    config: GenerationConfig,
    cache_config: CacheConfig,
    speculative: SpeculativeConfig,
    group: mx.distributed.Group | None,
) -> int:
    prompt = read_stdin() if args.prompt == "-" and args.prompts_file is None else args.prompt
    blas_hint()
    folder = resolve_path(args.model)
    model, tokenizer = load(
        folder, dtype=args.dtype, adapter_path=args.adapter_path, fast=args.fast, group=group, parallel=args.parallel
    )
    if args.prompts_file is not None:
        return run_prompts_file(args, config, cache_config, model, tokenizer)
    cache = None
    if args.prompt_cache_file:  # the prompt continues the cached tokens: no chat template unless asked for
        fingerprints = model_fingerprint(folder, args.adapter_path, args.dtype), tokenizer_fingerprint(folder)
        cache, _ = load_prompt_cache(Path(args.prompt_cache_file), *fingerprints)
        args.chat_template = bool(args.chat_template)
    ids = prompt_ids(tokenizer, prompt, args.system, args.chat_template)
    draft = load_draft(speculative.draft_model, tokenizer, args.dtype, args.fast)
    last = None
    responses = stream_generate(
        model,
        tokenizer,
        ids,
        cache=cache,
        config=config,
        cache_config=cache_config,
        draft=draft,
        speculative=speculative,
    )
    for last in responses:
        print(last.text, end="", flush=True)
    print()
    if args.verbose and last is not None:
        print_stats(last)
    return 0


if __name__ == "__main__":
    sys.exit(main())
