"""`python -m mlx_qwen2.lora`: fine-tune with LoRA, DoRA or fully; report test loss.

    python -m mlx_qwen2.lora --model M --train --data DIR [-c config.yaml] [--adapter-path adapters]

Options come from the dataclass defaults, then a YAML/JSON config file (-c), then the command line.
The work is done by `mlx_qwen2.tuner`; this module parses, calls it and prints.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
import yaml

from .cli import add_dataclass_args, blas_hint, join_group, only_rank_zero_prints, report_errors
from .errors import UserError, check_types
from .loader import load
from .parallel import barrier
from .tuner.adapters import (
    DEFAULT_DROPOUT,
    DEFAULT_KEYS,
    DEFAULT_RANK,
    DEFAULT_SCALE,
    FINE_TUNE_TYPES,
    adapter_config,
    load_adapters,
    make_trainable,
)
from .tuner.checkpoint import resume, save_checkpoint
from .tuner.data import load_splits
from .tuner.trainer import Report, TrainConfig, evaluate, make_optimizer, train, trainable_count


@dataclass
class LoraConfig:
    """What to train and on what; the flags and their defaults come from these fields."""

    model: str = field(default="", metadata={"help": "local model folder or hub id"})
    data: str = field(default="data", metadata={"help": "folder with train.jsonl, valid.jsonl, test.jsonl"})
    train: bool = field(default=False, metadata={"help": "train adapters"})
    test: bool = field(default=False, metadata={"help": "report test loss and perplexity"})
    fine_tune_type: str = field(default="lora", metadata={"help": ", ".join(FINE_TUNE_TYPES)})
    num_layers: int = field(default=16, metadata={"help": "adapt the last N layers; -1 for all"})
    keys: str = field(
        default=",".join(DEFAULT_KEYS),
        metadata={
            "help": "comma-separated layers to adapt (default: every dense projection; in MoE layers attention and "
            "the shared expert; add mlp.switch_mlp.gate_proj,... for the experts)"
        },
    )
    rank: int = field(default=DEFAULT_RANK, metadata={"help": "LoRA rank"})
    scale: float = field(default=DEFAULT_SCALE, metadata={"help": "LoRA scale (multiplies B A)"})
    alpha: float = field(default=0.0, metadata={"help": "if set, the scale is alpha / rank (the PEFT convention)"})
    dropout: float = field(default=DEFAULT_DROPOUT, metadata={"help": "dropout on the adapter input"})
    mask_prompt: bool = field(default=False, metadata={"help": "loss on completions / assistant turns only"})
    max_seq_length: int = field(default=2048, metadata={"help": "longer sequences are truncated"})
    pack_sequences: bool = field(default=False, metadata={"help": "pack text examples into full-length rows"})
    adapter_path: str = field(default="adapters", metadata={"help": "where adapters are saved (and loaded for --test)"})
    resume: bool = field(default=False, metadata={"help": "continue from the checkpoint in --adapter-path"})
    test_batches: int = field(default=-1, metadata={"help": "test batches; -1 for all"})

    def __post_init__(self) -> None:
        if self.fine_tune_type not in FINE_TUNE_TYPES:
            raise UserError(f"fine-tune-type must be one of {', '.join(FINE_TUNE_TYPES)}, got {self.fine_tune_type!r}")
        if self.rank < 1:
            raise UserError(f"rank must be at least 1, got {self.rank}")
        if not 0 <= self.dropout < 1:
            raise UserError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.max_seq_length < 2:
            raise UserError(f"max-seq-length must be at least 2, got {self.max_seq_length}")

    @property
    def lora_scale(self) -> float:
        """The scale the adapters use: alpha / rank when alpha is given, else `scale`."""
        return self.alpha / self.rank if self.alpha else self.scale


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mlx_qwen2.lora", description="Fine-tune a Qwen2 model.")
    p.add_argument("-c", "--config", default=None, help="YAML or JSON file with any of the options below")
    add_dataclass_args(p, LoraConfig, suppress=True)
    add_dataclass_args(p, TrainConfig, suppress=True)
    return p


def read_config_file(path: str) -> dict[str, Any]:
    """option: value pairs of a YAML or JSON file, with their names and types checked."""
    file = Path(path)
    if not file.is_file():
        raise UserError(f"config file {path} not found.")
    try:
        values = yaml.safe_load(file.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not valid YAML or JSON ({e}).") from e
    if not isinstance(values, dict):
        raise UserError(f"{path} must hold a mapping of option: value.")
    values = {str(k).replace("-", "_"): v for k, v in values.items()}
    names = {f.name for cls in (LoraConfig, TrainConfig) for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise UserError(f"{path}: unknown option(s) {', '.join(unknown)}.")
    for cls in (LoraConfig, TrainConfig):
        check_types(cls, values, path)
    return values


def read_options(argv: list[str] | None) -> tuple[LoraConfig, TrainConfig]:
    """Dataclass defaults < config file < command line."""
    args = vars(build_parser().parse_args(argv))
    path = args.pop("config")
    values = read_config_file(path) if path else {}
    values.update(args)
    split = lambda cls: {k: v for k, v in values.items() if k in {f.name for f in dataclasses.fields(cls)}}
    return LoraConfig(**split(LoraConfig)), TrainConfig(**split(TrainConfig))


def plot_losses(metrics: Path, out: Path) -> bool:
    """Train and validation loss against step, from metrics.jsonl; False without matplotlib."""
    try:  # optional: pip install 'mlx_qwen2[plot]'. The Figure API needs no backend and changes no global state.
        from matplotlib.figure import Figure
    except ImportError:
        return False
    if not metrics.is_file():
        return False
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    for key, label in (("train_loss", "train"), ("val_loss", "validation")):
        points = [(r["step"], r[key]) for r in rows if key in r]
        if points:
            ax.plot(*zip(*points), marker="o" if key == "val_loss" else None, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out)
    return True


def print_report(r: Report, metrics: Path | None) -> None:
    if r.val_loss is not None:
        print(f"step {r.step}: val loss {r.val_loss:.4f}, val ppl {math.exp(r.val_loss):.3f}", file=sys.stderr)
    else:
        print(
            f"step {r.step}: train loss {r.train_loss:.4f}, lr {r.learning_rate:.3e}, {r.iters_per_sec:.3f} it/s, "
            f"{r.tokens_per_sec:.1f} tok/s, peak mem {r.peak_memory_gb:.3f} GB",
            file=sys.stderr,
        )
    if metrics is not None:
        with open(metrics, "a", encoding="utf-8") as f:
            f.write(json.dumps({k: v for k, v in dataclasses.asdict(r).items() if v is not None}) + "\n")


def run_training(
    cfg: LoraConfig, tcfg: TrainConfig, model: Any, data: dict, folder: Path, group: mx.distributed.Group | None
) -> None:
    keys = tuple(k for k in cfg.keys.split(",") if k)
    config = adapter_config(cfg.fine_tune_type, cfg.num_layers, cfg.rank, cfg.lora_scale, cfg.dropout, keys)
    mx.random.seed(tcfg.seed)  # adapter initialisation is random: make it reproducible
    make_trainable(model, cfg.fine_tune_type, cfg.num_layers, cfg.rank, cfg.lora_scale, cfg.dropout, keys)
    optimizer = make_optimizer(tcfg)
    start = resume(folder, model, optimizer) if cfg.resume else 0
    print(f"trainable parameters: {trainable_count(model):,}", file=sys.stderr)
    model.train()
    writer = group is None or group.rank() == 0  # data parallel: every rank trains, rank 0 writes
    if writer:
        folder.mkdir(parents=True, exist_ok=True)
    metrics = folder / "metrics.jsonl"
    train(
        model,
        optimizer,
        data["train"],
        data.get("valid"),
        tcfg,
        save=lambda step, best: writer and save_checkpoint(folder, model, optimizer, step, best, config),
        report=lambda r: writer and print_report(r, metrics),
        start_step=start,
        group=group,
    )
    model.eval()
    if writer and plot_losses(metrics, folder / "loss.png"):
        print(f"loss curve: {folder / 'loss.png'}", file=sys.stderr)


@report_errors
def main(argv: list[str] | None = None) -> int:
    cfg, tcfg = read_options(argv)
    if not cfg.model:
        raise UserError("--model is required")
    if not (cfg.train or cfg.test):
        raise UserError("nothing to do: pass --train and/or --test")
    folder = Path(cfg.adapter_path)
    if folder.exists() and not folder.is_dir():
        raise UserError(f"--adapter-path {folder} is a file; choose a folder.")
    group = join_group()
    with only_rank_zero_prints(group):
        code = run(cfg, tcfg, folder, group)
    if group is not None:
        barrier(group)  # the ranks leave together (see generate)
    return code


def run(cfg: LoraConfig, tcfg: TrainConfig, folder: Path, group: mx.distributed.Group | None) -> int:
    """Train and/or test; with a group (mlx.launch), data parallel: each rank its share of every batch."""
    blas_hint()
    model, tokenizer = load(cfg.model)
    splits = (("train", "valid") if cfg.train else ()) + (("test",) if cfg.test else ())
    data, cut = load_splits(Path(cfg.data), tokenizer, splits, cfg.mask_prompt, cfg.max_seq_length, cfg.pack_sequences)
    for split, n in cut.items():
        if n:
            print(
                f"warning: {n} of {len(data[split])} {split} sequences were longer than {cfg.max_seq_length} tokens "
                "and were truncated",
                file=sys.stderr,
            )
    if cfg.train:
        run_training(cfg, tcfg, model, data, folder, group)
    elif cfg.test:
        load_adapters(model, folder)
    if cfg.test:
        loss = evaluate(model, data["test"], tcfg.batch_size, cfg.test_batches)
        print(f"test loss {loss:.4f}, test ppl {math.exp(loss):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
