"""`python -m mlx_qwen2.fuse`: fold trained adapters into the weights and write a plain model folder.

python -m mlx_qwen2.fuse --model M --adapter-path adapters --save-path fused [--dequantize]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .cli import report_errors
from .loader import load, read_config, resolve_path
from .quant.affine import weights_of
from .quant.dequantize import dequantize_model
from .tuner.adapters import fuse_adapters
from .writer import check_output_dir, write_model_folder


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mlx_qwen2.fuse", description="Fuse adapters into a model.")
    p.add_argument("--model", required=True, help="the base model folder or hub id the adapters were trained on")
    p.add_argument(
        "--adapter-path", default="adapters", help="folder with adapters.safetensors and adapter_config.json"
    )
    p.add_argument("--save-path", default="fused_model", help="output folder (written atomically)")
    p.add_argument("--dequantize", action="store_true", help="write float weights for a quantized base")
    p.add_argument("--force", action="store_true", help="replace a non-empty output folder")
    return p


@report_errors
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out = Path(args.save_path)
    check_output_dir(out, args.force)
    src = resolve_path(args.model)
    model, _ = load(src, adapter_path=args.adapter_path, fast=False)
    fuse_adapters(model, dequantize=args.dequantize)
    config = read_config(src)
    if args.dequantize:
        dequantize_model(model)  # layers without adapters too
        config = {k: v for k, v in config.items() if k not in ("quantization", "quantization_config")}
    write_model_folder(out, weights_of(model).items(), config, src, args.force)
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
