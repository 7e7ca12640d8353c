"""Shared by the benchmark scripts: the real model folder, held-out text, perplexity, timing."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

import mlx_qwen2  # noqa: F401  (before mlx.core: picks the optimized BLAS)

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from examples.fetch_model import SHA256, cache_dir, gguf_path  # noqa: E402
from mlx_qwen2.backends.cpu import blas  # noqa: E402
from mlx_qwen2.convert import main as convert_main  # noqa: E402

# Held-out text for a coder model: modules of Python's standard library (not in the calibration sample).
EVAL_FILES = ("textwrap.py", "json/decoder.py", "heapq.py", "bisect.py", "fnmatch.py")


def real_model_folder() -> Path:
    """The fixture model imported to a float32 Hugging Face folder (cached next to the GGUF)."""
    out = cache_dir() / "qwen2.5-coder-0.5b-instruct-f32"
    if not (out / "config.json").is_file():
        assert convert_main(["--gguf", str(gguf_path()), "--mlx-path", str(out), "--sha256", SHA256, "--force"]) == 0
    return out


def eval_text() -> str:
    lib = Path(sysconfig.get_paths()["stdlib"])
    return "\n\n".join((lib / f).read_text() for f in EVAL_FILES)


CHINESE_MAN_PAGE = Path("/usr/share/man/zh_CN/man1/bash.1.gz")  # Debian's manpages-zh


def held_out_texts() -> dict[str, str]:
    """Texts of three kinds that no calibration or tuning choice of ours was made on.

    - code: Python's email/message.py and http/client.py;
    - English prose: the Python documentation's topic pages (pydoc_data);
    - Chinese: the Chinese translation of the bash manual (`apt install manpages-zh`), roff markup removed.
    """
    import gzip
    import re
    from pydoc_data.topics import topics

    lib = Path(sysconfig.get_paths()["stdlib"])
    code = "\n\n".join((lib / f).read_text() for f in ("email/message.py", "http/client.py"))
    prose = "\n\n".join(topics[k] for k in sorted(topics))
    if not CHINESE_MAN_PAGE.is_file():
        raise SystemExit(f"{CHINESE_MAN_PAGE} not found: install Debian's manpages-zh (apt install manpages-zh).")
    lines = gzip.decompress(CHINESE_MAN_PAGE.read_bytes()).decode("utf-8").splitlines()
    chinese = "\n".join(
        re.sub(r"\\f[BIRP]|\\\(\w\w|\\-|\\&", "", re.sub(r"^\.\w+\s*", "", line))
        for line in lines
        if re.search("[\u4e00-\u9fff]", line) and not line.startswith('.\\"')
    )
    return {"code (email, http.client)": code, "English prose (Python docs)": prose, "Chinese (bash manual)": chinese}


def perplexity(model, ids: list[int], window: int = 512) -> float:
    """exp(mean next-token NLL) over non-overlapping windows."""
    nll, n = 0.0, 0
    for i in range(0, len(ids) - 1, window):
        chunk = ids[i : i + window + 1]
        if len(chunk) < 2:
            break
        logits = model(mx.array([chunk[:-1]]))[0].astype(mx.float32)
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        picked = mx.take_along_axis(logprobs, mx.array(chunk[1:])[:, None], axis=-1)
        nll -= float(picked.sum())
        n += len(chunk) - 1
    return float(np.exp(nll / n))


def openblas() -> str:
    """The OpenBLAS library mlx_qwen2 loaded in this process (for LD_PRELOAD into mlx-lm's)."""
    if not blas.in_use.startswith("OpenBLAS ("):
        raise SystemExit(f"no OpenBLAS in use ({blas.in_use}); install libopenblas0-pthread to compare like for like.")
    return blas.in_use.removeprefix("OpenBLAS (").removesuffix(")")


def same_blas(env: dict[str, str]) -> dict[str, str]:
    """`env` with our OpenBLAS preloaded as ours loaded it: the same library and the same kernels (the
    OPENBLAS_CORETYPE `blas.preload` chose, if it chose one)."""
    env["LD_PRELOAD"] = openblas()
    if blas.chosen_coretype is not None:
        env["OPENBLAS_CORETYPE"] = blas.chosen_coretype
    return env


def run_worker(module: str, tool: str, argv: list[str], timeout: float) -> dict | None:
    """Run `python -m benchmarks.MODULE --tool ... ARGV` in a fresh process; its last stdout line as JSON, or
    None past `timeout`. "mlx-lm" runs on MLX's own BLAS, "mlx-lm + OpenBLAS" on ours through LD_PRELOAD alone
    (the workers' package imports mlx_qwen2, whose own BLAS loading is switched off for mlx-lm); checked in
    the worker's memory map."""
    worker_tool = "mlx-lm" if tool.startswith("mlx-lm") else tool
    cmd = [sys.executable, "-m", f"benchmarks.{module}", "--tool", worker_tool, *argv]
    env = {**os.environ, "MLX_QWEN2_BLAS": "off"} if tool.startswith("mlx-lm") else None
    if tool == "mlx-lm + OpenBLAS":
        same_blas(env)
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, check=True, env=env)
    except subprocess.TimeoutExpired:
        return None
    except subprocess.CalledProcessError as e:
        raise RuntimeError(f"{tool} failed ({' '.join(argv)}):\n{e.stderr[-2000:]}") from e
    result = json.loads(out.stdout.strip().splitlines()[-1])
    if tool.startswith("mlx") and ("openblas" in result["blas"]) != (tool != "mlx-lm"):
        raise RuntimeError(f"{tool} ran with the wrong BLAS: {result['blas']}")
    return result


def median_seconds(f, rounds: int = 10) -> float:
    """Median seconds of `mx.eval(f())` over `rounds` calls, after two to warm up."""
    for _ in range(2):
        mx.eval(f())
    times = []
    for _ in range(rounds):
        tic = time.perf_counter()
        mx.eval(f())
        times.append(time.perf_counter() - tic)
    return statistics.median(times)
