"""Qwen2-MoE against transformers' Qwen2MoeForCausalLM, and its experts against a loop over experts."""

from __future__ import annotations

import json
import signal

import mlx.core as mx
import mlx.nn as nn
import mlx_lm
import numpy as np
import openai
import pytest
from mlx.utils import tree_flatten
from safetensors.numpy import load_file, save_file
from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

from mlx_qwen2 import load, stream_generate
from mlx_qwen2.backends.cpu import experts as cpu_experts
from mlx_qwen2.backends.cpu import kernels
from mlx_qwen2.backends.cpu import layers as cpu_layers
from mlx_qwen2.backends.cpu.experts import GroupingSwitchGLU
from mlx_qwen2.backends.cpu.fast import use_fast_layers
from mlx_qwen2.cache import KVCache
from mlx_qwen2.convert import main as convert_main
from mlx_qwen2.errors import UserError
from mlx_qwen2.generation import GenerationConfig, batch_generate
from mlx_qwen2.generation.speculative import SpeculativeConfig
from mlx_qwen2.models import MoeArgs, args_from_config
from mlx_qwen2.models.experts import SORT_PAIRS, QuantizedSwitchLinear, SwitchGLU
from mlx_qwen2.models.qwen2_moe import SparseMoeBlock
from mlx_qwen2.quant.affine import ROUTER_BITS
from tests.serving import ServerProcess
from tests.test_kernels import decoding_batch
from tests.test_server import ask, chat_ids, greedy
from tests.tiny import hf_greedy, hf_logits, hf_model, make_moe_checkpoint
from tests.tiny_gguf import write_gguf

IDS = [(i * 37 + 11) % 500 for i in range(40)]  # 40 tokens x top-2: past SORT_PAIRS, so prefill sorts
CONFIGS = {
    "top2": {},
    "top2-norm-step2-mlp-only-tied": {
        "norm_topk_prob": True,
        "decoder_sparse_step": 2,
        "mlp_only_layers": [3],
        "tied": True,
        "seed": 1,
    },
    "top3-yarn": {
        "top_k": 3,
        "rope_scaling": {
            "rope_type": "yarn",
            "factor": 4.0,
            "original_max_position_embeddings": 16,
            "rope_theta": 10000.0,
        },
        "seed": 2,
    },
}


@pytest.fixture(scope="module", params=list(CONFIGS))
def moe(request, tmp_path_factory):
    return make_moe_checkpoint(tmp_path_factory.mktemp(request.param), **CONFIGS[request.param])


@pytest.fixture(scope="module")
def moe_plain(tmp_path_factory):
    return make_moe_checkpoint(tmp_path_factory.mktemp("moe_plain"))


def test_logits_greedy_and_cache_match_transformers(moe):
    model, _ = load(moe)
    ref = hf_model(moe)
    config = json.loads((moe / "config.json").read_text())
    sparse = [isinstance(layer.mlp, SparseMoeBlock) for layer in model.layers]
    assert sparse == [
        i not in config["mlp_only_layers"] and (i + 1) % config["decoder_sparse_step"] == 0 for i in range(4)
    ]
    full = np.array(model(mx.array([IDS]))[0])
    np.testing.assert_allclose(full, hf_logits(ref, IDS), atol=1e-4, rtol=0)
    assert mlx_greedy(model, IDS[:5], 10) == hf_greedy(ref, IDS[:5], 10)
    cache = [KVCache(8) for _ in model.layers]  # prefill 7, then a token at a time: cache == full recompute
    steps = [np.array(model(mx.array([IDS[:7]]), cache)[0])] + [
        np.array(model(mx.array([[t]]), cache)[0]) for t in IDS[7:]
    ]
    np.testing.assert_allclose(np.concatenate(steps), full, atol=1e-4, rtol=0)


def mlx_greedy(model, ids: list[int], n: int) -> list[int]:
    out = list(ids)
    for _ in range(n):
        out.append(int(np.array(model(mx.array([out]))[0, -1]).argmax()))
    return out[len(ids) :]


