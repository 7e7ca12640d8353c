"""`python -m mlx_qwen2.generate`: stream a completion to stdout, statistics to stderr.

python -m mlx_qwen2.generate --model Qwen/Qwen2-0.5B-Instruct --prompt "Hello"
"""

from __future__ import annotations

import argparse
import sys

import mlx.core as mx

from .backends.cpu import blas
from .cli import add_dataclass_args, blas_hint, from_args, report_errors
from .errors import UserError
from .generation import GenerationConfig, GenerationResponse, stream_generate
from .loader import DTYPES, load
from .tokenizer import Tokenizer


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
    add_dataclass_args(p, GenerationConfig)
    return p


def prompt_ids(tokenizer: Tokenizer, prompt: str, system: str | None, use_template: bool | None) -> list[int]:
    """The prompt as token ids, through the chat template when asked (or available)."""
    if use_template is None:
        use_template = tokenizer.chat_template is not None
    if not use_template:
        return tokenizer.encode(prompt)
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True)


def read_stdin() -> str:
    try:
        return sys.stdin.read()
    except UnicodeDecodeError as e:
        raise UserError(f"the prompt on stdin is not {e.encoding} text ({e.reason} at byte {e.start}).") from e


def print_stats(last: GenerationResponse) -> None:
    print("=" * 10, file=sys.stderr)
    print(f"Prompt: {last.prompt_tokens} tokens, {last.prompt_tps:.3f} tokens-per-sec", file=sys.stderr)
    print(f"Generation: {last.generation_tokens} tokens, {last.generation_tps:.3f} tokens-per-sec", file=sys.stderr)
    print(f"Peak memory: {last.peak_memory:.3f} GB", file=sys.stderr)
    print(f"Device: {mx.default_device()}, BLAS: {blas.in_use}", file=sys.stderr)


@report_errors
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    config = from_args(GenerationConfig, args)
    prompt = read_stdin() if args.prompt == "-" else args.prompt
    blas_hint()
    model, tokenizer = load(args.model, dtype=args.dtype, adapter_path=args.adapter_path, fast=args.fast)
    ids = prompt_ids(tokenizer, prompt, args.system, args.chat_template)
    last = None
    for last in stream_generate(model, tokenizer, ids, config=config):
        print(last.text, end="", flush=True)
    print()
    if args.verbose and last is not None:
        print_stats(last)
    return 0


if __name__ == "__main__":
    sys.exit(main())
