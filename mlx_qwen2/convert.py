"""`python -m mlx_qwen2.convert`: a Hugging Face folder, hub id or qwen2 GGUF -> an MLX folder (cast, quantize).

python -m mlx_qwen2.convert --hf-path Qwen/Qwen2-0.5B-Instruct --mlx-path out -q
python -m mlx_qwen2.convert --gguf model.gguf --mlx-path out
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from huggingface_hub import HfApi

from .cli import report_errors
from .conversion import ConvertOptions, Summary, check_gptq, convert, float_summary
from .errors import UserError
from .gguf_import import import_gguf
from .loader import DTYPES, read_config, resolve_path
from .quant.affine import BITS, DEFAULT_BITS, DEFAULT_GROUP_SIZE, GROUP_SIZES
from .quant.calibration import DEFAULT_TOKENS, calibration_ids
from .quant.recipes import RECIPES
from .tokenizer import Tokenizer
from .writer import check_output_dir


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mlx_qwen2.convert", description="Convert a Qwen2 checkpoint to MLX.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--hf-path", help="Hugging Face model folder or hub id (or an MLX folder, with --dequantize)")
    src.add_argument("--gguf", help="a qwen2 GGUF file (any llama.cpp tensor type)")
    p.add_argument("--mlx-path", required=True, help="output folder (written atomically)")
    p.add_argument("-q", "--quantize", action="store_true", help="quantize the weights")
    p.add_argument("--q-bits", type=int, default=DEFAULT_BITS, help=f"bits per weight, one of {BITS} (default: 4)")
    p.add_argument(
        "--q-group-size", type=int, default=DEFAULT_GROUP_SIZE, help=f"group size, one of {GROUP_SIZES} (default: 64)"
    )
    p.add_argument(
        "--quant-recipe",
        default=None,
        help=f"mixed precision, one of {', '.join(RECIPES)}: mixed_L_H puts H bits on the output layer "
        "(embed_tokens when tied), every k_proj and v_proj, and down_proj of the first and last layers, "
        "within the size of mlx-lm's recipe of that name; L elsewhere; implies -q",
    )
    p.add_argument(
        "--calibrate",
        action="store_true",
        help="GPTQ: error-compensating quantization (implies -q); at a uniform width, with a recipe it measured worse",
    )
    p.add_argument("--calibration-data", default=None, help="a .txt or .jsonl file (default: a sample shipped with us)")
    p.add_argument(
        "--calibration-tokens", type=int, default=DEFAULT_TOKENS, help=f"calibration tokens (default: {DEFAULT_TOKENS})"
    )
    p.add_argument(
        "--dtype", choices=list(DTYPES), default=None, help="dtype of float weights (default: the checkpoint's)"
    )
    p.add_argument("--dequantize", action="store_true", help="turn a quantized MLX folder back into float weights")
    p.add_argument("--sha256", default=None, help="with --gguf: refuse the file unless its sha256 matches")
    p.add_argument("--upload-repo", default=None, help="upload the result to this Hugging Face repository")
    p.add_argument("--force", action="store_true", help="replace a non-empty output folder")
    return p


def _progress(stage: str, done: int, total: int) -> None:
    if done == total or done % max(1, total // 10) == 0:
        print(f"{stage}: {done}/{total}", file=sys.stderr, flush=True)


def _gguf_progress(done: int, total: int) -> None:
    _progress("dequantizing GGUF tensors", done, total)


def options_of(args: argparse.Namespace) -> ConvertOptions:
    """The conversion the flags ask for, checked before any slow work (calibration data comes later)."""
    if args.calibration_tokens < 1:
        raise UserError(f"--calibration-tokens must be at least 1, got {args.calibration_tokens}")
    quantize = args.quantize or args.quant_recipe is not None or args.calibrate
    return ConvertOptions(quantize, args.q_bits, args.q_group_size, args.quant_recipe, args.dtype, args.dequantize)


def run(args: argparse.Namespace) -> Summary:
    out, options = Path(args.mlx_path), options_of(args)

    def convert_folder(src: Path) -> Summary:
        if args.calibrate:
            check_gptq(read_config(src))
            options.calibration = calibration_ids(
                Tokenizer.from_folder(src), args.calibration_data, args.calibration_tokens
            )
        return convert(src, out, options, force=args.force, progress=_progress)

    if args.hf_path:
        return convert_folder(resolve_path(args.hf_path))
    if args.dequantize:
        raise UserError("--dequantize applies to a quantized MLX folder (--hf-path), not to a GGUF.")
    if not options.quantize and args.dtype in (None, "float32", "float16"):
        import_gguf(args.gguf, out, args.dtype or "float32", args.sha256, args.force, _gguf_progress)
        return float_summary(out)
    check_output_dir(out, args.force)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.gguf-", dir=out.parent) as tmp:
        folder = import_gguf(args.gguf, Path(tmp) / "hf", "float32", args.sha256, progress=_gguf_progress)
        return convert_folder(folder)


def upload(folder: Path, repo: str) -> None:
    try:
        api = HfApi()
        api.create_repo(repo, exist_ok=True)
        api.upload_folder(folder_path=str(folder), repo_id=repo, repo_type="model")
    except Exception as e:  # network, auth and hub errors come from several libraries; all mean "not uploaded"
        raise UserError(
            f"could not upload {folder} to {repo} ({e.__class__.__name__}); check the network and `hf auth login`, "
            "then upload later with `hf upload`. The converted folder is kept."
        ) from e


@report_errors
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    summary = run(args)
    print(
        f"wrote {summary.path}: {summary.size_bytes / 1e9:.3f} GB of weights, "
        f"{summary.bits_per_weight:.3f} bits per weight",
        file=sys.stderr,
    )
    if args.upload_repo:
        upload(summary.path, args.upload_repo)
        print(f"uploaded to https://huggingface.co/{args.upload_repo}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
