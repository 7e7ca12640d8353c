"""The HTTP routes: an OpenAI-compatible API over one loaded model and its batching engine.

`create_app` takes a model already loaded; nothing a request names is ever loaded. Routes validate
(pydantic, in schema.py), hand the work to completions.py, and turn every user error into OpenAI's
error shape; anything else is a bug, logged with its traceback and answered with a plain 500.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

import mlx.core as mx
from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException
from starlette.requests import Request as HttpRequest
from starlette.responses import JSONResponse, Response

from ..cache.config import CacheConfig
from ..cache.prefix import PrefixCache
from ..generation.batch import Engine, Request
from ..generation.grammar import Grammars
from ..generation.speculative import SpeculativeConfig
from ..models import Model
from ..tokenizer import Tokenizer
from . import schema
from .completions import chat, complete
from .guard import Guard
from .metrics import CONTENT_TYPE, Metrics
from .plan import Served, Spec, check_token_ids, request_of
from .runner import EngineRunner, follow
from .schema import ApiError
from .settings import ServerSettings
from .tools import template_messages

log = logging.getLogger("mlx_qwen2.server")
T = TypeVar("T", bound=BaseModel)


def engine_parts(
    model: Model,
    tokenizer: Tokenizer,
    settings: ServerSettings,
    draft: Model | None = None,
    cache_config: CacheConfig | None = None,
) -> tuple[Callable[[], Engine], Callable[[Any], Request], Grammars]:
    """A fresh engine (with the server's prefix cache, unless the cache is bounded or quantized), a request
    spec (or its JSON) -> its Request, and the grammars the specs' constrained output compiles with."""
    cache_config = cache_config or CacheConfig()
    prefix = None
    if settings.prefix_cache_entries and cache_config.plain:
        prefix = PrefixCache(settings.prefix_cache_entries, int(settings.prefix_cache_gb * 1e9))
    grammars = Grammars(tokenizer, model.args.vocab_size)

    def make_engine() -> Engine:
        return Engine(
            model, tokenizer, settings.max_concurrency, prefix_cache=prefix, draft=draft, cache_config=cache_config
        )

    def build(spec: Spec | dict[str, Any]) -> Request:
        return request_of(grammars, spec if isinstance(spec, Spec) else Spec.from_json(spec))

    return make_engine, build, grammars


def follow_engine(
    model: Model,
    tokenizer: Tokenizer,
    settings: ServerSettings,
    group: mx.distributed.Group,
    cache_config: CacheConfig | None = None,
) -> None:
    """A rank other than 0 of a server split over processes: take rank 0's engine steps until it stops."""
    make_engine, build, _ = engine_parts(model, tokenizer, settings, cache_config=cache_config)
    follow(make_engine, build, group)


def create_app(
    model: Model,
    tokenizer: Tokenizer,
    settings: ServerSettings,
    model_id: str,
    draft: Model | None = None,
    speculative: SpeculativeConfig | None = None,
    group: mx.distributed.Group | None = None,
    cache_config: CacheConfig | None = None,
) -> FastAPI:
    """The ASGI app; its lifespan starts and stops the engine thread. `draft` and `speculative` are the
    speculative decoding every request gets by default (while it runs alone). With a `group` (the model
    split over processes), the other ranks run `follow_engine`. `cache_config` bounds or quantizes the
    batch's KV cache (then without the prefix cache and speculation: neither works on those kinds)."""
    cache_config = cache_config or CacheConfig()
    make_engine, build, grammars = engine_parts(model, tokenizer, settings, draft, cache_config)
    runner = EngineRunner(make_engine, settings.max_concurrency + settings.max_queue, build, group)
    metrics = Metrics(runner)
    served = Served(
        model,
        tokenizer,
        runner,
        grammars,
        settings,
        metrics,
        model_id,
        speculative,
        draft is not None,
        cache_config.plain,
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        runner.start()
        yield
        runner.stop()

    app = FastAPI(title="mlx_qwen2", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.served = served
    _add_routes(app, served)
    _add_error_handlers(app)
    if settings.allowed_origins:
        app.add_middleware(
            CORSMiddleware, allow_origins=settings.allowed_origins, allow_methods=["*"], allow_headers=["*"]
        )
    app.add_middleware(Guard, api_key=settings.api_key, max_body_bytes=settings.max_body_bytes, metrics=metrics)
    return app


def _add_routes(app: FastAPI, served: Served) -> None:
    created = int(time.time())

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": served.model_id, "active_sequences": served.runner.active}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        card = {"id": served.model_id, "object": "model", "created": created, "owned_by": "mlx_qwen2"}
        return {"object": "list", "data": [card]}

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(served.metrics.render(), media_type=CONTENT_TYPE)

    @app.post("/v1/chat/completions")
    async def chat_completions(http: HttpRequest) -> Response:
        return await chat(served, await _body(http, schema.ChatRequest), http)

    @app.post("/v1/completions")
    async def completions(http: HttpRequest) -> Response:
        return await complete(served, await _body(http, schema.CompletionRequest), http)

    @app.post("/tokenize")
    async def tokenize(http: HttpRequest) -> dict[str, Any]:
        body = await _body(http, schema.TokenizeRequest)
        served.check_model(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise ApiError(400, "give either prompt or messages", param="prompt")
        if body.messages is not None:
            try:
                messages = template_messages(body.messages)
            except ValueError as e:
                raise ApiError(400, str(e), param="messages") from e
            ids = served.tokenizer.apply_chat_template(messages, add_generation_prompt=body.add_generation_prompt)
        else:
            ids = served.tokenizer.encode(body.prompt)
        return {"tokens": ids, "count": len(ids), "max_model_len": served.model.args.context_length}

    @app.post("/detokenize")
    async def detokenize(http: HttpRequest) -> dict[str, Any]:
        body = await _body(http, schema.DetokenizeRequest)
        served.check_model(body.model)
        check_token_ids(body.tokens, served.model.args.vocab_size, "tokens")
        return {"prompt": served.tokenizer.decode(body.tokens)}


async def _body(http: HttpRequest, model: type[T]) -> T:
    """The JSON body as `model`, whatever Content-Type the client sent; ApiError (400) naming the first bad field."""
    try:
        return model.model_validate_json(await http.body())
    except ValidationError as e:
        first = e.errors()[0]
        if first["type"] == "json_invalid":
            raise ApiError(
                400, f"the body is not valid JSON: {first.get('ctx', {}).get('error', first['msg'])}"
            ) from None
        where = ".".join(str(p) for p in first["loc"] if not _is_union_branch(p))
        raise ApiError(400, f"{where or 'body'}: {first['msg']}", param=where or None) from None


def _is_union_branch(part: object) -> bool:
    """pydantic names the union member it tried (`str`, `list[TextPart]`); a field path reads better without."""
    return isinstance(part, str) and (
        part in {"str", "int", "float", "bool", "dict", "list"} or "[" in part or part[:1].isupper()
    )


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: HttpRequest, e: ApiError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: HttpRequest, e: RequestValidationError) -> JSONResponse:
        first = e.errors()[0] if e.errors() else {}
        where = [str(p) for p in first.get("loc", ()) if p != "body"]
        if first.get("type") == "json_invalid":
            message, param = f"the body is not valid JSON: {first.get('ctx', {}).get('error', '')}", None
        else:
            message = f"{'.'.join(where) or 'body'}: {first.get('msg', 'invalid')}"
            param = ".".join(where) or None
        return JSONResponse(schema.error_body(message, "invalid_request_error", param), status_code=400)

    @app.exception_handler(HTTPException)
    async def http_error(request: HttpRequest, e: HTTPException) -> JSONResponse:
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return JSONResponse(schema.error_body(str(e.detail), kind), status_code=e.status_code)

    @app.exception_handler(Exception)
    async def bug(request: HttpRequest, e: Exception) -> JSONResponse:
        log.exception("internal error on %s", request.url.path)
        return JSONResponse(
            schema.error_body("internal server error; see the server log", "server_error"), status_code=500
        )
