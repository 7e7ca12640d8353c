"""The package as a user gets it: built as a wheel, installed into a fresh venv, every entry point's --help works."""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def modules() -> list[str]:
    """The `python -m mlx_qwen2.X` entry points: the modules that end in `if __name__ == "__main__":`, and the
    subpackages with a `__main__.py`."""
    package = ROOT / "mlx_qwen2"
    names = [p.stem for p in package.glob("*.py") if 'if __name__ == "__main__":' in p.read_text()]
    return sorted(names + [p.parent.name for p in package.glob("*/__main__.py")])


def console_scripts() -> list[str]:
    entry_points = importlib.metadata.distribution("mlx_qwen2").entry_points
    return sorted(e.name for e in entry_points if e.group == "console_scripts")


@pytest.fixture(scope="module")
def fresh_venv(tmp_path_factory) -> Path:
    """A new venv with the wheel installed (dependencies are shared from this environment, not downloaded)."""
    work = tmp_path_factory.mktemp("wheel")
    source = work / "source"  # a copy: a build leaves build/ behind, and an old build/ could fill the wheel
    shutil.copytree(ROOT / "mlx_qwen2", source / "mlx_qwen2", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, source / name)
    pip = [sys.executable, "-m", "pip"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(work), str(source)], check=True)
    (wheel,) = work.glob("mlx_qwen2-*.whl")
    env_dir = work / "venv"
    venv.create(env_dir, with_pip=False)
    python = env_dir / "bin" / "python"
    site = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], capture_output=True, text=True
    ).stdout.strip()
    # This environment's packages (mlx, tokenizers, ...) for the new one, without its editable mlx_qwen2:
    # a path line in a .pth file adds that folder, and the .pth files inside it are not run.
    (Path(site) / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([*pip, "--python", str(python), "install", "--no-deps", "--no-index", "-q", str(wheel)], check=True)
    return env_dir


def run(env_dir: Path, *argv: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = f"{env_dir / 'bin'}{os.pathsep}{env['PATH']}"
    return subprocess.run(argv, capture_output=True, text=True, cwd=env_dir, env=env, timeout=120)


def test_the_wheel_is_what_is_imported(fresh_venv):
    out = run(fresh_venv, str(fresh_venv / "bin" / "python"), "-c", "import mlx_qwen2; print(mlx_qwen2.__file__)")
    assert out.returncode == 0, out.stderr
    assert str(fresh_venv) in out.stdout  # from the installed wheel, not from this checkout


def test_the_wheel_ships_the_calibration_sample(fresh_venv):
    code = "from mlx_qwen2.quant.calibration import SAMPLE; print(SAMPLE.stat().st_size)"
    out = run(fresh_venv, str(fresh_venv / "bin" / "python"), "-c", code)
    assert out.returncode == 0 and int(out.stdout) > 50_000, out.stderr


def test_the_wheel_ships_and_builds_the_kernels(fresh_venv, tmp_path):
    code = "from mlx_qwen2.backends.cpu import kernels; print(kernels.SOURCE.is_file(), kernels.available())"
    out = run(fresh_venv, str(fresh_venv / "bin" / "python"), "-c", code)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["True", str(shutil.which("cc") is not None)]


@pytest.mark.parametrize("module", modules())
def test_python_m_help(fresh_venv, module):
    out = run(fresh_venv, str(fresh_venv / "bin" / "python"), "-m", f"mlx_qwen2.{module}", "--help")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("usage:") and out.stderr == ""


@pytest.mark.parametrize("script", console_scripts())
def test_console_script_help(fresh_venv, script):
    out = run(fresh_venv, str(fresh_venv / "bin" / script), "--help")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("usage:")


def test_every_entry_point_is_tested():
    assert modules() == ["cache_prompt", "chat", "convert", "fuse", "generate", "lora", "server"]
    assert console_scripts() == [f"mlx_qwen2-{m}" for m in modules()]
