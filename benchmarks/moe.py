"""Qwen2-MoE speed and memory beside mlx-lm's qwen2_moe, on a random MoE of realistic shape ratios.

    python -m benchmarks.moe [--models float32 4bit] [--prompt 256] [--gen-tokens 64] [--rounds 2]
    python -m benchmarks.moe --router      # routers at 4 bits, 8 bits or float, in a 4-bit model

No real MoE checkpoint is reachable from these machines, so the model is random: hidden 1024, 8 layers,
16 experts (top 4) of width 704 and a shared expert of width 2816 (Qwen1.5-MoE-A2.7B's ratios: expert
width ~0.69 x hidden, shared expert 4 x expert width), 16 query and 4 KV heads, a 32k vocabulary. Written
in Hugging Face's layout (one tensor per expert, stacked at load by both tools); the 4-bit folder is
mlx-lm's own conversion of it. Each figure is a fresh process (benchmarks.gen_worker), interleaved
rounds, medians:

- mlx-lm as its users run it (MLX's Linux wheels call the reference BLAS), and with the same OpenBLAS
  we load (LD_PRELOAD), so the ratio against that one is what our code does apart from OpenBLAS;
- decode also as a fraction of the bound set by the bytes a decode step reads: attention, the shared
  expert, routers, the output layer, one embedding row, and top_k / num_experts of the experts.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from benchmarks.common import ROOT, real_model_folder, run_worker
from benchmarks.generation import read_bandwidth_gbs
from examples.fetch_model import cache_dir
from mlx_qwen2.cache import make_cache
from mlx_qwen2.files import read_json
from mlx_qwen2.loader import load, load_weights
from mlx_qwen2.models.qwen2_moe import SparseMoeBlock
from mlx_qwen2.quant.affine import ROUTER_BITS
from mlx_qwen2.quant.recipes import is_router
from mlx_qwen2.writer import TOKENIZER_FILES, atomic_dir, save_weights, write_json

TOOLS = ("mlx_qwen2", "mlx-lm", "mlx-lm + OpenBLAS")
SHAPE = {
    "hidden_size": 1024,
    "num_hidden_layers": 8,
    "num_attention_heads": 16,
    "num_key_value_heads": 4,
    "num_experts": 16,
    "num_experts_per_tok": 4,
    "moe_intermediate_size": 704,
    "shared_expert_intermediate_size": 2816,
    "intermediate_size": 2816,
    "vocab_size": 32768,
}


def config_of(shape: dict) -> dict:
    return {
        "architectures": ["Qwen2MoeForCausalLM"],
        "model_type": "qwen2_moe",
        **shape,
        "norm_topk_prob": False,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "max_position_embeddings": 32768,
        "tie_word_embeddings": False,
        "use_sliding_window": False,
        "torch_dtype": "float32",
    }


def random_tensors(shape: dict, seed: int = 0, std: float | None = 0.02):
    """(name, array) of a random Qwen2-MoE in Hugging Face's layout, one tensor at a time. With `std` None,
    each matrix's deviation is 1 / sqrt(its input width), so activations keep their scale through the layers."""
    rng = np.random.default_rng(seed)
    d, kv = shape["hidden_size"], shape["hidden_size"] // shape["num_attention_heads"] * shape["num_key_value_heads"]
    e, m, s = shape["num_experts"], shape["moe_intermediate_size"], shape["shared_expert_intermediate_size"]

    def w(*dims: int, gain: float = 1.0) -> mx.array:
        scale = (std if std is not None else dims[-1] ** -0.5) * gain
        return mx.array(rng.standard_normal(dims, dtype=np.float32) * scale)

    yield "model.embed_tokens.weight", w(shape["vocab_size"], d)
    yield "lm_head.weight", w(shape["vocab_size"], d, gain=1.0 if std else 3.0)  # peaked next-token odds
    yield "model.norm.weight", mx.ones((d,))
    for i in range(shape["num_hidden_layers"]):
        p = f"model.layers.{i}"
        yield f"{p}.input_layernorm.weight", mx.ones((d,))
        yield f"{p}.post_attention_layernorm.weight", mx.ones((d,))
        for name, out in (("q_proj", d), ("k_proj", kv), ("v_proj", kv)):
            yield f"{p}.self_attn.{name}.weight", w(out, d)
            yield f"{p}.self_attn.{name}.bias", w(out)
        yield f"{p}.self_attn.o_proj.weight", w(d, d)
        yield f"{p}.mlp.gate.weight", w(e, d, gain=10.0 if std else 3.0)  # a spread: tokens prefer experts
        yield f"{p}.mlp.shared_expert_gate.weight", w(1, d)
        for name, dims in (("gate_proj", (s, d)), ("up_proj", (s, d)), ("down_proj", (d, s))):
            yield f"{p}.mlp.shared_expert.{name}.weight", w(*dims)
        for x in range(e):
            for name, dims in (("gate_proj", (m, d)), ("up_proj", (m, d)), ("down_proj", (d, m))):
                yield f"{p}.mlp.experts.{x}.{name}.weight", w(*dims)


