"""A real LoRA run, mlx_qwen2 beside mlx-lm: same model, data, settings, machine, one script.

    python benchmarks/lora.py [--iters 10] [--batch-size 1] [--num-layers 8] [--quantized]

Fine-tunes the real fixture model (Qwen2.5-Coder-0.5B-Instruct, float32; or mlx-lm's 4-bit
conversion of it with --quantized, i.e. QLoRA) on examples/lora_data (answer arithmetic as
<answer>N</answer>), loss on the answers only. Prints validation loss before and after, wall
time, training tokens/s and peak memory for both tools, each run in a fresh process.

Each tool's own validation loss is quoted as it reports it, but the two do not count the same
tokens: mlx-lm's loss mask takes one target past the end of every sequence (the padding id 0; see
ml-explore/mlx-lm pull request 1697), a token that is easy to learn and inflates its "before".
So both tools' final adapters (and the base model) are also scored by one evaluator, ours, over
the whole validation set: that row is the like-for-like comparison of what each run learned.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mlx_lm

from benchmarks.common import ROOT, cache_dir, real_model_folder

DATA = ROOT / "examples" / "lora_data"
# mlx-lm's CLI prints a rich-text table without peak memory; its Python entry point takes a callback
# that receives the same figures it computes, which this driver prints as JSON lines.
MLX_LM_DRIVER = """
import json, sys, types
from mlx_lm import lora
from mlx_lm.tuner.callbacks import TrainingCallback

class Report(TrainingCallback):
    def on_train_loss_report(self, info):
        print("MLXLM_REPORT", json.dumps({k: float(v) for k, v in info.items()}), flush=True)

    def on_val_loss_report(self, info):
        print("MLXLM_REPORT", json.dumps({k: float(v) for k, v in info.items()}), flush=True)

args = vars(lora.build_parser().parse_args(sys.argv[1:]))
for k, v in lora.CONFIG_DEFAULTS.items():
    if args.get(k) is None:
        args[k] = v
args = types.SimpleNamespace(**args)
# lora.run() would replace our callback with its own; this is the rest of what it does.
lora.np.random.seed(args.seed)
model, tokenizer = lora.load(args.model, tokenizer_config={"trust_remote_code": False})
train_set, valid_set, _ = lora.load_dataset(args, tokenizer)
lora.train_model(args, model, train_set, valid_set, Report())
"""


def run(tool: str, model: Path, out: Path, a: argparse.Namespace) -> dict:
    common = ["--model", str(model), "--train", "--data", str(DATA), "--adapter-path", str(out)]
    common += ["--iters", str(a.iters), "--batch-size", str(a.batch_size), "--num-layers", str(a.num_layers)]
    common += ["--learning-rate", str(a.learning_rate), "--mask-prompt", "--steps-per-report", str(a.iters)]
    common += [
        "--steps-per-eval",
        str(a.iters),
        "--save-every",
        str(a.iters),
        "--val-batches",
        str(a.val_batches),
        "--seed",
        "0",
    ]
    if tool == "mlx_qwen2":
        # mlx-lm's defaults: Adam, constant learning rate
        cmd = [sys.executable, "-m", "mlx_qwen2.lora", *common, "--optimizer", "adam", "--no-cosine-decay"]
        env = None
    else:
        cmd = [sys.executable, "-c", MLX_LM_DRIVER, *common]
        env = {**os.environ, "MLX_QWEN2_BLAS": "off"}  # as mlx-lm's users run it
    tic = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    wall = time.perf_counter() - tic
    if done.returncode:
        raise RuntimeError(f"{tool} failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    text = done.stdout + done.stderr
    log = Path(a.out).with_name(f"lora-{tool}.log")
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text(text)  # the tool's own report, kept for reading
    if tool == "mlx_qwen2":
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        vals = [r["val_loss"] for r in rows if "val_loss" in r]
        train = [r for r in rows if "train_loss" in r][-1]
        return {
            "val_before": vals[0],
            "val_after": vals[-1],
            "iters_per_sec": train["iters_per_sec"],
            "tokens_per_sec": train["tokens_per_sec"],
            "peak_gb": train["peak_memory_gb"],
            "wall_s": wall,
        }
    reports = [json.loads(line.split(" ", 1)[1]) for line in text.splitlines() if line.startswith("MLXLM_REPORT ")]
    vals = [r["val_loss"] for r in reports if "val_loss" in r]
    train = [r for r in reports if "train_loss" in r]
    if not vals or not train:
        raise RuntimeError(f"no reports found in mlx-lm's output; see {log}")
    return {
        "val_before": vals[0],
        "val_after": vals[-1],
        "iters_per_sec": train[-1]["iterations_per_second"],
        "tokens_per_sec": train[-1]["tokens_per_second"],
        "peak_gb": train[-1]["peak_memory"],
        "wall_s": wall,
    }


def common_val_loss(model: Path, adapters: Path | None, batch_size: int) -> float:
    """Validation loss of the base model plus `adapters` (either tool's), under one evaluator."""
    from mlx_qwen2 import load
    from mlx_qwen2.tuner.data import load_jsonl
    from mlx_qwen2.tuner.trainer import evaluate

    net, tokenizer = load(str(model), adapter_path=str(adapters) if adapters else None)
    return evaluate(net, load_jsonl(DATA / "valid.jsonl", tokenizer, mask_prompt=True), batch_size)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--num-layers", type=int, default=8)
    p.add_argument("--learning-rate", type=float, default=1e-4)
    p.add_argument("--val-batches", type=int, default=4, help="validation batches (mlx-lm's CPU forward is slow)")
    p.add_argument("--quantized", action="store_true", help="QLoRA on mlx-lm's default 4-bit conversion")
    p.add_argument("--out", default=str(ROOT / "bench-out" / "lora.json"))
    a = p.parse_args()
    model = real_model_folder()
    if a.quantized:
        q = cache_dir() / "qwen2.5-coder-0.5b-instruct-mlxlm-4bit-f32src"
        if not (q / "config.json").is_file():
            mlx_lm.convert(str(model), str(q), quantize=True, q_bits=4)
        model = q
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for tool in ("mlx_qwen2", "mlx-lm"):
            results[tool] = run(tool, model, Path(tmp) / tool, a)
            print(tool, results[tool], flush=True)
        base = common_val_loss(model, None, a.batch_size)
        for tool in results:
            results[tool]["common_val_before"] = base
            results[tool]["common_val_after"] = common_val_loss(model, Path(tmp) / tool, a.batch_size)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"args": vars(a), "results": results}, indent=2))
    ours, theirs = results["mlx_qwen2"], results["mlx-lm"]
    kind = "QLoRA (4-bit base)" if a.quantized else "LoRA (float32 base)"
    print(f"\n{kind}, {a.iters} iterations, batch {a.batch_size}, {a.num_layers} layers, lr {a.learning_rate}\n")
    print("| | mlx_qwen2 | mlx-lm | ratio |\n|---|---|---|---|")
    rows = ("common_val_before", "common_val_after", "val_before", "val_after", "iters_per_sec")
    for key in (*rows, "tokens_per_sec", "peak_gb", "wall_s"):
        print(f"| {key} | {ours[key]:.3f} | {theirs[key]:.3f} | {ours[key] / theirs[key]:.2f} |")


if __name__ == "__main__":
    main()
