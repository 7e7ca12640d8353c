"""MLX's CPU exponentials against elementwise.py's (e^x through mx.power), and what they do to prefill.

    python -m benchmarks.elementwise [--prompts 512 2048] [--rounds 2]

Part 1, in this process: nanoseconds an element of MLX's exp, sigmoid, SiLU and softmax, and of ours,
and one attention call at a prefill chunk's shape (MLX's fused attention against the explicit one).
Part 2, the real float32 model, one fresh process per measurement: prefill tokens/s and MLX's peak
memory over the weights with MLX's own SiLU and attention (`mlx`) and with ours (`power`), the same
prompt, and whether the greedy tokens that follow are the same.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import mlx.core as mx
import mlx.nn as nn

from benchmarks.common import ROOT, median_seconds, real_model_folder
from mlx_qwen2.backends.cpu import elementwise
from mlx_qwen2.models.base import attention


def ops() -> None:
    x = mx.random.normal((512, 4864))  # a 512-token chunk's MLP activations (0.5B model)
    mx.eval(x)
    n = x.size
    rows = [
        ("exp", lambda: mx.exp(x), lambda: elementwise.exp(x)),
        ("sigmoid / SiLU", lambda: nn.silu(x), lambda: elementwise.silu(x)),
        ("softmax (last axis)", lambda: mx.softmax(x, axis=-1, precise=True), None),
    ]
    print("| operation | MLX ns/element | ours ns/element | MLX / ours |\n|---|---|---|---|")
    for name, theirs, ours in rows:
        t = median_seconds(theirs) * 1e9 / n
        o = median_seconds(ours) * 1e9 / n if ours else None
        print(f"| {name} | {t:.2f} | {f'{o:.2f}' if o else '-'} | {f'{t / o:.2f}x' if o else '-'} |")
    print(f"| power (the C library's) | | {median_seconds(lambda: mx.power(mx.array(2.0), x)) * 1e9 / n:.2f} | |")
    print(f"| multiply, for scale | | {median_seconds(lambda: x * x) * 1e9 / n:.2f} | |")
    print(
        "\n| attention, 14 query / 2 KV heads of 64 | MLX fused (ms) | explicit, ours (ms) | ratio |\n|---|---|---|---|"
    )
    for L, T in ((512, 512), (512, 2048)):
        q, k, v = (mx.random.normal((1, h, n_, 64)) for h, n_ in ((14, L), (2, T), (2, T)))
        mask = mx.arange(T - L, T)[:, None] >= mx.arange(T)[None]
        mx.eval(q, k, v, mask)
        fused = median_seconds(
            lambda q=q, k=k, v=v, m=mask: mx.fast.scaled_dot_product_attention(q, k, v, scale=0.125, mask=m)
        )
        ours = median_seconds(lambda q=q, k=k, v=v, m=mask: attention(q, k, v, 0.125, m, None, elementwise.exp))
        print(f"| {L} queries x {T} keys | {fused * 1e3:.1f} | {ours * 1e3:.1f} | {fused / ours:.2f}x |")


def worker(args: argparse.Namespace) -> None:
    from mlx_qwen2 import load
    from mlx_qwen2.cache import make_cache
    from mlx_qwen2.generation import generate_step
    from mlx_qwen2.sample import greedy

    model, _ = load(real_model_folder())
    if args.worker == "mlx":  # MLX's own SiLU and fused attention: the class defaults
        for _, m in model.named_modules():
            m.__dict__.pop("silu", None), m.__dict__.pop("exp", None)
    mx.eval(model.parameters())
    weights = mx.get_active_memory()
    mx.reset_peak_memory()
    ids = [1000 + (i * 7919) % 50000 for i in range(args.tokens)]
    steps = generate_step(mx.array(ids), model, make_cache(len(model.layers)), greedy)
    tic = time.perf_counter()
    tokens = [next(steps)]
    ttft = time.perf_counter() - tic
    tokens += [next(steps) for _ in range(7)]
    print(
        json.dumps(
            {"prefill_tps": args.tokens / ttft, "peak_mb": (mx.get_peak_memory() - weights) / 1e6, "tokens": tokens}
        )
    )


def prefill(prompts: list[int], rounds: int) -> None:
    print(
        "\n| prompt | MLX's SiLU and attention | ours (power) | ours / MLX's | peak over weights, MLX's / ours | same tokens |"
    )
    print("|---|---|---|---|---|---|")
    for n in prompts:
        runs: dict[str, list[dict]] = {"mlx": [], "power": []}
        for _ in range(rounds):
            for kind in runs:
                cmd = [sys.executable, "-m", "benchmarks.elementwise", "--worker", kind, "--tokens", str(n)]
                out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, check=True)
                runs[kind].append(json.loads(out.stdout.strip().splitlines()[-1]))
        tps = {k: statistics.median(r["prefill_tps"] for r in v) for k, v in runs.items()}
        peak = {k: statistics.median(r["peak_mb"] for r in v) for k, v in runs.items()}
        same = all(r["tokens"] == runs["mlx"][0]["tokens"] for v in runs.values() for r in v)
        print(
            f"| {n} tokens | {tps['mlx']:.0f} tokens/s | {tps['power']:.0f} tokens/s | {tps['power'] / tps['mlx']:.2f}x "
            f"| {peak['mlx']:.0f} / {peak['power']:.0f} MB | {'yes' if same else 'NO'} |"
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prompts", type=int, nargs="+", default=[512, 2048])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--worker", choices=["mlx", "power"], help=argparse.SUPPRESS)
    p.add_argument("--tokens", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    if not elementwise.SLOW_EXP:
        print("note: this machine keeps MLX's own exp (elementwise.SLOW_EXP is false); the figures are A/B anyway")
    ops()
    prefill(args.prompts, args.rounds)


if __name__ == "__main__":
    main()
