"""The training loop: loss, schedule, accumulation, clipping, evaluation, checkpoints.

No argument parsing and no printing: progress is reported through a callback,
and checkpoints are written through a `save` function the caller provides.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map

from ..backends.metal import wired_limit
from ..errors import UserError
from .data import Example, batches, training_batches


@dataclass
class TrainConfig:
    """Training settings; `python -m mlx_qwen2.lora` builds its flags from these fields."""

    batch_size: int = field(default=4, metadata={"help": "sequences per step"})
    iters: int = field(default=600, metadata={"help": "optimizer steps"})
    learning_rate: float = field(default=1e-5, metadata={"help": "peak learning rate"})
    warmup: int = field(default=0, metadata={"help": "linear warmup steps"})
    cosine_decay: bool = field(default=True, metadata={"help": "cosine decay to 10% of the peak after warmup"})
    optimizer: str = field(default="adamw", metadata={"help": "adamw, adam or sgd"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    grad_accumulation: int = field(default=1, metadata={"help": "batches per optimizer step"})
    grad_clip: float = field(default=0.0, metadata={"help": "clip the gradient norm to this; 0 disables"})
    grad_checkpoint: bool = field(default=False, metadata={"help": "recompute layer activations in backward"})
    steps_per_report: int = field(default=10, metadata={"help": "steps between train-loss reports"})
    steps_per_eval: int = field(default=200, metadata={"help": "steps between validation runs"})
    val_batches: int = field(default=25, metadata={"help": "validation batches per run; -1 for all"})
    save_every: int = field(default=100, metadata={"help": "steps between checkpoints"})
    early_stop: int = field(default=0, metadata={"help": "stop after this many evaluations without improvement"})
    seed: int = field(default=0, metadata={"help": "random seed"})

    def __post_init__(self) -> None:
        if self.optimizer not in ("adamw", "adam", "sgd"):
            raise UserError(f"optimizer must be adamw, adam or sgd, got {self.optimizer!r}")
        for name in ("batch_size", "iters", "grad_accumulation", "steps_per_report", "steps_per_eval", "save_every"):
            if getattr(self, name) < 1:
                raise UserError(f"{name.replace('_', '-')} must be at least 1")


def loss_fn(model: nn.Module, tokens: mx.array, weights: mx.array) -> tuple[mx.array, mx.array]:
    """Mean next-token cross-entropy over weighted positions; returns (loss, weighted token count)."""
    logits = model(tokens[:, :-1]).astype(mx.float32)
    w = weights[:, 1:]
    ce = nn.losses.cross_entropy(logits, tokens[:, 1:]) * w
    n = w.sum()
    return ce.sum() / mx.maximum(n, 1), n


def make_optimizer(cfg: TrainConfig) -> optim.Optimizer:
    """The optimizer with its schedule: linear warmup, then constant or cosine decay to 10% of the peak."""
    peak = cfg.learning_rate
    schedule: Callable | float = peak
    if cfg.cosine_decay:
        schedule = optim.cosine_decay(peak, max(cfg.iters - cfg.warmup, 1), peak * 0.1)
    if cfg.warmup:
        after = schedule if callable(schedule) else optim.linear_schedule(peak, peak, 1)  # constant
        schedule = optim.join_schedules([optim.linear_schedule(0.0, peak, cfg.warmup), after], [cfg.warmup])
    if cfg.optimizer == "adamw":
        return optim.AdamW(learning_rate=schedule, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adam":
        return optim.Adam(learning_rate=schedule)
    return optim.SGD(learning_rate=schedule)


@functools.cache
def _checkpointed_class(cls: type) -> type:
    """A subclass of a layer class whose forward pass is recomputed in the backward pass."""

    def __call__(self: nn.Module, *args: Any) -> mx.array:
        def inner(params: dict, *inputs: Any) -> mx.array:
            self.update(params)
            return cls.__call__(self, *inputs)

        return mx.checkpoint(inner)(self.trainable_parameters(), *args)

    return type(f"Checkpointed{cls.__name__}", (cls,), {"__call__": __call__})


@contextmanager
def gradient_checkpointing(model: nn.Module) -> Iterator[None]:
    """Within the block, recompute each decoder layer's activations in the backward pass instead of keeping them.

    Only this model's layers change (their class is swapped for a checkpointed subclass), and
    only until the block ends; parameter names, and so saved adapters, stay the same.
    """
    layers = list(model.layers)
    classes = [type(layer) for layer in layers]
    for layer, cls in zip(layers, classes):
        layer.__class__ = _checkpointed_class(cls)
    try:
        yield
    finally:
        for layer, cls in zip(layers, classes):
            layer.__class__ = cls


def evaluate(model: nn.Module, examples: list[Example], batch_size: int, max_batches: int = -1) -> float:
    """Mean loss per weighted token."""
    total, count = 0.0, 0.0
    for i, (tokens, weights) in enumerate(batches(examples, batch_size)):
        if 0 <= max_batches <= i:
            break
        loss, n = loss_fn(model, tokens, weights)
        total += float(loss * n)
        count += float(n)
    return total / max(count, 1.0)


@dataclass
class Report:
    step: int
    train_loss: float | None = None
    val_loss: float | None = None
    learning_rate: float = 0.0
    iters_per_sec: float = 0.0
    tokens_per_sec: float = 0.0
    peak_memory_gb: float = 0.0
    trained_tokens: int = 0


def make_step(
    model: nn.Module, optimizer: optim.Optimizer, cfg: TrainConfig, group: mx.distributed.Group | None = None
) -> Callable[[Iterator], tuple[float, float]]:
    """One optimizer step over `cfg.grad_accumulation` batches of an iterator; returns (mean loss, weighted tokens).

    With a `group` (data parallel), each rank's batches are its share of the global ones, and each batch's
    loss and gradient are the token-weighted means over the ranks: what one process computes on the
    global batch."""
    value_and_grad = nn.value_and_grad(model, loss_fn)
    state = [model.state, optimizer.state, mx.random.state]

    def step(data: Iterator[tuple[mx.array, mx.array]]) -> tuple[float, float]:
        grads, total, count = None, mx.array(0.0), mx.array(0.0)
        for _ in range(cfg.grad_accumulation):
            tokens, weights = next(data)
            (loss, n), g = value_and_grad(model, tokens, weights)
            if group is not None:
                (loss, n), g = _over_ranks(loss, n, g, group)
            grads = g if grads is None else tree_map(mx.add, grads, g)
            total, count = total + loss * n, count + n
        if cfg.grad_accumulation > 1:
            grads = tree_map(lambda x: x / cfg.grad_accumulation, grads)
        if cfg.grad_clip > 0:
            grads, _ = optim.clip_grad_norm(grads, cfg.grad_clip)
        optimizer.update(model, grads)
        mx.eval(state, total, count)
        return float(total / mx.maximum(count, 1)), float(count)

    return step


def _over_ranks(loss: mx.array, n: mx.array, grads: Any, group: mx.distributed.Group) -> tuple[tuple, Any]:
    """Token-weighted means over the ranks of each rank's mean loss and gradient; the total token count."""
    total = mx.distributed.all_sum(n, group=group)
    loss = mx.distributed.all_sum(loss * n, group=group) / total
    grads = tree_map(lambda g: mx.distributed.all_sum(g * n, group=group) / total, grads)
    return (loss, total), grads


