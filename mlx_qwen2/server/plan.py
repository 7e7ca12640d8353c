"""From an OpenAI request body to engine requests: the prompt's token ids, sampling settings, logits
processors (logit bias, penalties, grammar masks), speculation, and the checks that make them 400s.
Also what the routes share (`Served`). Knows nothing of streaming or of responses.
"""

from __future__ import annotations

import dataclasses
import itertools
import random
from dataclasses import dataclass
from typing import Any

import jinja2

from ..errors import UserError
from ..generation.batch import Request
from ..generation.grammar import Grammars
from ..generation.settings import GenerationConfig
from ..generation.speculative import SpeculativeConfig
from ..generation.step import check_room
from ..models import Model
from ..sample import LogitsProcessor, logit_bias_processor, penalty_processor
from ..tokenizer import Tokenizer
from . import schema
from .metrics import Metrics
from .runner import EngineRunner
from .schema import ApiError
from .settings import ServerSettings
from .tools import CLOSE, OPEN, forced_call_grammar, template_messages


@dataclass
class Served:
    """What the routes share."""

    model: Model
    tokenizer: Tokenizer
    runner: EngineRunner
    grammars: Grammars
    settings: ServerSettings
    metrics: Metrics
    model_id: str
    speculative: SpeculativeConfig | None = None  # the server's default (--prompt-lookup, --draft-model)
    has_draft: bool = False
    plain_cache: bool = True  # False with --max-kv-size or --kv-bits: no speculation then

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.model_id:
            raise ApiError(
                404,
                f"model {name!r} is not served here; this server serves {self.model_id!r}",
                param="model",
                code="model_not_found",
            )


_ids = itertools.count()


@dataclass
class Spec:
    """An engine request as data: what a rank that follows rank 0 (several processes) needs to build the
    same `Request` (the logits processors are built from their inputs, by `request_of`)."""

    prompt: list[int]
    config: GenerationConfig
    id: tuple[str, int]
    logprobs: int | None = None
    speculative: SpeculativeConfig | None = None
    bias: dict[int, float] | None = None
    penalties: tuple[float, float] | None = None  # presence, frequency
    grammar: str | None = None
    prompt_logprobs: int | None = None  # completions' echo with logprobs

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["bias"] = None if self.bias is None else [[k, v] for k, v in self.bias.items()]
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Spec:
        config = GenerationConfig(**d["config"])
        speculative = None if d["speculative"] is None else SpeculativeConfig(**d["speculative"])
        bias = None if d["bias"] is None else {int(k): v for k, v in d["bias"]}
        penalties = None if d["penalties"] is None else tuple(d["penalties"])
        return cls(
            d["prompt"], config, tuple(d["id"]), d["logprobs"], speculative, bias, penalties, d["grammar"],
            d["prompt_logprobs"],
        )  # fmt: skip


def request_of(grammars: Grammars, spec: Spec) -> Request:
    """The engine request a spec describes, its processors built fresh."""
    processors: list[LogitsProcessor] = []
    n = len(spec.prompt)
    if spec.bias:
        processors.append(logit_bias_processor(spec.bias))
    if spec.penalties is not None:
        processors.append(penalty_processor(*spec.penalties, n))
    if spec.grammar is not None:
        processors.append(grammars.processor(spec.grammar, n))
    return Request(
        list(spec.prompt), spec.config, spec.id, processors, spec.logprobs, spec.prompt_logprobs, spec.speculative
    )


def plan(
    served: Served,
    ids: list[int],
    body: schema._Sampling,
    grammar: str | None,
    logprobs: int | None,
    param: str,
    count: int | None = None,
) -> list[Spec]:
    """One engine request per choice (`count` of them, default n), with the body's settings; ApiError for
    what cannot be served."""
    context = served.model.args.context_length
    try:
        check_room(ids, 0, context)
    except UserError as e:
        raise ApiError(400, str(e), param=param, code="context_length_exceeded") from e
    count = count or body.n
    if count > served.settings.max_n:
        raise ApiError(400, f"n is {count}; this server allows at most {served.settings.max_n}", param="n")
    wanted = getattr(body, "max_completion_tokens", None) or body.max_tokens
    wanted = served.settings.default_max_tokens if wanted is None else wanted  # 0: completions scoring a prompt
    bias = _logit_bias(body.logit_bias, served.model.args.vocab_size)
    speculative = _speculative(served, body, constrained=grammar is not None)
    penalties = (
        (body.presence_penalty, body.frequency_penalty) if body.presence_penalty or body.frequency_penalty else None
    )
    specs = []
    for i in range(count):
        seed = None if body.seed is None else body.seed + i
        if seed is None and served.runner.group is not None:  # every rank must draw the same tokens
            seed = random.getrandbits(63)
        config = GenerationConfig(
            max_tokens=min(wanted, context - len(ids)),
            temp=body.temperature,
            top_p=body.top_p,
            top_k=max(body.top_k, 0),
            min_p=body.min_p,
            repetition_penalty=body.repetition_penalty,
            seed=seed,
            stop=body.stops(),
        )
        specs.append(
            Spec(list(ids), config, ("r", next(_ids)), logprobs, speculative, bias or None, penalties, grammar)
        )
    return specs


