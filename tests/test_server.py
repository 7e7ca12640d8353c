"""The OpenAI-compatible server, driven over real HTTP by the official `openai` client and by raw requests.

Oracles: in-process `stream_generate` for greedy text (alone and with other requests running), the
model's own log-softmax for logprobs, the chat template for usage counts, jsonschema for structured output.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time

import httpx
import jsonschema
import mlx.core as mx
import numpy as np
import openai
import pytest
from fastapi.testclient import TestClient

from mlx_qwen2 import load, stream_generate
from mlx_qwen2.cache.config import CacheConfig
from mlx_qwen2.server import ServerSettings, create_app
from mlx_qwen2.server.tools import ToolCallParser
from tests.serving import ServerProcess
from tests.tiny import make_checkpoint

KEY = "test-key-123"
PROMPTS = ["Write a poem about the sea.", "def add(a, b):", "你好，世界", "Numbers 12345 and symbols"]
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"enum": ["Paris", "Oslo"]},
                "days": {"type": "integer", "minimum": 1, "maximum": 7},
            },
            "required": ["city", "days"],
            "additionalProperties": False,
        },
    },
}
SMALL_SCHEMA = {
    "type": "object",
    "properties": {"name": {"enum": ["ann", "bob"]}, "age": {"type": "integer", "minimum": 0, "maximum": 120}},
    "required": ["name", "age"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def server(tiny_untied):
    s = ServerProcess(
        tiny_untied, "--api-key", KEY, "--max-body-bytes", "65536", "--max-concurrency", "8", "--max-queue", "64"
    )
    yield s
    assert s.stop() in (0, -signal.SIGTERM)  # uvicorn re-raises the signal it caught, once shut down
    assert any("engine stopped" in line for line in s.log)


@pytest.fixture(scope="module")
def local(tiny_untied):
    return load(tiny_untied)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)


def chat_ids(tokenizer, text: str) -> list[int]:
    return tokenizer.apply_chat_template([{"role": "user", "content": text}])


def ask(client: openai.OpenAI, model, text: str, **settings):
    """A chat request of one user message, through the openai client."""
    return client.chat.completions.create(model=str(model), messages=[{"role": "user", "content": text}], **settings)


def greedy(local, ids: list[int], n: int, **settings) -> tuple[str, str]:
    model, tokenizer = local
    out = list(stream_generate(model, tokenizer, ids, max_tokens=n, **settings))
    return "".join(r.text for r in out), out[-1].finish_reason


def test_health_is_open_and_the_rest_needs_the_key(server, tiny_untied):
    assert server.client().get("/health").json()["status"] == "ok"
    r = server.client().get("/v1/models")
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    assert server.client("wrong").get("/v1/models").status_code == 401
    models = server.client(KEY).get("/v1/models").json()
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == [str(tiny_untied)]


def test_chat_greedy_equals_generate(server, client, local, tiny_untied):
    for text in PROMPTS:
        expected, finish = greedy(local, chat_ids(local[1], text), 24)
        r = ask(client, tiny_untied, text, max_tokens=24, temperature=0)
        assert r.choices[0].message.content == expected
        assert r.choices[0].finish_reason == finish
        streamed = ask(
            client,
            tiny_untied,
            text,
            max_tokens=24,
            temperature=0,
            stream=True,
        )
        chunks = list(streamed)
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == finish


def test_greedy_is_the_same_with_eight_other_requests_running(server, local, tiny_untied):
    target = "def add(a, b):"
    expected, _ = greedy(local, chat_ids(local[1], target), 40)

    async def run() -> list[str]:
        async with openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0) as c:

            async def one(text: str, n: int) -> str:
                r = await c.chat.completions.create(
                    model=str(tiny_untied), messages=[{"role": "user", "content": text}], max_tokens=n, temperature=0
                )
                return r.choices[0].message.content

            others = [one(f"{PROMPTS[i % 4]} {i}" * (i + 1), 60 + 10 * i) for i in range(8)]
            return await asyncio.gather(*others[:4], one(target, 40), *others[4:])

    assert asyncio.run(run())[4] == expected


def test_completions_stop_and_echo(client, local, tiny_untied):
    tokenizer = local[1]
    ids = tokenizer.encode("The quick brown fox")
    expected, _ = greedy(local, ids, 30)
    r = client.completions.create(model=str(tiny_untied), prompt="The quick brown fox", max_tokens=30, temperature=0)
    assert r.choices[0].text == expected
    stop = expected[10:14]
    cut = expected[: expected.find(stop)]
    r = client.completions.create(model=str(tiny_untied), prompt=ids, max_tokens=30, temperature=0, stop=[stop])
    assert (r.choices[0].text, r.choices[0].finish_reason) == (cut, "stop")
    r = client.completions.create(
        model=str(tiny_untied), prompt="The quick brown fox", max_tokens=5, temperature=0, echo=True
    )
    assert r.choices[0].text.startswith("The quick brown fox")


def test_completions_of_several_prompts(client, local, tiny_untied):
    """A list of prompts: choice i * n + j is prompt i's j-th; usage counts each prompt once; echo and
    streaming per prompt."""
    tokenizer = local[1]
    prompts = ["The quick brown fox", "def add(a, b):"]
    expected = [greedy(local, tokenizer.encode(p), 12)[0] for p in prompts]
    r = client.completions.create(model=str(tiny_untied), prompt=prompts, n=2, max_tokens=12, temperature=0, echo=True)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert [c.text for c in r.choices] == [p + e for p, e in zip(prompts, expected) for _ in range(2)]
    assert r.usage.prompt_tokens == sum(len(tokenizer.encode(p)) for p in prompts)
    assert (
        r.usage.completion_tokens == sum(len(tokenizer.encode(e)) for e in expected) * 2
        or r.usage.completion_tokens == 48
    )
    ids = [tokenizer.encode(p) for p in prompts]  # token-id prompts, streamed
    stream = client.completions.create(model=str(tiny_untied), prompt=ids, max_tokens=12, temperature=0, stream=True)
    texts = ["", ""]
    for chunk in stream:
        for c in chunk.choices:
            texts[c.index] += c.text
    assert texts == expected


def test_best_of_returns_the_most_likely_sampled_choices(client, tiny_untied):
    """best_of 4, n 2: the two of the four seeded samples (seeds 5..8, as n=4 draws them) with the highest
    mean token log-probability, best first; usage counts all four; logprobs only when asked for."""
    settings = {"model": str(tiny_untied), "prompt": "The quick brown fox", "max_tokens": 10, "temperature": 1.0,
                "seed": 5}  # fmt: skip
    every = client.completions.create(**settings, n=4, logprobs=0)
    means = [sum(c.logprobs.token_logprobs) / len(c.logprobs.token_logprobs) for c in every.choices]
    order = sorted(range(4), key=lambda i: -means[i])[:2]
    best = client.completions.create(**settings, n=2, best_of=4)
    assert [c.text for c in best.choices] == [every.choices[i].text for i in order]
    assert [c.index for c in best.choices] == [0, 1] and best.choices[0].logprobs is None
    assert best.usage.completion_tokens == every.usage.completion_tokens
    assert len({c.text for c in every.choices}) > 2  # the samples differ, so the choice means something


def test_seed_reproduces_a_sampled_reply(client, tiny_untied):
    def sample(seed: int) -> str:
        r = ask(
            client,
            tiny_untied,
            "hi",
            max_tokens=20,
            temperature=1.0,
            seed=seed,
        )
        return r.choices[0].message.content

    assert sample(7) == sample(7)
    assert len({sample(s) for s in range(4)}) > 1


def test_n_choices_and_usage_counts(client, local, tiny_untied):
    ids = chat_ids(local[1], "hello")
    r = ask(
        client,
        tiny_untied,
        "hello",
        max_tokens=7,
        temperature=0.8,
        n=3,
        seed=1,
        logprobs=True,
    )
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert len({c.message.content for c in r.choices}) > 1  # each choice draws with its own seed
    assert r.usage.prompt_tokens == len(ids)
    # every generated token has a logprobs entry, except an end token (counted, but not text)
    assert r.usage.completion_tokens == sum(len(c.logprobs.content) + (c.finish_reason == "stop") for c in r.choices)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_stream_usage_chunk(client, local, tiny_untied):
    ids = chat_ids(local[1], "count")
    chunks = list(
        ask(
            client,
            tiny_untied,
            "count",
            max_tokens=5,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    last = chunks[-1]
    assert last.choices == [] and last.usage.prompt_tokens == len(ids) and last.usage.completion_tokens == 5
    assert all(c.usage is None for c in chunks[:-1])


def test_logprobs_equal_the_models_log_softmax(client, local, tiny_untied):
    model, tokenizer = local
    ids = chat_ids(tokenizer, "logprobs please")
    out = list(stream_generate(model, tokenizer, ids, max_tokens=6))
    generated = [r.token for r in out]
    logits = model(mx.array([ids + generated]))[0, len(ids) - 1 : -1].astype(mx.float32)
    logp = np.array(logits - mx.logsumexp(logits, axis=-1, keepdims=True))
    r = ask(
        client,
        tiny_untied,
        "logprobs please",
        max_tokens=6,
        temperature=0,
        logprobs=True,
        top_logprobs=3,
    )
    content = r.choices[0].logprobs.content
    assert len(content) == sum(t not in tokenizer.eos_token_ids for t in generated)
    for i, entry in enumerate(content):
        assert entry.logprob == pytest.approx(logp[i, generated[i]], abs=1e-4)
        top = np.sort(logp[i])[::-1][:3]
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx(top.tolist(), abs=1e-4)
        assert bytes(entry.bytes) == tokenizer.token_bytes(generated[i])


def test_echo_with_logprobs_scores_the_prompt(client, local, tiny_untied):
    """Completions' echo + logprobs: every prompt token after the first gets its log-probability under the
    model and its top tokens (the first: None), then the generated ones; max_tokens 0 scores only."""
    model, tokenizer = local
    text = "The quick brown fox jumps over the lazy dog"
    ids = tokenizer.encode(text)
    logits = model(mx.array([ids]))[0].astype(mx.float32)
    logp = np.array(logits - mx.logsumexp(logits, axis=-1, keepdims=True))
    r = client.completions.create(model=str(tiny_untied), prompt=text, max_tokens=0, echo=True, logprobs=2)
    choice = r.choices[0]
    assert (choice.text, choice.finish_reason, r.usage.completion_tokens) == (text, "length", 0)
    lp = choice.logprobs
    assert "".join(lp.tokens) == text and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    np.testing.assert_allclose(lp.token_logprobs[1:], [logp[j, ids[j + 1]] for j in range(len(ids) - 1)], atol=1e-4)
    for j, top in enumerate(lp.top_logprobs[1:]):
        np.testing.assert_allclose(sorted(top.values(), reverse=True), np.sort(logp[j])[::-1][:2], atol=1e-4)
    assert lp.text_offset == [len("".join(lp.tokens[:i])) for i in range(len(ids))]
    # with tokens generated: the prompt's entries, then what the same request without echo gets
    plain = client.completions.create(model=str(tiny_untied), prompt=text, max_tokens=5, temperature=0, logprobs=1)
    both = client.completions.create(
        model=str(tiny_untied), prompt=text, max_tokens=5, temperature=0, logprobs=1, echo=True
    )
    assert both.choices[0].text == text + plain.choices[0].text
    # to float32 rounding: the second request's prompt comes partly from the prefix cache, so its last positions
    # go through a pass of fewer rows (the few-row kernels, another order of additions than BLAS's)
    np.testing.assert_allclose(
        both.choices[0].logprobs.token_logprobs[len(ids) :], plain.choices[0].logprobs.token_logprobs, atol=1e-5
    )
    np.testing.assert_allclose(both.choices[0].logprobs.token_logprobs[1 : len(ids)], lp.token_logprobs[1:], atol=1e-5)
    streamed = list(
        client.completions.create(
            model=str(tiny_untied), prompt=text, max_tokens=5, temperature=0, logprobs=1, echo=True, stream=True
        )
    )
    assert "".join(c.choices[0].text for c in streamed) == both.choices[0].text
    tokens = [t for c in streamed if c.choices[0].logprobs for t in c.choices[0].logprobs.tokens]
    assert tokens == both.choices[0].logprobs.tokens


def test_cached_tokens_count_a_repeated_prefix(client, local, tiny_untied):
    messages = [{"role": "system", "content": "Numbers 12345 " * 8}, {"role": "user", "content": "first question"}]
    first = client.chat.completions.create(model=str(tiny_untied), messages=messages, max_tokens=3, temperature=0)
    again = client.chat.completions.create(model=str(tiny_untied), messages=messages, max_tokens=3, temperature=0)
    assert first.usage.prompt_tokens_details.cached_tokens < 10  # at most the template's opening is shared
    assert again.usage.prompt_tokens_details.cached_tokens == again.usage.prompt_tokens - 1
    assert again.choices[0].message.content == first.choices[0].message.content


def test_json_schema_output_validates(client, tiny_untied):
    for stream in (False, True):
        r = ask(
            client,
            tiny_untied,
            "a person",
            max_tokens=40,
            temperature=1.0,
            seed=3,
            stream=stream,
            response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": SMALL_SCHEMA}},
        )
        text = (
            "".join(c.choices[0].delta.content or "" for c in r if c.choices)
            if stream
            else r.choices[0].message.content
        )
        jsonschema.validate(json.loads(text), SMALL_SCHEMA)


def test_required_tool_call_round_trip(client, tiny_untied):
    messages = [{"role": "user", "content": "weather in Paris?"}]
    r = client.chat.completions.create(
        model=str(tiny_untied),
        messages=messages,
        tools=[WEATHER],
        tool_choice="required",
        max_tokens=150,
        temperature=0,
    )
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    call = choice.message.tool_calls[0]
    assert call.function.name == "get_weather" and call.id.startswith("call_")
    jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])
    messages += [
        choice.message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": '{"temp": 21}'},
    ]
    follow = client.chat.completions.create(
        model=str(tiny_untied), messages=messages, tools=[WEATHER], max_tokens=5, temperature=0
    )
    assert follow.choices[0].finish_reason in ("stop", "length", "tool_calls")
    streamed = list(
        client.chat.completions.create(
            model=str(tiny_untied),
            messages=messages[:1],
            tools=[WEATHER],
            tool_choice={"type": "function", "function": {"name": "get_weather"}},
            max_tokens=150,
            temperature=0,
            stream=True,
        )
    )
    calls = [tc for c in streamed if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert calls[0].function.name == "get_weather" and calls[0].function.arguments == call.function.arguments
    assert [c.choices[0].finish_reason for c in streamed if c.choices][-1] == "tool_calls"


def test_tool_call_parser_streams_text_and_calls():
    text = 'Let me check.\n<tool_call>\n{"name": "f", "arguments": {"x": 1}}\n</tool_call>\n<tool_call>\nnot json\n</tool_call>'
    for size in (1, 3, len(text)):
        parser, out = ToolCallParser(), []
        pieces = [text[i : i + size] for i in range(0, len(text), size)]
        for i, piece in enumerate(pieces):
            out += parser.feed(piece, final=i == len(pieces) - 1)
        texts = "".join(v for k, v in out if k == "text")
        calls = [v for k, v in out if k == "call"]
        assert [c["function"]["name"] for c in calls] == ["f"] and json.loads(calls[0]["function"]["arguments"]) == {
            "x": 1
        }
        assert texts == "Let me check.<tool_call>\nnot json\n</tool_call>"  # whitespace beside a call goes
        plain = ToolCallParser()
        assert (
            "".join(v for _, v in plain.feed("a <tool_c") + plain.feed("ut\n b  ", final=True)) == "a <tool_cut\n b  "
        )


def test_tokenize_and_detokenize(server, local):
    c = server.client(KEY)
    r = c.post("/tokenize", json={"prompt": "hello world"}).json()
    assert r["tokens"] == local[1].encode("hello world") and r["count"] == len(r["tokens"])
    chat = c.post("/tokenize", json={"messages": [{"role": "user", "content": "hi"}]}).json()
    assert chat["tokens"] == chat_ids(local[1], "hi")
    assert c.post("/detokenize", json={"tokens": r["tokens"]}).json()["prompt"] == "hello world"


BAD = [
    ("invalid JSON", "/v1/chat/completions", b'{"messages": [', 400, None),
    ("body not an object", "/v1/chat/completions", b"[1, 2]", 400, None),
    ("missing messages", "/v1/chat/completions", {"max_tokens": 3}, 400, "messages"),
    ("empty messages", "/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("unknown role", "/v1/chat/completions", {"messages": [{"role": "robot", "content": "x"}]}, 400, "messages.0.role"),
    (
        "content wrong type",
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": 5}]},
        400,
        "messages.0.content",
    ),
    (
        "unknown model",
        "/v1/chat/completions",
        {"model": "/etc", "messages": [{"role": "user", "content": "x"}]},
        404,
        "model",
    ),
    (
        "negative max_tokens",
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "x"}], "max_tokens": -5},
        400,
        "max_tokens",
    ),
    (
        "temperature too high",
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "x"}], "temperature": 3},
        400,
        "temperature",
    ),
    (
        "temperature a string",
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "x"}], "temperature": "0.5"},
        400,
        "temperature",
    ),
    ("top_p zero", "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "top_p": 0}, 400, "top_p"),
    ("n over the limit", "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "n": 50}, 400, "n"),
    (
        "too many stops",
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "x"}], "stop": ["a"] * 20},
        400,
        "stop",
    ),
    (
        "logit_bias not a token",
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "x"}], "logit_bias": {"abc": 1}},
        400,
        "logit_bias",
    ),
    (
        "logit_bias out of range",
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "x"}], "logit_bias": {"5": 500}},
        400,
        "logit_bias.5",
    ),
    (
        "top_logprobs too many",
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "x"}], "logprobs": True, "top_logprobs": 50},
        400,
        "top_logprobs",
    ),
    (
        "tool with a bad name",
        "/v1/chat/completions",
        {
            "messages": [{"role": "user", "content": "x"}],
            "tools": [{"type": "function", "function": {"name": "bad name!"}}],
        },
        400,
        "tools.0.function.name",
    ),
    (
        "tool schema not an object",
        "/v1/chat/completions",
        {
            "messages": [{"role": "user", "content": "x"}],
            "tools": [{"type": "function", "function": {"name": "f", "parameters": "nope"}}],
        },
        400,
        "tools.0.function.parameters",
    ),
    (
        "required tool schema uncompilable",
        "/v1/chat/completions",
        {
            "messages": [{"role": "user", "content": "x"}],
            "tool_choice": "required",
            "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "frob"}}}],
        },
        400,
        "tools",
    ),
    (
        "tool_choice names no tool",
        "/v1/chat/completions",
        {
            "messages": [{"role": "user", "content": "x"}],
            "tool_choice": {"type": "function", "function": {"name": "g"}},
            "tools": [WEATHER],
        },
        400,
        "tools",
    ),
    (
        "tool_choice without tools",
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "x"}], "tool_choice": "required"},
        400,
        "tool_choice",
    ),
    (
        "tool call arguments not JSON",
        "/v1/chat/completions",
        {
            "messages": [
                {
                    "role": "assistant",
                    "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f", "arguments": "{oops"}}],
                }
            ]
        },
        400,
        "messages",
    ),
    (
        "json_schema uncompilable",
        "/v1/chat/completions",
        {
            "messages": [{"role": "user", "content": "x"}],
            "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "frob"}}},
        },
        400,
        "response_format",
    ),
    (
        "json_schema missing",
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "json_schema"}},
        400,
        "response_format",
    ),
    ("prompt over the context", "/v1/completions", {"prompt": "fox " * 2000}, 400, "prompt"),
    ("prompt token out of vocabulary", "/v1/completions", {"prompt": [1, 2, 99999]}, 400, "prompt"),
    ("prompts x n past max_n", "/v1/completions", {"prompt": ["a", "b", "c"], "n": 3}, 400, "prompt"),
    ("best_of below n", "/v1/completions", {"prompt": "a", "n": 3, "best_of": 2}, 400, "best_of"),
    ("best_of streamed", "/v1/completions", {"prompt": "a", "best_of": 2, "stream": True}, 400, "stream"),
    ("suffix without FIM tokens", "/v1/completions", {"prompt": "a", "suffix": "b"}, 400, "suffix"),
    ("suffix with echo", "/v1/completions", {"prompt": "a", "suffix": "b", "echo": True}, 400, "echo"),
    ("max_tokens 0 without echo", "/v1/completions", {"prompt": "a", "max_tokens": 0}, 400, "max_tokens"),
    (
        "chat max_tokens 0",
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "a"}], "max_tokens": 0},
        400,
        "max_tokens",
    ),  # fmt: skip
    ("detokenize out of vocabulary", "/detokenize", {"tokens": [10**6]}, 400, "tokens"),
    ("tokenize neither", "/tokenize", {}, 400, "prompt"),
    (
        "speculative without a draft",
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "x"}], "speculative": True},
        400,
        "speculative",
    ),
    (
        "prompt_lookup with a schema",
        "/v1/chat/completions",
        {
            "messages": [{"role": "user", "content": "x"}],
            "prompt_lookup": 2,
            "response_format": {"type": "json_object"},
        },
        400,
        "prompt_lookup",
    ),
    (
        "prompt_lookup zero",
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "x"}], "prompt_lookup": 0},
        400,
        "prompt_lookup",
    ),
    (
        "huge body",
        "/v1/chat/completions",
        b'{"messages": [{"role": "user", "content": "' + b"x" * 200_000 + b'"}]}',
        413,
        None,
    ),
    ("unknown path", "/v1/engines", {}, 404, None),
]


@pytest.mark.parametrize("what,path,body,status,param", BAD, ids=[b[0] for b in BAD])
def test_bad_requests_get_an_openai_error(server, what, path, body, status, param):
    c = server.client(KEY)
    r = c.post(path, content=body) if isinstance(body, bytes) else c.post(path, json=body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["param"] == param
    assert c.get("/health").status_code == 200


def test_a_wrong_key_is_refused_before_the_body_is_read(server):
    r = server.client("nope").post("/v1/chat/completions", content=b"x" * 200_000)
    assert r.status_code == 401


def test_metrics_count_requests_and_tokens(server, client, tiny_untied):
    before = server.metric("mlx_qwen2_generation_tokens_total", KEY)
    ask(client, tiny_untied, "m", max_tokens=4, temperature=0)
    assert server.metric("mlx_qwen2_generation_tokens_total", KEY) - before == 4
    text = server.client(KEY).get("/metrics").text
    for name in (
        "mlx_qwen2_requests_total",
        "mlx_qwen2_queue_depth",
        "mlx_qwen2_time_to_first_token_seconds_bucket",
        "mlx_qwen2_prefix_cache_hits_total",
    ):
        assert name in text
    assert any("POST /v1/chat/completions 200" in line and "prompt=" in line for line in server.log)


def test_load_with_disconnects(server, local, tiny_untied):
    """32 clients x 4 requests, a quarter of them hang up mid-stream; the rest get exactly their greedy text."""
    expected = {p: greedy(local, chat_ids(local[1], p), 30)[0] for p in PROMPTS}
    idle = server.metric("mlx_qwen2_mlx_active_memory_bytes", KEY)

    async def run() -> list[bool]:
        limits = httpx.Limits(max_connections=64)
        async with httpx.AsyncClient(
            base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=120, limits=limits
        ) as c:

            async def one(client_no: int, k: int) -> bool:
                prompt = PROMPTS[(client_no + k) % 4]
                body = {
                    "messages": [{"role": "user", "content": prompt}],
                    "max_tokens": 30,
                    "temperature": 0,
                    "stream": True,
                }
                text, hang_up = "", client_no % 4 == 0 and k == 1
                async with c.stream("POST", "/v1/chat/completions", json=body) as r:
                    async for line in r.aiter_lines():
                        if not line.startswith("data: ") or line == "data: [DONE]":
                            continue
                        chunk = json.loads(line[6:])
                        text += chunk["choices"][0]["delta"].get("content") or ""
                        if hang_up and len(text) > 3:
                            return True  # leaving the block closes the connection
                return text == expected[prompt]

            async def client(no: int) -> list[bool]:
                return [await one(no, k) for k in range(4)]

            results = await asyncio.gather(*(client(i) for i in range(32)))
            return [ok for r in results for ok in r]

    assert all(asyncio.run(run()))
    assert server.client().get("/health").status_code == 200
    assert server.wait_until(lambda: server.metric("mlx_qwen2_active_sequences", KEY) == 0)
    prefix = server.metric("mlx_qwen2_prefix_cache_bytes", KEY)
    assert server.metric("mlx_qwen2_mlx_active_memory_bytes", KEY) <= idle + prefix + (1 << 20)


@pytest.fixture(scope="module")
def long_model(tmp_path_factory):
    """A tiny model with room for thousands of tokens, so a request can run for seconds."""
    return make_checkpoint(tmp_path_factory.mktemp("long"), max_position_embeddings=8192)


@pytest.fixture(scope="module")
def tight(long_model):
    s = ServerProcess(
        long_model,
        "--max-concurrency",
        "1",
        "--max-queue",
        "0",
        "--request-timeout",
        "2",
        "--keepalive",
        "0.2",
        "--prefix-cache-entries",
        "0",
    )
    yield s
    s.stop()


def long_body(stream: bool = False) -> dict:
    return {"messages": [{"role": "user", "content": "go on"}], "max_tokens": 8000, "temperature": 0, "stream": stream}


def test_a_client_that_hangs_up_is_cancelled(tight):
    with tight.client().stream("POST", "/v1/chat/completions", json=long_body(stream=True)) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
        assert tight.metric("mlx_qwen2_active_sequences") == 1
    assert tight.wait_until(lambda: tight.metric("mlx_qwen2_active_sequences") == 0, timeout=2)
    with tight.client() as c:  # the same without streaming: the sequence goes when the connection does
        with pytest.raises(httpx.ReadTimeout):
            c.post("/v1/chat/completions", json=long_body(), timeout=0.5)
    assert tight.wait_until(lambda: tight.metric("mlx_qwen2_active_sequences") == 0, timeout=2)


def test_a_full_queue_gets_429_and_a_long_request_504(tight):
    async def run() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=tight.url, timeout=30) as c:
            first = asyncio.create_task(c.post("/v1/chat/completions", json=long_body()))
            await asyncio.sleep(0.5)
            second = await c.post("/v1/chat/completions", json=long_body())
            return [await first, second]

    first, second = asyncio.run(run())
    assert second.status_code == 429 and second.json()["error"]["code"] == "queue_full"
    assert first.status_code == 504 and first.json()["error"]["code"] == "timeout"


def test_streams_keep_alive_and_end_with_an_error_on_timeout(tight):
    with tight.client().stream("POST", "/v1/chat/completions", json=long_body(stream=True)) as r:
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]" and "timeout" in lines[-2]


def test_sigterm_finishes_running_requests_and_exits(long_model):
    s = ServerProcess(long_model, "--shutdown-timeout", "20")

    async def run() -> httpx.Response:
        async with httpx.AsyncClient(base_url=s.url, timeout=60) as c:
            body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 300, "temperature": 0}
            task = asyncio.create_task(c.post("/v1/chat/completions", json=body))
            await asyncio.sleep(0.3)
            s.proc.send_signal(signal.SIGTERM)
            return await task

    started = time.monotonic()
    r = asyncio.run(run())
    assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] in ("length", "stop")
    assert s.proc.wait(30) in (0, -signal.SIGTERM) and time.monotonic() - started < 30
    assert any("engine stopped" in line for line in s.log)


@pytest.fixture(scope="module")
def real_server(real_folder):
    s = ServerProcess(real_folder, "--served-model-name", "qwen-coder")
    yield s
    s.stop()


@pytest.mark.real
@pytest.mark.slow
def test_real_model_greedy_equals_generate_alone_and_among_eight(real_server, real_folder):
    model, tokenizer = load(real_folder)
    question = "Write a Python function that reverses a string."
    expected, _ = greedy((model, tokenizer), chat_ids(tokenizer, question), 16)

    async def run() -> list[str]:
        async with openai.AsyncOpenAI(base_url=real_server.url + "/v1", api_key="none", max_retries=0) as c:

            async def one(text: str, n: int) -> str:
                messages = [{"role": "user", "content": text}]
                r = await c.chat.completions.create(model="qwen-coder", messages=messages, max_tokens=n, temperature=0)
                return r.choices[0].message.content

            alone = await one(question, 16)
            others = [one(f"Say something about the number {i}.", 24) for i in range(8)]
            among = await asyncio.gather(*others[:4], one(question, 16), *others[4:])
            return [alone, among[4]]

    assert asyncio.run(run()) == [expected, expected]


@pytest.mark.real
@pytest.mark.slow
def test_real_model_tool_call_round_trip_and_json(real_server):
    c = openai.OpenAI(base_url=real_server.url + "/v1", api_key="none", max_retries=0)
    tool = {**WEATHER, "function": {**WEATHER["function"], "description": "Get the current weather in a city"}}
    messages = [{"role": "user", "content": "What is the weather in Oslo for the next 3 days?"}]
    r = c.chat.completions.create(
        model="qwen-coder", messages=messages, tools=[tool], tool_choice="required", max_tokens=60, temperature=0
    )
    call = r.choices[0].message.tool_calls[0]
    assert r.choices[0].finish_reason == "tool_calls"
    assert json.loads(call.function.arguments) == {"city": "Oslo", "days": 3}
    messages += [
        r.choices[0].message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": "sunny, 12 C"},
    ]
    rendered = real_server.client().post("/tokenize", json={"messages": messages}).json()["tokens"]
    text = real_server.client().post("/detokenize", json={"tokens": rendered}).json()["prompt"]
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "days": 3}}\n</tool_call>' in text
    assert "<tool_response>\nsunny, 12 C\n</tool_response>" in text
    follow = c.chat.completions.create(
        model="qwen-coder", messages=messages, tools=[tool], max_tokens=30, temperature=0
    )
    assert follow.choices[0].finish_reason in ("stop", "length", "tool_calls")  # what a 0.5B model says next varies
    prompt = [{"role": "user", "content": "Describe a cat as JSON with name and age."}]
    r = c.chat.completions.create(
        model="qwen-coder", messages=prompt, max_tokens=60, temperature=0, response_format={"type": "json_object"}
    )
    assert isinstance(json.loads(r.choices[0].message.content), dict)


def test_logit_bias_forces_and_bans_tokens(client, local, tiny_untied):
    tokenizer = local[1]
    forced = tokenizer.encode("ps")[0]
    messages = [{"role": "user", "content": "bias"}]
    r = client.chat.completions.create(
        model=str(tiny_untied), messages=messages, max_tokens=5, temperature=0, logit_bias={str(forced): 100}
    )
    assert r.choices[0].message.content == tokenizer.decode([forced]) * 5
    top = list(stream_generate(*local, chat_ids(tokenizer, "bias"), max_tokens=1))[0].token
    r = client.chat.completions.create(
        model=str(tiny_untied),
        messages=messages,
        max_tokens=1,
        temperature=0,
        logit_bias={str(top): -100},
        logprobs=True,
        top_logprobs=2,
    )
    entry = r.choices[0].logprobs.content[0]  # logprobs are the model's own, before the bias
    assert entry.logprob == pytest.approx(entry.top_logprobs[1].logprob)  # the second best: the best is banned
    assert entry.logprob < entry.top_logprobs[0].logprob


def test_presence_and_frequency_penalties_match_a_hand_computed_greedy(client, local, tiny_untied):
    model, tokenizer = local
    ids = chat_ids(tokenizer, "repeat after me")
    tokens: list[int] = []
    for _ in range(12):  # the oracle: a full forward pass per token, penalties subtracted by hand
        logits = np.array(model(mx.array([ids + tokens]))[0, -1].astype(mx.float32))
        for t in set(tokens):
            logits[t] -= 0.5 + 0.7 * tokens.count(t)
        tokens.append(int(np.argmax(logits)))
        if tokens[-1] in tokenizer.eos_token_ids:
            break
    r = ask(
        client,
        tiny_untied,
        "repeat after me",
        max_tokens=12,
        temperature=0,
        presence_penalty=0.5,
        frequency_penalty=0.7,
    )
    assert r.choices[0].message.content == tokenizer.decode(tokens)
    plain = ask(client, tiny_untied, "repeat after me", max_tokens=12, temperature=0)
    assert plain.choices[0].message.content != r.choices[0].message.content


def test_max_tokens_is_capped_by_the_context(client, local, tiny_untied):
    ids = chat_ids(local[1], "long")
    r = ask(
        client,
        tiny_untied,
        "long",
        max_tokens=100_000,
        temperature=0,
        logit_bias={str(local[1].encode("ps")[0]): 100},
    )
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 512 - len(ids)


def test_cors_is_off_unless_origins_are_given(local):
    preflight = {"Origin": "https://example.com", "Access-Control-Request-Method": "POST"}
    for origins, allowed in (([], False), (["https://example.com"], True)):
        app = create_app(*local, ServerSettings(allowed_origins=origins), "tiny")
        with TestClient(app) as c:
            r = c.options("/v1/chat/completions", headers=preflight)
            assert ("access-control-allow-origin" in r.headers) == allowed
            assert c.get("/v1/models").json()["data"][0]["id"] == "tiny"


def test_keep_alive_comments_while_a_request_waits(local):
    """A stream whose first token is slow to come (a long prefill) gets SSE comments meanwhile."""
    app = create_app(*local, ServerSettings(keepalive=0.05), "tiny")
    with TestClient(app) as c:
        runner = app.state.served.runner
        step = runner.engine.step

        def slow_step():
            time.sleep(0.3)
            return step()

        runner.engine.step = slow_step  # the engine thread calls it for every step
        body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "temperature": 0, "stream": True}
        with c.stream("POST", "/v1/chat/completions", json=body) as r:
            lines = [line for line in r.iter_lines() if line]
    assert ": keep-alive" in lines and lines[-1] == "data: [DONE]"
    data = [i for i, line in enumerate(lines) if line.startswith("data: ")]
    assert data[0] < lines.index(": keep-alive") < data[1]  # after the opening chunk, before any token's


def test_prompt_lookup_per_request_gives_the_greedy_text(server, local, tiny_untied):
    text = "def add(a, b):\n    return a + b\n\n" * 3
    expected, _ = greedy(local, chat_ids(local[1], text), 30)
    body = {"messages": [{"role": "user", "content": text}], "max_tokens": 30, "temperature": 0, "prompt_lookup": 2}
    r = server.client(KEY).post("/v1/chat/completions", json=body).json()
    assert r["choices"][0]["message"]["content"] == expected
    spec = r["usage"]["speculative"]
    assert spec["proposed_tokens"] > 0 and spec["target_passes"] < r["usage"]["completion_tokens"]
    plain = server.client(KEY).post("/v1/chat/completions", json={**body, "prompt_lookup": None}).json()
    assert "speculative" not in plain["usage"]


@pytest.mark.real
@pytest.mark.slow
def test_real_model_fills_in_the_middle(real_server, real_folder):
    """`suffix`: Qwen2.5-Coder's fill-in-the-middle prompt; the reply equals greedy decoding of that prompt."""
    model, tokenizer = load(real_folder)
    prefix, suffix = "def add(a, b):\n", "\n\nprint(add(1, 2))\n"
    ids = [tokenizer.token_to_id("<|fim_prefix|>"), *tokenizer.encode(prefix), tokenizer.token_to_id("<|fim_suffix|>"),
           *tokenizer.encode(suffix), tokenizer.token_to_id("<|fim_middle|>")]  # fmt: skip
    expected, _ = greedy((model, tokenizer), ids, 16)
    c = openai.OpenAI(base_url=real_server.url + "/v1", api_key="none", max_retries=0)
    r = c.completions.create(model="qwen-coder", prompt=prefix, suffix=suffix, max_tokens=16, temperature=0)
    assert r.choices[0].text == expected and "return a + b" in expected, expected


