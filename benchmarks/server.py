"""The HTTP server under concurrent clients, beside mlx_lm.server, in one run on the same model.

    python -m benchmarks.server [--models float32 bfloat16] [--clients 1 4 16] [--gen-tokens 64]
                                [--user-clients 1] [--timeout 300] [--rounds 0]

For each model and each number of concurrent clients, every server is started fresh, warmed with
one request, then each client sends its requests one after another (4 for a single client, 2 each
otherwise; every request a different question, greedy, `--gen-tokens` at most), streaming, over
localhost. Reported: aggregate generated tokens/s (tokens from the servers' usage counts, over the
wall time of the level), time to first token p50/p95, and the server process's peak resident memory.

Servers: ours (`python -m mlx_qwen2.server`, `--max-concurrency` the largest client count);
mlx_lm.server as its users run it (`mlx_lm.server --model M`: MLX's reference BLAS), at
`--user-clients` only, since its prefill there is slow; and mlx_lm.server with the OpenBLAS we load
(LD_PRELOAD), so the ratio shows what the server code does apart from the BLAS. Also
`python -m mlx_qwen2.generate` on the single client's 4 questions (median), for its decode rate to compare with.

That comparison is of runs minutes apart, and this machine's speed drifts by 10-20% within an hour.
`--rounds R` adds one made to cancel the drift: our server stays up, and for each of the 4 questions,
R times over, `python -m mlx_qwen2.generate` answers it (a fresh process, the server idle), then the
server does, asked by the single client, then by a lean client (`lean_request`: what the server itself
costs, with as little client work as possible competing for these 2 cores); reported: the median and
range of each client's ratio of decode rates to generate's.
"""

from __future__ import annotations

import argparse
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
import numpy as np

from benchmarks.common import ROOT, same_blas
from benchmarks.generation import model_folders

QUESTIONS = [
    f"{verb} {topic}"
    for topic in (
        "a Python function that merges two sorted lists.",
        "how a hash map handles collisions.",
        "a SQL query that finds duplicate emails in a users table.",
        "the difference between a process and a thread.",
        "a bash one-liner that counts lines in all .py files.",
        "what a closure is in JavaScript.",
        "a Rust function that reverses a string.",
        "how binary search works.",
    )
    for verb in ("Write or explain", "Briefly describe", "Give an example of", "Tell me about")
]
SERVERS = ("mlx_qwen2", "mlx_lm.server + OpenBLAS", "mlx_lm.server")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(server: str, folder: Path, max_clients: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ}
    if server == "mlx_qwen2":
        cmd = [sys.executable, "-m", "mlx_qwen2.server", "--model", str(folder), "--port", str(port)]
        cmd += ["--max-concurrency", str(max_clients), "--log-level", "warning"]
    else:
        cmd = [
            sys.executable,
            "-m",
            "mlx_lm",
            "server",
            "--model",
            str(folder),
            "--port",
            str(port),
            "--log-level",
            "WARNING",
        ]
        env["MLX_QWEN2_BLAS"] = "off"
        if server.endswith("OpenBLAS"):
            same_blas(env)
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    end = time.monotonic() + 300
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"{server} exited: {proc.stderr.read()[-2000:]}")
        try:
            if httpx.get(url + "/v1/models", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError(f"{server} did not start in 300 s")


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()


def peak_rss_gb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) * 1024 / 1e9


