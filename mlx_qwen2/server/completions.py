"""Running a request's sequences and answering: events from the engine become choices, whole or as
server-sent events. The routes (app.py) call `chat` and `complete`; plan.py builds the engine requests.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from starlette.requests import Request as HttpRequest
from starlette.responses import JSONResponse, Response, StreamingResponse

from ..generation.batch import Event
from ..tokenizer import Tokenizer
from . import schema
from .plan import Served, Spec, chat_prompt, completion_prompts, plan, response_grammar
from .runner import QueueFull
from .schema import ApiError
from .tools import ToolCallParser


class Generation:
    """The events of one request's sequences, in order; a tick (None) every `keepalive` seconds of silence."""

    def __init__(self, served: Served, requests: list[Spec], arrived: float):
        self.served, self.arrived = served, arrived
        self.index = {r.id: i for i, r in enumerate(requests)}
        self.open = set(self.index)
        self.queue: asyncio.Queue[Event | BaseException] = asyncio.Queue()
        self.first: float | None = None
        try:
            served.runner.submit(requests, self.queue)
        except QueueFull as e:
            raise ApiError(429, f"the server is busy ({e}); retry later", "rate_limit_error", code="queue_full") from e

    async def events(self) -> AsyncIterator[Event | None]:
        settings = self.served.settings
        deadline = self.arrived + settings.request_timeout
        while self.open:
            left = deadline - time.monotonic()
            if left <= 0:
                raise ApiError(
                    504,
                    f"the request ran past the server's limit of {settings.request_timeout:g} s",
                    "timeout_error",
                    code="timeout",
                )
            try:
                item = await asyncio.wait_for(self.queue.get(), min(settings.keepalive, left))
            except asyncio.TimeoutError:
                yield None
                continue
            if isinstance(item, BaseException):
                self.open.clear()
                raise ApiError(500, f"generation failed: {type(item).__name__}: {item}", "server_error") from item
            if self.first is None:
                self.first = time.monotonic()
                self.served.metrics.ttft.observe(self.first - self.arrived)
            if item.finish_reason is not None:
                self.open.discard(item.id)
            yield item

    def close(self) -> None:
        """Cancel whatever has not finished (a client gone, a timeout, an error)."""
        if self.open:
            self.served.runner.cancel(list(self.open))
            self.open.clear()


class Choice:
    """One choice's output so far; `add` turns an event into the delta to stream."""

    def __init__(self, index: int, tokenizer: Tokenizer, tools: bool, prompt: list[int] | None = None):
        self.index, self.tokenizer = index, tokenizer
        self.parser = ToolCallParser() if tools else None
        self.text, self.calls, self.logprobs = "", [], []
        self.prompt_ids, self.prompt_logprobs = prompt, None  # the prompt's token entries, once scored
        self.finish: str | None = None
        self.prompt = self.generated = self.cached = 0
        self.speculative: dict[str, int] | None = None

    def add(self, event: Event) -> dict[str, Any]:
        """The chat delta for this event ({} when it adds nothing)."""
        self.prompt, self.generated, self.cached = event.prompt_tokens, event.generation_tokens, event.cached_tokens
        if event.speculative is not None:
            stats = event.speculative
            self.speculative = {
                "proposed_tokens": stats.proposed,
                "accepted_tokens": stats.accepted,
                "target_passes": stats.passes,
            }
        if event.prompt_logprobs is not None and self.prompt_ids is not None:
            self.prompt_logprobs = [
                _token_logprob(self.tokenizer, t, lp, top)
                for t, (lp, top) in zip(self.prompt_ids, event.prompt_logprobs)
            ]
        if event.logprob is not None and event.token not in self.tokenizer.eos_token_ids:
            self.logprobs.append(_token_logprob(self.tokenizer, event.token, event.logprob, event.top_logprobs))
        delta: dict[str, Any] = {}
        pieces = (
            [("text", event.text)]
            if self.parser is None
            else self.parser.feed(event.text, event.finish_reason is not None)
        )
        for kind, value in pieces:
            if kind == "text" and value:
                self.text += value
                delta["content"] = delta.get("content", "") + value
            elif kind == "call":
                delta.setdefault("tool_calls", []).append({"index": len(self.calls), **value})
                self.calls.append(value)
        if event.finish_reason is not None:
            self.finish = "tool_calls" if self.calls and event.finish_reason == "stop" else event.finish_reason
        return delta


def _token_logprob(
    tokenizer: Tokenizer, token: int, logprob: float | None, top: list[tuple[int, float]] | None
) -> dict[str, Any]:
    """A token's entry; a prompt's first token has no log-probability (None) and no top tokens (None)."""

    def entry(t: int, lp: float | None) -> dict[str, Any]:
        raw = tokenizer.token_bytes(t)
        text = raw.decode("utf-8", errors="replace") if raw else tokenizer.id_to_token(t) or ""
        return {"token": text, "logprob": lp, "bytes": list(raw or text.encode())}

    tops = None if logprob is None else [entry(t, lp) for t, lp in top or []]
    return {**entry(token, logprob), "top_logprobs": tops}


