"""Atomic output folders: an interrupt at any step of the swap leaves the old folder or the new one, whole."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from mlx_qwen2 import writer
from mlx_qwen2.errors import UserError
from mlx_qwen2.files import atomic_write
from mlx_qwen2.writer import atomic_dir

# The swap's steps, in order: each call of os.rename, then the removal of the old folder.
STEPS = [
    ("rename", 1, "before"),  # moving the old folder aside
    ("rename", 1, "after"),
    ("rename", 2, "before"),  # moving the new folder into place
    ("rename", 2, "after"),
    ("rmtree", 1, "before"),  # removing the old folder
    ("rmtree", 1, "during"),
]


def old_folder(path: Path) -> None:
    path.mkdir()
    (path / "old.txt").write_text("old")


def contents(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir())


def hidden(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


@pytest.mark.parametrize("call, n, when", STEPS)
def test_interrupt_at_each_step_of_the_swap(call, n, when, tmp_path, monkeypatch):
    out = tmp_path / "out"
    old_folder(out)
    real = {"rename": os.rename, "rmtree": shutil.rmtree}
    seen = {"rename": 0, "rmtree": 0}

    def interrupting(kind):
        def fake(src, *args, **kwargs):
            seen[kind] += 1
            if kind != call or seen[kind] != n or (kind == "rmtree" and ".old-" not in str(src)):
                return real[kind](src, *args, **kwargs)
            if when == "during":  # half of the old folder is gone
                (Path(src) / "old.txt").unlink()
            if when == "after":
                real[kind](src, *args, **kwargs)
            raise KeyboardInterrupt

        return fake

    monkeypatch.setattr(writer.os, "rename", interrupting("rename"))
    monkeypatch.setattr(writer.shutil, "rmtree", interrupting("rmtree"))
    with pytest.raises(KeyboardInterrupt):
        with atomic_dir(out, force=True) as tmp:
            (tmp / "new.txt").write_text("new")
    monkeypatch.undo()
    assert out.is_dir()
    assert contents(out) in (["old.txt"], ["new.txt"])  # one or the other, whole
    if call == "rename" and (n, when) in ((1, "before"), (1, "after"), (2, "before")):
        assert contents(out) == ["old.txt"]  # the new folder never made it: the old one is back
    # The next run (another process) cleans what was left and writes its own output.
    monkeypatch.setattr(writer, "_pid_alive", lambda pid: False)
    with atomic_dir(out, force=True) as tmp:
        (tmp / "next.txt").write_text("next")
    assert contents(out) == ["next.txt"]
    assert hidden(tmp_path) == []


def test_a_process_killed_between_the_renames_gets_its_folder_back(tmp_path):
    out = tmp_path / "out"
    stranded = tmp_path / ".out.old-999999999"  # the old folder, moved aside by a process that is gone
    old_folder(stranded)
    with pytest.raises(UserError, match="not empty"):
        with atomic_dir(out):  # the recovered folder is not overwritten without force
            pass
    assert contents(out) == ["old.txt"] and hidden(tmp_path) == []


def test_a_live_process_leftover_is_not_touched(tmp_path):
    out = tmp_path / "out"
    busy = tmp_path / f".out.old-{os.getpid()}"  # a swap still under way in a live process
    old_folder(busy)
    with atomic_dir(out) as tmp:
        (tmp / "new.txt").write_text("new")
    assert contents(out) == ["new.txt"] and busy.is_dir()


def test_atomic_write_keeps_the_old_file_on_failure(tmp_path):
    path = tmp_path / "a.json"
    path.write_text("old")

    def failing(tmp: str) -> None:
        Path(tmp).write_text("half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        atomic_write(path, failing)
    assert path.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]
