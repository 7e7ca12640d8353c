"""Training data: jsonl files -> token sequences with loss masks -> padded batches.

Each line is {"text": ...}, {"messages": [...]} (rendered with the chat template)
or {"prompt": ..., "completion": ...}. With `mask_prompt`, the loss covers only
completions and every assistant turn. Knows nothing of models or training.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from ..errors import UserError
from ..files import jsonl_records
from ..tokenizer import Tokenizer


@dataclass
class Example:
    tokens: list[int]
    weights: list[int]  # 1 where the next-token loss counts, per position of `tokens`


def _spans_of_messages(tok: Tokenizer, messages: list[dict[str, Any]]) -> Example:
    """Tokens of a conversation, with loss weights on every assistant turn."""
    tokens = tok.apply_chat_template(messages, add_generation_prompt=False)
    weights = [0] * len(tokens)
    for i, m in enumerate(messages):
        if m.get("role") != "assistant":
            continue
        start = len(tok.apply_chat_template(messages[:i], add_generation_prompt=True))
        end = len(tok.apply_chat_template(messages[: i + 1], add_generation_prompt=False))
        weights[start:end] = [1] * (end - start)
    return Example(tokens, weights)


def encode_line(tok: Tokenizer, record: Any, mask_prompt: bool) -> Example:
    """One jsonl record -> tokens and loss weights; raises UserError describing a malformed record."""
    if not isinstance(record, dict):
        raise UserError("expected a JSON object")
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not all(
            isinstance(m, dict) and "role" in m and "content" in m for m in messages
        ):
            raise UserError('"messages" must be a list of {"role": ..., "content": ...}')
        ex = _spans_of_messages(tok, messages)
    elif "prompt" in record and "completion" in record:
        if not isinstance(record["prompt"], str) or not isinstance(record["completion"], str):
            raise UserError('"prompt" and "completion" must be strings')
        if tok.chat_template:
            msgs = [
                {"role": "user", "content": record["prompt"]},
                {"role": "assistant", "content": record["completion"]},
            ]
            ex = _spans_of_messages(tok, msgs)
        else:
            prompt = tok.encode(record["prompt"])
            tokens = prompt + tok.encode(record["completion"]) + sorted(tok.eos_token_ids)[:1]
            ex = Example(tokens, [0] * len(prompt) + [1] * (len(tokens) - len(prompt)))
    elif "text" in record:
        if not isinstance(record["text"], str):
            raise UserError('"text" must be a string')
        tokens = tok.encode(record["text"]) + sorted(tok.eos_token_ids)[:1]
        ex = Example(tokens, [1] * len(tokens))
    else:
        raise UserError('expected a "text", "messages" or "prompt" + "completion" field')
    if not mask_prompt:
        ex.weights = [1] * len(ex.tokens)
    return ex


def load_jsonl(path: Path, tok: Tokenizer, mask_prompt: bool) -> list[Example]:
    """Every line of a file, or a UserError naming the file and line of the first bad one."""
    if not path.is_file():
        raise UserError(f"{path} not found.")
    examples = []
    for n, record in jsonl_records(path):
        try:
            examples.append(encode_line(tok, record, mask_prompt))
        except ValueError as e:
            raise UserError(f"{path}, line {n}: {e}") from e
    if not examples:
        raise UserError(f"{path} has no examples.")
    return examples


def load_splits(
    folder: Path, tok: Tokenizer, splits: tuple[str, ...], mask_prompt: bool, max_len: int, pack_train: bool = False
) -> tuple[dict[str, list[Example]], dict[str, int]]:
    """`{split}.jsonl` of a folder, each checked whole, packed (train, if asked) and cut to `max_len` tokens.

    Returns the examples by split and how many sequences of each split were cut. A missing
    valid.jsonl is allowed (no validation); any other missing split is an error.
    """
    out, cut = {}, {}
    for split in splits:
        path = Path(folder) / f"{split}.jsonl"
        if split == "valid" and not path.is_file():
            continue
        examples = load_jsonl(path, tok, mask_prompt)
        if pack_train and split == "train":
            examples = pack(examples, max_len)
        cut[split] = truncate(examples, max_len)
        out[split] = examples
    return out, cut


def truncate(examples: list[Example], max_len: int) -> int:
    """Cut sequences to max_len tokens in place; returns how many were cut."""
    cut = 0
    for ex in examples:
        if len(ex.tokens) > max_len:
            ex.tokens, ex.weights = ex.tokens[:max_len], ex.weights[:max_len]
            cut += 1
    return cut


def pack(examples: list[Example], max_len: int) -> list[Example]:
    """Concatenate examples and cut the stream into max_len chunks (for text data: no padding wasted)."""
    tokens = [t for ex in examples for t in ex.tokens]
    weights = [w for ex in examples for w in ex.weights]
    return [Example(tokens[i : i + max_len], weights[i : i + max_len]) for i in range(0, len(tokens) - 1, max_len)]


def batch_order(examples: list[Example], batch_size: int, seed: int | None) -> list[list[int]]:
    """Groups of example indices of similar lengths; shuffled (as groups) by `seed`, in length order if None."""
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].tokens))
    groups = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    if seed is not None:
        np.random.default_rng(seed).shuffle(groups)
    return groups


def make_batch(examples: list[Example], group: list[int]) -> tuple[mx.array, mx.array]:
    """(tokens (B, L), weights (B, L)), right-padded with weight 0."""
    width = max(len(examples[i].tokens) for i in group)
    tokens = np.zeros((len(group), width), np.int32)
    weights = np.zeros((len(group), width), np.float32)
    for row, i in enumerate(group):
        ex = examples[i]
        tokens[row, : len(ex.tokens)] = ex.tokens
        weights[row, : len(ex.weights)] = ex.weights
    return mx.array(tokens), mx.array(weights)


def batches(examples: list[Example], batch_size: int) -> Iterator[tuple[mx.array, mx.array]]:
    """All examples once, in length order (for evaluation)."""
    for group in batch_order(examples, batch_size, None):
        yield make_batch(examples, group)


def training_batches(
    examples: list[Example], batch_size: int, seed: int, skip: int = 0, shard: tuple[int, int] = (0, 1)
) -> Iterator[tuple[mx.array, mx.array]]:
    """Endless epochs, each shuffled by (seed, epoch); `skip` drops the first batches (for resuming).
    `shard` (rank, ranks): this rank's share of each batch (data parallel)."""
    epoch, n = 0, 0
    rank, ranks = shard
    while True:
        for group in batch_order(examples, batch_size, seed + epoch):
            if n >= skip:
                share = group[rank::ranks]
                if share:
                    yield make_batch(examples, share)
                else:  # a short last batch, fewer examples than ranks: this rank adds nothing to it
                    tokens, weights = make_batch(examples, group[:1])
                    yield tokens, mx.zeros_like(weights)
            n += 1
        epoch += 1
