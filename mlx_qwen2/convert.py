"""Hugging Face checkpoint (folder, hub id or qwen2 GGUF) -> MLX checkpoint: cast, quantize, save.

python -m mlx_qwen2.convert --hf-path Qwen/Qwen2-0.5B-Instruct --mlx-path out -q
python -m mlx_qwen2.convert --gguf model.gguf --mlx-path out
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
from huggingface_hub import HfApi

from .checkpoint import check_output_dir, write_model_folder
from .cli import report_errors
from .gguf_import import import_gguf
from .gptq import quantize_gptq
from .loader import load_model, load_weights, read_config, resolve_path
from .model import Model, ModelArgs
from .quantize import (
    BITS,
    GROUP_SIZES,
    RECIPES,
    bits_per_weight,
    check_divisible,
    config_block,
    make_plan,
    quantizable_key,
    validate,
    weights_of,
)
from .tokenizer import Tokenizer

DTYPES = ("float16", "bfloat16", "float32")


@dataclass
class Summary:
    """What a conversion wrote."""

    path: Path
    bits_per_weight: float  # stored bits per parameter of the matrices (weights + scales + biases)
    size_bytes: int


def source_settings(config: dict[str, Any]) -> Callable[[str], dict[str, Any]]:
    """Module path -> the quantization settings a quantized checkpoint was written with."""
    block = config.get("quantization") or {}
    defaults = {"group_size": block.get("group_size"), "bits": block.get("bits")}
    return lambda path: {**defaults, **(block.get(path) or {})}


def converted(
    weights: dict[str, mx.array],
    plan: Callable[[str], dict[str, Any]] | None,
    dtype: mx.Dtype | None,
    dequantize_with: Callable[[str], dict[str, Any]] | None,
    stats: dict[str, float],
) -> Iterator[tuple[str, mx.array]]:
    """Lazily cast, quantize or dequantize each tensor; tallies bits and parameters of the matrices in `stats`.

    Takes each tensor out of `weights` as it goes: once evaluated, a source tensor still held there
    would keep its data, and the whole source would end up in memory."""

    def cast(w: mx.array) -> mx.array:
        return w.astype(dtype) if dtype is not None and mx.issubdtype(w.dtype, mx.floating) else w

    packed_paths = {k.rpartition(".")[0] for k in weights if k.endswith(".scales")}
    for key in sorted(weights):
        path, _, kind = key.rpartition(".")
        if kind in ("weight", "scales", "biases") and path in packed_paths:  # a packed matrix's parts
            if dequantize_with is None:
                w = weights.pop(key)
                yield key, w if kind == "weight" else cast(w)  # kept packed; scales and biases may be cast
            elif kind == "weight":  # after its .biases and .scales, in sorted order
                s = dequantize_with(path)
                parts = weights.pop(key), weights.pop(f"{path}.scales"), weights.pop(f"{path}.biases")
                w = cast(mx.dequantize(*parts, s["group_size"], s["bits"]))
                stats["params"] += w.size
                stats["bits"] += w.nbytes * 8
                yield key, w
            continue
        w = cast(weights.pop(key))
        if plan is not None and quantizable_key(key):
            q = plan(path)
            packed, scales, biases = mx.quantize(w, q["group_size"], q["bits"])
            stats["params"] += w.size
            stats["bits"] += (packed.nbytes + scales.nbytes + biases.nbytes) * 8
            yield key, packed
            yield f"{path}.scales", scales
            yield f"{path}.biases", biases
        else:
            if quantizable_key(key):
                stats["params"] += w.size
                stats["bits"] += w.nbytes * 8
            yield key, w


def convert(
    src: Path,
    out: Path,
    quantize: bool = False,
    bits: int = 4,
    group_size: int = 64,
    recipe: str | None = None,
    dtype: str | None = None,
    dequantize: bool = False,
    force: bool = False,
    progress: Callable[[str, int, int], None] | None = None,
    calibration: list[list[int]] | None = None,
) -> Summary:
    """Write `src` (a Hugging Face or MLX folder) to `out`, cast and optionally (de)quantized, streaming.

    With `calibration` (token sequences), quantization is GPTQ instead of round-to-nearest;
    that needs the whole model in memory rather than a few tensors at a time.
    """
    source = read_config(src)
    args = ModelArgs.from_dict(source)
    source_quantized = bool(source.get("quantization"))
    if quantize and source_quantized:
        raise ValueError(f"{src} is already quantized; pass --dequantize first, or convert from the float checkpoint.")
    if dequantize and not source_quantized:
        raise ValueError(f"{src} is not quantized; there is nothing to --dequantize.")
    check_output_dir(out, force)
    weights = Model(args).sanitize(load_weights(src))  # lazy: nothing is read yet
    config = {k: v for k, v in source.items() if k not in ("quantization", "quantization_config")}
    plan = None
    if quantize:
        matrices = {k.rpartition(".")[0]: w.shape for k, w in weights.items() if quantizable_key(k)}
        plan = make_plan(args.num_hidden_layers, args.tie_word_embeddings, bits, group_size, recipe, matrices)
        check_divisible(matrices, plan)
        config["quantization"] = config["quantization_config"] = config_block(plan, sorted(matrices))
    elif source_quantized and not dequantize:
        config["quantization"] = config["quantization_config"] = source["quantization"]
    if dtype:
        config["torch_dtype"] = dtype
    stats = {"bits": 0.0, "params": 0.0}
    dequantize_with = source_settings(source) if dequantize else None
    if calibration is not None and plan is not None:
        model = load_model(src, dtype=getattr(mx, dtype) if dtype else None)
        quantize_gptq(
            model, calibration, plan, progress=lambda i, n: progress("GPTQ layers", i, n) if progress else None
        )
        weights, plan = weights_of(model), None  # already quantized: written as they are
        stats = {"bits": bits_per_weight(model), "params": 1.0}
    tensors = converted(weights, plan, getattr(mx, dtype) if dtype else None, dequantize_with, stats)
    packed = sum(k.endswith(".scales") for k in weights)
    total = len(weights) + 2 * sum(quantizable_key(k) for k in weights) * bool(plan) - 2 * packed * dequantize
    write_model_folder(
        out,
        tensors,
        config,
        src,
        force,
        progress=(lambda n: progress("writing tensors", n, total)) if progress else None,
    )
    size = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    return Summary(out, stats["bits"] / max(stats["params"], 1), size)


def calibration_ids(tokenizer: Tokenizer, path: str | None, n_tokens: int, seq_len: int = 512) -> list[list[int]]:
    """Calibration token sequences from a .txt or .jsonl ({"text": ...} lines) file, or the sample we ship."""
    if path is None:
        here = Path(__file__).parent
        texts = [(here / "calibration.txt").read_text()] + [p.read_text() for p in sorted(here.glob("*.py"))]
    elif not Path(path).is_file():
        raise FileNotFoundError(f"calibration data {path} not found.")
    elif path.endswith(".jsonl"):
        texts = []
        for n, line in enumerate(Path(path).read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                texts.append(json.loads(line)["text"])
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(f'{path}, line {n}: expected a JSON object with a "text" field ({e}).') from e
    else:
        texts = [Path(path).read_text()]
    ids = [t for text in texts for t in tokenizer.encode(text)][:n_tokens]
    if len(ids) < seq_len:
        raise ValueError(f"calibration data has {len(ids)} tokens; give at least {seq_len}.")
    return [ids[i : i + seq_len] for i in range(0, len(ids) - seq_len + 1, seq_len)]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mlx_qwen2.convert", description="Convert a Qwen2 checkpoint to MLX.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--hf-path", help="Hugging Face model folder or hub id (or an MLX folder, with --dequantize)")
    src.add_argument("--gguf", help="a qwen2 GGUF file (any llama.cpp tensor type)")
    p.add_argument("--mlx-path", required=True, help="output folder (written atomically)")
    p.add_argument("-q", "--quantize", action="store_true", help="quantize the weights")
    p.add_argument("--q-bits", type=int, default=4, help=f"bits per weight, one of {BITS} (default: 4)")
    p.add_argument("--q-group-size", type=int, default=64, help=f"group size, one of {GROUP_SIZES} (default: 64)")
    p.add_argument(
        "--quant-recipe",
        default=None,
        help=f"mixed precision, one of {', '.join(RECIPES)}: mixed_L_H puts H bits on the output layer "
        "(embed_tokens when tied), every k_proj and v_proj, and down_proj of the first and last layers, "
        "within the size of mlx-lm's recipe of that name; L elsewhere; implies -q",
    )
    p.add_argument("--calibrate", action="store_true", help="GPTQ: error-compensating quantization (implies -q)")
    p.add_argument("--calibration-data", default=None, help="a .txt or .jsonl file (default: a sample shipped with us)")
    p.add_argument("--calibration-tokens", type=int, default=4096, help="calibration tokens (default: 4096)")
    p.add_argument("--dtype", choices=DTYPES, default=None, help="dtype of float weights (default: the checkpoint's)")
    p.add_argument("--dequantize", action="store_true", help="turn a quantized MLX folder back into float weights")
    p.add_argument("--sha256", default=None, help="with --gguf: refuse the file unless its sha256 matches")
    p.add_argument("--upload-repo", default=None, help="upload the result to this Hugging Face repository")
    p.add_argument("--force", action="store_true", help="replace a non-empty output folder")
    return p


def _progress(stage: str, done: int, total: int) -> None:
    if done == total or done % max(1, total // 10) == 0:
        print(f"{stage}: {done}/{total}", file=sys.stderr, flush=True)


def _run(args: argparse.Namespace) -> Summary:
    out = Path(args.mlx_path)
    quantize = args.quantize or args.quant_recipe is not None or args.calibrate
    options: dict[str, Any] = dict(
        quantize=quantize, bits=args.q_bits, group_size=args.q_group_size, recipe=args.quant_recipe, dtype=args.dtype
    )

    def calibration(folder: Path) -> list[list[int]] | None:
        if not args.calibrate:
            return None
        tokenizer = Tokenizer.from_folder(folder)
        return calibration_ids(tokenizer, args.calibration_data, args.calibration_tokens)

    if args.hf_path:
        src = resolve_path(args.hf_path)
        return convert(
            src,
            out,
            dequantize=args.dequantize,
            force=args.force,
            progress=_progress,
            calibration=calibration(src),
            **options,
        )
    if args.dequantize:
        raise ValueError("--dequantize applies to a quantized MLX folder (--hf-path), not to a GGUF.")
    if not quantize and args.dtype in (None, "float32", "float16"):
        import_gguf(
            args.gguf,
            out,
            args.dtype or "float32",
            args.sha256,
            args.force,
            lambda i, n: _progress("dequantizing GGUF tensors", i, n),
        )
        return convert_summary(out)
    check_output_dir(out, args.force)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.gguf-", dir=out.parent) as tmp:
        folder = import_gguf(
            args.gguf,
            Path(tmp) / "hf",
            "float32",
            args.sha256,
            progress=lambda i, n: _progress("dequantizing GGUF tensors", i, n),
        )
        return convert(folder, out, force=args.force, progress=_progress, calibration=calibration(folder), **options)


def convert_summary(folder: Path) -> Summary:
    """Summary of a float folder just written."""
    weights = load_weights(folder)
    matrices = [w for k, w in weights.items() if quantizable_key(k)]
    bits = sum(w.nbytes * 8 for w in matrices) / max(sum(w.size for w in matrices), 1)
    return Summary(folder, bits, sum(f.stat().st_size for f in folder.glob("*.safetensors")))


def upload(folder: Path, repo: str) -> None:
    try:
        api = HfApi()
        api.create_repo(repo, exist_ok=True)
        api.upload_folder(folder_path=str(folder), repo_id=repo, repo_type="model")
    except Exception as e:  # network, auth and hub errors come from several libraries; all mean "not uploaded"
        raise ConnectionError(
            f"could not upload {folder} to {repo} ({e.__class__.__name__}); check the network and `hf auth login`, "
            "then upload later with `hf upload`. The converted folder is kept."
        ) from e


@report_errors
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.quantize or args.quant_recipe or args.calibrate:
        validate(args.q_bits, args.q_group_size, args.quant_recipe)  # before any slow work
    summary = _run(args)
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