def write_random_moe(out: Path, shape: dict, seed: int = 0, std: float | None = 0.02) -> Path:
    """A random Qwen2-MoE folder (weights, config, the real model's tokenizer files)."""
    tokenizer_from = real_model_folder()
    with atomic_dir(out, force=True) as tmp:
        save_weights(tmp, random_tensors(shape, seed, std))
        write_json(tmp / "config.json", config_of(shape))
        for name in TOKENIZER_FILES:
            if (tokenizer_from / name).is_file():
                (tmp / name).write_bytes((tokenizer_from / name).read_bytes())
    return out


def bench_folders(names: list[str]) -> dict[str, Path]:
    import mlx_lm

    f32 = cache_dir() / "moe-bench-f32"
    if not (f32 / "config.json").is_file():
        write_random_moe(f32, SHAPE)
    folders = {"float32": f32}
    q4 = cache_dir() / "moe-bench-mlxlm-4bit"
    if "4bit" in names and not (q4 / "config.json").is_file():
        mlx_lm.convert(str(f32), str(q4), quantize=True, q_bits=4)
    folders["4bit"] = q4
    return {k: v for k, v in folders.items() if k in names}


def decode_bytes(folder: Path) -> int:
    """Weight bytes a decode step reads: all but the experts and the input embedding, top_k / num_experts
    of the experts, one embedding row."""
    config = read_json(folder / "config.json")
    share = config["num_experts_per_tok"] / config["num_experts"]
    total = 0.0
    for key, w in load_weights(folder).items():
        if key.startswith("model.embed_tokens."):
            total += w.nbytes / w.shape[0]
        elif ".switch_mlp." in key or ".mlp.experts." in key:
            total += w.nbytes * share
        else:
            total += w.nbytes
    return int(total)


def weight_bytes(folder: Path) -> int:
    return sum(w.nbytes for w in load_weights(folder).values())


def median(runs: list, metric: str) -> float | None:
    values = [r[metric] for r in runs if r is not None and r.get(metric) is not None]
    return statistics.median(values) if values else None


