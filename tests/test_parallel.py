"""Tensor and pipeline parallel against one process: 2 ranks on localhost (MLX's ring backend), bounded."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlx_qwen2 import stream_generate
from mlx_qwen2.cache.config import CacheConfig
from mlx_qwen2.convert import main as convert_main
from mlx_qwen2.loader import load
from mlx_qwen2.lora import main as lora_main
from mlx_qwen2.models.qwen2 import PROJECTIONS
from mlx_qwen2.parallel import tensor_parallel_axis
from mlx_qwen2.tuner.adapters import EXPERTS, SHARED_EXPERT, adapter_config, apply_adapters
from tests.tiny import make_checkpoint, make_moe_checkpoint, quantized_copy

ROOT = Path(__file__).resolve().parent.parent
IDS = [5, 17, 300, 42, 99, 7, 250, 11, 64, 3, 128, 77]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(argv: list[str], n: int = 2, timeout: float = 120, stdin: str = "") -> subprocess.CompletedProcess:
    """`mlx.launch -n N --backend ring ARGV` on localhost, on ports the system had free. Its exit status is
    made non-zero when a rank failed (mlx.launch itself returns 0 then). Past `timeout` the launcher and
    every rank are killed (they share a process group) and the test fails. mlx.launch copies `stdin` to
    every rank."""
    launcher = [sys.executable, "-c", "import sys; from mlx._distributed_utils.launch import main; sys.exit(main())"]
    cmd = [*launcher, "-n", str(n), "--backend", "ring",
           "--starting-port", str(free_port()), "--python", sys.executable, *argv]  # fmt: skip
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=ROOT, start_new_session=True)  # fmt: skip
    try:
        out, err = proc.communicate(stdin, timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"ranks still running after {timeout} s:\n{err[-3000:]}")
    failed = re.search(r"rank \d+ exited with code (?!0\b)", err)
    return subprocess.CompletedProcess(cmd, proc.returncode or int(bool(failed)), out, err)


def run_ranks(model: Path, mode: str, tmp_path: Path, n: int = 2, adapters: Path | None = None) -> list[dict]:
    out = tmp_path / f"{mode}-out"
    out.mkdir()
    argv = [str(ROOT / "tests" / "parallel_worker.py"), str(model), mode, str(out), json.dumps(IDS)]
    done = launch(argv + (["8", str(adapters)] if adapters else []), n)
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(n)]


def single(model: Path, adapters: Path | None = None) -> tuple[np.ndarray, list[int]]:
    m, _ = load(model, adapter_path=adapters)
    logits = np.array(m(mx.array([IDS]))[0])
    seq = list(IDS)
    for _ in range(8):
        seq.append(int(np.array(m(mx.array([seq]))[0, -1]).argmax()))
    return logits, seq[len(IDS) :]


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("dense"), layers=3, intermediate=128)


@pytest.fixture(scope="module")
def moe(tmp_path_factory):
    return make_moe_checkpoint(tmp_path_factory.mktemp("moe"), decoder_sparse_step=2, seed=4)


@pytest.fixture(scope="module")
def dense_4bit(dense, tmp_path_factory):
    return quantized_copy(dense, tmp_path_factory.mktemp("q") / "q")


@pytest.fixture(scope="module")
def moe_4bit(tmp_path_factory):
    """Expert width 64: half of it is 32, one whole quantization group."""
    src = make_moe_checkpoint(tmp_path_factory.mktemp("moe64"), moe_intermediate=64, seed=5)
    return quantized_copy(src, tmp_path_factory.mktemp("moeq") / "q")


@pytest.mark.parametrize("mode", ["tensor", "pipeline"])
@pytest.mark.parametrize("kind", ["dense", "moe", "dense_4bit", "moe_4bit"])
def test_two_ranks_compute_what_one_process_computes(kind, mode, request, tmp_path):
    model = request.getfixturevalue(kind)
    logits, tokens = single(model)
    ranks = run_ranks(model, mode, tmp_path)
    for r in ranks:  # every rank holds the same result
        np.testing.assert_allclose(np.array(r["logits"]), logits, atol=1e-5, rtol=0)
        assert r["tokens"] == tokens
    if mode == "tensor":  # each rank half of the heads and of the vocabulary (untied), all layers
        assert [r["lm_head_rows"] for r in ranks] == [256, 256]
        assert [r["q_proj"][0] for r in ranks] == [32, 32] and [r["layers"] for r in ranks] == [
            4 if kind.startswith("moe") else 3
        ] * 2
    else:  # each rank its block of layers, all heads
        assert sum(r["layers"] for r in ranks) == (4 if kind.startswith("moe") else 3) and ranks[0]["q_proj"][0] == 64


def make_adapters(model: Path, folder: Path, keys: tuple[str, ...], dora: bool = False, layers: int = 2) -> Path:
    """Adapters on the last `layers` layers with random (non-zero) values, saved as lora writes them."""
    m, _ = load(model)
    apply_adapters(m, layers, rank=4, scale=2.0, keys=keys, dora=dora)
    for i, (name, p) in enumerate(tree_flatten(m.trainable_parameters())):
        if not name.endswith(".m"):
            p[...] = mx.random.normal(p.shape, key=mx.random.key(i)) * 0.05
    folder.mkdir()
    mx.save_safetensors(str(folder / "adapters.safetensors"), dict(tree_flatten(m.trainable_parameters())))
    config = adapter_config("dora" if dora else "lora", layers, 4, 2.0, 0.0, keys)
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize("mode", ["tensor", "pipeline"])
@pytest.mark.parametrize("kind", ["dense", "moe_4bit"])
def test_adapters_across_ranks_compute_what_one_process_computes(kind, mode, request, tmp_path):
    model = request.getfixturevalue(kind)
    keys = PROJECTIONS if kind == "dense" else PROJECTIONS + SHARED_EXPERT + EXPERTS
    adapters = make_adapters(model, tmp_path / "adapters", keys)
    logits, tokens = single(model, adapters)
    assert np.abs(logits - single(model)[0]).max() > 1e-3  # the adapters change the logits
    for r in run_ranks(model, mode, tmp_path, adapters=adapters):
        np.testing.assert_allclose(np.array(r["logits"]), logits, atol=1e-5, rtol=0)
        assert r["tokens"] == tokens


def test_dora_across_ranks(dense, tmp_path):
    """Pipeline: as one process. Tensor: refused where a layer's input is split (its norms span the ranks)."""
    adapters = make_adapters(dense, tmp_path / "dora", ("self_attn.q_proj", "self_attn.o_proj"), dora=True)
    logits, _ = single(dense, adapters)
    for r in run_ranks(dense, "pipeline", tmp_path, adapters=adapters):
        np.testing.assert_allclose(np.array(r["logits"]), logits, atol=1e-5, rtol=0)
    results = by_hand([generate_cmd(dense, "--adapter-path", str(adapters))] * 2, tmp_path)
    for rc, err in results:
        assert rc == 1 and "self_attn.o_proj cannot be split over ranks" in err, err[-500:]