def loop_over_experts(glu: SwitchGLU, x: mx.array, experts: mx.array, weight) -> mx.array:
    """The obvious computation: for each token and each of its experts, that expert's SwiGLU."""
    rows = []
    for t in range(x.shape[0]):
        outs = []
        for e in np.array(experts[t]).tolist():
            w = {name: weight(getattr(glu, name))[e] for name in ("gate_proj", "up_proj", "down_proj")}
            h = nn.silu(x[t] @ w["gate_proj"].T) * (x[t] @ w["up_proj"].T)
            outs.append(h @ w["down_proj"].T)
        rows.append(mx.stack(outs))
    return mx.stack(rows)  # (N, k, D)


def float_weight(layer) -> mx.array:
    if isinstance(layer, QuantizedSwitchLinear):
        return mx.dequantize(layer.weight, layer.scales, layer.biases, group_size=layer.group_size, bits=layer.bits)
    return layer.weight


@pytest.mark.parametrize("tokens", [3, SORT_PAIRS])  # decode (gathered as is) and prefill (sorted by expert)
@pytest.mark.parametrize("bits", [None, 4, 8])
def test_gathered_experts_equal_a_loop_over_experts(tokens, bits):
    mx.random.seed(0)
    glu = SwitchGLU(64, 32, 8)
    if bits:
        nn.quantize(glu, group_size=32, bits=bits)
        assert isinstance(glu.down_proj, QuantizedSwitchLinear)
    x = mx.random.normal((tokens, 64))
    experts = mx.random.randint(0, 8, (tokens, 3))
    got = glu(x, experts)
    assert got.shape == (tokens, 3, 64)
    np.testing.assert_allclose(np.array(got), np.array(loop_over_experts(glu, x, experts, float_weight)), atol=1e-4)
    batched = glu(x.reshape(1, tokens, 64), experts.reshape(1, tokens, 3))  # (B, L) leading dims too
    np.testing.assert_allclose(np.array(batched[0]), np.array(got), atol=1e-5)


def test_mlx_lm_layout_loads_to_the_same_logits(moe_plain, tmp_path):
    """Experts stacked under switch_mlp (mlx-lm's layout) and transformers 5's fused layout, both as the HF one."""
    model, _ = load(moe_plain)
    expected = np.array(model(mx.array([IDS]))[0])
    weights = load_file(moe_plain / "model.safetensors")
    for layout in ("switch_mlp", "fused"):
        folder = tmp_path / layout
        folder.mkdir()
        for f in moe_plain.iterdir():
            if f.suffix != ".safetensors":
                (folder / f.name).write_bytes(f.read_bytes())
        save_file(relayout(weights, layout), folder / "model.safetensors")
        got = np.array(load(folder)[0](mx.array([IDS]))[0])
        np.testing.assert_array_equal(got, expected)


def relayout(weights: dict[str, np.ndarray], layout: str) -> dict[str, np.ndarray]:
    out = {k: v for k, v in weights.items() if ".experts." not in k}
    for i in range(4):
        p = f"model.layers.{i}.mlp"
        stack = {
            n: np.stack([weights[f"{p}.experts.{e}.{n}.weight"] for e in range(8)])
            for n in ("gate_proj", "up_proj", "down_proj")
        }
        if layout == "switch_mlp":
            out.update({f"{p}.switch_mlp.{n}.weight": w for n, w in stack.items()})
        else:
            out[f"{p}.experts.gate_up_proj"] = np.concatenate([stack["gate_proj"], stack["up_proj"]], axis=1)
            out[f"{p}.experts.down_proj"] = stack["down_proj"]
    return out


def test_batch_of_moe_sequences_equals_each_alone(moe_plain):
    model, tok = load(moe_plain)
    tok.eos_token_ids = set()
    prompts = ["Hi", "The quick brown fox jumps over the lazy dog", "def add(a, b):"]
    configs = [GenerationConfig(max_tokens=n, prefill_step_size=4) for n in (6, 9, 4)]
    results = batch_generate(model, tok, prompts, configs, max_batch=3)
    for prompt, config, result in zip(prompts, configs, results):
        assert result.tokens == [r.token for r in stream_generate(model, tok, prompt, config=config)], prompt


