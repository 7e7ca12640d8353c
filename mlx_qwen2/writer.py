"""Write files and model folders atomically: safetensors shards, their index, JSON files.

Everything is written into a hidden sibling (file or folder) that is renamed into
place only when complete, so a crash, a full disk or Ctrl-C leaves either the old
version or the new one, never half of one.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlx.core as mx

from .errors import UserError

MAX_SHARD_BYTES = 5 * 1024**3
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


def check_output_dir(path: Path, force: bool) -> None:
    """Refuse to overwrite a non-empty folder unless forced, and a file always."""
    if path.exists() and not path.is_dir():
        raise UserError(f"{path} exists and is a file; choose another output path.")
    if path.is_dir() and any(path.iterdir()) and not force:
        raise UserError(f"{path} exists and is not empty; pass --force to replace it, or choose another path.")
    parent = next((p for p in path.parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise UserError(f"{parent} is a file, so {path} cannot be created; choose another output path.")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def recover_leftovers(path: Path) -> None:
    """Undo what an earlier swap into `path` left when its process died mid-way.

    A `.NAME.old-PID` folder of a process that is gone is the previous `path`: put back if
    `path` is missing (the process died between its two renames), removed otherwise.
    """
    for old in path.parent.glob(f".{path.name}.old-*"):
        pid = old.name.rpartition("-")[2]
        if not pid.isdigit() or _pid_alive(int(pid)):
            continue
        if path.exists():
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(old, path)


def _swap(tmp: Path, path: Path) -> None:
    """Put the finished folder `tmp` at `path`; on any exception the old `path` is back where it was."""
    old = None
    try:
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.rename(path, old)
        os.rename(tmp, path)
    except BaseException:
        if old is not None and old.exists():
            if path.exists():  # the new folder made it into place: the old one is no longer wanted
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.rename(old, path)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)  # interrupted here: the next run removes what is left


@contextmanager
def atomic_dir(path: str | os.PathLike[str], force: bool = False) -> Iterator[Path]:
    """Yield a temporary folder that replaces `path` only if the block completes."""
    path = Path(path)
    if path.parent.is_dir():
        recover_leftovers(path)
    check_output_dir(path, force)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.partial-", dir=path.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the result should not be
    try:
        yield tmp
        _swap(tmp, path)
    except BaseException:  # KeyboardInterrupt and a full disk included: leave nothing behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_json(path: Path, data: dict[str, Any]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, ensure_ascii=False)
        f.write("\n")


def save_weights(
    folder: Path,
    tensors: Iterable[tuple[str, mx.array]],
    max_shard_bytes: int = MAX_SHARD_BYTES,
    progress: Callable[[int], None] | None = None,
) -> list[str]:
    """Evaluate and save (name, tensor) pairs a shard at a time; returns the file names.

    Tensors may be lazy: each is computed as it is reached, and a shard is freed
    once written, so peak memory is about one shard, not the whole model.
    """
    files: list[Path] = []
    weight_map: dict[str, int] = {}
    shard: dict[str, mx.array] = {}
    size = total = count = 0

    def flush() -> None:
        files.append(folder / f".shard-{len(files)}.safetensors")
        mx.save_safetensors(str(files[-1]), shard, metadata={"format": "pt"})
        shard.clear()

    for name, t in tensors:
        mx.eval(t)
        if shard and size + t.nbytes > max_shard_bytes:
            flush()
            size = 0
        shard[name], weight_map[name] = t, len(files)
        size, total, count = size + t.nbytes, total + t.nbytes, count + 1
        if progress:
            progress(count)
    if shard or not files:
        flush()
    n = len(files)
    names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    for f, name in zip(files, names):
        os.rename(f, folder / name)
    if n > 1:
        index = {"metadata": {"total_size": total}, "weight_map": {k: names[i] for k, i in weight_map.items()}}
        write_json(folder / "model.safetensors.index.json", index)
    return names


def write_model_folder(
    out: Path,
    tensors: Iterable[tuple[str, mx.array]],
    config: dict[str, Any],
    tokenizer_from: Path,
    force: bool = False,
    progress: Callable[[int], None] | None = None,
) -> None:
    """Weights, config.json and the tokenizer files of `tokenizer_from`, as one atomic folder."""
    with atomic_dir(out, force) as tmp:
        save_weights(tmp, tensors, progress=progress)
        write_json(tmp / "config.json", config)
        for name in TOKENIZER_FILES:
            if (tokenizer_from / name).is_file():
                shutil.copy2(tokenizer_from / name, tmp / name)
