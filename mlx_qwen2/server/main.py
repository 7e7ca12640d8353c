"""`python -m mlx_qwen2.server`: load one model and serve the OpenAI API on it until SIGINT or SIGTERM.

python -m mlx_qwen2.server --model Qwen/Qwen2.5-0.5B-Instruct [--port 8080] [--api-key KEY]
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

import uvicorn

from ..cache.config import CacheConfig
from ..cli import add_dataclass_args, add_parallel_flag, blas_hint, from_args, join_group, report_errors
from ..errors import UserError
from ..generation.speculative import SpeculativeConfig
from ..loader import DTYPES, load, load_draft, resolve_path
from ..parallel import barrier
from .app import create_app, follow_engine
from .settings import ServerSettings


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m mlx_qwen2.server", description="Serve a Qwen2 model over an OpenAI-compatible HTTP API."
    )
    p.add_argument("--model", required=True, help="local model folder or Hugging Face hub id (the only model served)")
    p.add_argument("--adapter-path", default=None, help="LoRA/DoRA adapters to apply (a folder from mlx_qwen2.lora)")
    p.add_argument("--dtype", choices=list(DTYPES), default=None, help="compute dtype")
    p.add_argument(
        "--fast", action=argparse.BooleanOptionalAction, default=True, help="use the fastest layers for this device"
    )
    p.add_argument(
        "--log-level", choices=["debug", "info", "warning", "error"], default="info", help="server log level"
    )
    add_parallel_flag(p)
    add_dataclass_args(p, ServerSettings)
    add_dataclass_args(p, CacheConfig)
    add_dataclass_args(p, SpeculativeConfig)
    return p


class _Server(uvicorn.Server):
    async def startup(self, sockets: list[Any] | None = None) -> None:
        await super().startup(sockets)
        for s in self.servers:
            for sock in s.sockets:  # the real port, also when --port 0 let the system pick one
                host, port = sock.getsockname()[:2]
                logging.getLogger("mlx_qwen2.server").info(
                    "serving %s on http://%s:%d", self.config.app.state.served.model_id, host, port
                )


@report_errors
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    settings = from_args(ServerSettings, args)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    if settings.host not in ("127.0.0.1", "localhost", "::1") and settings.api_key is None:
        logging.getLogger("mlx_qwen2.server").warning(
            "listening on %s without --api-key: anyone who reaches the port can use it", settings.host
        )
    blas_hint()
    speculative, cache_config = from_args(SpeculativeConfig, args), from_args(CacheConfig, args)
    if speculative.enabled and not cache_config.plain:
        raise UserError("speculative decoding needs the plain cache; drop --max-kv-size and --kv-bits.")
    group = join_group()
    if group is not None and speculative.enabled:
        raise UserError("speculative decoding is not available across ranks (mlx.launch); drop its flags.")
    folder = resolve_path(args.model)
    model, tokenizer = load(
        folder, dtype=args.dtype, adapter_path=args.adapter_path, fast=args.fast, group=group, parallel=args.parallel
    )
    cache_config.check_model(model.args.head_dim)
    if group is not None and group.rank() != 0:  # rank 0 serves HTTP; this rank takes its engine's steps
        follow_engine(model, tokenizer, settings, group, cache_config)
        barrier(group)
        return 0
    draft = load_draft(speculative.draft_model, tokenizer, args.dtype, args.fast)
    name = settings.served_model_name or args.model
    default = speculative if speculative.enabled else None
    app = create_app(model, tokenizer, settings, name, draft, default, group, cache_config)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level="warning",
        access_log=False,  # the guard logs one line per request, with token counts
        timeout_graceful_shutdown=settings.shutdown_timeout,
    )
    server = _Server(config)
    try:
        server.run()
    except SystemExit as e:  # uvicorn exits when the port cannot be bound
        raise UserError(
            f"could not listen on {settings.host}:{settings.port}; is the port in use? (exit {e.code})"
        ) from e
    if group is not None:
        barrier(group)  # the others have stopped with the engine (see generate)
    return 0
