"""One rank of benchmarks/distributed.py (or the single process it is compared with).

    [mlx.launch -n 2 --backend ring ...] python -m benchmarks.dist_worker MODEL MODE OUT_DIR PROMPT DECODE

Writes OUT_DIR/rank{r}.json: load_peak_gb (MLX), peak_gb, prefill_tps, decode_tps.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import mlx.core as mx  # noqa: E402
import numpy as np

import mlx_qwen2  # noqa: F401  (the BLAS first)
from mlx_qwen2.cache import make_cache  # noqa: E402
from mlx_qwen2.cli import join_group  # noqa: E402
from mlx_qwen2.loader import load  # noqa: E402
from mlx_qwen2.parallel import barrier  # noqa: E402


def main() -> None:
    model_dir, mode, out_dir = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    prompt, decode = int(sys.argv[4]), int(sys.argv[5])
    group = join_group()
    model, _ = load(model_dir, group=group, parallel=mode)
    load_peak = mx.get_peak_memory()
    mx.reset_peak_memory()
    ids = mx.array(np.random.default_rng(0).integers(0, model.args.vocab_size, prompt))
    cache = make_cache(len(model.layers))
    tic = time.perf_counter()
    token = mx.argmax(model(ids[None], cache)[0, -1])
    mx.eval(token)
    prefill_s = time.perf_counter() - tic
    tic = time.perf_counter()
    for _ in range(decode):
        token = mx.argmax(model(token.reshape(1, 1), cache)[0, -1])
        mx.eval(token)
    decode_s = time.perf_counter() - tic
    rank = group.rank() if group else 0
    result = {"load_peak_gb": load_peak / 1e9, "peak_gb": mx.get_peak_memory() / 1e9,
              "prefill_tps": prompt / prefill_s, "decode_tps": decode / decode_s}  # fmt: skip
    (out_dir / f"rank{rank}.json").write_text(json.dumps(result))
    if group:
        barrier(group)


if __name__ == "__main__":
    main()