def test_a_missing_expert_is_a_clear_error(moe_plain, tmp_path):
    weights = load_file(moe_plain / "model.safetensors")
    del weights["model.layers.2.mlp.experts.5.up_proj.weight"]
    for f in moe_plain.iterdir():
        if f.suffix != ".safetensors":
            (tmp_path / f.name).write_bytes(f.read_bytes())
    save_file(weights, tmp_path / "model.safetensors")
    with pytest.raises(UserError, match=r"lacks model\.layers\.2\.mlp\.experts\.\{5\}\.up_proj\.weight"):
        load(tmp_path)


BASE = {
    "model_type": "qwen2_moe",
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "intermediate_size": 96,
    "num_attention_heads": 4,
    "vocab_size": 512,
    "num_experts": 8,
    "num_experts_per_tok": 2,
    "moe_intermediate_size": 32,
    "shared_expert_intermediate_size": 48,
}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"num_experts_per_tok": 9}, "exceeds num_experts"),
        ({"num_experts": None}, "lacks num_experts"),
        ({"mlp_only_layers": "1,2"}, "mlp_only_layers is '1,2', but it must be a list"),
        ({"mlp_only_layers": [1.5]}, "must list layer indices"),
        ({"decoder_sparse_step": 0}, "decoder_sparse_step must be at least 1"),
        ({"model_type": "mixtral"}, "not 'qwen2' or 'qwen2_moe'"),
    ],
)
def test_bad_moe_configs(change, message):
    config = {**BASE, **change}
    config = {k: v for k, v in config.items() if v is not None}
    with pytest.raises(UserError, match=message):
        args_from_config(config)


def test_args_read_the_routing_keys():
    args = args_from_config({**BASE, "norm_topk_prob": True, "decoder_sparse_step": 2, "mlp_only_layers": [1]})
    assert isinstance(args, MoeArgs) and args.norm_topk_prob
    assert [args.is_sparse(i) for i in range(4)] == [False, False, False, True]


def our_logits(folder, fast: bool = False) -> np.ndarray:
    return np.array(load(folder, fast=fast)[0](mx.array([IDS]))[0])


def lm_logits(folder) -> np.ndarray:
    model, _ = mlx_lm.load(str(folder))
    return np.array(model(mx.array([IDS]))[0])


@pytest.mark.parametrize("bits", [4, 8])
def test_quantize_save_load_and_mlx_lm_loads_it(moe_plain, tmp_path, bits):
    out = tmp_path / "q"
    flags = ["-q", "--q-group-size", "32", "--q-bits", str(bits)]
    assert convert_main(["--hf-path", str(moe_plain), "--mlx-path", str(out), *flags]) == 0
    q = json.loads((out / "config.json").read_text())["quantization"]
    assert q["bits"] == bits
    for i in range(4):  # routers kept at 8 bits (ROUTER_BITS); experts at the chosen width
        router = {"group_size": 32, "bits": ROUTER_BITS}
        assert (
            bits == ROUTER_BITS
            or q[f"model.layers.{i}.mlp.gate"] == q[f"model.layers.{i}.mlp.shared_expert_gate"] == router
        )
        assert f"model.layers.{i}.mlp.switch_mlp.down_proj" not in q
    model, _ = load(out)
    experts = model.layers[1].mlp.switch_mlp
    assert isinstance(experts.gate_proj, QuantizedSwitchLinear) and experts.gate_proj.bits == bits
    assert model.layers[1].mlp.gate.bits == ROUTER_BITS
    ours, float_logits = our_logits(out), our_logits(moe_plain)
    # Near the float model, not equal. A 4-bit error moves a token's hidden state enough to change its experts
    # (a jump, not a drift), so on this tiny model only 8 bits stay close.
    assert np.corrcoef(ours.ravel(), float_logits.ravel())[0, 1] > (0.99 if bits == 8 else 0.5)
    np.testing.assert_allclose(our_logits(out, fast=True), ours, atol=1e-4)  # the CPU layers compute the same
    np.testing.assert_array_equal(lm_logits(out), ours)  # MLX's own layers on both sides: bit for bit
    back = tmp_path / "dequantized"  # and back to float: the same function
    assert convert_main(["--hf-path", str(out), "--mlx-path", str(back), "--dequantize"]) == 0
    np.testing.assert_allclose(our_logits(back), ours, atol=1e-5)


