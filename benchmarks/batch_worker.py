"""One batched-generation measurement in a fresh process.

    python -m benchmarks.batch_worker --tool mlx_qwen2|mlx-lm --model DIR --ids FILE --batch B --gen-tokens N
                                      [--max-kv-size W | --kv-bits 8]

FILE holds B prompts (lists of token ids). Both tools run their own `batch_generate`, greedy, end
tokens ignored (so both generate exactly N tokens per prompt). Prints one JSON line: seconds,
generated tokens, tokens/s (prefill included), peak_gb (MLX), rss_gb, blas. With --max-kv-size
both bound their caches (mlx-lm's BatchGenerator takes it too); --kv-bits is ours only.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from types import SimpleNamespace

from benchmarks.gen_worker import blas_mapped, peak_rss_gb


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tool", choices=["mlx_qwen2", "mlx-lm"], required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--ids", required=True)
    p.add_argument("--batch", type=int, required=True)
    p.add_argument("--gen-tokens", type=int, default=32)
    p.add_argument("--max-kv-size", type=int, default=None)
    p.add_argument("--kv-bits", type=int, default=None)
    args = p.parse_args()
    with open(args.ids) as f:
        prompts = json.load(f)[: args.batch]
    cache_bytes = 0
    if args.tool == "mlx_qwen2":
        import mlx.core as mx

        import mlx_qwen2
        from mlx_qwen2.cache.config import CacheConfig
        from mlx_qwen2.generation import Engine, GenerationConfig, Request

        model, tok = mlx_qwen2.load(args.model)
        tok.eos_token_ids = set()
        mx.eval(model.parameters())
        mx.reset_peak_memory()
        tic = time.perf_counter()
        # batch_generate's loop, here to see the cache's size as it goes
        cache_config = CacheConfig(max_kv_size=args.max_kv_size, kv_bits=args.kv_bits)
        engine = Engine(model, tok, max_batch=args.batch, cache_config=cache_config)
        for ids in prompts:
            engine.add(Request(ids, GenerationConfig(max_tokens=args.gen_tokens)))
        generated = cache_bytes = 0
        while engine.busy:
            generated += len(engine.step())
            cache_bytes = max(cache_bytes, engine.cache_bytes)
        seconds = time.perf_counter() - tic
    else:
        import mlx.core as mx
        import mlx_lm

        if args.kv_bits is not None:
            sys.exit("mlx-lm's batch_generate has no quantized cache")
        model, _ = mlx_lm.load(args.model)
        mx.eval(model.parameters())
        mx.reset_peak_memory()
        tic = time.perf_counter()
        no_stop = SimpleNamespace(eos_token_ids=[], decode=lambda ids: "")  # what batch_generate uses of it
        bound = {} if args.max_kv_size is None else {"max_kv_size": args.max_kv_size}
        response = mlx_lm.batch_generate(
            model, no_stop, prompts, max_tokens=args.gen_tokens, return_token_ids=True, **bound
        )
        seconds = time.perf_counter() - tic
        generated = sum(len(t) for t in response.token_ids)
    result = {
        "seconds": seconds,
        "generated": generated,
        "tokens_per_s": generated / seconds,
        "peak_gb": mx.get_peak_memory() / 1e9,
        "cache_gb": cache_bytes / 1e9 if args.tool == "mlx_qwen2" else None,
        "rss_gb": peak_rss_gb(),
        "blas": blas_mapped(),
    }
    print(json.dumps(result))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
