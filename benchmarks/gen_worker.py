"""One generation measurement in a fresh process (so memory counters and BLAS choice are clean).

    python -m benchmarks.gen_worker --tool mlx_qwen2|mlx-lm|llama.cpp --model DIR_OR_GGUF --ids FILE --gen-tokens N

Prints one JSON line: load_s, ttft_s, prefill_tps, decode_tps, decode_tokens, peak_gb (MLX, while
generating; RSS for llama.cpp), load_peak_gb (MLX, while loading), rss_gb, blas (the BLAS library mapped into the process). Every tool is driven the same way:
its own loader and its own token loop, greedy, over the same prompt token ids. Which BLAS mlx-lm gets is
the caller's choice (LD_PRELOAD); this worker imports nothing of mlx_qwen2 for mlx-lm or llama.cpp.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import sys
import time
from pathlib import Path


def peak_rss_gb() -> float:
    """This process's peak resident memory. Not getrusage's ru_maxrss: Linux carries that over from the parent
    across fork and exec, so a worker started by a large benchmark process would report the parent's."""
    with open("/proc/self/status") as f:
        kb = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    return kb * 1024 / 1e9


def blas_mapped() -> str:
    """The BLAS libraries the process has mapped, but numpy's private copy (its symbols are renamed: MLX
    cannot call it), and the kernels a mapped OpenBLAS chose (its core name)."""
    with open("/proc/self/maps") if os.path.exists("/proc/self/maps") else open(os.devnull) as f:
        paths = {line.split()[-1] for line in f if "blas" in line.lower() and "/" in line}
    paths = {p for p in paths if not Path(p).name.startswith("libscipy_openblas")}
    names = []
    for path in sorted(paths, key=lambda p: Path(p).name):
        name = Path(path).name
        library = ctypes.CDLL(path) if "openblas" in name else None  # already mapped: only a symbol lookup
        if library is not None and hasattr(library, "openblas_get_corename"):  # as blas.preload reads it
            library.openblas_get_corename.restype = ctypes.c_char_p
            name += f" ({library.openblas_get_corename().decode()})"
        names.append(name)
    return ", ".join(names) or "none found in /proc/self/maps"


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tool", choices=["mlx_qwen2", "mlx-lm", "llama.cpp"], required=True)
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
    elif args.tool == "mlx-lm":
        import mlx.core as mx
        import mlx_lm
        from mlx_lm.generate import generate_step

        model, _ = mlx_lm.load(args.model)
        steps = (t for t, _ in generate_step(mx.array(ids), model, max_tokens=args.gen_tokens))
    else:
        from llama_cpp import Llama

        llm = Llama(model_path=args.model, n_threads=len(os.sched_getaffinity(0)), n_ctx=len(ids) + args.gen_tokens + 8,
                    n_batch=512, verbose=False)  # fmt: skip
        steps = llm.generate(ids, top_k=1, temp=0.0, repeat_penalty=1.0)  # greedy
        mx = None
    load_peak_gb = None
    if mx is not None:
        mx.eval(model.parameters())
        load_peak_gb = mx.get_peak_memory() / 1e9
        mx.reset_peak_memory()
    load_s = time.perf_counter() - tic
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
    rss_gb = peak_rss_gb()
    result = {
        "load_s": load_s,
        "ttft_s": ttft,
        "prefill_tps": len(ids) / ttft,
        "decode_tps": (n - 1) / (last - first) if n > 1 else 0.0,
        "decode_tokens": n,
        "peak_gb": mx.get_peak_memory() / 1e9 if mx is not None else rss_gb,
        "load_peak_gb": load_peak_gb,
        "rss_gb": rss_gb,
        "blas": blas_mapped(),
    }
    print(json.dumps(result))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