class _Window:
    """Training steps since the last report: their losses, tokens and time."""

    def __init__(self) -> None:
        self.trained = 0
        self.restart()

    def restart(self) -> None:
        self.losses: list[float] = []
        self.tokens, self.tic = 0.0, time.perf_counter()

    def add(self, loss: float, tokens: float) -> None:
        self.losses.append(loss)
        self.tokens += tokens
        self.trained += int(tokens)

    def report(self, step: int, learning_rate: float) -> Report:
        elapsed = time.perf_counter() - self.tic
        r = Report(
            step,
            train_loss=float(np.mean(self.losses)),
            learning_rate=learning_rate,
            iters_per_sec=len(self.losses) / elapsed,
            tokens_per_sec=self.tokens / elapsed,
            peak_memory_gb=mx.get_peak_memory() / 1e9,
            trained_tokens=self.trained,
        )
        self.restart()
        return r


def train(
    model: nn.Module,
    optimizer: optim.Optimizer,
    train_set: list[Example],
    val_set: list[Example] | None,
    cfg: TrainConfig,
    save: Callable[[int, bool], None],
    report: Callable[[Report], None] = lambda r: None,
    start_step: int = 0,
    group: mx.distributed.Group | None = None,
) -> float | None:
    """Train from `start_step` to cfg.iters; `save(step, is_best)` writes a checkpoint. Returns the best val loss.

    With a `group` of processes (data parallel), each takes its share of every batch (`batch_size` must
    divide by the group's size); `save` and `report` are the caller's to call on one rank only."""
    shard = (0, 1) if group is None else (group.rank(), group.size())
    if cfg.batch_size % shard[1]:
        raise UserError(f"--batch-size {cfg.batch_size} must divide by the number of ranks ({shard[1]}).")
    with wired_limit(model), gradient_checkpointing(model) if cfg.grad_checkpoint else nullcontext():
        mx.random.seed(cfg.seed + start_step)
        step_once = make_step(model, optimizer, cfg, group)
        # The same batches in the same order whether or not the run was resumed.
        skip = start_step * cfg.grad_accumulation
        data = training_batches(train_set, cfg.batch_size, cfg.seed, skip=skip, shard=shard)
        best, stale = math.inf, 0
        if val_set and start_step == 0:  # where training starts from, for comparison
            report(Report(0, val_loss=evaluate(model, val_set, cfg.batch_size, cfg.val_batches)))
        window = _Window()
        for step in range(start_step + 1, cfg.iters + 1):
            window.add(*step_once(data))
            if step % cfg.steps_per_report == 0 or step == cfg.iters:
                report(window.report(step, float(optimizer.learning_rate)))
            is_best = False
            if val_set and (step % cfg.steps_per_eval == 0 or step == cfg.iters):
                val = evaluate(model, val_set, cfg.batch_size, cfg.val_batches)
                is_best, stale = (True, 0) if val < best else (False, stale + 1)
                best = min(best, val)
                report(Report(step, val_loss=val, peak_memory_gb=mx.get_peak_memory() / 1e9))
                window.tic = time.perf_counter()  # evaluation time is not training speed
            if step % cfg.save_every == 0 or step == cfg.iters or is_best:
                save(step, is_best)
            if cfg.early_stop and stale >= cfg.early_stop:
                save(step, False)
                break
    return best if best < math.inf else None


def trainable_count(model: nn.Module) -> int:
    return sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
