"""Batched generation, KV cache kinds and the prefix cache, beside mlx-lm's batch_generate, in one run.

    python -m benchmarks.batch [--models float32 bfloat16 4bit] [--batches 1 4 8 16] [--prompt-tokens 32]
                               [--gen-tokens 32] [--user-batches 1 8] [--user-models float32 bfloat16]
                               [--rounds 1] [--skip-kv] [--skip-prefix] [--skip-kinds] [--kinds-window 256]

1. Aggregate generated tokens/s (prefill included) of `batch_generate` at each batch size, ours and
   mlx-lm's, each measurement in a fresh process (benchmarks/batch_worker.py), end tokens ignored so
   both generate the same count. mlx-lm runs with the same OpenBLAS as ours (LD_PRELOAD) at every
   batch size, and as its users run it (MLX's reference BLAS) at --user-batches of --user-models only:
   it is slow (its 4-bit prefill runs at about 0.5 tokens/s here).
   Prompts are slices of held-out text of different lengths (--prompt-tokens, +0/4/8/12). With
   --rounds N every measurement is made N times, the rounds interleaved, and the run of median
   tokens/s is reported (the lower middle one of an even count).
2. The KV cache at 4,096 tokens of held-out text (float32 real model, chunks of 512): bytes held by
   the float, 8-bit and 4-bit caches, and the perplexity each gives.
3. The prefix cache: time to first token of a request after another that shares a 1,000-token prefix,
   against the first one's.
4. Cache kinds in a batch (--kinds-batch prompts of --kinds-prompt tokens, --kinds-gen new tokens each,
   float32 real model): the plain cache, a bounded one (--kinds-window) and the 8-bit one, ours beside
   mlx-lm's batch_generate (plain, and with its max_kv_size) with the same OpenBLAS: tokens/s, the
   largest our batch cache got, MLX's peak.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

from benchmarks.common import ROOT, eval_text, held_out_texts, real_model_folder, run_worker
from benchmarks.generation import model_folders
from mlx_qwen2 import load
from mlx_qwen2.cache.config import CacheConfig
from mlx_qwen2.cache.prefix import PrefixCache
from mlx_qwen2.generation import Engine, GenerationConfig, Request
from mlx_qwen2.loader import load_weights
from mlx_qwen2.tokenizer import Tokenizer

TOOLS = ("mlx_qwen2", "mlx-lm + OpenBLAS", "mlx-lm")


def throughput(args: argparse.Namespace) -> dict:
    folders = model_folders(args.models)
    tok = Tokenizer.from_folder(folders[args.models[0]])
    ids = tok.encode(eval_text())
    step = args.prompt_tokens + 16
    prompts = [ids[i * step : i * step + args.prompt_tokens + 4 * (i % 4)] for i in range(max(args.batches))]
    results: dict = {}
    runs: dict[tuple[str, str], list[dict | None]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        ids_file = Path(tmp) / "prompts.json"
        ids_file.write_text(json.dumps(prompts))
        for round_ in range(args.rounds):  # interleaved: a slow spell of the machine hits every figure alike
            for name, folder in folders.items():
                weights = sum(w.nbytes for w in load_weights(folder).values())
                for batch in args.batches:
                    key = f"{name} / batch {batch}"
                    results.setdefault(key, {"weights_gb": weights / 1e9})
                    for tool in TOOLS:
                        if tool == "mlx-lm" and (batch not in args.user_batches or name not in args.user_models):
                            continue
                        if tool == "mlx-lm + OpenBLAS" and args.lm_batches is not None and batch not in args.lm_batches:
                            continue
                        argv = ["--model", str(folder), "--ids", str(ids_file), "--batch", str(batch)]
                        argv += ["--gen-tokens", str(args.gen_tokens)]
                        result = run_worker("batch_worker", tool, argv, args.timeout)
                        runs.setdefault((key, tool), []).append(result)
                        print(f"round {round_ + 1}: {name} batch {batch} {tool}: {result}", flush=True)
    for (key, tool), measured in runs.items():
        results[key][tool] = _median_run(measured)
    return results


def _median_run(measured: list[dict | None]) -> dict | None:
    """The run of median tokens/s (the lower middle one of an even count); None if any timed out."""
    if any(m is None for m in measured):
        return None
    return sorted(measured, key=lambda m: m["tokens_per_s"])[(len(measured) - 1) // 2]


def kv_cache(tokens: int = 4096, chunk: int = 512) -> dict:
    """Bytes and perplexity of the float, 8-bit and 4-bit caches over `tokens` tokens of held-out code."""
    model, tok = load(real_model_folder())
    ids = tok.encode(held_out_texts()["code (email, http.client)"])[: tokens + 1]
    out = {}
    for label, config in (
        ("float", CacheConfig()),
        ("8-bit", CacheConfig(kv_bits=8)),
        ("4-bit", CacheConfig(kv_bits=4)),
    ):
        cache = config.make(len(model.layers))
        nll = 0.0
        for start in range(0, tokens, chunk):
            piece = ids[start : min(start + chunk, tokens)]
            logits = model(mx.array([piece]), cache)[0].astype(mx.float32)
            targets = mx.array(ids[start + 1 : start + 1 + len(piece)])
            logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
            nll -= float(mx.take_along_axis(logprobs, targets[:, None], axis=-1).sum())
        held = sum(a.nbytes for c in cache for a in c.state)  # what the cache holds, not its spare room
        out[label] = {"bytes": held, "perplexity": float(np.exp(nll / tokens))}
        print(f"KV {label}: {held / 1e6:.1f} MB, perplexity {out[label]['perplexity']:.4f}", flush=True)
    return out


def prefix(prefix_tokens: int = 1000) -> dict:
    """Time to first token of two requests sharing a prefix, with the prefix cache."""
    model, tok = load(real_model_folder())
    shared = tok.encode(eval_text())[:prefix_tokens]
    cache = PrefixCache()
    times = []
    for question in ("\n# Summarize the code above in one line.\n", "\n# Which function above is the longest?\n"):
        engine = Engine(model, tok, prefix_cache=cache)
        tic = time.perf_counter()
        engine.add(Request(shared + tok.encode(question), GenerationConfig(max_tokens=1)))
        events = []
        while not events:
            events = engine.step()
        times.append({"ttft_s": time.perf_counter() - tic, "cached_tokens": events[0].cached_tokens})
        print(f"prefix: {times[-1]}", flush=True)
    return {"first": times[0], "second": times[1], "ratio": times[1]["ttft_s"] / times[0]["ttft_s"]}


def cache_kinds(args: argparse.Namespace) -> dict:
    folder = real_model_folder()
    tok = Tokenizer.from_folder(folder)
    ids = tok.encode(eval_text())
    step = args.kinds_prompt + 16
    prompts = [ids[i * step : i * step + args.kinds_prompt + 4 * (i % 4)] for i in range(args.kinds_batch)]
    window = ["--max-kv-size", str(args.kinds_window)]
    runs = [("mlx_qwen2", "plain", []), ("mlx_qwen2", "bounded", window), ("mlx_qwen2", "8-bit", ["--kv-bits", "8"]),
            ("mlx-lm + OpenBLAS", "plain", []), ("mlx-lm + OpenBLAS", "bounded", window)]  # fmt: skip
    out: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        ids_file = Path(tmp) / "prompts.json"
        ids_file.write_text(json.dumps(prompts))
        argv = ["--model", str(folder), "--ids", str(ids_file), "--batch", str(args.kinds_batch)]
        argv += ["--gen-tokens", str(args.kinds_gen)]
        for tool, kind, flags in runs:
            out[f"{tool} / {kind}"] = run_worker("batch_worker", tool, argv + flags, args.timeout)
            print(f"kinds {tool} {kind}: {out[f'{tool} / {kind}']}", flush=True)
    return out


def kinds_table(kinds: dict) -> str:
    lines = ["| cache | mlx_qwen2 tok/s | mlx-lm + OpenBLAS tok/s | ours / same BLAS | our largest cache | our MLX peak |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for kind in ("plain", "bounded", "8-bit"):
        ours, theirs = kinds.get(f"mlx_qwen2 / {kind}"), kinds.get(f"mlx-lm + OpenBLAS / {kind}")
        a, b = (ours or {}).get("tokens_per_s"), (theirs or {}).get("tokens_per_s")
        cells = ["-" if a is None else f"{a:.2f}", "-" if b is None else f"{b:.2f}",
                 "-" if a is None or b is None else f"{a / b:.2f}x",
                 "-" if ours is None else f"{ours['cache_gb'] * 1e3:.1f} MB",
                 "-" if ours is None else f"{ours['peak_gb']:.3f} GB"]  # fmt: skip
        lines.append(f"| {kind} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def table(results: dict) -> str:
    lines = ["| model / batch | mlx_qwen2 tok/s | mlx-lm + OpenBLAS | mlx-lm (as its users run it) | "
             "ours / same BLAS | ours / users' | ours vs our batch 1 | peak (MLX) / weights + cache |",
             "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    base: dict[str, float] = {}
    for key, row in results.items():
        name, batch = key.split(" / batch ")
        values = {t: (row.get(t) or {}).get("tokens_per_s") for t in TOOLS}
        ours = values["mlx_qwen2"]
        if batch == "1" and ours:
            base[name] = ours
        fmt = lambda v: "-" if v is None else f"{v:.2f}"
        ratio = lambda a, b: "-" if a is None or b is None else f"{a / b:.2f}x"
        mem = "-"
        if row.get("mlx_qwen2"):
            peak, cache = row["mlx_qwen2"]["peak_gb"], row["mlx_qwen2"]["cache_gb"]
            mem = f"{peak:.3f} / {row['weights_gb'] + cache:.3f} GB = {peak / (row['weights_gb'] + cache):.2f}"
        cells = [fmt(values[t]) for t in TOOLS]
        cells += [ratio(ours, values["mlx-lm + OpenBLAS"]), ratio(ours, values["mlx-lm"]), ratio(ours, base.get(name))]
        lines.append(f"| {name} / {batch} | " + " | ".join(cells) + f" | {mem} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["float32", "bfloat16", "4bit"])
    p.add_argument("--batches", type=int, nargs="*", default=[1, 4, 8, 16], help="none: skip part 1")
    p.add_argument("--user-batches", type=int, nargs="*", default=[1, 8])
    p.add_argument("--user-models", nargs="*", default=["float32", "bfloat16"], help="(4-bit: ~0.5 prompt tokens/s)")
    p.add_argument("--lm-batches", type=int, nargs="*", default=None, help="mlx-lm + OpenBLAS only at these")
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--gen-tokens", type=int, default=32)
    p.add_argument("--timeout", type=float, default=600)
    p.add_argument("--rounds", type=int, default=1, help="part 1 measured this many times, interleaved; medians")
    p.add_argument("--skip-kv", action="store_true")
    p.add_argument("--skip-prefix", action="store_true")
    p.add_argument("--skip-kinds", action="store_true")
    p.add_argument("--kinds-batch", type=int, default=8)
    p.add_argument("--kinds-prompt", type=int, default=256)
    p.add_argument("--kinds-gen", type=int, default=128)
    p.add_argument("--kinds-window", type=int, default=256)
    p.add_argument("--out", default=str(ROOT / "bench-out" / "batch.json"))
    args = p.parse_args()
    report = {"args": vars(args), "throughput": throughput(args) if args.batches else {}}
    if not args.skip_kv:
        report["kv"] = kv_cache()
    if not args.skip_prefix:
        report["prefix"] = prefix()
    if not args.skip_kinds:
        report["kinds"] = cache_kinds(args)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(table(report["throughput"]))
    if "kv" in report:
        f = report["kv"]["float"]
        for label in ("8-bit", "4-bit"):
            r = report["kv"][label]
            print(f"KV {label}: {r['bytes'] / f['bytes']:.3f}x the float cache's bytes, "
                  f"perplexity {r['perplexity']:.4f} vs {f['perplexity']:.4f}")  # fmt: skip
    if "prefix" in report:
        print(f"prefix cache: second request's time to first token {report['prefix']['ratio']:.3f}x the first's")
    if "kinds" in report:
        print(kinds_table(report["kinds"]))


if __name__ == "__main__":
    main()