def _totals(choices: list[Choice], n: int) -> dict[str, Any]:
    """Usage of a request's choices: each prompt (every n-th choice starts one) counted once."""
    speculative = None
    if any(c.speculative for c in choices):
        speculative = {
            k: sum((c.speculative or {}).get(k, 0) for c in choices)
            for k in ("proposed_tokens", "accepted_tokens", "target_passes")
        }
    firsts = choices[::n]
    prompt, cached = sum(c.prompt for c in firsts), sum(c.cached for c in firsts)
    return schema.usage(prompt, sum(c.generated for c in choices), cached, speculative)


def _record(served: Served, http: HttpRequest, choices: list[Choice], n: int) -> None:
    firsts = choices[::n]
    prompt, cached = sum(c.prompt for c in firsts), sum(c.cached for c in firsts)
    generated = sum(c.generated for c in choices)
    served.metrics.prompt_tokens.inc(prompt)
    served.metrics.generation_tokens.inc(generated)
    served.metrics.cached_tokens.inc(cached)
    http.scope["state"]["log"].update(prompt=prompt, completion=generated, cached=cached)


async def _collect(gen: Generation, http: HttpRequest, on_event: Callable[[Event], None]) -> None:
    """Feed every event to `on_event`; stop (and cancel) if the client disconnects first."""

    async def drain() -> None:
        async for event in gen.events():
            if event is not None:
                on_event(event)

    work, gone = asyncio.create_task(drain()), asyncio.create_task(_disconnected(http))
    try:
        done, _ = await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
        if work not in done:
            work.cancel()
            raise ApiError(499, "the client disconnected", code="client_closed")
        work.result()
    finally:
        gone.cancel()
        gen.close()


async def _disconnected(http: HttpRequest) -> None:
    while (await http.receive())["type"] != "http.disconnect":
        pass


def _sse(data: Any) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


async def _stream(
    gen: Generation,
    chunks: Callable[[Event], list[dict[str, Any]]],
    opening: list[dict[str, Any]],
    closing: Callable[[], list[dict[str, Any]]],
) -> AsyncIterator[str]:
    try:
        for chunk in opening:
            yield _sse(chunk)
        async for event in gen.events():
            if event is None:
                yield ": keep-alive\n\n"
                continue
            for chunk in chunks(event):
                yield _sse(chunk)
        for chunk in closing():
            yield _sse(chunk)
    except ApiError as e:
        yield _sse(e.body())
    finally:
        gen.close()
    yield "data: [DONE]\n\n"


SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


async def chat(served: Served, body: schema.ChatRequest, http: HttpRequest) -> Response:
    arrived = time.monotonic()
    served.check_model(body.model)
    ids, grammar, tools = chat_prompt(served, body)
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    gen = Generation(served, plan(served, ids, body, grammar, logprobs, "messages"), arrived)
    id_ = schema.new_id("chatcmpl")
    http.scope["state"]["log"]["id"] = id_
    choices = [Choice(i, served.tokenizer, tools) for i in range(body.n)]
    model = served.model_id

    def choice_of(event: Event) -> Choice:
        return choices[gen.index[event.id]]

    if not body.stream:
        await _collect(gen, http, lambda e: choice_of(e).add(e))
        _record(served, http, choices, body.n)
        out = [_chat_choice(c, body.logprobs) for c in choices]
        return JSONResponse(schema.envelope(id_, "chat.completion", model, out, usage=_totals(choices, body.n)))

    usage_too = bool(body.stream_options and body.stream_options.include_usage)
    extra = {"usage": None} if usage_too else {}

    def chunk(index: int, delta: dict[str, Any], finish: str | None = None, logprobs: Any = None) -> dict[str, Any]:
        part = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        return schema.envelope(id_, "chat.completion.chunk", model, [part], **extra)

    def chunks(event: Event) -> list[dict[str, Any]]:
        c = choice_of(event)
        seen = len(c.logprobs)
        delta = c.add(event)
        logprobs = {"content": c.logprobs[seen:]} if body.logprobs and len(c.logprobs) > seen else None
        out = [chunk(c.index, delta, None, logprobs)] if delta or logprobs else []
        if c.finish is not None:
            out.append(chunk(c.index, {}, c.finish))
        return out

    def closing() -> list[dict[str, Any]]:
        _record(served, http, choices, body.n)
        totals = _totals(choices, body.n)
        return [schema.envelope(id_, "chat.completion.chunk", model, [], usage=totals)] if usage_too else []

    opening = [chunk(i, {"role": "assistant", "content": ""}) for i in range(body.n)]
    return StreamingResponse(
        _stream(gen, chunks, opening, closing), media_type="text/event-stream", headers=SSE_HEADERS
    )


def _chat_choice(c: Choice, logprobs: bool) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": c.text if c.text or not c.calls else None}
    if c.calls:
        message["tool_calls"] = c.calls
    return {
        "index": c.index,
        "message": message,
        "logprobs": {"content": c.logprobs} if logprobs else None,
        "finish_reason": c.finish,
    }


