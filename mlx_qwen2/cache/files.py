"""Prompt-cache files: a prefilled KV cache and its token ids in one safetensors file, for one model only.

The file records what made it: a fingerprint of the model (config.json, each weight file's name, size,
header and first and last MiB, the adapters if any, the compute dtype) and one of the tokenizer.
Loading it for another model or tokenizer is refused with an error saying so; a file that is not
one of ours, or is damaged, is an error too, never a crash. Files are written atomically.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import mlx.core as mx

from ..errors import UserError
from ..files import atomic_write, check_safetensors
from .kv import KVCache
from .quantized import QuantizedKVCache
from .rotating import RotatingKVCache

FORMAT = "mlx_qwen2.prompt-cache.v1"
SAMPLE = 1 << 20  # bytes hashed at each end of a weight file


def _hash_file_ends(h: Any, path: Path) -> None:
    size = path.stat().st_size
    h.update(f"{path.name}:{size}".encode())
    with open(path, "rb") as f:
        h.update(f.read(SAMPLE))  # the header and the first tensors
        if size > 2 * SAMPLE:
            f.seek(size - SAMPLE)
        h.update(f.read(SAMPLE))


def model_fingerprint(folder: Path, adapter_path: str | Path | None = None, dtype: str | None = None) -> str:
    """What a cache depends on: the model's config and weights, its adapters, its compute dtype."""
    h = hashlib.sha256()
    h.update((folder / "config.json").read_bytes())
    for path in sorted(folder.glob("*.safetensors")):
        _hash_file_ends(h, path)
    if adapter_path is not None:
        for path in sorted(Path(adapter_path).glob("adapter*")):
            h.update(path.read_bytes())
    h.update(f"dtype={dtype}".encode())
    return h.hexdigest()


def tokenizer_fingerprint(folder: Path) -> str:
    h = hashlib.sha256()
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (folder / name).is_file():
            h.update((folder / name).read_bytes())
    return h.hexdigest()


def _kind(cache: Any) -> dict[str, Any]:
    if isinstance(cache, QuantizedKVCache):
        return {"kind": "quantized", "bits": cache.bits, "group_size": cache.group_size}
    if isinstance(cache, RotatingKVCache):
        return {"kind": "rotating", "max_size": cache.max_size, "keep": cache.keep}
    if isinstance(cache, KVCache):
        return {"kind": "kv"}
    raise UserError(f"a {type(cache).__name__} cannot be saved to a prompt-cache file.")


def save_prompt_cache(path: Path, cache: list[Any], tokens: list[int], model: str, tokenizer: str) -> None:
    """Write the cache (one per layer, holding exactly `tokens`) and its provenance, atomically."""
    if any(c.offset != len(tokens) for c in cache):
        raise ValueError("the cache does not hold exactly these tokens")  # a caller's bug, not a user's
    arrays = {f"layers.{i}.{j}": a for i, c in enumerate(cache) for j, a in enumerate(c.state)}
    arrays["tokens"] = mx.array(tokens, dtype=mx.int32)
    meta = {"format": FORMAT, "model": model, "tokenizer": tokenizer, "layers": json.dumps([_kind(c) for c in cache])}
    meta["offsets"] = json.dumps([c.offset for c in cache])
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: mx.save_safetensors(tmp, arrays, metadata=meta))


def _restore(kind: dict[str, Any], arrays: list[mx.array], offset: int) -> Any:
    if kind["kind"] == "kv":
        cache = KVCache()
        cache.restore(*arrays)
    elif kind["kind"] == "quantized":
        cache = QuantizedKVCache(kind["bits"], kind["group_size"])
        cache.restore(*arrays)
    else:
        cache = RotatingKVCache(kind["max_size"], kind["keep"])
        cache.restore(*arrays, offset=offset)
    return cache


def load_prompt_cache(path: Path, model: str, tokenizer: str) -> tuple[list[Any], list[int]]:
    """(cache per layer, the token ids it holds); UserError if the file is not for this model and tokenizer."""
    if not path.is_file():
        raise UserError(f"prompt-cache file {path} not found; make one with `python -m mlx_qwen2.cache_prompt`.")
    check_safetensors(path)  # header and size first: a truncated file is a clear error
    try:
        arrays, meta = mx.load(str(path), return_metadata=True)
    except (RuntimeError, ValueError) as e:
        raise UserError(f"{path} is not a readable prompt-cache file ({e}); make it again.") from e
    if meta.get("format") != FORMAT:
        raise UserError(f"{path} is not a prompt-cache file of mlx_qwen2 ({FORMAT}); make it again.")
    if meta.get("model") != model:
        raise UserError(f"{path} was made with another model (or adapters, or dtype); make it again for this one.")
    if meta.get("tokenizer") != tokenizer:
        raise UserError(f"{path} was made with another tokenizer; make it again for this model.")
    try:
        kinds, offsets = json.loads(meta["layers"]), json.loads(meta["offsets"])
        cache = [
            _restore(kind, [arrays[f"layers.{i}.{j}"] for j in range(6 if kind["kind"] == "quantized" else 2)], off)
            for i, (kind, off) in enumerate(zip(kinds, offsets))
        ]
        tokens = arrays["tokens"].tolist()
    except (KeyError, TypeError, ValueError, IndexError) as e:
        raise UserError(f"{path} is damaged ({e!r}); make it again.") from e
    if any(c.offset != len(tokens) for c in cache):
        raise UserError(f"{path} is damaged (its caches and tokens disagree); make it again.")
    return cache, tokens
