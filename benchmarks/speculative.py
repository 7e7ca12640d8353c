"""Speculative decoding on the real model: prompt lookup on code edits and plain questions, and a draft model.

    python -m benchmarks.speculative [--gen-tokens 64] [--lookup 3] [--num-draft 8] [--draft-prompts 6]
                                     [--lm-prompts 2] [--lm-gen-tokens 24]

1. Prompt lookup (`--prompt-lookup`), float32 Qwen2.5-Coder-0.5B-Instruct, greedy: the 20 code-editing
   prompts of benchmarks/data/code_edits.py (a function and a small change; the reply repeats most of
   it) and 8 plain questions. Per set: target passes per generated token, acceptance rate, decode
   tokens/s with and without, and whether every output equals plain greedy's.
2. The draft-model path: the 4-bit model (mlx-lm's conversion) drafting for the float32 one, on the first
   `--draft-prompts` code edits and questions: acceptance and passes per token (the figures that do not
   depend on the backend), decode tokens/s; beside mlx-lm's `draft_model=` on the same pair (with our
   OpenBLAS, in a fresh process) on `--lm-prompts` prompts (its 4-bit model decodes slowly on this CPU).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from benchmarks.common import run_worker
from benchmarks.data.code_edits import FUNCTIONS, QUESTIONS, edit_prompt
from benchmarks.generation import model_folders
from mlx_qwen2 import load, stream_generate
from mlx_qwen2.generation import SpeculativeConfig


def run(model, tokenizer, prompts: list[list[int]], gen_tokens: int, **kw) -> dict:
    tokens, passes, proposed, accepted, decode_tps = [], 0, 0, 0, []
    for ids in prompts:
        out = list(stream_generate(model, tokenizer, ids, max_tokens=gen_tokens, **kw))
        tokens.append([r.token for r in out])
        passes += out[-1].target_passes
        proposed += out[-1].draft_tokens
        accepted += out[-1].accepted_tokens
        decode_tps.append(out[-1].generation_tps)
    n = sum(len(t) for t in tokens)
    return {
        "tokens": tokens,
        "tokens_per_pass": n / passes,
        "acceptance": accepted / proposed if proposed else 0.0,
        "decode_tps": sum(decode_tps) / len(decode_tps),
    }


def lookup_table(results: dict) -> str:
    lines = [
        "| prompts | tokens per target pass | acceptance | decode tokens/s plain -> lookup | speed-up | output = plain greedy |"
    ]
    lines.append("|---|---|---|---|---|---|")
    for name, (plain, fast) in results.items():
        same = all(a == b for a, b in zip(plain["tokens"], fast["tokens"]))
        speed = fast["decode_tps"] / plain["decode_tps"]
        lines.append(
            f"| {name} | {fast['tokens_per_pass']:.2f} | {fast['acceptance']:.0%} | "
            f"{plain['decode_tps']:.2f} -> {fast['decode_tps']:.2f} | {speed:.2f}x | {'yes' if same else 'NO'} |"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gen-tokens", type=int, default=64)
    p.add_argument("--lookup", type=int, default=3, help="n-gram size for prompt lookup")
    p.add_argument("--num-draft", type=int, default=8, help="most tokens proposed per step")
    p.add_argument("--draft-prompts", type=int, default=6, help="code edits and questions each, for the draft model")
    p.add_argument("--lm-prompts", type=int, default=2, help="prompts for mlx-lm's draft path (0 skips it)")
    p.add_argument("--lm-gen-tokens", type=int, default=24)
    p.add_argument("--lm-timeout", type=float, default=900.0)
    args = p.parse_args()
    folders = model_folders(["float32", "4bit"])
    model, tokenizer = load(folders["float32"])
    chat = lambda text: tokenizer.apply_chat_template([{"role": "user", "content": text}])  # noqa: E731
    sets = {
        f"code edits ({len(FUNCTIONS)})": [chat(edit_prompt(code, change)) for code, change in FUNCTIONS],
        f"plain questions ({len(QUESTIONS)})": [chat(q) for q in QUESTIONS],
    }
    lookup = SpeculativeConfig(prompt_lookup=args.lookup, num_draft_tokens=args.num_draft)
    results = {}
    for name, prompts in sets.items():
        results[name] = (
            run(model, tokenizer, prompts, args.gen_tokens),
            run(model, tokenizer, prompts, args.gen_tokens, speculative=lookup),
        )
        print(f"{name}: {lookup_table({name: results[name]}).splitlines()[-1]}", flush=True)
    print(
        f"\n### Prompt lookup (n-gram {args.lookup}, at most {args.num_draft} proposed, {args.gen_tokens} tokens, greedy)\n"
    )
    print(lookup_table(results))

    draft, _ = load(folders["4bit"])
    k = min(args.num_draft, 4)
    print(f"\n### Draft model: 4-bit drafting for float32, at most {k} proposed, {args.gen_tokens} tokens, greedy\n")
    print(
        "| prompts | tool | tokens per target pass | acceptance | decode tokens/s (plain ours: see above) | output = plain greedy |"
    )
    print("|---|---|---|---|---|---|")
    for name, prompts in sets.items():
        chosen = prompts[: args.draft_prompts]
        plain = run(model, tokenizer, chosen, args.gen_tokens)
        fast = run(
            model, tokenizer, chosen, args.gen_tokens, draft=draft, speculative=SpeculativeConfig(num_draft_tokens=k)
        )
        same = all(a == b for a, b in zip(plain["tokens"], fast["tokens"]))
        print(
            f"| {name.split(' (')[0]} ({len(chosen)}) | mlx_qwen2 | {fast['tokens_per_pass']:.2f} | {fast['acceptance']:.0%} | "
            f"{plain['decode_tps']:.2f} -> {fast['decode_tps']:.2f} | {'yes' if same else 'NO'} |",
            flush=True,
        )
    if args.lm_prompts:
        with tempfile.TemporaryDirectory() as tmp:
            ids_file = Path(tmp) / "ids.json"
            chosen = [sets[n][0] for n in sets][: args.lm_prompts]
            ids_file.write_text(json.dumps(chosen))
            argv = ["--model", str(folders["float32"]), "--draft", str(folders["4bit"]), "--ids", str(ids_file)]
            argv += ["--gen-tokens", str(args.lm_gen_tokens), "--num-draft", str(k)]
            lm = run_worker("spec_worker", "mlx-lm + OpenBLAS", argv, args.lm_timeout)
        if lm is None:
            print(f"| first prompt of each set | mlx-lm + OpenBLAS | over {args.lm_timeout:g} s | | | |")
        else:
            n = sum(r["tokens"] for r in lm["prompts"])
            drafted = sum(r["from_draft"] for r in lm["prompts"])
            passes = sum(r["passes"] for r in lm["prompts"])  # its first token comes from a check too
            tps = sum(r["decode_tps"] for r in lm["prompts"]) / len(lm["prompts"])
            print(
                f"| first prompt of each set ({len(lm['prompts'])}, {args.lm_gen_tokens} tokens) | mlx-lm + OpenBLAS | "
                f"{n / passes:.2f} | {drafted / (passes * k):.0%} | {tps:.2f} | |"
            )
            print(f"\nmlx-lm raw: {json.dumps(lm['prompts'])}")


if __name__ == "__main__":
    main()