def test_we_load_mlx_lms_quantized_moe(moe_plain, tmp_path):
    out = tmp_path / "theirs"
    mlx_lm.convert(str(moe_plain), str(out), quantize=True, q_bits=4, q_group_size=32)
    assert "model.layers.0.mlp.switch_mlp.up_proj.scales" in mx.load(str(out / "model.safetensors"))
    np.testing.assert_array_equal(our_logits(out), lm_logits(out))
    ours = tmp_path / "float"  # our float conversion writes their layout, which they load to our logits
    assert convert_main(["--hf-path", str(moe_plain), "--mlx-path", str(ours)]) == 0
    np.testing.assert_array_equal(lm_logits(ours), our_logits(moe_plain))


def test_mixed_recipe_knows_experts(moe_plain, tmp_path):
    out = tmp_path / "mixed"
    flags = ["--quant-recipe", "mixed_3_6", "--q-group-size", "32"]
    assert convert_main(["--hf-path", str(moe_plain), "--mlx-path", str(out), *flags]) == 0
    q = json.loads((out / "config.json").read_text())["quantization"]
    assert q["bits"] == 3
    high = [p for p, s in q.items() if isinstance(s, dict) and s["bits"] == 6]
    assert any(p.endswith("mlp.switch_mlp.down_proj") for p in high), high  # the experts' down_proj counts
    assert all(q[f"model.layers.{i}.mlp.gate"]["bits"] == ROUTER_BITS for i in range(4))
    assert "model.layers.1.mlp.switch_mlp.gate_proj" not in q  # at the low width, the block's default
    load(out)


def test_gptq_refuses_moe(moe_plain, tmp_path, capsys):
    out = tmp_path / "gptq"
    assert (
        convert_main(
            [
                "--hf-path",
                str(moe_plain),
                "--mlx-path",
                str(out),
                "--calibrate",
                "--q-group-size",
                "32",
                "--calibration-tokens",
                "64",
            ]
        )
        != 0
    )
    assert "dense Qwen2 models only" in capsys.readouterr().err and not out.exists()