BOUNDED, QUANTIZED = ("--max-kv-size", "16", "--kv-keep", "4"), ("--kv-bits", "4", "--kv-group-size", "32")


@pytest.mark.parametrize("flags", [BOUNDED, QUANTIZED])
def test_a_bounded_or_quantized_cache_serves_what_generate_gives_alone(flags, tmp_path_factory):
    folder = make_checkpoint(tmp_path_factory.mktemp("wide"), hidden=128, heads=4, kv_heads=2, seed=3)  # head 32
    model, tokenizer = load(folder)
    bounded = flags == BOUNDED
    config = CacheConfig(16, 4) if bounded else CacheConfig(kv_bits=4, kv_group_size=32)
    s = ServerProcess(folder, *flags)
    try:

        async def run(texts: list[str]) -> list[str]:
            async with openai.AsyncOpenAI(base_url=s.url + "/v1", api_key="none", max_retries=0) as c:

                async def one(text: str) -> str:
                    r = await c.chat.completions.create(
                        model=str(folder), messages=[{"role": "user", "content": text}], max_tokens=40, temperature=0
                    )
                    return r.choices[0].message.content

                return await asyncio.gather(*(one(text) for text in texts))

        # The bounded cache: four at once, past the window. The 4-bit one a request at a time: in a batch, float
        # differences of the batched products can move a key across a 4-bit rounding step (tests/test_cache_kinds.py
        # has the batch against each prompt alone, in-process).
        got = asyncio.run(run(PROMPTS)) if bounded else [asyncio.run(run([text]))[0] for text in PROMPTS]
        differ = 0
        for text, reply in zip(PROMPTS, got):
            ids = chat_ids(tokenizer, text)
            alone = "".join(r.text for r in stream_generate(model, tokenizer, ids, max_tokens=40, cache_config=config))
            assert reply == alone
            differ += reply != "".join(r.text for r in stream_generate(model, tokenizer, ids, max_tokens=40))
        assert differ  # the cache kind changes the replies here: the test can tell it was used
        r = s.client().post("/v1/completions", json={"prompt": "Hi", "max_tokens": 4, "prompt_lookup": 2})
        assert r.status_code == 400 and "plain KV cache" in r.json()["error"]["message"]
    finally:
        s.stop()


def test_a_kv_group_that_does_not_divide_the_head_is_refused_at_start(tiny_untied):
    done = subprocess.run(
        [sys.executable, "-m", "mlx_qwen2.server", "--model", str(tiny_untied), "--port", "0", "--kv-bits", "8"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 1 and "does not divide the head size 16" in done.stderr.strip().splitlines()[-1]
