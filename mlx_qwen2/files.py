"""Files, one at a time: reading JSON and safetensors checked (a bad file is a clear error, not a crash),
and replacing a file atomically.

Knows nothing of models; tensors are returned lazily (nothing is read until evaluated).
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from .errors import UserError


def read_json(path: Path, missing_ok: bool = False) -> dict[str, Any]:
    """A JSON object from a file; {} for a missing file when `missing_ok`."""
    if missing_ok and not path.is_file():
        return {}
    if not path.is_file():
        raise UserError(f"{path} not found.")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not valid JSON ({e}); re-download or re-convert the model.") from e
    if not isinstance(data, dict):
        raise UserError(f"{path} must hold a JSON object; re-download or re-convert the model.")
    return data


def jsonl_records(path: Path) -> Iterator[tuple[int, Any]]:
    """(line number, parsed JSON) of every non-blank line; UserError naming the file and line of a line that
    is not UTF-8 or not JSON. What a record must hold is the caller's to check."""
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                where = f"{e.reason} at byte {e.start} of the line"
                raise UserError(f"{path}, line {n}: not UTF-8 text ({where}); save it as UTF-8.") from e
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}, line {n}: {e}") from e
            yield n, record


def check_safetensors(path: Path) -> dict[str, Any]:
    """The header of a safetensors file; UserError if the file is truncated or its header is corrupt."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > size - 8:
                raise ValueError("header longer than the file")
            header = json.loads(f.read(n))
        end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    except (struct.error, ValueError, KeyError, TypeError, IndexError, AttributeError) as e:
        raise UserError(f"{path} is not a valid safetensors file ({e}); re-download or re-convert it.") from e
    if 8 + n + end > size:
        raise UserError(
            f"{path} is truncated: its header promises {8 + n + end} bytes but the file has {size}; "
            "re-download or re-convert it."
        )
    header["__data_start__"] = 8 + n
    return header


def load_safetensors(path: Path) -> dict[str, mx.array]:
    """The tensors of one checked file, lazily."""
    check_safetensors(path)
    return mx.load(str(path))


# safetensors dtype -> (numpy dtype to read the bytes as, MLX dtype they are)
_DTYPES = {
    "F32": (np.float32, mx.float32),
    "F16": (np.float16, mx.float16),
    "BF16": (np.uint16, mx.bfloat16),
    "U32": (np.uint32, mx.uint32),
    "I32": (np.int32, mx.int32),
    "U8": (np.uint8, mx.uint8),
}


def read_slice(path: Path, header: dict[str, Any], key: str, axis: int, part: int, parts: int) -> mx.array:
    """Part `part` of `parts` equal parts of tensor `key` along `axis`, read from the file alone (the rest of
    the tensor is never copied into memory); axis None reads the whole tensor."""
    entry = header[key]
    if entry["dtype"] not in _DTYPES:
        raise UserError(f"{path}: tensor {key} has dtype {entry['dtype']}, which mlx_qwen2 cannot read in parts.")
    np_dtype, mx_dtype = _DTYPES[entry["dtype"]]
    shape = tuple(entry["shape"])
    start = header["__data_start__"] + entry["data_offsets"][0]
    data = np.memmap(path, dtype=np_dtype, mode="r", offset=start, shape=shape)
    if axis is not None:
        if shape[axis] % parts:
            raise UserError(f"{path}: tensor {key} {shape} does not split into {parts} equal parts along axis {axis}.")
        size = shape[axis] // parts
        index = [slice(None)] * len(shape)
        index[axis] = slice(part * size, (part + 1) * size)
        data = data[tuple(index)]
    out = mx.array(np.ascontiguousarray(data))
    return out.view(mx_dtype) if mx_dtype == mx.bfloat16 else out


def atomic_write(path: Path, write: Callable[[str], object]) -> None:
    """`write(temporary path)`, then the file replaces `path`: a failure (a full disk) leaves the old file intact."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
