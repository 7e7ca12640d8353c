"""Calibrated quantization (GPTQ) against round-to-nearest, scored by an evaluator independent of ours.

    python -m benchmarks.gptq [--tokens 2048] [--out bench-out/gptq.json]

Converts the real fixture model (Qwen2.5-Coder-0.5B-Instruct, float32) with mlx_qwen2's
converter: round-to-nearest (the same weights mlx-lm makes) and GPTQ with the shipped
calibration sample (calibration-v1), at 4 and 3 bits and with the mixed_3_6 recipe. Each model
is then loaded with mlx-lm's loader and model code, its quantized layers replaced by float32
ones holding the dequantized weights (the same function up to rounding), and scored on the
first --tokens tokens of each text in 512-token windows. Texts: the one the README's
perplexity table uses (on which GPTQ's damping was chosen), and three held-out ones of
different kinds (see benchmarks/common.py: held_out_texts). For each text the table gives the
share of the float-to-round-to-nearest gap that GPTQ closes.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx_lm

from benchmarks.common import ROOT, eval_text, held_out_texts, perplexity, real_model_folder
from mlx_qwen2.convert import main as convert_main
from mlx_qwen2.quant.dequantize import dequantize_model
from mlx_qwen2.tokenizer import Tokenizer

# (label, convert flags); each GPTQ row is compared with the round-to-nearest row it names.
SETTINGS = [
    ("RTN 4-bit g64", ["-q"], None),
    ("GPTQ 4-bit g64", ["--calibrate"], "RTN 4-bit g64"),
    ("RTN 3-bit g64", ["-q", "--q-bits", "3"], None),
    ("GPTQ 3-bit g64", ["--calibrate", "--q-bits", "3"], "RTN 3-bit g64"),
    ("RTN mixed_3_6", ["--quant-recipe", "mixed_3_6"], None),
    ("GPTQ mixed_3_6", ["--calibrate", "--quant-recipe", "mixed_3_6"], "RTN mixed_3_6"),
]


def score(folder: Path, texts: dict[str, list[int]]) -> dict[str, float]:
    """Perplexity on each text, computed by mlx-lm's model with float32 dequantized weights."""
    model, _ = mlx_lm.load(str(folder))
    dequantize_model(model)
    model.apply(lambda w: w.astype(mx.float32) if mx.issubdtype(w.dtype, mx.floating) else w)
    mx.eval(model.parameters())
    assert not any(isinstance(m, nn.QuantizedLinear) for _, m in model.named_modules())
    return {name: perplexity(model, ids) for name, ids in texts.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=2048, help="tokens scored per text")
    p.add_argument("--out", default=str(ROOT / "bench-out" / "gptq.json"))
    args = p.parse_args()
    src = real_model_folder()
    tok = Tokenizer.from_folder(src)
    texts = {"README text (textwrap.py, json/decoder.py, ...)": eval_text(), **held_out_texts()}
    ids = {name: tok.encode(text)[: args.tokens] for name, text in texts.items()}
    rows = {"float32": score(src, ids)}
    print(f"float32: {rows['float32']}", flush=True)
    work = Path(tempfile.mkdtemp(prefix="gptq-"))
    try:
        for label, flags, _ in SETTINGS:
            out = work / label.replace(" ", "_")
            tic = time.perf_counter()
            assert convert_main(["--hf-path", str(src), "--mlx-path", str(out), *flags]) == 0
            convert_s = time.perf_counter() - tic
            rows[label] = score(out, ids)
            print(f"{label} ({convert_s:.0f} s to convert): {rows[label]}", flush=True)
            shutil.rmtree(out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"tokens": args.tokens, "perplexity": rows}, indent=2))
    print(table(rows))


def table(rows: dict[str, dict[str, float]]) -> str:
    texts = list(rows["float32"])
    lines = ["| text | float32 | " + " | ".join(label for label, _, _ in SETTINGS) + " |"]
    lines.append("|---" * (2 + len(SETTINGS)) + "|")
    for text in texts:
        cells = [f"{rows['float32'][text]:.4f}"]
        for label, _, baseline in SETTINGS:
            cell = f"{rows[label][text]:.4f}"
            if baseline is not None:
                gap = rows[baseline][text] - rows["float32"][text]
                closed = (rows[baseline][text] - rows[label][text]) / gap if gap > 0 else float("nan")
                cell += f" ({100 * closed:.0f}% of the gap)"
            cells.append(cell)
        lines.append(f"| {text} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
