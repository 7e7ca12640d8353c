"""The server's settings: one dataclass the CLI builds its flags from, checked on construction."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import UserError


@dataclass
class ServerSettings:
    """Where the server listens, what a request may ask for, and how much it holds at once."""

    host: str = field(
        default="127.0.0.1", metadata={"help": "address to bind; 0.0.0.0 exposes the server to the network"}
    )
    port: int = field(default=8080, metadata={"help": "TCP port (0 picks a free one)"})
    api_key: str | None = field(default=None, metadata={"help": "require 'Authorization: Bearer KEY'", "type": str})
    served_model_name: str | None = field(
        default=None, metadata={"help": "the model id requests name (default: --model as given)", "type": str}
    )
    max_concurrency: int = field(default=8, metadata={"help": "most sequences decoded together"})
    max_queue: int = field(default=32, metadata={"help": "most sequences waiting for a place; more get 429"})
    max_body_bytes: int = field(default=4 << 20, metadata={"help": "largest request body accepted (413 above)"})
    default_max_tokens: int = field(default=512, metadata={"help": "max_tokens when a request gives none"})
    max_n: int = field(default=8, metadata={"help": "most choices (n) one request may ask for"})
    request_timeout: float = field(default=600.0, metadata={"help": "seconds a request may run (504 after)"})
    keepalive: float = field(default=5.0, metadata={"help": "seconds between keep-alive comments in a silent stream"})
    allowed_origins: list[str] = field(default_factory=list, metadata={"help": "CORS origin to allow (repeatable)"})
    prefix_cache_entries: int = field(default=8, metadata={"help": "prompts kept in the prefix cache; 0 disables it"})
    prefix_cache_gb: float = field(default=2.0, metadata={"help": "most memory the prefix cache holds, in GB"})
    shutdown_timeout: float = field(
        default=10.0, metadata={"help": "seconds to finish running requests on SIGINT/SIGTERM"}
    )

    def __post_init__(self) -> None:
        for name in ("max_concurrency", "max_body_bytes", "default_max_tokens", "max_n"):
            if getattr(self, name) < 1:
                raise UserError(f"{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        for name in ("max_queue", "prefix_cache_entries"):
            if getattr(self, name) < 0:
                raise UserError(f"{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        for name in ("request_timeout", "keepalive", "prefix_cache_gb", "shutdown_timeout"):
            if getattr(self, name) <= 0:
                raise UserError(f"{name.replace('_', '-')} must be > 0, got {getattr(self, name)}")
        if not 0 <= self.port <= 65535:
            raise UserError(f"port must be in 0..65535, got {self.port}")
        if self.api_key is not None and not self.api_key.strip():
            raise UserError("api-key is empty; give a key or leave the flag out")
