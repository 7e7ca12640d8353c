"""Sampling filters on the real model's logits, ours beside mlx-lm's, in one run.

    python -m benchmarks.sampling [--positions 48]

The float32 fixture model scores a held-out text; for each of its first positions (one row of the
152k vocabulary each, as a decode step samples), top-k and top-p of mlx_qwen2.sample and of
mlx_lm.sample_utils are timed (median milliseconds over positions, each the median of 5 calls).
mlx-lm's filters take log-probabilities, ours logits: each gets its own input.
"""

from __future__ import annotations

import argparse
import statistics

import mlx.core as mx
from mlx_lm import sample_utils

from benchmarks.common import eval_text, median_seconds, real_model_folder
from mlx_qwen2 import load
from mlx_qwen2.sample import apply_top_k, apply_top_p


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--positions", type=int, default=48)
    args = p.parse_args()
    model, tok = load(real_model_folder())
    ids = tok.encode(eval_text())[: args.positions]
    logits = model(mx.array([ids]))[0].astype(mx.float32)  # (positions, vocab)
    logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    mx.eval(logits, logprobs)
    rows = [
        ("top-k 40", lambda r: apply_top_k(logits[r], 40), lambda r: sample_utils.apply_top_k(logprobs[r], 40)),
        ("top-p 0.9", lambda r: apply_top_p(logits[r], 0.9), lambda r: sample_utils.apply_top_p(logprobs[r], 0.9)),
        ("top-p 0.95", lambda r: apply_top_p(logits[r], 0.95), lambda r: sample_utils.apply_top_p(logprobs[r], 0.95)),
    ]
    print(f"{len(ids)} positions, vocabulary {logits.shape[-1]}\n")
    print("| filter | mlx_qwen2 (ms) | mlx-lm (ms) | mlx-lm / ours |\n|---|---|---|---|")
    for name, ours, theirs in rows:
        o = statistics.median(1e3 * median_seconds(lambda i=i, f=ours: f(slice(i, i + 1)), 5) for i in range(len(ids)))
        t = statistics.median(
            1e3 * median_seconds(lambda i=i, f=theirs: f(slice(i, i + 1)), 5) for i in range(len(ids))
        )
        print(f"| {name} | {o:.2f} | {t:.2f} | {t / o:.2f}x |")


if __name__ == "__main__":
    main()
