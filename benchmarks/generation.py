"""Generation speed and memory: mlx_qwen2 beside mlx-lm (two ways) and llama.cpp, same prompt, interleaved rounds.

    python -m benchmarks.generation [--prompts 128 1024] [--gen-tokens 256] [--rounds 3] [--models float32 bfloat16 bfloat16-f32 8bit 4bit] [--tools ...]

Tools (columns):
- mlx_qwen2;
- mlx-lm as its users run it: MLX's Linux wheels call the reference BLAS;
- mlx-lm with the same OpenBLAS we load (LD_PRELOAD), so the ratio against it is what our own code
  does, apart from what OpenBLAS does;
- llama.cpp (llama-cpp-python, `pip install 'mlx_qwen2[bench]'`) on the fixture's GGUF as it ships
  (Q5_0/Q8_0/Q6_K/Q4_K tensors), whichever MLX model the row is about.

Models come from the real fixture (Qwen2.5-Coder-0.5B-Instruct): float32 (imported from its GGUF),
bfloat16 (cast, as hub checkpoints ship), and 8-bit / 4-bit made by mlx-lm's own converter from the
bfloat16 folder with its defaults (group 64, bfloat16 scales), i.e. the quantized models mlx-lm users
have. `bfloat16-f32` is the bfloat16 folder with mlx_qwen2 holding the weights as float32 (`--dtype
float32`: twice the weight memory) beside mlx-lm on the same folder as its users run it. Each
measurement runs in a fresh process (benchmarks/gen_worker.py); a run that exceeds --timeout is
reported as a bound. Prints a markdown table and writes JSON with every round.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from benchmarks.common import ROOT, cache_dir, eval_text, gguf_path, real_model_folder, run_worker
from mlx_qwen2.convert import main as convert_main
from mlx_qwen2.loader import load_weights
from mlx_qwen2.tokenizer import Tokenizer

TOOLS = ("mlx_qwen2", "mlx-lm", "mlx-lm + OpenBLAS", "llama.cpp")
METRICS = ("load_s", "ttft_s", "prefill_tps", "decode_tps", "peak_gb", "rss_gb")


def model_folders(names: list[str]) -> dict[str, Path]:
    import mlx_lm

    f32 = real_model_folder()
    folders = {"float32": f32}
    bf16 = cache_dir() / "qwen2.5-coder-0.5b-instruct-bf16"
    if not (bf16 / "config.json").is_file():
        assert convert_main(["--hf-path", str(f32), "--mlx-path", str(bf16), "--dtype", "bfloat16", "--force"]) == 0
    folders["bfloat16"] = folders["bfloat16-f32"] = bf16
    for bits in (8, 4):
        out = cache_dir() / f"qwen2.5-coder-0.5b-instruct-mlxlm-{bits}bit"
        if f"{bits}bit" in names and not (out / "config.json").is_file():
            mlx_lm.convert(str(bf16), str(out), quantize=True, q_bits=bits)
        folders[f"{bits}bit"] = out
    return {k: v for k, v in folders.items() if k in names}


def measure(tool: str, folder: Path, ids_file: Path, gen_tokens: int, timeout: float, f32: bool) -> dict | None:
    model = gguf_path() if tool == "llama.cpp" else folder
    argv = ["--model", str(model), "--ids", str(ids_file), "--gen-tokens", str(gen_tokens)]
    argv += ["--decode-seconds", str(timeout / 3)] + (["--dtype", "float32"] if f32 and tool == "mlx_qwen2" else [])
    return run_worker("gen_worker", tool, argv, timeout)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prompts", type=int, nargs="+", default=[128, 1024])
    p.add_argument("--gen-tokens", type=int, default=256)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--models", nargs="+", default=["float32", "bfloat16", "bfloat16-f32", "8bit", "4bit"])
    p.add_argument("--tools", nargs="+", default=list(TOOLS), choices=TOOLS, help="which tools to run")
    p.add_argument("--timeout", type=float, default=600, help="seconds per measurement")
    p.add_argument("--out", default=str(ROOT / "bench-out" / "generation.json"))
    args = p.parse_args()
    folders = model_folders(args.models)
    tok = Tokenizer.from_folder(folders[args.models[0]])
    all_ids = tok.encode(eval_text())
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, folder in folders.items():
            for n in args.prompts:
                ids_file = Path(tmp) / f"ids-{n}.json"
                ids_file.write_text(json.dumps(all_ids[:n]))
                key = f"{name} / {n}-token prompt"
                runs: dict[str, list] = {t: [] for t in args.tools}
                for r in range(args.rounds):
                    for tool in args.tools:
                        if runs[tool] and runs[tool][-1] is None:
                            continue  # timed out once: do not spend the time again
                        f32 = name.endswith("-f32")
                        res = measure(tool, folder, ids_file, args.gen_tokens, args.timeout, f32)
                        runs[tool].append(res)
                        print(f"{key} round {r + 1} {tool}: {res}", flush=True)
                results[key] = runs
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    machine = f"{platform.machine()}, {platform.system()}, {os.cpu_count()} cores"
    Path(args.out).write_text(json.dumps({"machine": machine, "args": vars(args), "results": results}, indent=2))
    print(f"\n(per-round results in {args.out})")
    print(f"\nMachine: {machine}; medians of {args.rounds} interleaved rounds, {args.gen_tokens} new tokens.\n")
    bw = read_bandwidth_gbs()
    # `-f32` holds the 16-bit weights as float32: twice the bytes per token.
    bounds = {
        name: bw * 1e9 / bytes_per_token(folder) / (2 if name.endswith("-f32") else 1)
        for name, folder in folders.items()
    }
    print(f"Read bandwidth (numpy): {bw:.1f} GB/s\n")
    print(table(results, args.timeout, bounds, args.tools))


def median(runs: list, metric: str) -> float | None:
    values = [r[metric] for r in runs if r is not None]
    return statistics.median(values) if values else None


def read_bandwidth_gbs() -> float:
    """Memory read bandwidth with every core reading, the bound for decoding: the maximum of a 1 GB array, one
    slice per core, each on its own thread (numpy lets go of the GIL). Not one thread, nor a sum: here one
    thread read 13.6 GB/s where two read 24.0, and numpy's pairwise sum ran at 8.0 and 15.2 (its adds, not
    the memory, set its pace); the few-row kernels read on every core."""
    a = np.ones(256 * 1024**2, np.float32)
    parts = np.array_split(a, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())
    with ThreadPoolExecutor(len(parts)) as pool:
        list(pool.map(np.max, parts))
        best = float("inf")
        for _ in range(5):  # the best of 5: a capacity, and this machine's neighbours take some of it at times
            tic = time.perf_counter()
            list(pool.map(np.max, parts))
            best = min(best, time.perf_counter() - tic)
        return a.nbytes / best / 1e9


def bytes_per_token(folder: Path) -> int:
    """Weight bytes a decode step reads: everything but the input embedding (one row of it is read)."""
    weights = load_weights(folder)
    tied = json.loads((folder / "config.json").read_text()).get("tie_word_embeddings", False)
    skip = () if tied else ("model.embed_tokens.",)
    return sum(w.nbytes for k, w in weights.items() if not k.startswith(skip))


def table(results: dict, timeout: float, bounds: dict[str, float], tools: list[str]) -> str:
    """Medians of every tool, and mlx_qwen2's figure over each other tool's (llama.cpp runs its own GGUF)."""
    others = [t for t in tools if t != "mlx_qwen2"]
    head = " | ".join(tools) + " | " + " | ".join(f"mlx_qwen2 / {t}" for t in others)
    lines = [f"| model / prompt | metric | {head} |", "|---" * (2 + len(tools) + len(others)) + "|"]
    fmt = lambda v: "timeout" if v is None else f"{v:.3g}"
    for key, runs in results.items():
        bound = bounds[key.split(" / ")[0]]
        decode = {t: median(runs[t], "decode_tps") for t in tools}
        fractions = ["n/a" if v is None or t == "llama.cpp" else f"{100 * v / bound:.0f}%" for t, v in decode.items()]
        lines.append(
            f"| {key} | decode / bound ({bound:.1f} tok/s) | " + " | ".join(fractions) + " |" * (len(others) + 1)
        )
        for metric in METRICS:
            values = {t: median(runs[t], metric) for t in tools}
            ours = values.get("mlx_qwen2")
            ratios = [ratio(ours, values[t], f"{t} did not finish in {timeout:.0f} s") for t in others]
            cells = [fmt(values[t]) for t in tools] + ratios
            lines.append(f"| {key} | {metric} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def ratio(ours: float | None, theirs: float | None, timed_out: str) -> str:
    if theirs is None:
        return timed_out
    return "n/a" if ours is None else f"{ours / theirs:.2f}"


if __name__ == "__main__":
    main()
