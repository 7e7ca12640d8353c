"""`python -m mlx_qwen2.cache_prompt`: prefill a prompt once and save its KV cache, to start generations from it.

python -m mlx_qwen2.cache_prompt --model M --prompt "$(cat long_document.txt)" --prompt-cache-file doc.safetensors
python -m mlx_qwen2.generate --model M --prompt-cache-file doc.safetensors --prompt "Summarize the text above."
python -m mlx_qwen2.cache_prompt --model M --system "You are a careful reviewer..." --prompt-cache-file sys.safetensors
python -m mlx_qwen2.chat --model M --system "You are a careful reviewer..." --prompt-cache-file sys.safetensors
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .cache.config import CacheConfig
from .cache.files import model_fingerprint, save_prompt_cache, tokenizer_fingerprint
from .cli import add_dataclass_args, blas_hint, from_args, report_errors
from .errors import UserError
from .generation.step import check_room, fill
from .loader import DTYPES, load, resolve_path


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mlx_qwen2.cache_prompt", description="Save a prefilled prompt cache.")
    p.add_argument("--model", required=True, help="local model folder or Hugging Face hub id")
    p.add_argument("--prompt", "-p", default=None, help="text the cache holds, as is (no chat template); '-': stdin")
    p.add_argument("--system", default=None, help="instead: a system message, through the chat template (for chat)")
    p.add_argument("--prompt-cache-file", required=True, help="the .safetensors file to write (atomically)")
    p.add_argument("--dtype", choices=list(DTYPES), default=None, help="compute dtype")
    p.add_argument("--adapter-path", default=None, help="LoRA/DoRA adapters to apply")
    p.add_argument("--prefill-step-size", type=int, default=512, help="prompt tokens processed per chunk")
    add_dataclass_args(p, CacheConfig, skip=("quantized_kv_start",))
    return p


@report_errors
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if (args.prompt is None) == (args.system is None):
        raise UserError("give --prompt (text as is) or --system (a system turn for chat), one of the two.")
    cache_config = from_args(CacheConfig, args)
    text = sys.stdin.read() if args.prompt == "-" else args.prompt
    blas_hint()
    folder = resolve_path(args.model)
    model, tokenizer = load(folder, dtype=args.dtype, adapter_path=args.adapter_path)
    if args.system is not None:
        ids = tokenizer.apply_chat_template([{"role": "system", "content": args.system}], add_generation_prompt=False)
    else:
        ids = tokenizer.encode(text)
    check_room(ids, 0, model.args.context_length)
    cache = cache_config.make(len(model.layers))
    fill(model, ids, cache, args.prefill_step_size)
    fingerprint = model_fingerprint(folder, args.adapter_path, args.dtype)
    save_prompt_cache(Path(args.prompt_cache_file), cache, ids, fingerprint, tokenizer_fingerprint(folder))
    size = Path(args.prompt_cache_file).stat().st_size
    print(f"wrote {args.prompt_cache_file}: {len(ids)} tokens, {size / 1e6:.1f} MB", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