async def complete(served: Served, body: schema.CompletionRequest, http: HttpRequest) -> Response:
    arrived = time.monotonic()
    served.check_model(body.model)
    if body.max_tokens == 0 and not body.echo:
        raise ApiError(
            400, "max_tokens 0 generates nothing: it goes with echo (to score the prompt)", param="max_tokens"
        )
    if body.echo and body.suffix is not None:
        raise ApiError(400, "echo with suffix is not supported: the reply is the text that fills the gap", param="echo")
    best_of = body.best_of or body.n
    if best_of < body.n:
        raise ApiError(400, f"best_of ({best_of}) must be at least n ({body.n})", param="best_of")
    if best_of > body.n and body.stream:
        raise ApiError(400, "best_of with stream is not supported: the best are known only at the end", param="stream")
    prompts = completion_prompts(served, body.prompt, best_of, body.suffix)
    grammar = response_grammar(served, body)
    ranked = 0 if best_of > body.n and body.logprobs is None else body.logprobs  # best_of ranks by logprob
    specs = [s for ids in prompts for s in plan(served, ids, body, grammar, ranked, "prompt", best_of)]
    scored = body.echo and body.logprobs is not None  # the prompt's tokens get log-probabilities too
    for spec in specs if scored else []:
        spec.prompt_logprobs = body.logprobs
    gen = Generation(served, specs, arrived)
    id_ = schema.new_id("cmpl")
    http.scope["state"]["log"]["id"] = id_
    choices = [Choice(i, served.tokenizer, False, specs[i].prompt if scored else None) for i in range(len(specs))]
    echoes = [served.tokenizer.decode(ids) if body.echo else "" for ids in prompts for _ in range(body.n)]
    model = served.model_id

    def piece(c: Choice, text: str, seen: int, finish: str | None, echoed: bool = False) -> dict[str, Any]:
        entries = (c.prompt_logprobs or []) + c.logprobs[seen:] if echoed else c.logprobs[seen:]
        return {
            "index": c.index,
            "text": text,
            "logprobs": _legacy_logprobs(entries) if body.logprobs is not None else None,
            "finish_reason": finish,
        }

    if not body.stream:
        await _collect(gen, http, lambda e: choices[gen.index[e.id]].add(e))
        _record(served, http, choices, best_of)
        usage = _totals(choices, best_of)  # every sequence generated counts, as with OpenAI's best_of
        out = [piece(c, echoes[c.index] + c.text, 0, c.finish, scored) for c in _best(choices, best_of, body.n)]
        return JSONResponse(schema.envelope(id_, "text_completion", model, out, usage=usage))

    usage_too = bool(body.stream_options and body.stream_options.include_usage)
    extra = {"usage": None} if usage_too else {}

    def chunks(event: Event) -> list[dict[str, Any]]:
        c = choices[gen.index[event.id]]
        seen = len(c.logprobs)
        text = c.add(event).get("content", "")
        out = []
        if scored and event.prompt_logprobs is not None:  # the echo goes first, now that the prompt is scored
            echo = {"index": c.index, "text": echoes[c.index], "finish_reason": None}
            echo["logprobs"] = _legacy_logprobs(c.prompt_logprobs or [])
            out.append(schema.envelope(id_, "text_completion", model, [echo], **extra))
        if text or c.finish is not None or len(c.logprobs) > seen:
            out.append(schema.envelope(id_, "text_completion", model, [piece(c, text, seen, c.finish)], **extra))
        return out

    def closing() -> list[dict[str, Any]]:
        _record(served, http, choices, body.n)
        totals = _totals(choices, body.n)
        return [schema.envelope(id_, "text_completion", model, [], usage=totals)] if usage_too else []

    opening = (
        [schema.envelope(id_, "text_completion", model, [piece(c, echoes[c.index], 0, None)], **extra) for c in choices]
        if body.echo and not scored
        else []
    )
    return StreamingResponse(
        _stream(gen, chunks, opening, closing), media_type="text/event-stream", headers=SSE_HEADERS
    )


def _best(choices: list[Choice], best_of: int, n: int) -> list[Choice]:
    """Of each prompt's `best_of` choices, the `n` of highest mean token log-probability, best first,
    re-indexed prompt * n + rank (all of them, in order, when best_of is n)."""
    if best_of == n:
        return choices

    def score(c: Choice) -> float:
        return sum(e["logprob"] for e in c.logprobs) / max(len(c.logprobs), 1)

    kept = []
    for p in range(len(choices) // best_of):
        group = sorted(choices[p * best_of : (p + 1) * best_of], key=score, reverse=True)[:n]
        for rank, c in enumerate(group):
            c.index = p * n + rank
            kept.append(c)
    return kept


def _legacy_logprobs(entries: list[dict[str, Any]]) -> dict[str, Any]:
    """The completions API's older logprobs shape."""
    offsets, at = [], 0
    for e in entries:
        offsets.append(at)
        at += len(e["token"])
    return {
        "tokens": [e["token"] for e in entries],
        "token_logprobs": [e["logprob"] for e in entries],
        "top_logprobs": [
            None if e["top_logprobs"] is None else {t["token"]: t["logprob"] for t in e["top_logprobs"]}
            for e in entries
        ],
        "text_offset": offsets,
    }
