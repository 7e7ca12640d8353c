"""The OpenAI-compatible HTTP server: routes (app), API schema (schema), tool calls (tools), the engine thread (runner)."""

from .app import create_app
from .settings import ServerSettings

__all__ = ["ServerSettings", "create_app"]
