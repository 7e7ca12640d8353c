"""A local folder or Hugging Face hub id -> (model, tokenizer).

Weights are read lazily from safetensors (sharded or not); quantization
described in config.json is re-applied before the weights are set. Pickled
weights (.bin, .pt) are refused.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from huggingface_hub import snapshot_download
from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError

from .backends.cpu.fast import use_fast_layers
from .errors import UserError
from .files import check_safetensors, load_safetensors, read_json, read_slice
from .models import Model, args_from_config, build
from .parallel import (
    MODES,
    adapter_axis,
    check_same_everywhere,
    local_part,
    shard_pipeline,
    shard_tensor_parallel,
    splits_head,
    tensor_parallel_axis,
)
from .tokenizer import Tokenizer, check_same_vocab
from .tuner.adapters import load_adapters

Shard = tuple[Callable[[str], int | None], int, int]  # (key -> split axis or None, rank, number of ranks)
HUB_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "*.txt"]
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_HUB_ID = re.compile(r"^[\w.\-]+/[\w.\-]+$")


def resolve_path(path_or_id: str | os.PathLike[str], revision: str | None = None) -> Path:
    """A local folder as is; a hub id ("org/name") downloaded (only the files we read)."""
    path = Path(path_or_id).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise UserError(f"{path} is a file; pass the model folder that contains config.json.")
    text = str(path_or_id)
    if not _HUB_ID.match(text) or text.startswith((".", "/", "~")):
        raise UserError(f"model folder {text} not found; pass a local folder or a hub id like Qwen/Qwen2-0.5B.")
    return _download(text, revision)


def _download(repo_id: str, revision: str | None) -> Path:
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=HUB_PATTERNS))
    except RepositoryNotFoundError as e:
        raise UserError(
            f"{repo_id} is neither a local folder nor a repository on the Hugging Face hub (or it is gated: "
            "log in with `hf auth login`)."
        ) from e
    except (LocalEntryNotFoundError, OSError) as e:
        raise UserError(
            f"could not download {repo_id} from the Hugging Face hub (offline?) and it is not in the local "
            "cache; download it on a connected machine, or pass the path of a local model folder."
        ) from e


def read_config(folder: Path) -> dict[str, Any]:
    path = folder / "config.json"
    if not path.is_file():
        raise UserError(f"{path} not found: {folder} is not a Hugging Face or MLX model folder.")
    return read_json(path)


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a checkpoint, checked; refuses pickled weights."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        with open(index, encoding="utf-8") as f:
            names = sorted(set(json.load(f)["weight_map"].values()))
        missing = [n for n in names if not (folder / n).is_file()]
        if missing:
            raise UserError(f"{folder} lacks shard(s) {', '.join(missing)} listed in {index.name}; re-download.")
        files = [folder / n for n in names]
    else:
        files = sorted(folder.glob("*.safetensors"))
    if not files:
        pickled = [p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES]
        if pickled:
            raise UserError(
                f"{folder} holds only pickled weights ({', '.join(pickled)}), which mlx_qwen2 never loads "
                "because unpickling can run arbitrary code; use a safetensors checkpoint."
            )
        raise UserError(f"no .safetensors weights in {folder}.")
    return files


def load_weights(folder: Path, shard: Shard | None = None) -> dict[str, mx.array]:
    """All tensors of a checkpoint as lazy MLX arrays (nothing is read until evaluated). With `shard`
    (key -> split axis or None, this rank, the number of ranks), split tensors are this rank's part only,
    read from the file alone."""
    weights: dict[str, mx.array] = {}
    for f in weight_files(folder):
        lazy = load_safetensors(f)
        if shard is None:
            weights.update(lazy)
            continue
        axis_of, rank, parts = shard
        header = check_safetensors(f)
        for key, w in lazy.items():
            axis = axis_of(key)
            weights[key] = w if axis is None else read_slice(f, header, key, axis, rank, parts)
    return weights


def quantization_block(config: dict[str, Any]) -> dict[str, Any]:
    """config.json's quantization settings ({} for a float checkpoint)."""
    return config.get("quantization") or config.get("quantization_config") or {}


def apply_quantization(model: nn.Module, config: dict[str, Any], weights: dict[str, mx.array]) -> None:
    """Swap in quantized layers where the checkpoint holds `.scales`, with per-layer overrides."""
    q = quantization_block(config)
    if not q:
        return
    defaults = {"group_size": q["group_size"], "bits": q["bits"], "mode": q.get("mode", "affine")}

    def predicate(path: str, module: nn.Module) -> bool | dict[str, Any]:
        override = q.get(path)
        if override is False or f"{path}.scales" not in weights:
            return False
        if isinstance(override, dict):
            return {**defaults, **{k: override[k] for k in ("group_size", "bits", "mode") if k in override}}
        return defaults

    nn.quantize(model, class_predicate=predicate)


DTYPES = {"float16": mx.float16, "bfloat16": mx.bfloat16, "float32": mx.float32}


def as_dtype(dtype: mx.Dtype | str | None) -> mx.Dtype | None:
    """An `mx.Dtype`, or one of the names the command lines take ("float16", "bfloat16", "float32")."""
    if dtype is None or isinstance(dtype, mx.Dtype):
        return dtype
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    raise UserError(f"dtype {dtype!r} is not supported; use one of {', '.join(DTYPES)} (or an mx.Dtype).")


