"""Checkpoint conversion as a library: cast, quantize (round-to-nearest or GPTQ) or dequantize, streaming.

A Hugging Face or MLX folder goes in, an MLX folder in mlx-lm's on-disk format comes out,
written atomically. `python -m mlx_qwen2.convert` is the command line over this module.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
from mlx.utils import tree_flatten

from .errors import UserError
from .loader import DTYPES, eos_ids, load_model, load_weights, read_config
from .models import Model, ModelArgs, args_from_config, build
from .quant.affine import (
    DEFAULT_BITS,
    DEFAULT_GROUP_SIZE,
    bits_per_weight,
    check_divisible,
    config_block,
    make_plan,
    quantizable_key,
    validate,
    weights_of,
)
from .quant.dequantize import dequantize
from .quant.gptq import GPTQ_DENSE_ONLY, quantize_gptq
from .tokenizer import Tokenizer
from .writer import check_output_dir, write_model_folder

Progress = Callable[[str, int, int], None]  # (stage, done, total)


@dataclass
class Summary:
    """What a conversion wrote."""

    path: Path
    bits_per_weight: float  # stored bits per parameter of the matrices (weights + scales + biases)
    size_bytes: int


@dataclass
class ConvertOptions:
    """What a conversion does to the weights; checked on construction."""

    quantize: bool = False
    bits: int = DEFAULT_BITS
    group_size: int = DEFAULT_GROUP_SIZE
    recipe: str | None = None
    dtype: str | None = None  # of float weights; None keeps the checkpoint's
    dequantize: bool = False
    calibration: list[list[int]] | None = None  # token sequences: GPTQ instead of round-to-nearest

    def __post_init__(self) -> None:
        if self.quantize:
            validate(self.bits, self.group_size, self.recipe)
        if self.dtype is not None and self.dtype not in DTYPES:
            raise UserError(f"--dtype {self.dtype} is not supported; choose one of {', '.join(DTYPES)}.")
        if self.quantize and self.dequantize:
            raise UserError("--dequantize and quantization exclude each other; convert in two steps.")

    @property
    def mx_dtype(self) -> mx.Dtype | None:
        return DTYPES[self.dtype] if self.dtype else None


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
                w = cast(dequantize(*parts, s["group_size"], s["bits"]))
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


def output_config(
    source: dict[str, Any], args: ModelArgs, options: ConvertOptions, weights: dict[str, mx.array]
) -> tuple[dict[str, Any], Callable[[str], dict[str, Any]] | None]:
    """The output's config.json, and the quantization plan (module path -> settings) if quantizing."""
    config = {k: v for k, v in source.items() if k not in ("quantization", "quantization_config")}
    plan = None
    if options.quantize:
        matrices = {k.rpartition(".")[0]: w.shape for k, w in weights.items() if quantizable_key(k)}
        layers, tied = args.num_hidden_layers, args.tie_word_embeddings
        plan = make_plan(layers, tied, options.bits, options.group_size, options.recipe, matrices)
        check_divisible(matrices, plan)
        config["quantization"] = config["quantization_config"] = config_block(plan, sorted(matrices))
    elif source.get("quantization") and not options.dequantize:
        config["quantization"] = config["quantization_config"] = source["quantization"]
    if options.dtype:
        config["torch_dtype"] = options.dtype
    return config, plan


def check_source(src: Path, source: dict[str, Any], options: ConvertOptions) -> None:
    """Refuse conversions that cannot apply to this source."""
    quantized = bool(source.get("quantization"))
    if options.quantize and quantized:
        raise UserError(f"{src} is already quantized; pass --dequantize first, or convert from the float checkpoint.")
    if options.dequantize and not quantized:
        raise UserError(f"{src} is not quantized; there is nothing to --dequantize.")
    if options.calibration is not None:
        check_gptq(source)


def check_gptq(source: dict[str, Any]) -> None:
    """Refuse GPTQ for an architecture it does not handle (before calibration data is read)."""
    if source.get("model_type", "qwen2") != "qwen2":
        raise UserError(GPTQ_DENSE_ONLY)


def check_shapes(src: Path, model: Model, weights: dict[str, mx.array]) -> None:
    """UserError unless the checkpoint holds every tensor config.json implies, each of the shape it implies."""
    expected = dict(tree_flatten(model.parameters()))
    packed = {k.rpartition(".")[0] for k in weights if k.endswith(".scales")}
    missing = sorted(set(expected) - set(weights))
    wrong = [
        f"{k} {tuple(w.shape)} (config.json implies {tuple(expected[k].shape)})"
        for k, w in weights.items()
        if k in expected and k.rpartition(".")[0] not in packed and w.shape != expected[k].shape
    ]
    if missing or wrong:
        found = [f"missing {', '.join(missing[:3])}"] if missing else []
        raise UserError(f"the weights in {src} do not match its config.json: {'; '.join(found + wrong[:3])}.")


def convert(
    src: Path, out: Path, options: ConvertOptions | None = None, force: bool = False, progress: Progress | None = None
) -> Summary:
    """Write `src` (a Hugging Face or MLX folder) to `out`, cast and optionally (de)quantized, streaming.

    With `options.calibration`, quantization is GPTQ instead of round-to-nearest; that needs
    the whole model in memory rather than a few tensors at a time.
    """
    options = options or ConvertOptions()
    source = read_config(src)
    args = args_from_config(source)
    Tokenizer.from_folder(src, eos_ids(src))  # copied as they are: broken files would make a broken output
    check_source(src, source, options)
    check_output_dir(out, force)
    model = build(args)
    weights = model.sanitize(load_weights(src))  # lazy: nothing is read yet
    check_shapes(src, model, weights)
    config, plan = output_config(source, args, options, weights)
    stats = {"bits": 0.0, "params": 0.0}
    if options.calibration is not None and plan is not None:
        model = load_model(src, dtype=options.mx_dtype)
        stage = (lambda i, n: progress("GPTQ layers", i, n)) if progress else None
        quantize_gptq(model, options.calibration, plan, progress=stage)
        weights, plan = weights_of(model), None  # already quantized: written as they are
        stats = {"bits": bits_per_weight(model), "params": 1.0}
    dequantize_with = source_settings(source) if options.dequantize else None
    tensors = converted(weights, plan, options.mx_dtype, dequantize_with, stats)
    packed = sum(k.endswith(".scales") for k in weights)
    total = len(weights) + 2 * sum(quantizable_key(k) for k in weights) * bool(plan) - 2 * packed * options.dequantize
    written = (lambda n: progress("writing tensors", n, total)) if progress else None
    write_model_folder(out, tensors, config, src, force, progress=written)
    return Summary(out, stats["bits"] / max(stats["params"], 1), _stored_bytes(out))


def float_summary(folder: Path) -> Summary:
    """Summary of a float folder just written."""
    weights = load_weights(folder)
    matrices = [w for k, w in weights.items() if quantizable_key(k)]
    bits = sum(w.nbytes * 8 for w in matrices) / max(sum(w.size for w in matrices), 1)
    return Summary(folder, bits, _stored_bytes(folder))


def _stored_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))
