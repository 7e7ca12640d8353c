"""Tensor and pipeline parallel over 2 ranks on this machine, beside one process: memory, speed, traffic.

    python -m benchmarks.distributed [--models real moe] [--prompt 128] [--decode 32]
        [--link-gbps 40] [--link-latency-us 50]

Two ranks here share two cores (and one memory bus; each rank gets OpenBLAS threads for its share of
the cores), so no speed-up is expected; what this measures is
each rank's memory (MLX's peak while loading and while generating) and its speed, and it counts the bytes a
rank sends per decoded token: tensor parallel, two all-reduces of the hidden state per layer (a ring
all-reduce sends 2 (N - 1) / N of the data), and for an untied output layer the gather of the logits;
pipeline, one hidden state per stage boundary plus the
gather of the last stage's output. From those counts, the time per token they cost on a link of the
given bandwidth and per-message latency (an estimate for two Macs, not a measurement).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.common import ROOT, real_model_folder
from benchmarks.moe import bench_folders
from mlx_qwen2.files import read_json
from mlx_qwen2.loader import load_weights

LAUNCH = [sys.executable, "-c", "import sys; from mlx._distributed_utils.launch import main; sys.exit(main())"]


def run(folder: Path, mode: str, args: argparse.Namespace, port: int) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        worker = ["-m", "benchmarks.dist_worker", str(folder), mode, tmp, str(args.prompt), str(args.decode)]
        if mode == "single":
            cmd = [sys.executable, *worker]
        else:
            threads = f"OPENBLAS_NUM_THREADS={max(1, (os.cpu_count() or 2) // 2)}"  # the cores shared out
            cmd = [*LAUNCH, "-n", "2", "--backend", "ring", "--starting-port", str(port), "--env", threads,
                   "--python", sys.executable, *worker]  # fmt: skip
        subprocess.run(cmd, check=True, cwd=ROOT, timeout=args.timeout, capture_output=True)
        return [json.loads(p.read_text()) for p in sorted(Path(tmp).glob("rank*.json"))]


def traffic(config: dict, mode: str, ranks: int = 2) -> tuple[float, int]:
    """(bytes a rank sends per decoded token, messages per token), float32 activations."""
    hidden, layers = config["hidden_size"], config["num_hidden_layers"]
    state = hidden * 4
    if mode == "tensor":  # a ring all-reduce: 2 (N - 1) steps of 1/N of the data each
        sent, messages = 2 * layers * state * 2 * (ranks - 1) / ranks, 2 * layers * 2 * (ranks - 1)
        vocab = config["vocab_size"]
        if not config.get("tie_word_embeddings", False) and vocab % ranks == 0:  # the logits gathered
            sent, messages = sent + vocab * 4 * (ranks - 1) / ranks, messages + ranks - 1
        return sent, messages
    return state + state * (ranks - 1), 1 + (ranks - 1)  # one stage boundary, then the all-gather


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["real", "moe"], choices=["real", "moe"])
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--decode", type=int, default=32)
    p.add_argument("--link-gbps", type=float, default=40.0, help="link bandwidth for the estimate (Thunderbolt 4)")
    p.add_argument("--link-latency-us", type=float, default=50.0, help="per-message latency for the estimate")
    p.add_argument("--timeout", type=float, default=600)
    args = p.parse_args()
    folders = {"real": real_model_folder(), "moe": bench_folders(["float32"])["float32"]}
    print(
        "| model | mode | rank | weights held (load peak) | peak while generating | prefill tok/s | decode tok/s "
        "| bytes sent / token | link time / token (estimate) |\n|---|---|---|---|---|---|---|---|---|"
    )
    for name in args.models:
        folder = folders[name]
        config = read_json(folder / "config.json")
        weights = sum(w.nbytes for w in load_weights(folder).values())
        for i, mode in enumerate(("single", "tensor", "pipeline")):
            for rank, r in enumerate(run(folder, mode, args, 40000 + 10 * i)):
                sent, messages = traffic(config, mode) if mode != "single" else (0, 0)
                link = sent * 8 / (args.link_gbps * 1e9) + messages * args.link_latency_us * 1e-6
                print(
                    f"| {name} ({weights / 1e9:.2f} GB) | {mode} | {rank} | {r['load_peak_gb']:.3f} GB "
                    f"({r['load_peak_gb'] * 1e9 / weights:.2f}x) | {r['peak_gb']:.3f} GB | {r['prefill_tps']:.1f} | "
                    f"{r['decode_tps']:.2f} | {sent / 1e3:.1f} KB | {link * 1e3:.2f} ms |"
                )


if __name__ == "__main__":
    main()