@pytest.mark.parametrize("dense", [[], [0]], ids=["all-sparse", "a-dense-layer"])
def test_gguf_import_gives_transformers_tensors(tmp_path, dense):
    """A qwen2moe GGUF (experts stacked, llama.cpp's names) imports to the tensors transformers' GGUF reader
    gives, in a folder transformers loads, computing what the source computes. llama.cpp's qwen2moe has no
    dense layers (nor has transformers' reader); we import one as a layer listed in mlp_only_layers."""
    src = make_moe_checkpoint(tmp_path / "src", mlp_only_layers=dense, seed=3)
    path = write_gguf(src, tmp_path / "moe.gguf")
    out = tmp_path / "imported"
    assert convert_main(["--gguf", str(path), "--mlx-path", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "qwen2_moe" and config["mlp_only_layers"] == dense
    assert (config["num_experts"], config["num_experts_per_tok"], config["moe_intermediate_size"]) == (8, 2, 32)
    reference = hf_model(src)
    ids = IDS[:20]
    np.testing.assert_allclose(hf_logits(hf_model(out), ids), hf_logits(reference, ids), atol=1e-6)
    model, _ = load(out)
    np.testing.assert_allclose(np.array(model(mx.array([ids]))[0]), hf_logits(reference, ids), atol=1e-4)
    if dense:
        return
    theirs = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=reference)["tensors"]
    ours = dict(tree_flatten(model.parameters()))
    expected = model.sanitize({k: mx.array(v.numpy()) for k, v in theirs.items()})  # their fused experts, stacked
    assert set(expected) == set(ours)
    for key, value in expected.items():
        np.testing.assert_array_equal(np.array(ours[key]), np.array(value), err_msg=key)


def glu_pair(dim: int, hidden: int, kind: str, group_size: int) -> tuple[SwitchGLU, nn.Module]:
    """Two SwitchGLUs of 8 experts with the same weights, of `kind`: MLX's own, and one in a holder given the
    CPU layers (`holder.glu`, a GroupingSwitchGLU)."""
    plain, holder = SwitchGLU(dim, hidden, 8), nn.Module()
    holder.glu = SwitchGLU(dim, hidden, 8)
    holder.glu.update(plain.parameters())
    for glu in (plain, holder.glu):
        if kind == "bfloat16":
            glu.set_dtype(mx.bfloat16)
        elif kind != "float32":
            nn.quantize(glu, group_size=group_size, bits=int(kind[0]))
    assert use_fast_layers(holder, mx.Device(mx.cpu)) == 1 and type(holder.glu) is GroupingSwitchGLU
    return plain, holder


@pytest.mark.parametrize("split", [False, True], ids=["", "split"])  # as in a pass of 2-8 tokens (layers.pace)
@pytest.mark.parametrize("tokens", [1, 3, 40])  # gathered (decode) and grouped by expert (prefill)
@pytest.mark.parametrize("kind", ["float32", "bfloat16", "4bit", "8bit"])
def test_cpu_experts_compute_what_mlx_computes(tokens, kind, split, monkeypatch):
    """backends/cpu/experts.py against MLX's own gathered products: outputs and input gradients (experts 6
    and 7 unused: skipped when grouping); also with the products split over two CPU streams."""
    streams = (mx.new_stream(mx.cpu), mx.new_stream(mx.cpu))
    monkeypatch.setattr(cpu_layers, "_streams", lambda: streams)
    monkeypatch.setattr(cpu_layers, "_split", split)
    mx.random.seed(1)
    plain, holder = glu_pair(64, 32, kind, group_size=32)
    x = mx.random.normal((2, tokens, 64))
    experts = mx.random.randint(0, 6, (2, tokens, 2))

    def loss(glu, x):
        return (glu(x, experts) * mx.arange(64)).sum()

    x_in = x.astype(mx.bfloat16) if kind == "bfloat16" else x
    if kind == "bfloat16":  # MLX's CPU gather_mm takes float32 only: the reference is the weights upcast
        plain.set_dtype(mx.float32)
        x = x_in.astype(mx.float32)
    np.testing.assert_allclose(
        np.array(holder.glu(x_in, experts).astype(mx.float32)),
        np.array(plain(x, experts)),
        atol=2e-2 if kind == "bfloat16" else 1e-4,
    )
    if kind == "float32":
        ours, theirs = (mx.grad(lambda v, g=g: loss(g, v))(x) for g in (holder.glu, plain))
        np.testing.assert_allclose(np.array(ours), np.array(theirs), atol=1e-4)


@pytest.mark.parametrize("kernel_rows", [None, 8], ids=["", "some-by-blas"])  # groups past KERNEL_ROWS: BLAS
@pytest.mark.parametrize("tokens", [1, 3, 40, 150])
@pytest.mark.parametrize("kind", ["float32", "bfloat16", "4bit", "8bit", "2bit"])
def test_cpu_experts_in_generation_passes_go_to_the_kernels(tokens, kind, kernel_rows, monkeypatch):
    """In generation's passes (`layers.inference`) the experts' grouped products run on the compiled kernels:
    the same outputs as MLX's gathered products outside them, and no float32 copy (or BLAS product) made."""
    if not kernels.available():
        pytest.skip("no C compiler: the kernels are not built (the layers keep MLX's products)")
    if kernel_rows is not None:
        monkeypatch.setattr(cpu_experts, "KERNEL_ROWS", kernel_rows)
    copies = []
    real = cpu_experts._expert_floats
    monkeypatch.setattr(
        cpu_experts, "_expert_floats", lambda p: [lambda e, a, f=f: copies.append(e) or f(e, a) for f in real(p)]
    )
    mx.random.seed(2)
    plain, holder = glu_pair(128, 64, kind, group_size=64)
    if kind == "bfloat16":
        plain.set_dtype(mx.float32)  # MLX's CPU gather_mm takes float32 only
    x = mx.random.normal((1, tokens, 128))
    experts = mx.random.randint(0, 6, (1, tokens, 2))
    with cpu_layers.inference():
        ours = holder.glu(x.astype(mx.bfloat16) if kind == "bfloat16" else x, experts)
    np.testing.assert_allclose(
        np.array(ours.astype(mx.float32)), np.array(plain(x, experts)), atol=2e-2 if kind == "bfloat16" else 1e-4
    )
    busiest = int(np.bincount(np.array(experts).reshape(-1)).max())
    assert bool(copies) == (busiest > cpu_experts.KERNEL_ROWS)  # float32 copies and BLAS only past it


@pytest.mark.parametrize("kind", ["float32", "bfloat16", "4bit"])
def test_the_fused_layer_runs_moe_blocks_on_the_kernels(moe, kind, monkeypatch):
    """A decode pass of a batch through `decoder.FusedDecoderLayer` computes each sparse block on the host
    (router, shared expert and experts through the kernels, no MLX operation): the logits of the plain
    layers' path to float32 rounding, and the same next tokens."""
    if not kernels.available():
        pytest.skip("no C compiler: the kernels are not built (the layers keep MLX's products)")
    from mlx_qwen2.backends.cpu import decoder
    from mlx_qwen2.cache.batch import BatchKVCache
    from mlx_qwen2.models.qwen2 import DecoderLayer

    model, kv, tokens = decoding_batch(moe, kind, seed=4)
    plain_blocks = []
    real_call = SparseMoeBlock.__call__
    monkeypatch.setattr(SparseMoeBlock, "__call__", lambda *a: plain_blocks.append(1) or real_call(*a))

    def logits(fused: bool) -> np.ndarray:
        cache = [BatchKVCache(k, v, [0, 2, 0, 1, 0]) for k, v in kv]
        with monkeypatch.context() as m:
            if not fused:
                m.setattr(decoder.FusedDecoderLayer, "__call__", DecoderLayer.__call__)
            with cpu_layers.inference():
                return np.array(model(tokens, cache=cache).astype(mx.float32))

    fused = logits(True)
    assert not plain_blocks  # every sparse block on the host
    unfused = logits(False)
    assert len(plain_blocks) == sum(isinstance(layer.mlp, SparseMoeBlock) for layer in model.layers)
    np.testing.assert_allclose(fused, unfused, atol=1e-4 * np.abs(unfused).max())
    assert (fused.argmax(-1) == unfused.argmax(-1)).all()


def test_the_server_serves_moe(moe_plain):
    """Through the server (the batching engine), streamed and not, greedy text equals stream_generate's."""
    local = load(moe_plain)
    text = "def add(a, b):"
    expected, _ = greedy(local, chat_ids(local[1], text), 16)
    server = ServerProcess(moe_plain)
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
        assert ask(client, moe_plain, text, max_tokens=16, temperature=0).choices[0].message.content == expected
        chunks = list(ask(client, moe_plain, text, max_tokens=16, temperature=0, stream=True))
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
    finally:
        assert server.stop() in (0, -signal.SIGTERM)  # uvicorn re-raises the signal it caught, once shut down


def test_speculative_decoding_on_moe_equals_plain_greedy(moe_plain, tmp_path):
    """A draft (the model itself, and a second MoE) and prompt lookup: the target's greedy tokens exactly."""
    model, tok = load(moe_plain)
    tok.eos_token_ids = set()
    draft, _ = load(make_moe_checkpoint(tmp_path / "draft", layers=2, seed=9))
    prompt = tok.encode("def add(a, b):\n    return a + b\n" * 3 + "def add(a, b):\n")
    plain = [r.token for r in stream_generate(model, tok, prompt, max_tokens=24)]
    for settings in ({"draft": model}, {"draft": draft}, {"speculative": SpeculativeConfig(prompt_lookup=2)}):
        out = list(stream_generate(model, tok, prompt, max_tokens=24, **settings))
        assert [r.token for r in out] == plain, settings
        assert out[-1].draft_tokens > 0


def test_sharded_checkpoint_with_experts_across_shards(moe_plain, tmp_path):
    """transformers' sharded save (an index; layers' experts in different files) loads to the same logits."""
    reference = hf_model(moe_plain)
    reference.save_pretrained(tmp_path, max_shard_size="60KB")
    for f in moe_plain.iterdir():
        if f.suffix != ".safetensors" and f.name != "config.json":
            (tmp_path / f.name).write_bytes(f.read_bytes())
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]
    assert len({index[f"model.layers.{i}.mlp.experts.0.up_proj.weight"] for i in range(4)}) > 1
    np.testing.assert_array_equal(our_logits(tmp_path), our_logits(moe_plain))
