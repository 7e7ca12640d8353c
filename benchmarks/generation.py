"""Generation speed and memory, mlx_qwen2 beside mlx-lm, same folder, same prompt, interleaved rounds.

    python -m benchmarks.generation [--prompts 128 1024] [--gen-tokens 256] [--rounds 3] [--models float32 bfloat16 bfloat16-f32 8bit 4bit]

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
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common import ROOT, cache_dir, eval_text, real_model_folder
from mlx_qwen2.convert import main as convert_main
from mlx_qwen2.loader import load_weights
from mlx_qwen2.tokenizer import Tokenizer

TOOLS = ("mlx_qwen2", "mlx-lm")
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


def run_worker(tool: str, folder: Path, ids_file: Path, gen_tokens: int, timeout: float, f32: bool) -> dict | None:
    cmd = [sys.executable, "-m", "benchmarks.gen_worker", "--tool", tool, "--model", str(folder)]
    if f32 and tool == "mlx_qwen2":
        cmd += ["--dtype", "float32"]
    cmd += ["--ids", str(ids_file), "--gen-tokens", str(gen_tokens), "--decode-seconds", str(timeout / 3)]
    # mlx-lm runs as its users run it: on the BLAS MLX ships with (benchmarks/__init__ would preload OpenBLAS).
    env = {**os.environ, "MLX_QWEN2_BLAS": "off"} if tool == "mlx-lm" else None
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, check=True, env=env)
    except subprocess.TimeoutExpired:
        return None
    except subprocess.CalledProcessError as e:
        raise RuntimeError(f"{tool} failed on {folder}:\n{e.stderr[-2000:]}") from e
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prompts", type=int, nargs="+", default=[128, 1024])
    p.add_argument("--gen-tokens", type=int, default=256)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--models", nargs="+", default=["float32", "bfloat16", "bfloat16-f32", "8bit", "4bit"])
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
                runs: dict[str, list] = {t: [] for t in TOOLS}
                for r in range(args.rounds):
                    for tool in TOOLS:
                        if runs[tool] and runs[tool][-1] is None:
                            continue  # timed out once: do not spend the time again
                        f32 = name.endswith("-f32")
                        res = run_worker(tool, folder, ids_file, args.gen_tokens, args.timeout, f32)
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
    print(table(results, args.timeout, bounds))


def median(runs: list, metric: str) -> float | None:
    values = [r[metric] for r in runs if r is not None]
    return statistics.median(values) if values else None


def read_bandwidth_gbs() -> float:
    """Memory read bandwidth as numpy sees it (sum over a 1 GB array), the bound for decoding."""
    a = np.ones(256 * 1024**2, np.float32)
    a.sum()
    tic = time.perf_counter()
    for _ in range(3):
        a.sum()
    return 3 * a.nbytes / (time.perf_counter() - tic) / 1e9


def bytes_per_token(folder: Path) -> int:
    """Weight bytes a decode step reads: everything but the input embedding (one row of it is read)."""
    weights = load_weights(folder)
    tied = json.loads((folder / "config.json").read_text()).get("tie_word_embeddings", False)
    skip = () if tied else ("model.embed_tokens.",)
    return sum(w.nbytes for k, w in weights.items() if not k.startswith(skip))


def table(results: dict, timeout: float, bounds: dict[str, float]) -> str:
    lines = [
        "| model / prompt | metric | mlx_qwen2 | mlx-lm | ratio (mlx_qwen2 / mlx-lm) |",
        "|---|---|---|---|---|",
    ]
    for key, runs in results.items():
        bound = bounds[key.split(" / ")[0]]
        ours, theirs = median(runs["mlx_qwen2"], "decode_tps"), median(runs["mlx-lm"], "decode_tps")
        frac = ["n/a" if v is None else f"{100 * v / bound:.0f}%" for v in (ours, theirs)]
        lines.append(f"| {key} | decode / bandwidth bound ({bound:.1f} tok/s) | {frac[0]} | {frac[1]} | |")
        for metric in METRICS:
            ours, theirs = median(runs["mlx_qwen2"], metric), median(runs["mlx-lm"], metric)
            fmt = lambda v: "timeout" if v is None else f"{v:.3g}"
            if theirs is None or ours is None:
                ratio = f"{'mlx-lm' if theirs is None else 'mlx_qwen2'} did not finish in {timeout:.0f} s"
            else:
                ratio = f"{ours / theirs:.2f}"
            lines.append(f"| {key} | {metric} | {fmt(ours)} | {fmt(theirs)} | {ratio} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