def test_each_rank_holds_its_share(dense, tmp_path):
    """Tensor parallel: MLX's peak while loading is the replicated tensors plus half of the split ones
    (within 5% and 64 KB); pipeline: its block of layers plus the replicated ones."""
    weights = mx.load(str(dense / "model.safetensors"))
    split = sum(w.nbytes for k, w in weights.items() if tensor_parallel_axis(k, split_head=True) is not None)
    replicated = sum(w.nbytes for k, w in weights.items() if tensor_parallel_axis(k, split_head=True) is None)
    assert "lm_head.weight" in weights  # untied, vocabulary 512: the output layer is split too
    for r in run_ranks(dense, "tensor", tmp_path):
        expected = replicated + split / 2
        assert abs(r["load_peak"] - expected) <= 0.05 * expected + 65536, (r["load_peak"], expected)
        assert r["load_peak"] < 0.8 * (split + replicated)


def by_hand(commands: list[list[str]], tmp_path: Path, timeout: float = 60, **env: str) -> list[tuple[int, str]]:
    """Start one process per command as the ranks of a ring on localhost (a hostfile, no launcher); their
    exit codes and stderr. Bounded: past `timeout` they are killed and the test fails."""
    hosts = tmp_path / "hosts.json"
    hosts.write_text(json.dumps([[f"127.0.0.1:{free_port()}"] for _ in commands]))
    procs = [
        subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
            env={**os.environ, "MLX_RANK": str(r), "MLX_HOSTFILE": str(hosts), **env},
        )  # fmt: skip
        for r, cmd in enumerate(commands)
    ]
    results = []
    for p in procs:
        try:
            _, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail(f"a rank was still running after {timeout} s")
        results.append((p.returncode, err))
    return results


def generate_cmd(model: Path, *flags: str) -> list[str]:
    return [sys.executable, "-m", "mlx_qwen2.generate", "--model", str(model), "--prompt", "Hi", *flags]


