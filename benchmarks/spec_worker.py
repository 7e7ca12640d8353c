"""mlx-lm's speculative decoding (`draft_model=`) on a list of prompts, in a fresh process.

    python -m benchmarks.spec_worker --tool mlx-lm --model DIR --draft DIR --ids FILE --gen-tokens N --num-draft K

Prints one JSON line: per prompt the tokens generated, how many came from the draft (mlx-lm's
`from_draft`), the target's forward passes after its prefill (counted by wrapping the model's
`__call__`: calls with at most K + 1 new tokens), decode tokens/s; and the BLAS mapped.
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
    passes = [0]
    call = type(model).__call__

    def counted(self, inputs, *a, **kw):  # the target alone: the draft is another class instance check
        if self is model and inputs.shape[-1] <= args.num_draft + 1:
            passes[0] += 1
        return call(self, inputs, *a, **kw)

    type(model).__call__ = counted
    with open(args.ids) as f:
        prompts = json.load(f)
    out = []
    for ids in prompts:
        n = from_draft = 0
        first = last = None
        passes[0] = 0
        for r in stream_generate(
            model, tokenizer, ids, max_tokens=args.gen_tokens, draft_model=draft, num_draft_tokens=args.num_draft
        ):
            now = time.perf_counter()
            first, last = first or now, now
            n += 1
            from_draft += bool(r.from_draft)
        rate = (n - 1) / (last - first) if n > 1 else 0.0
        out.append({"tokens": n, "from_draft": from_draft, "passes": passes[0], "decode_tps": rate})
    print(json.dumps({"prompts": out, "blas": blas_mapped()}))


if __name__ == "__main__":
    main()
