"""One decode step of a batch of sequences, by itself: milliseconds and tokens/s at each batch size.

    python -m benchmarks.decode_step [--models 4bit float32] [--batches 1 2 4 8 16] [--keys 60] [--rounds 1]

Each measurement is a fresh process: the model (the fixture model's folders of benchmarks.generation),
a batch cache of B rows holding `--keys` random keys and values, one token a row through the model and
the argmax of its logits, the median of 7 steps after 2. This is what batch_generate's decode part costs
a step, without its prefill and scheduling (benchmarks/batch.py measures those, beside mlx-lm); ours only.
Each step is measured three ways, interleaved, `--rounds` times each (medians): as generation runs it
(inside `backends/cpu/layers.inference`: few-row products through the compiled kernels), without the
kernels (passes of 2-8 tokens split over the CPU streams), and with neither (`SPLIT_TOKENS` emptied:
OpenBLAS keeps its threads, products padded to 16 rows).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import subprocess
import sys

from benchmarks.common import ROOT, median_seconds
from benchmarks.generation import model_folders

MODES = ("kernels", "split", "plain")


def worker(folder: str, batch: int, keys: int, mode: str) -> None:
    import mlx.core as mx

    from mlx_qwen2 import load
    from mlx_qwen2.backends.cpu import layers
    from mlx_qwen2.cache.batch import BatchKVCache

    if mode == "plain":
        layers.SPLIT_TOKENS = range(0)
    passes = layers.inference if mode == "kernels" else contextlib.nullcontext

    model, _ = load(folder)
    args = model.args
    shape = (batch, args.n_kv_heads, keys, args.head_dim)
    cache = [BatchKVCache(mx.random.normal(shape), mx.random.normal(shape), [0] * batch) for _ in model.layers]
    tokens = mx.arange(100, 100 + batch)[:, None]

    def step() -> mx.array:
        with passes():
            y = mx.argmax(model(tokens, cache=cache)[:, -1], axis=-1)
        mx.eval(y)
        for c in cache:
            c.trim(1)  # the same length every step
        return y

    seconds = median_seconds(step, rounds=7)
    print(json.dumps({"ms": seconds * 1e3, "tokens_per_s": batch / seconds}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["4bit", "float32"])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    p.add_argument("--keys", type=int, default=60, help="cached positions a row")
    p.add_argument("--rounds", type=int, default=1, help="measurements of each step, interleaved (medians)")
    p.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args.worker[0], int(args.worker[1]), args.keys, args.worker[2])
    folders = model_folders(args.models)
    print(
        "| model / batch | ms a step | tokens/s | x batch 1 | ms, no kernels (split) | ms, neither | kernels / split |"
    )
    print("|---|---|---|---|---|---|---|")
    for name, folder in folders.items():
        first = None
        for b in args.batches:
            ms: dict[str, list[float]] = {mode: [] for mode in MODES}
            for _ in range(args.rounds):
                for mode in ms:
                    cmd = [sys.executable, "-m", "benchmarks.decode_step", "--keys", str(args.keys)]
                    cmd += ["--worker", str(folder), str(b), mode]
                    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, check=True)
                    ms[mode].append(json.loads(out.stdout.strip().splitlines()[-1])["ms"])
            kernel, split, plain = (statistics.median(ms[mode]) for mode in MODES)
            rate = b / kernel * 1e3
            first = first or rate
            print(
                f"| {name} / {b} | {kernel:.0f} | {rate:.1f} | {rate / first:.2f}x | {split:.0f} | {plain:.0f} "
                f"| {kernel / split:.2f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