def speed(args: argparse.Namespace) -> None:
    folders = bench_folders(args.models)
    ids = np.random.default_rng(0).integers(0, SHAPE["vocab_size"], args.prompt).tolist()
    results: dict[str, dict[str, list]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        ids_file = Path(tmp) / "ids.json"
        ids_file.write_text(json.dumps(ids))
        argv = ["--ids", str(ids_file), "--gen-tokens", str(args.gen_tokens), "--decode-seconds", "60"]
        for name, folder in folders.items():
            runs: dict[str, list] = {t: [] for t in args.tools}
            for r in range(args.rounds):
                for tool in args.tools:
                    res = run_worker("gen_worker", tool, ["--model", str(folder), *argv], args.timeout)
                    runs[tool].append(res)
                    print(f"{name} round {r + 1} {tool}: {res}", flush=True)
            results[name] = runs
    bw = read_bandwidth_gbs()
    machine = f"{platform.machine()}, {platform.system()}, {os.cpu_count()} cores"
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": machine, "args": vars(args), "results": results}, indent=2))
    print(
        f"\nMachine: {machine}; read bandwidth (numpy) {bw:.1f} GB/s; medians of {args.rounds} rounds; "
        f"{args.prompt}-token prompt, {args.gen_tokens} new tokens. (per-round results in {out})\n"
    )
    print(table(results, folders, bw, args.tools))


def table(results: dict, folders: dict[str, Path], bw: float, tools: list[str]) -> str:
    others = [t for t in tools if t != "mlx_qwen2"]
    head = " | ".join(tools) + " | " + " | ".join(f"mlx_qwen2 / {t}" for t in others)
    lines = [f"| model | metric | {head} |", "|---" * (2 + len(tools) + len(others)) + "|"]
    for name, runs in results.items():
        weights, bound = weight_bytes(folders[name]), bw * 1e9 / decode_bytes(folders[name])
        for metric in ("prefill_tps", "decode_tps", "peak_gb", "load_peak_gb"):
            values = {t: median(runs[t], metric) for t in tools}
            cells = ["n/a" if v is None else f"{v:.3g}" for v in values.values()]
            ours = values.get("mlx_qwen2")
            cells += ["n/a" if not ours or not values[t] else f"{ours / values[t]:.2f}" for t in others]
            lines.append(f"| {name} | {metric} | " + " | ".join(cells) + " |")
            if metric.endswith("peak_gb"):
                over = [f"{v * 1e9 / weights:.3f}" if v else "n/a" for v in values.values()]
                lines.append(
                    f"| {name} | {metric} / weights ({weights / 1e9:.3f} GB) | "
                    + " | ".join(over)
                    + " |" * (len(others) + 1)
                )
            if metric == "decode_tps":
                frac = [f"{100 * v / bound:.0f}%" if v else "n/a" for v in values.values()]
                lines.append(
                    f"| {name} | decode / bound ({bound:.1f} tok/s) | " + " | ".join(frac) + " |" * (len(others) + 1)
                )
    return "\n".join(lines)


ROUTER_SHAPE = {
    **SHAPE,
    "hidden_size": 256,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "moe_intermediate_size": 192,
    "shared_expert_intermediate_size": 768,
    "intermediate_size": 768,
    "vocab_size": 4096,
}


def forward_with_routes(model, ids: mx.array) -> tuple[mx.array, list[mx.array]]:
    """Logits (L, vocab) and each sparse layer's chosen experts (L, k): DecoderLayer's steps, spelled out."""
    h, routes = model.model.embed_tokens(ids[None]), []
    for layer in model.layers:
        h = h + layer.self_attn(layer.input_layernorm(h), "causal", None)
        x = layer.post_attention_layernorm(h)
        if isinstance(layer.mlp, SparseMoeBlock):
            routes.append(mx.sort(layer.mlp.route(x)[0][0], axis=-1))
        h = h + layer.mlp(x)
    return model.head(model.model.norm(h))[0].astype(mx.float32), routes


def sample(model, n: int, length: int, seed: int) -> list[list[int]]:
    """Sequences sampled from the model itself (temperature 1), each from one random first token."""
    key = mx.random.key(seed)
    out = []
    for _ in range(n):
        key, sub = mx.random.split(key)
        seq = [int(mx.random.randint(0, model.args.vocab_size, (), key=sub))]
        cache = make_cache(len(model.layers))
        logits = model(mx.array([seq]), cache)[0, -1]
        for _ in range(length - 1):
            key, sub = mx.random.split(key)
            seq.append(int(mx.random.categorical(logits, key=sub)))
            logits = model(mx.array([seq[-1:]]), cache)[0, -1]
        out.append(seq)
    return out


def router_study(args: argparse.Namespace) -> None:
    """Routers at 4 bits, 8 bits (our default) or float, alone and in a 4-bit model, against the float model."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = write_random_moe(Path(tmp) / "moe", ROUTER_SHAPE, seed=1, std=None)
        reference, _ = load(folder)
        texts = sample(reference, args.router_samples, 256, seed=2)
        expected = [forward_with_routes(reference, mx.array(t)) for t in texts]
        # (bits of the routers, bits of everything else): the routers' own rounding, then in a 4-bit model
        variants = {
            "routers at 4 bits, the rest float": (4, None),
            f"routers at {ROUTER_BITS} bits, the rest float": (ROUTER_BITS, None),
            "4-bit, routers at 4 bits (mlx-lm)": (4, 4),
            f"4-bit, routers at {ROUTER_BITS} bits (ours)": (ROUTER_BITS, 4),
            "4-bit, routers in float": (None, 4),
        }
        shape = ROUTER_SHAPE
        print(
            f"\nRandom Qwen2-MoE: {shape['num_hidden_layers']} layers, hidden {shape['hidden_size']}, "
            f"{shape['num_experts']} experts top {shape['num_experts_per_tok']}, group size 64; "
            f"{len(texts)} sequences of 256 tokens sampled from the float model.\n"
        )
        print("| model | perplexity | KL(float ‖ quantized) per token | expert sets kept |\n|---|---|---|---|")
        print(f"| float | {perplexity(expected, texts):.3f} | 0 | 100% |")
        for name, (router_bits, rest_bits) in variants.items():
            model, _ = load(folder)
            nn.quantize(model, class_predicate=lambda p, m, r=router_bits, o=rest_bits: _bits(p, m, r, o))
            got = [forward_with_routes(model, mx.array(t)) for t in texts]
            kl = np.mean([float(mean_kl(e[0], g[0])) for e, g in zip(expected, got)])
            pairs = [(a, b) for e, g in zip(expected, got) for a, b in zip(e[1], g[1])]
            kept = np.mean([float((a == b).all(axis=-1).mean()) for a, b in pairs])
            print(f"| {name} | {perplexity(got, texts):.3f} | {kl:.4f} | {100 * kept:.1f}% |")


def _bits(path: str, module: nn.Module, router_bits: int | None, rest_bits: int | None) -> bool | dict:
    bits = router_bits if is_router(path) else rest_bits
    return hasattr(module, "to_quantized") and bits is not None and {"group_size": 64, "bits": bits}


def mean_kl(p_logits: mx.array, q_logits: mx.array) -> mx.array:
    p = p_logits - mx.logsumexp(p_logits, axis=-1, keepdims=True)
    q = q_logits - mx.logsumexp(q_logits, axis=-1, keepdims=True)
    return (mx.exp(p) * (p - q)).sum(axis=-1).mean()


def perplexity(outputs: list[tuple[mx.array, list]], texts: list[list[int]]) -> float:
    nll, n = 0.0, 0
    for (logits, _), ids in zip(outputs, texts):
        logprobs = logits[:-1] - mx.logsumexp(logits[:-1], axis=-1, keepdims=True)
        nll -= float(mx.take_along_axis(logprobs, mx.array(ids[1:])[:, None], axis=-1).sum())
        n += len(ids) - 1
    return float(np.exp(nll / n))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["float32", "4bit"], choices=["float32", "4bit"])
    p.add_argument("--tools", nargs="+", default=list(TOOLS), choices=TOOLS)
    p.add_argument("--prompt", type=int, default=256, help="prompt tokens (random ids)")
    p.add_argument("--gen-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--timeout", type=float, default=600, help="seconds per measurement")
    p.add_argument("--router", action="store_true", help="the router-precision study instead of speed")
    p.add_argument("--router-samples", type=int, default=8)
    p.add_argument("--out", default=str(ROOT / "bench-out" / "moe.json"))
    args = p.parse_args()
    router_study(args) if args.router else speed(args)


if __name__ == "__main__":
    main()