def _speculative(served: Served, body: schema._Sampling, constrained: bool) -> SpeculativeConfig | None:
    """This request's proposals: its own prompt lookup, the server's default, or none. A grammar's mask
    follows the tokens drawn, not proposals that may be refused: constrained output is decoded plainly;
    so is all output of a server whose cache cannot be rewound (bounded or quantized)."""
    refusal = (
        "speculative decoding cannot be combined with response_format or a required tool call"
        if constrained
        else None
        if served.plain_cache
        else "speculative decoding needs the plain KV cache, and this server bounds or quantizes it"
    )
    if refusal is not None:  # decoded plainly; asking for proposals is a 400
        if body.speculative or body.prompt_lookup is not None:
            raise ApiError(400, refusal, param="prompt_lookup" if body.prompt_lookup is not None else "speculative")
        return None
    if body.speculative is False:
        return None
    default = served.speculative
    most = body.num_draft_tokens or (default.num_draft_tokens if default else SpeculativeConfig().num_draft_tokens)
    if body.prompt_lookup is not None:
        return SpeculativeConfig(num_draft_tokens=most, prompt_lookup=body.prompt_lookup)
    if default is not None and (default.prompt_lookup is not None or served.has_draft):
        return SpeculativeConfig(num_draft_tokens=most, prompt_lookup=default.prompt_lookup)
    if body.speculative:
        raise ApiError(400, "no draft model is loaded: give prompt_lookup (an n-gram size)", param="speculative")
    return None


def _logit_bias(bias: dict[str, float] | None, vocab: int) -> dict[int, float]:
    out = {}
    for key, value in (bias or {}).items():
        if not key.isdigit() or int(key) >= vocab:
            raise ApiError(400, f"logit_bias key {key!r} is not a token id in 0..{vocab - 1}", param="logit_bias")
        out[int(key)] = value
    return out


def response_grammar(served: Served, body: schema._Sampling) -> str | None:
    fmt = body.response_format
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_schema" and fmt.json_schema is None:
        raise ApiError(400, "response_format of type json_schema needs a json_schema object", param="response_format")
    try:
        grammar = served.grammars.json_schema(fmt.json_schema.json_schema if fmt.json_schema else None)
        served.grammars.check(grammar)
    except UserError as e:
        raise ApiError(400, str(e), param="response_format", code="invalid_schema") from e
    return grammar


def chat_prompt(served: Served, body: schema.ChatRequest) -> tuple[list[int], str | None, bool]:
    """(prompt ids, grammar or None, whether to parse tool calls) for a chat request."""
    try:
        messages = template_messages(body.messages)
    except ValueError as e:
        raise ApiError(400, str(e), param="messages") from e
    choice = body.tool_choice or ("auto" if body.tools else "none")
    tools = body.tools if body.tools and choice != "none" else None
    if choice != "none" and not body.tools:
        raise ApiError(400, f"tool_choice {choice!r} needs tools", param="tool_choice")
    grammar = response_grammar(served, body)
    if tools and choice != "auto":
        if grammar is not None:
            raise ApiError(
                400, "response_format and a required tool call cannot both constrain the output", param="tool_choice"
            )
        name = None if choice == "required" else choice.function.name
        try:
            tags = all(served.tokenizer.token_to_id(t) is not None for t in (OPEN, CLOSE))
            grammar = served.grammars.lark(forced_call_grammar(tools, name, tags))
            served.grammars.check(grammar)
        except (ValueError, UserError) as e:
            raise ApiError(400, str(e), param="tools") from e
    kwargs = {"tools": [t.model_dump(exclude_none=True) for t in tools]} if tools else {}
    try:
        ids = served.tokenizer.apply_chat_template(messages, add_generation_prompt=True, **kwargs)
    except (jinja2.TemplateError, TypeError, ValueError) as e:  # a conversation the template refuses
        raise ApiError(400, f"the chat template cannot render these messages: {e}", param="messages") from e
    return ids, grammar, tools is not None


FIM = ("<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>")  # Qwen2.5-Coder's fill-in-the-middle tokens


def fill_in_the_middle(served: Served, prompt: Any, suffix: str) -> list[int]:
    """The ids of Qwen2.5-Coder's fill-in-the-middle prompt: prefix, suffix, then the middle to write."""
    if not isinstance(prompt, str):
        raise ApiError(400, "suffix needs the prompt as text (the code before the gap)", param="prompt")
    ids = [served.tokenizer.token_to_id(t) for t in FIM]
    if None in ids:
        raise ApiError(400, f"this model has no fill-in-the-middle tokens ({', '.join(FIM)})", param="suffix")
    fim_prefix, fim_suffix, fim_middle = ids
    return [fim_prefix, *served.tokenizer.encode(prompt), fim_suffix, *served.tokenizer.encode(suffix), fim_middle]


def completion_prompts(
    served: Served, prompt: str | list[Any], per_prompt: int, suffix: str | None = None
) -> list[list[int]]:
    """The token ids of each prompt of a completion request (one, or a list; with `suffix`, each the prefix
    of a gap to fill); ApiError past max_n sequences (`per_prompt`: n, or best_of)."""
    several = isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list))
    prompts = prompt if several else [prompt]
    if len(prompts) * per_prompt > served.settings.max_n:
        raise ApiError(
            400,
            f"{len(prompts)} prompts x {per_prompt} sequences each is {len(prompts) * per_prompt}; this server "
            f"allows at most {served.settings.max_n}",
            param="prompt",
        )
    out = []
    for p in prompts:
        if suffix is not None:
            out.append(fill_in_the_middle(served, p, suffix))
            continue
        ids = served.tokenizer.encode(p) if isinstance(p, str) else list(p)
        check_token_ids(ids, served.model.args.vocab_size, "prompt")
        out.append(ids)
    return out


def check_token_ids(ids: list[int], vocab: int, param: str) -> None:
    """ApiError (400) naming the first id outside the vocabulary."""
    bad = [t for t in ids if not 0 <= t < vocab]
    if bad:
        raise ApiError(400, f"token id {bad[0]} is outside the vocabulary (0..{vocab - 1})", param=param)
