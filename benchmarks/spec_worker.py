"""mlx-lm's speculative decoding (`draft_model=`) on a list of prompts, in a fresh process.

    python -m benchmarks.spec_worker --tool mlx-lm --model DIR --draft DIR --ids FILE --gen-tokens N --num-draft K

Prints one JSON line: per prompt the tokens generated, how many came from the draft (mlx-lm's
`from_draft`), decode tokens/s; and the BLAS mapped. mlx-lm checks K proposals per target pass and
yields one token of the target's own per pass, so passes = tokens - tokens from the draft.
"""

from __future__ import annotations

import argparse
import json
import time

from benchmarks.gen_worker import blas_mapped


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tool", choices=["mlx-lm"], required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--draft", required=True)
    p.add_argument("--ids", required=True, help="JSON file: a list of prompts' token ids")
    p.add_argument("--gen-tokens", type=int, default=32)
    p.add_argument("--num-draft", type=int, default=4)
    args = p.parse_args()
    import mlx_lm
    from mlx_lm.generate import stream_generate

    model, tokenizer = mlx_lm.load(args.model)
    draft, _ = mlx_lm.load(args.draft)
    with open(args.ids) as f:
        prompts = json.load(f)
    out = []
    for ids in prompts:
        n = from_draft = 0
        first = last = None
        for r in stream_generate(
            model, tokenizer, ids, max_tokens=args.gen_tokens, draft_model=draft, num_draft_tokens=args.num_draft
        ):
            now = time.perf_counter()
            first, last = first or now, now
            n += 1
            from_draft += bool(r.from_draft)
        out.append({"tokens": n, "from_draft": from_draft, "decode_tps": (n - 1) / (last - first) if n > 1 else 0.0})
    print(json.dumps({"prompts": out, "blas": blas_mapped()}))


if __name__ == "__main__":
    main()
