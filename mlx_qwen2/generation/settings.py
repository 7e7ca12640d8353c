"""Generation settings: one dataclass the CLIs build their flags from, checked on construction."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import UserError
from ..sample import validate_sampling


@dataclass
class GenerationConfig:
    """Generation settings; the CLI's flags and defaults come from these fields."""

    max_tokens: int = field(default=256, metadata={"help": "most tokens to generate", "aliases": ("-m",)})
    temp: float = field(default=0.0, metadata={"help": "sampling temperature; 0 is greedy"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling mass; 1 disables"})
    top_k: int = field(default=0, metadata={"help": "sample among the k most likely tokens; 0 disables"})
    min_p: float = field(default=0.0, metadata={"help": "drop tokens below min-p x the top probability; 0 disables"})
    repetition_penalty: float = field(default=1.0, metadata={"help": "penalty for recent tokens; 1 disables"})
    repetition_context_size: int = field(default=20, metadata={"help": "how many recent tokens are penalised"})
    seed: int | None = field(default=None, metadata={"help": "random seed for sampling", "type": int})
    stop: list[str] = field(default_factory=list, metadata={"help": "stop at this string (repeatable)"})
    prefill_step_size: int = field(default=512, metadata={"help": "prompt tokens processed per chunk"})

    @property
    def sampling(self) -> dict[str, float | int]:
        """The sampler's settings as `sample.probabilities` and speculative decoding take them."""
        return {"temp": self.temp, "top_p": self.top_p, "top_k": self.top_k, "min_p": self.min_p}

    def __post_init__(self) -> None:
        validate_sampling(self.temp, self.top_p, self.top_k, self.min_p, self.repetition_penalty)
        if self.max_tokens < 0:
            raise UserError(f"max-tokens must be >= 0, got {self.max_tokens}")
        if self.prefill_step_size < 1:
            raise UserError(f"prefill-step-size must be >= 1, got {self.prefill_step_size}")
        if self.repetition_context_size < 1:
            raise UserError(f"repetition-context-size must be >= 1, got {self.repetition_context_size}")
