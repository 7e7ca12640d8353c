"""Generation: settings, the model's prefill and decode steps, single-stream generation, and the batching engine."""

from .batch import BatchResult, Engine, Request, batch_generate
from .settings import GenerationConfig
from .speculative import SpeculativeConfig
from .step import generate_step, prefill
from .stream import GenerationResponse, generate, stream_generate
from .text import StopMatcher, TextStream, held_back

__all__ = [
    "BatchResult",
    "Engine",
    "GenerationConfig",
    "GenerationResponse",
    "Request",
    "SpeculativeConfig",
    "StopMatcher",
    "TextStream",
    "batch_generate",
    "generate",
    "generate_step",
    "held_back",
    "prefill",
    "stream_generate",
]
