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

Also given: the rate of the step's matrix products, 2 x rows x the model's matrix weights (every projection
and the output layer) over the step's time, in GFLOPS, beside the machine's float32 multiply-add peak
(benchmarks/peak_flops.c, compiled as the kernels are, on every core): how near a batch's step is to being
bound by compute rather than by the bytes it reads.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.common import ROOT, median_seconds
from benchmarks.generation import model_folders
from mlx_qwen2.loader import read_config
from mlx_qwen2.models.base import ModelArgs

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


def matrix_weights(args: ModelArgs) -> int:
    """Weights of every projection and of the output layer: a token's multiply-adds in the products."""
    d = args.hidden_size
    attention = 2 * d * (args.num_attention_heads + args.n_kv_heads) * args.head_dim  # q and o; k and v
    return args.num_hidden_layers * (attention + 3 * d * args.intermediate_size) + args.vocab_size * d


def peak_gflops() -> float | None:
    """The machine's float32 multiply-add peak on every core (benchmarks/peak_flops.c); None without a compiler."""
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        binary = str(Path(tmp) / "peak")
        source = str(Path(__file__).with_name("peak_flops.c"))
        subprocess.run([compiler, "-O3", "-march=native", "-fopenmp", source, "-o", binary], check=True)
        return max(float(subprocess.run([binary], capture_output=True, text=True, check=True).stdout.split()[0])
                   for _ in range(3))  # fmt: skip


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
    peak = peak_gflops()
    print(
        "| model / batch | ms a step | tokens/s | x batch 1 | products GFLOPS | ms, no kernels (split) | ms, neither "
        "| kernels / split |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, folder in folders.items():
        first, weights = None, matrix_weights(ModelArgs.from_dict(read_config(Path(folder))))
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
            gflops = 2 * b * weights / kernel / 1e6
            print(
                f"| {name} / {b} | {kernel:.0f} | {rate:.1f} | {rate / first:.2f}x | {gflops:.1f} | {split:.0f} "
                f"| {plain:.0f} | {kernel / split:.2f} |",
                flush=True,
            )
    if peak is not None:
        print(f"\nThis machine's float32 multiply-add peak (benchmarks/peak_flops.c, every core): {peak:.1f} GFLOPS")


if __name__ == "__main__":
    main()
