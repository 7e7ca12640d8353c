"""One rank of a test under `mlx.launch`: load a model sharded over the group, write what it computes.

    mlx.launch -n 2 --backend ring ... tests/parallel_worker.py MODEL MODE OUT_DIR [IDS_JSON] [GREEDY_N] [ADAPTERS]

Each rank writes OUT_DIR/rank{r}.json: logits of the prompt (float32 lists), greedy tokens, MLX's peak
memory after loading, and the local shapes it holds.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import mlx.core as mx  # noqa: E402

import mlx_qwen2  # noqa: F401  (the BLAS first)
from mlx_qwen2.cache import make_cache  # noqa: E402
from mlx_qwen2.loader import load  # noqa: E402
from mlx_qwen2.parallel import barrier  # noqa: E402


def main() -> None:
    model_dir, mode, out_dir = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    ids = json.loads(sys.argv[4]) if len(sys.argv) > 4 else [5, 17, 300, 42, 99, 7, 250, 11]
    n = int(sys.argv[5]) if len(sys.argv) > 5 else 8
    adapters = sys.argv[6] if len(sys.argv) > 6 else None
    group = mx.distributed.init()
    model, _ = load(model_dir, group=group, parallel=mode, adapter_path=adapters)
    load_peak = mx.get_peak_memory()
    logits = model(mx.array([ids]))[0].astype(mx.float32)
    cache = make_cache(len(model.layers))
    seq = list(ids)
    step = model(mx.array([seq]), cache)[0, -1]
    tokens = []
    for _ in range(n):
        tokens.append(int(mx.argmax(step)))
        step = model(mx.array([[tokens[-1]]]), cache)[0, -1]
    q_proj = model.layers[0].self_attn.q_proj
    result = {
        "rank": group.rank(),
        "size": group.size(),
        "logits": logits.tolist(),
        "tokens": tokens,
        "load_peak": load_peak,
        "layers": len(model.layers),
        "q_proj": list(getattr(q_proj, "linear", q_proj).weight.shape),  # under an adapter, its layer
        "lm_head_rows": model.lm_head.weight.shape[0] if "lm_head" in model else None,
    }
    (out_dir / f"rank{group.rank()}.json").write_text(json.dumps(result))
    barrier(group)


if __name__ == "__main__":
    main()
