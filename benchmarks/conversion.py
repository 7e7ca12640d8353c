"""Conversion wall time and peak memory, mlx_qwen2 beside mlx-lm, same source, interleaved rounds.

    python benchmarks/conversion.py [--rounds 3] [--bits 4]

Each conversion runs in a fresh process; peak memory is the process's maximum RSS
(the source is float32, 2.5 GB on disk: "two copies" would be 5 GB).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import ROOT, real_model_folder

# Each child reports its own peak RSS when it exits (however it exits).
REPORT = (
    "import atexit, resource, sys; atexit.register(lambda: print('MAXRSS_KB', "
    "resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)); "
)
COMMANDS = {
    "mlx_qwen2": REPORT + "import mlx_qwen2.convert as c; sys.exit(c.main(sys.argv[1:]))",
    "mlx-lm": REPORT + "import importlib; importlib.import_module('mlx_lm.convert').main()",
}


def run(tool: str, src: Path, out: Path, bits: int) -> dict[str, float]:
    args = ["--hf-path", str(src), "--mlx-path", str(out), "-q", "--q-bits", str(bits)]  # the same flags in both
    env = {**os.environ, "MLX_QWEN2_BLAS": "off"} if tool == "mlx-lm" else None
    tic = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", COMMANDS[tool], *args], check=True, capture_output=True, text=True, env=env, cwd=ROOT
    )
    wall = time.perf_counter() - tic
    peak_kb = int(done.stderr.rsplit("MAXRSS_KB", 1)[1].split()[0])
    return {"wall_s": wall, "peak_rss_gb": peak_kb / 1e6}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--out", default=str(ROOT / "bench-out" / "conversion.json"))
    args = p.parse_args()
    src = real_model_folder()
    rows: dict[str, list] = {t: [] for t in COMMANDS}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for tool in COMMANDS:
                out = Path(tmp) / f"{tool}-{r}"
                rows[tool].append(run(tool, src, out, args.bits))
                print(f"round {r + 1} {tool}: {rows[tool][-1]}", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rows, indent=2))
    wall = {t: statistics.median(x["wall_s"] for x in rows[t]) for t in rows}
    print(f"\n| {args.bits}-bit conversion of the float32 0.5B model | mlx_qwen2 | mlx-lm | ratio |")
    print("|---|---|---|---|")
    rss = {t: statistics.median(x["peak_rss_gb"] for x in rows[t]) for t in rows}
    for name, v in (("wall time (s)", wall), ("peak RSS (GB)", rss)):
        print(f"| {name}, median | {v['mlx_qwen2']:.2f} | {v['mlx-lm']:.2f} | {v['mlx_qwen2'] / v['mlx-lm']:.2f} |")


if __name__ == "__main__":
    main()