def load_model(folder: Path, dtype: mx.Dtype | str | None = None, lazy: bool = False) -> Model:
    """Build the model from config.json and set its weights."""
    dtype = as_dtype(dtype)
    config = read_config(folder)
    return _with_weights(build(args_from_config(config)), folder, config, dtype, lazy)


def _with_weights(
    model: Model,
    folder: Path,
    config: dict[str, Any],
    dtype: mx.Dtype | None,
    lazy: bool,
    shard: Shard | None = None,
    local_key: Callable[[str], str | None] | None = None,
) -> Model:
    """Set the checkpoint's weights (quantized layers first, where config.json says so). `shard` and
    `local_key` are a tensor-parallel rank's part of each tensor, and a pipeline stage's keys (see parallel)."""
    weights = load_weights(folder, shard)
    if local_key is not None:
        weights = {local: w for k, w in weights.items() if (local := local_key(k)) is not None}
    weights = model.sanitize(weights)
    apply_quantization(model, config, weights)
    if dtype is not None:
        weights = {k: v.astype(dtype) if mx.issubdtype(v.dtype, mx.floating) else v for k, v in weights.items()}
    try:
        model.load_weights(list(weights.items()), strict=True)
    except ValueError as e:
        raise UserError(f"the weights in {folder} do not match its config.json: {e}") from e
    if not lazy:
        for layer in model.layers:  # a layer at a time: stacking a checkpoint's experts copies one layer's
            mx.eval(layer.parameters())
        mx.eval(model.parameters())
    model.eval()
    return model


def eos_ids(folder: Path) -> set[int]:
    """EOS ids from generation_config.json and config.json."""
    ids: set[int] = set()
    for name in ("generation_config.json", "config.json"):
        value = read_json(folder / name, missing_ok=True).get("eos_token_id")
        ids.update(value if isinstance(value, list) else [value] if isinstance(value, int) else [])
    return ids


def load(
    path_or_id: str | os.PathLike[str],
    dtype: mx.Dtype | str | None = None,
    lazy: bool = False,
    revision: str | None = None,
    fast: bool = True,
    adapter_path: str | os.PathLike[str] | None = None,
    group: mx.distributed.Group | None = None,
    parallel: str = "tensor",
) -> tuple[Model, Tokenizer]:
    """Load a Qwen2 model and its tokenizer from a local folder or a hub id.

    `dtype` casts float weights (an `mx.Dtype` or its name). `fast` swaps in the layers that are
    fastest on the default device (see `backends/cpu/layers.py`);
    they compute the same function up to float rounding. `adapter_path` applies
    LoRA/DoRA adapters saved by `python -m mlx_qwen2.lora` (or by mlx-lm). With a `group` of more than
    one process (`mx.distributed.init()` under `mlx.launch`), this process holds its share of the model,
    `parallel` "tensor" or "pipeline" (see `parallel.py`), and reads only that share's tensors.
    """
    folder = resolve_path(path_or_id, revision)
    dtype = as_dtype(dtype)
    config = read_config(folder)
    model = build(args_from_config(config))  # no weights yet: a wrong folder is told by its config first
    tokenizer = Tokenizer.from_folder(folder, eos_token_ids=eos_ids(folder))
    shard = local_key = select = None
    if group is not None and group.size() > 1:
        if parallel not in MODES:
            raise UserError(f"parallel must be one of {', '.join(MODES)}, got {parallel!r}.")
        check_same_everywhere(group, config, str(dtype), parallel, adapter_digest(adapter_path))
        rank, n = group.rank(), group.size()
        if parallel == "tensor":
            model = shard_tensor_parallel(model, group, quantization_block(config).get("group_size"))
            split_head = splits_head(model.args, n)
            shard = (functools.partial(tensor_parallel_axis, split_head=split_head), rank, n)

            def select(key: str, w: mx.array) -> tuple[str, mx.array]:  # this rank's part of every adapter
                return key, local_part(w, adapter_axis(key, split_head), rank, n)
        else:
            local_key = shard_pipeline(model, group)

            def select(key: str, w: mx.array) -> tuple[str, mx.array] | None:  # the adapters of this rank's layers
                local = local_key(key)
                return None if local is None else (local, w)

    _with_weights(model, folder, config, dtype, lazy, shard, local_key)
    if fast:
        use_fast_layers(model)
    if adapter_path is not None:
        load_adapters(model, adapter_path, select)
    return model, tokenizer


def adapter_digest(adapter_path: str | os.PathLike[str] | None) -> str | None:
    """A digest of an adapter folder's two files (so that ranks given different adapters refuse to start)."""
    if adapter_path is None:
        return None
    digest = hashlib.sha256()
    for name in ("adapter_config.json", "adapters.safetensors"):
        path = Path(adapter_path) / name
        if path.is_file():  # a missing file is reported by load_adapters, on every rank
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
    return digest.hexdigest()


def load_draft(
    path_or_id: str | os.PathLike[str] | None,
    tokenizer: Tokenizer,
    dtype: mx.Dtype | str | None = None,
    fast: bool = True,
) -> Model | None:
    """A draft model for speculative decoding (None for no path), after checking it shares `tokenizer`'s vocabulary."""
    if path_or_id is None:
        return None
    draft, draft_tokenizer = load(path_or_id, dtype=dtype, fast=fast)
    check_same_vocab(tokenizer, draft_tokenizer)
    return draft