def test_generate_under_mlx_launch_prints_once_what_one_process_prints(dense, tmp_path):
    flags = ["--max-tokens", "12", "--no-chat-template", "--no-verbose"]
    alone = subprocess.run(generate_cmd(dense, *flags), capture_output=True, text=True, cwd=ROOT, timeout=60)
    for mode in ("tensor", "pipeline"):
        launched = launch(
            ["-m", "mlx_qwen2.generate", "--model", str(dense), "--prompt", "Hi", *flags, "--parallel", mode]
        )
        assert launched.returncode == 0, launched.stderr[-2000:]
        assert launched.stdout == alone.stdout and alone.stdout.strip(), (launched.stdout, alone.stdout)


def test_chat_under_mlx_launch_answers_each_turn_as_one_process_does(dense):
    turns = "Hello\nAnd then?\n/reset\nHi again\n/quit\n"  # mlx.launch never ends the ranks' input: /quit does
    flags = ["--max-tokens", "6", "--temp", "0.8", "--seed", "3"]
    chat = [sys.executable, "-m", "mlx_qwen2.chat", "--model", str(dense), *flags]
    alone = subprocess.run(chat, input=turns, capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert alone.returncode == 0 and alone.stdout.count(">> ") == 5, alone.stderr[-2000:]
    for mode in ("tensor", "pipeline"):
        launched = launch(chat[1:] + ["--parallel", mode], stdin=turns)
        assert launched.returncode == 0, launched.stderr[-2000:]
        assert launched.stdout == alone.stdout, (mode, launched.stdout, alone.stdout)


def test_a_rank_that_dies_stops_the_others_with_one_line(dense, tmp_path):
    dies = [sys.executable, "-c", "import os, mlx.core as mx; mx.distributed.init(); os._exit(3)"]
    (rc0, err0), (rc1, _) = by_hand([generate_cmd(dense, "--max-tokens", "20000"), dies], tmp_path)
    assert (rc0, rc1) == (1, 3)
    assert err0.strip().splitlines()[-1].startswith("error: another rank of this run stopped"), err0[-500:]


def test_a_rank_that_never_starts_is_a_timeout_not_a_hang(dense, tmp_path):
    hosts = tmp_path / "hosts.json"
    hosts.write_text(json.dumps([[f"127.0.0.1:{free_port()}"], [f"127.0.0.1:{free_port()}"]]))
    env = {**os.environ, "MLX_RANK": "0", "MLX_HOSTFILE": str(hosts), "MLX_QWEN2_JOIN_TIMEOUT": "3"}
    done = subprocess.run(generate_cmd(dense), capture_output=True, text=True, cwd=ROOT, env=env, timeout=60)
    assert done.returncode != 0 and "not every rank of this run connected within 3 s" in done.stderr


def test_ranks_given_different_models_refuse_to_start(dense, moe, tmp_path):
    results = by_hand([generate_cmd(dense), generate_cmd(moe)], tmp_path)
    for rc, err in results:
        assert rc == 1 and "different models or settings" in err.strip().splitlines()[-1], err[-500:]


def test_ranks_given_different_adapters_refuse_to_start(dense, tmp_path):
    adapters = make_adapters(dense, tmp_path / "a", PROJECTIONS)
    results = by_hand([generate_cmd(dense, "--adapter-path", str(adapters)), generate_cmd(dense)], tmp_path)
    for rc, err in results:
        assert rc == 1 and "different models or settings" in err.strip().splitlines()[-1], err[-500:]


@pytest.mark.parametrize("case", ["three-kv-heads", "half-a-group"])
def test_tensor_parallel_needs_divisible_widths(case, dense, tmp_path):
    if case == "three-kv-heads":
        model = make_checkpoint(tmp_path / "three-kv", heads=3, kv_heads=3, hidden=48, intermediate=96)
    else:  # intermediate 128 / 2 = 64 is one group of 64, but o_proj's 64 / 2 = 32 is half a group
        model = tmp_path / "q64"
        assert convert_main(["--hf-path", str(dense), "--mlx-path", str(model), "-q", "--q-group-size", "64"]) == 0
    results = by_hand([generate_cmd(model), generate_cmd(model)], tmp_path)
    for rc, err in results:
        assert rc == 1 and "use --parallel pipeline" in err, err[-500:]


def test_data_parallel_lora_follows_one_process(dense, tmp_path):
    """2 ranks, each half of every batch of 4, against one process at batch 4: the same loss curve (rtol 1e-5)
    and the same adapters (atol 1e-6), written once, by rank 0. SGD: Adam divides by the root of tiny
    second moments, which turns float32 summation-order differences into 1e-4 differences in the weights."""
    data = tmp_path / "data"  # 10 examples of unequal lengths; a short last batch of 2, one for each rank
    data.mkdir()
    rows = [{"text": f"Question {i}: " + "FORTY-TWO is the answer. " * (1 + i % 4)} for i in range(10)]
    for split in ("train", "valid"):
        (data / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    flags = ["--model", str(dense), "--train", "--data", str(data), "--iters", "6", "--batch-size", "4",
             "--learning-rate", "0.5", "--optimizer", "sgd", "--steps-per-report", "1", "--steps-per-eval", "100",
             "--num-layers", "2", "--seed", "3"]  # fmt: skip
    one, two = tmp_path / "one", tmp_path / "two"
    assert lora_main([*flags, "--adapter-path", str(one)]) == 0
    done = launch(["-m", "mlx_qwen2.lora", *flags, "--adapter-path", str(two)])
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stderr.count("step 6: train loss") == 1  # rank 0 reports, the other is silent

    def losses(folder: Path) -> list[float]:
        rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
        return [r["train_loss"] for r in rows if "train_loss" in r]

    assert len(losses(two)) == 6
    np.testing.assert_allclose(losses(two), losses(one), rtol=1e-5)
    assert losses(one)[-1] < losses(one)[0] - 0.1  # it learned something
    ours, theirs = mx.load(str(two / "adapters.safetensors")), mx.load(str(one / "adapters.safetensors"))
    assert ours.keys() == theirs.keys()
    for k in ours:
        np.testing.assert_allclose(np.array(ours[k]), np.array(theirs[k]), atol=1e-6, err_msg=k)


@pytest.mark.real
def test_tensor_parallel_real_model_gives_the_single_process_text(real_folder):
    """Qwen2.5-Coder-0.5B (2 KV heads: 2 ranks), float32: the same greedy text as one process."""
    flags = ["--prompt", "Write a Python function that reverses a string.", "--max-tokens", "24", "--no-verbose"]
    alone = subprocess.run([sys.executable, "-m", "mlx_qwen2.generate", "--model", str(real_folder), *flags],
                           capture_output=True, text=True, cwd=ROOT, timeout=300)  # fmt: skip
    launched = launch(["-m", "mlx_qwen2.generate", "--model", str(real_folder), *flags], timeout=300)
    assert launched.returncode == 0, launched.stderr[-2000:]
    assert launched.stdout == alone.stdout and "def" in alone.stdout, (launched.stdout, alone.stdout)


@pytest.mark.parametrize("flags", [[], ["--max-kv-size", "8", "--kv-keep", "2"]], ids=["plain", "bounded"])
def test_the_server_across_ranks_answers_as_one_process(flags, dense, tmp_path):
    """Rank 0 serves HTTP, rank 1 takes the same engine steps (tensor parallel): greedy and seeded sampled
    completions, two at once, equal one process's (also with a bounded cache, past its window); SIGTERM stops
    both ranks."""
    launcher = [sys.executable, "-c", "import sys; from mlx._distributed_utils.launch import main; sys.exit(main())"]
    cmd = [*launcher, "-n", "2", "--backend", "ring", "--starting-port", str(free_port()), "--python",
           sys.executable, "-m", "mlx_qwen2.server", "--model", str(dense), "--port", "0", *flags]  # fmt: skip
    cache_config = CacheConfig(8, 2) if flags else CacheConfig()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
                            start_new_session=True)  # fmt: skip
    try:
        url = None
        deadline = time.monotonic() + 60
        while url is None and time.monotonic() < deadline:
            line = proc.stdout.readline()
            m = re.search(r"serving .* on (http://[\d.]+:\d+)", line)
            url = m.group(1) if m else None
        assert url, "the server did not start"
        model, tok = load(dense)
        asks = [("Hello", {"temperature": 0}), ("def add(a, b):", {"temperature": 0.8, "seed": 7})]
        expected = [
            "".join(r.text for r in stream_generate(model, tok, tok.encode(p), max_tokens=16, temp=s["temperature"],
                                                    seed=s.get("seed"), cache_config=cache_config))
            for p, s in asks
        ]  # fmt: skip

        async def both() -> list[str]:
            async with httpx.AsyncClient(base_url=url, timeout=60) as c:
                bodies = [{"model": str(dense), "prompt": p, "max_tokens": 16, **s} for p, s in asks]
                replies = await asyncio.gather(*(c.post("/v1/completions", json=b) for b in bodies))
                return [r.json()["choices"][0]["text"] for r in replies]

        assert asyncio.run(both()) == expected
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)