async def one_request(c: httpx.AsyncClient, question: str, gen_tokens: int) -> dict:
    body = {
        "messages": [{"role": "user", "content": question}],
        "max_tokens": gen_tokens,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    start, first, last, chunks, tokens = time.monotonic(), None, None, 0, None
    async with c.stream("POST", "/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            if chunk.get("choices") and chunk["choices"][0]["delta"].get("content"):
                first = first or time.monotonic()
                last = time.monotonic()
                chunks += 1
    return {"ttft": (first or time.monotonic()) - start, "tokens": tokens or chunks, "first": first, "last": last}


def lean_request(url: str, question: str, gen_tokens: int, timeout: float) -> dict:
    """`one_request`'s request and figures, from a client that does as little as a client can: HTTP/1.0 on a
    blocking socket (the body is the bare event stream, ended by the server closing it), each event only
    looked at for non-empty content, JSON parsed once (the usage chunk). On these 2 cores every client
    competes with the model for the CPU, so this one shows what the server itself costs a stream."""
    host, port = url.removeprefix("http://").split(":")
    body = {
        "messages": [{"role": "user", "content": question}],
        "max_tokens": gen_tokens,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    data = json.dumps(body).encode()
    head = f"POST /v1/chat/completions HTTP/1.0\r\nHost: {host}\r\nContent-Type: application/json\r\n"
    start, first, last, chunks, tokens, pending, headed = time.monotonic(), None, None, 0, None, b"", False
    with socket.create_connection((host, int(port)), timeout=timeout) as s:
        s.sendall(f"{head}Content-Length: {len(data)}\r\n\r\n".encode() + data)
        while received := s.recv(1 << 16):
            now = time.monotonic()
            if not headed and not received.startswith(b"HTTP/1.1 200"):
                raise RuntimeError(f"the server answered {received[:200]!r}")
            headed = True
            *events, pending = (pending + received).split(b"\n\n")
            for event in events:
                if b'"content": "' in event and b'"content": ""' not in event:
                    first, last, chunks = first or now, now, chunks + 1
                elif event.startswith(b"data: {") and b'"usage": {' in event:
                    tokens = json.loads(event[6:])["usage"]["completion_tokens"]
    return {"ttft": (first or time.monotonic()) - start, "tokens": tokens or chunks, "first": first, "last": last}


async def level(url: str, clients: int, gen_tokens: int, timeout: float) -> dict:
    per_client = 4 if clients == 1 else 2
    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits) as c:

        async def client(i: int) -> list[dict]:
            return [
                await one_request(c, QUESTIONS[(i * per_client + k) % len(QUESTIONS)], gen_tokens)
                for k in range(per_client)
            ]

        start = time.monotonic()
        results = [
            r
            for rs in await asyncio.wait_for(asyncio.gather(*(client(i) for i in range(clients))), timeout)
            for r in rs
        ]
        wall = time.monotonic() - start
    ttft = np.array([r["ttft"] for r in results])
    decode = [(r["tokens"] - 1) / (r["last"] - r["first"]) for r in results if r["last"] and r["last"] > r["first"]]
    return {
        "tokens_per_s": sum(r["tokens"] for r in results) / wall,
        "ttft_p50": float(np.percentile(ttft, 50)),
        "ttft_p95": float(np.percentile(ttft, 95)),
        "decode_per_request": float(np.median(decode)) if decode else None,
        "requests": len(results),
    }


def measure(server: str, folder: Path, clients: list[int], gen_tokens: int, timeout: float) -> dict:
    """Each level on a fresh server. mlx_lm.server (Python's http.server) now and then drops a connection
    at 16 clients (httpx.ReadError, with nothing in its log): such a level is run once more on a fresh
    server, and the result says so. Ours gets no second try."""
    out = {}
    for n in clients:
        for attempt in range(1 if server == "mlx_qwen2" else 2):
            out[n] = _level_on_fresh(server, folder, max(clients), n, gen_tokens, timeout)
            if attempt:
                out[n]["second_try"] = True
            print(f"  {server:26s} {n:3d} clients: {out[n]}", file=sys.stderr, flush=True)
            if not out[n].get("dropped"):
                break
    return out


def _level_on_fresh(server: str, folder: Path, most: int, n: int, gen_tokens: int, timeout: float) -> dict:
    proc, url = start(server, folder, most)
    try:
        asyncio.run(level(url, 1, 4, timeout))  # warm-up: first-call compilation and allocation
        result = asyncio.run(level(url, n, gen_tokens, timeout))
        result["peak_gb"] = peak_rss_gb(proc.pid)
        return result
    except (asyncio.TimeoutError, httpx.HTTPError) as e:
        timed_out = isinstance(e, (asyncio.TimeoutError, httpx.TimeoutException))
        error = f"{type(e).__name__} (over {timeout:g} s)" if timed_out else f"{type(e).__name__}: {e}"
        return {"error": error, "dropped": isinstance(e, httpx.ReadError)}
    finally:
        stop(proc)


def generate_rate(folder: Path, gen_tokens: int) -> float:
    """Median decode tokens/s that `python -m mlx_qwen2.generate` reports for the questions the single client
    asks (the same 4, each a fresh process), to set beside that client's median."""
    return float(np.median([generate_once(folder, question, gen_tokens) for question in QUESTIONS[:4]]))


def generate_once(folder: Path, question: str, gen_tokens: int) -> float:
    """The decode tokens/s `python -m mlx_qwen2.generate` reports for one question."""
    cmd = [sys.executable, "-m", "mlx_qwen2.generate", "--model", str(folder), "--prompt", question]
    cmd += ["--max-tokens", str(gen_tokens)]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True)
    return float(re.search(r"Generation: \d+ tokens, ([\d.]+) tokens-per-sec", out.stderr).group(1))


def interleaved(folder: Path, gen_tokens: int, rounds: int, timeout: float) -> dict:
    """Decode tokens/s of generate and of our server with one client, taken one right after the other: for
    each question, generate, then the server asked by the benchmark's httpx client (`one_request`), then by
    the lean one (`lean_request`)."""
    proc, url = start("mlx_qwen2", folder, 1)
    runs = []
    try:
        asyncio.run(level(url, 1, 4, timeout))  # warm-up

        async def ask(question: str) -> dict:
            async with httpx.AsyncClient(base_url=url, timeout=timeout) as c:
                return await one_request(c, question, gen_tokens)

        def rate(r: dict) -> float:
            return (r["tokens"] - 1) / (r["last"] - r["first"])

        for _ in range(rounds):
            for question in QUESTIONS[:4]:
                generate = generate_once(folder, question, gen_tokens)
                runs.append(
                    (generate, rate(asyncio.run(ask(question))), rate(lean_request(url, question, gen_tokens, timeout)))
                )
                print("  generate {:.2f}, server (httpx) {:.2f}, server (lean) {:.2f} tokens/s".format(*runs[-1]),
                      file=sys.stderr, flush=True)  # fmt: skip
    finally:
        stop(proc)
    out: dict = {"runs": runs}
    for i, client in ((1, "httpx"), (2, "lean")):
        ratios = [r[i] / r[0] for r in runs]
        out[client] = {"median_ratio": float(np.median(ratios)), "min_ratio": min(ratios), "max_ratio": max(ratios)}
    return out


def table(name: str, results: dict, clients: list[int], generate: float, paired: dict | None) -> str:
    ours = results["mlx_qwen2"]
    lines = [f"### {name}", "", f"`python -m mlx_qwen2.generate`, the single client's 4 questions: {generate:.1f} "
             "decode tokens/s (median)", ""]  # fmt: skip
    lines += [
        "| server | clients | tokens/s | x our 1 client | x mlx_lm.server + OpenBLAS | TTFT p50 / p95 (s) | peak RSS (GB) |"
    ]
    lines += ["|---|---|---|---|---|---|---|"]
    for server in SERVERS:
        for n in clients:
            r = results.get(server, {}).get(n)
            if r is None:
                continue
            if "error" in r:
                lines.append(f"| {server} | {n} | {r['error']} | | | | |")
                continue
            base, peer = ours.get(1, {}).get("tokens_per_s"), results.get(SERVERS[1], {}).get(n, {}).get("tokens_per_s")
            x1 = f"{r['tokens_per_s'] / base:.2f}x" if base else ""
            xp = f"{r['tokens_per_s'] / peer:.2f}x" if peer else ""
            again = " (second try)" if r.get("second_try") else ""
            lines.append(
                f"| {server} | {n} | {r['tokens_per_s']:.1f}{again} | {x1} | {xp} | {r['ttft_p50']:.2f} / {r['ttft_p95']:.2f} | {r['peak_gb']:.2f} |"
            )
    one = ours.get(1, {}).get("decode_per_request")
    if one:
        lines += [
            "",
            f"Our server, one client, decode per request: {one:.1f} tokens/s = {one / generate:.2f}x generate's.",
        ]
    if paired:
        lines += ["", f"Interleaved with generate ({len(paired['runs'])} questions asked of each): our server's one-client "
                  "decode rate over generate's (median; range):", ""]  # fmt: skip
        for client, what in (("httpx", "the benchmark's httpx client"), ("lean", "the lean client (`lean_request`)")):
            r = paired[client]
            lines.append(f"- {what}: {r['median_ratio']:.3f}x ({r['min_ratio']:.2f}-{r['max_ratio']:.2f}x)")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["float32", "bfloat16"])
    p.add_argument("--clients", nargs="*", type=int, default=[1, 4, 16])
    p.add_argument("--user-clients", nargs="*", type=int, default=[1], help="levels for mlx_lm.server on its own BLAS")
    p.add_argument("--gen-tokens", type=int, default=64)
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per level before it counts as timed out")
    p.add_argument("--rounds", type=int, default=0, help="rounds of the interleaved one-client comparison (0: none)")
    p.add_argument("--json", default=None, help="also write the figures here")
    args = p.parse_args()
    # SIGTERM (a stopped job) exits through the `finally` blocks, which stop the server being measured
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    folders = model_folders(args.models)
    report, raw = [], {}
    for name, folder in folders.items():
        print(f"{name}:", file=sys.stderr)
        generate = generate_rate(folder, args.gen_tokens)
        results = {
            "mlx_qwen2": measure("mlx_qwen2", folder, args.clients, args.gen_tokens, args.timeout),
            SERVERS[1]: measure(SERVERS[1], folder, args.clients, args.gen_tokens, args.timeout),
        }
        if args.user_clients:
            results[SERVERS[2]] = measure(SERVERS[2], folder, args.user_clients, args.gen_tokens, args.timeout)
        paired = interleaved(folder, args.gen_tokens, args.rounds, args.timeout) if args.rounds else None
        raw[name] = {"generate": generate, **results, "interleaved": paired}
        levels = sorted(set(args.clients) | set(args.user_clients))
        report.append(table(name, results, levels, generate, paired))
    print("\n\n".join(report))
    if args.json:
        Path(args.json).write_text(json.dumps(raw, indent=2))


if __name__ == "__main__":
    main()
