"""Perplexity of converted models on held-out text, ours beside mlx-lm's, in one run.

    python -m benchmarks.perplexity [--tokens 2048] [--out bench-out/perplexity.json] [--quick | --only SETTING...]

Converts the real fixture model (Qwen2.5-Coder-0.5B-Instruct, imported from its GGUF to
float32) with mlx_qwen2 and with mlx-lm at each setting, then measures perplexity on
source files of Python's standard library, which neither tool calibrates on.

Every quantized model is evaluated with its weights dequantized to float32: MLX's CPU
quantized matmul is very slow for multi-token inputs, and dequantize-then-matmul computes
the same function up to float rounding (tests/test_gptq.py checks this on a tiny model).
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import mlx.core as mx
import mlx_lm

from benchmarks.common import ROOT, eval_text, perplexity, real_model_folder
from mlx_qwen2.convert import main as convert_main
from mlx_qwen2.loader import load
from mlx_qwen2.quant.affine import bits_per_weight
from mlx_qwen2.quant.dequantize import dequantize_model

# (label, our convert flags, mlx-lm convert kwargs or None)
SETTINGS = [
    ("8-bit g64", ["-q", "--q-bits", "8"], dict(quantize=True, q_bits=8, q_group_size=64)),
    ("6-bit g64", ["-q", "--q-bits", "6"], dict(quantize=True, q_bits=6, q_group_size=64)),
    ("5-bit g64", ["-q", "--q-bits", "5"], dict(quantize=True, q_bits=5, q_group_size=64)),
    ("4-bit g32", ["-q", "--q-group-size", "32"], dict(quantize=True, q_bits=4, q_group_size=32)),
    ("4-bit g64", ["-q"], dict(quantize=True, q_bits=4, q_group_size=64)),
    ("4-bit g128", ["-q", "--q-group-size", "128"], dict(quantize=True, q_bits=4, q_group_size=128)),
    ("3-bit g64", ["-q", "--q-bits", "3"], dict(quantize=True, q_bits=3, q_group_size=64)),
    ("2-bit g64", ["-q", "--q-bits", "2"], dict(quantize=True, q_bits=2, q_group_size=64)),
    *[
        (f"recipe {r}", ["--quant-recipe", r], dict(quantize=True, q_group_size=64, quant_predicate=r))
        for r in ("mixed_2_6", "mixed_3_4", "mixed_3_6", "mixed_4_6")
    ],
    ("GPTQ 4-bit g64", ["--calibrate"], None),
    ("GPTQ 3-bit g64", ["--calibrate", "--q-bits", "3"], None),
    ("GPTQ recipe mixed_3_6", ["--calibrate", "--quant-recipe", "mixed_3_6"], None),
]
QUICK = {"4-bit g64", "GPTQ 4-bit g64", "recipe mixed_3_6", "GPTQ recipe mixed_3_6"}


def measure(folder: Path, ids: list[int]) -> dict[str, float]:
    model, _ = load(folder, lazy=True)
    bpw = bits_per_weight(model)
    dequantize_model(model)
    mx.eval(model.parameters())
    size = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    return {"bits_per_weight": bpw, "size_mb": size / 1e6, "perplexity": perplexity(model, ids)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=2048, help="held-out tokens to score")
    p.add_argument("--out", default=str(ROOT / "bench-out" / "perplexity.json"))
    p.add_argument("--quick", action="store_true", help="only 4-bit g64, mixed_3_6 and their calibrated versions")
    p.add_argument("--only", nargs="+", metavar="SETTING", help='only these settings, e.g. "recipe mixed_3_6"')
    args = p.parse_args()
    src = real_model_folder()
    _, tok = load(src, lazy=True)
    ids = tok.encode(eval_text())[: args.tokens]
    rows = [{"setting": "float32", "tool": "source", **measure(src, ids)}]
    print(f"float32: perplexity {rows[0]['perplexity']:.4f} on {len(ids)} tokens", flush=True)
    work = Path(tempfile.mkdtemp(prefix="ppl-"))
    try:
        for label, flags, theirs in SETTINGS:
            if (args.quick and label not in QUICK) or (args.only and label not in args.only):
                continue
            for tool in ("mlx_qwen2", "mlx-lm"):
                out = work / f"{tool}-{label.replace(' ', '_')}"
                tic = time.perf_counter()
                if tool == "mlx_qwen2":
                    assert convert_main(["--hf-path", str(src), "--mlx-path", str(out), *flags]) == 0
                elif theirs is not None:
                    mlx_lm.convert(str(src), str(out), **theirs)
                else:
                    continue
                row = {"setting": label, "tool": tool, "convert_s": time.perf_counter() - tic, **measure(out, ids)}
                rows.append(row)
                print(
                    f"{label:>24} {tool:>9}: ppl {row['perplexity']:.4f}  {row['bits_per_weight']:.3f} bpw", flush=True
                )
                shutil.rmtree(out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"tokens": len(ids), "rows": rows}, indent=2))
    print(table(rows))


def table(rows: list[dict]) -> str:
    base = rows[0]["perplexity"]
    lines = ["| setting | tool | bits/weight | size (MB) | perplexity | vs float |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['setting']} | {r['tool']} | {r['bits_per_weight']:.3f} | {r['size_mb']:.0f} | "
            f"{r['perplexity']:.4f} | {100 * (r['perplexity'] / base - 1):+.2f}% |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
