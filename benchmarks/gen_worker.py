"""One generation measurement in a fresh process (so memory counters and BLAS choice are clean).

    python -m benchmarks.gen_worker --tool mlx_qwen2|mlx-lm --model DIR --ids FILE --gen-tokens N [--dtype D]

Prints one JSON line: load_s, ttft_s, prefill_tps, decode_tps, decode_tokens, peak_gb (MLX), rss_gb.
Both tools are driven the same way: their own `load` and their own `generate_step`, greedy.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tool", choices=["mlx_qwen2", "mlx-lm"], required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--ids", required=True, help="JSON file with the prompt token ids")
    p.add_argument("--gen-tokens", type=int, default=256)
    p.add_argument("--decode-seconds", type=float, default=120.0, help="stop decoding after this long")
    p.add_argument("--dtype", default=None, help="mlx_qwen2 only: compute dtype (e.g. float32 for bfloat16 weights)")
    args = p.parse_args()
    with open(args.ids) as f:
        ids = json.load(f)
    tic = time.perf_counter()
    if args.tool == "mlx_qwen2":
        import mlx.core as mx

        import mlx_qwen2  # first: it picks the optimized BLAS before mlx.core loads
        from mlx_qwen2.cache import make_cache
        from mlx_qwen2.generation import generate_step
        from mlx_qwen2.sample import greedy

        model, _ = mlx_qwen2.load(args.model, dtype=getattr(mx, args.dtype) if args.dtype else None)
        steps = generate_step(mx.array(ids), model, make_cache(len(model.layers)), greedy)
    else:
        import mlx.core as mx
        import mlx_lm
        from mlx_lm.generate import generate_step

        model, _ = mlx_lm.load(args.model)
        steps = (t for t, _ in generate_step(mx.array(ids), model, max_tokens=args.gen_tokens))
    mx.eval(model.parameters())
    load_s = time.perf_counter() - tic
    mx.reset_peak_memory()
    tic = time.perf_counter()
    first = last = None
    n = 0
    for _ in steps:
        n += 1
        now = time.perf_counter()
        if first is None:
            first = now
        last = now
        if n >= args.gen_tokens or now - first > args.decode_seconds:
            break
    ttft = first - tic
    result = {
        "load_s": load_s,
        "ttft_s": ttft,
        "prefill_tps": len(ids) / ttft,
        "decode_tps": (n - 1) / (last - first) if n > 1 else 0.0,
        "decode_tokens": n,
        "peak_gb": mx.get_peak_memory() / 1e9,
        "rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6,
    }
    print(json.dumps(result))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
