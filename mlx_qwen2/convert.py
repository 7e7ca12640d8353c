"""Hugging Face checkpoint (folder, hub id or qwen2 GGUF) -> MLX checkpoint: cast, quantize, save.

python -m mlx_qwen2.convert --hf-path Qwen/Qwen2-0.5B-Instruct --mlx-path out -q
python -m mlx_qwen2.convert --gguf model.gguf --mlx-path out
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import mlx.core as mx

from .checkpoint import atomic_dir, check_output_dir, save_weights, write_json
from .cli import report_errors
from .gguf_import import import_gguf
from .loader import load_model, read_config, resolve_path
from .quantize import BITS, GROUP_SIZES, dequantize_model, quantize_model, validate, weights_of

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "generation_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
)
DTYPES = ("float16", "bfloat16", "float32")


def convert(
    src: Path,
    out: Path,
    quantize: bool = False,
    bits: int = 4,
    group_size: int = 64,
    dtype: str | None = None,
    dequantize: bool = False,
    force: bool = False,
) -> Path:
    """Write `src` (a Hugging Face or MLX folder) to `out`, cast and optionally (de)quantized."""
    config = read_config(src)
    source_quantized = bool(config.get("quantization"))
    if quantize and source_quantized:
        raise ValueError(f"{src} is already quantized; pass --dequantize first, or convert from the float checkpoint.")
    if dequantize and not source_quantized:
        raise ValueError(f"{src} is not quantized; there is nothing to --dequantize.")
    check_output_dir(out, force)
    model = load_model(src, dtype=getattr(mx, dtype) if dtype else None, lazy=True)
    config = {k: v for k, v in config.items() if k not in ("quantization", "quantization_config")}
    if quantize:
        block = quantize_model(model, bits, group_size)
        config["quantization"] = config["quantization_config"] = block
    if dequantize:
        dequantize_model(model)
    if dtype:
        config["torch_dtype"] = dtype
    with atomic_dir(out, force) as tmp:
        save_weights(tmp, weights_of(model))
        write_json(tmp / "config.json", config)
        for name in TOKENIZER_FILES:
            if (src / name).is_file():
                shutil.copy2(src / name, tmp / name)
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mlx_qwen2.convert", description="Convert a Qwen2 checkpoint to MLX.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--hf-path", help="Hugging Face model folder or hub id (or an MLX folder, with --dequantize)")
    src.add_argument("--gguf", help="a qwen2 GGUF file (any llama.cpp tensor type)")
    p.add_argument("--mlx-path", required=True, help="output folder (written atomically)")
    p.add_argument("-q", "--quantize", action="store_true", help="quantize the weights")
    p.add_argument("--q-bits", type=int, default=4, help=f"bits per weight, one of {BITS} (default: 4)")
    p.add_argument("--q-group-size", type=int, default=64, help=f"group size, one of {GROUP_SIZES} (default: 64)")
    p.add_argument("--dtype", choices=DTYPES, default=None, help="dtype of float weights (default: the checkpoint's)")
    p.add_argument("--dequantize", action="store_true", help="turn a quantized MLX folder back into float weights")
    p.add_argument("--sha256", default=None, help="with --gguf: refuse the file unless its sha256 matches")
    p.add_argument("--force", action="store_true", help="replace a non-empty output folder")
    return p


def _progress(done: int, total: int) -> None:
    if done == total or done % max(1, total // 10) == 0:
        print(f"dequantizing GGUF tensors: {done}/{total}", file=sys.stderr, flush=True)


def _run(args: argparse.Namespace) -> Path:
    out = Path(args.mlx_path)
    options: dict[str, Any] = dict(bits=args.q_bits, group_size=args.q_group_size, force=args.force)
    if args.hf_path:
        src = resolve_path(args.hf_path)
        return convert(src, out, args.quantize, dtype=args.dtype, dequantize=args.dequantize, **options)
    if args.dequantize:
        raise ValueError("--dequantize applies to a quantized MLX folder (--hf-path), not to a GGUF.")
    if not args.quantize and args.dtype in (None, "float32", "float16"):
        return import_gguf(args.gguf, out, args.dtype or "float32", args.sha256, args.force, _progress)
    check_output_dir(out, args.force)
    with tempfile.TemporaryDirectory(prefix=".gguf-import-", dir=out.parent if out.parent.exists() else None) as tmp:
        folder = import_gguf(args.gguf, Path(tmp) / "hf", "float32", args.sha256, progress=_progress)
        return convert(folder, out, args.quantize, dtype=args.dtype, **options)


@report_errors
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.quantize:
        validate(args.q_bits, args.q_group_size)  # before any slow work
    out = _run(args)
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
