"""`python -m mlx_qwen2.lora`: fine-tune with LoRA, DoRA or fully; report test loss.

    python -m mlx_qwen2.lora --model M --train --data DIR [-c config.yaml] [--adapter-path adapters]

Options come from the dataclass defaults, then a YAML/JSON config file (-c), then the command line.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import yaml

try:  # optional: a loss-curve PNG when matplotlib is installed (pip install 'mlx_qwen2[plot]')
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
except ImportError:
    plt = None
from mlx.utils import tree_flatten, tree_unflatten

from .adapters import DEFAULT_KEYS, adapter_config, adapter_weights, apply_adapters, load_adapters
from .cli import add_dataclass_args, report_errors
from .data import Example, load_jsonl, pack, truncate
from .loader import load
from .trainer import Report, TrainConfig, evaluate, make_optimizer, train, trainable_count


@dataclass
class LoraConfig:
    """What to train and on what; the flags and their defaults come from these fields."""

    model: str = field(default="", metadata={"help": "local model folder or hub id"})
    data: str = field(default="data", metadata={"help": "folder with train.jsonl, valid.jsonl, test.jsonl"})
    train: bool = field(default=False, metadata={"help": "train adapters"})
    test: bool = field(default=False, metadata={"help": "report test loss and perplexity"})
    fine_tune_type: str = field(default="lora", metadata={"help": "lora, dora or full"})
    num_layers: int = field(default=16, metadata={"help": "adapt the last N layers; -1 for all"})
    keys: str = field(default=",".join(DEFAULT_KEYS), metadata={"help": "comma-separated projections to adapt"})
    rank: int = field(default=8, metadata={"help": "LoRA rank"})
    scale: float = field(default=20.0, metadata={"help": "LoRA scale (multiplies B A)"})
    alpha: float = field(default=0.0, metadata={"help": "if set, scale = alpha / rank (the PEFT convention)"})
    dropout: float = field(default=0.0, metadata={"help": "dropout on the adapter input"})
    mask_prompt: bool = field(default=False, metadata={"help": "loss on completions / assistant turns only"})
    max_seq_length: int = field(default=2048, metadata={"help": "longer sequences are truncated"})
    pack_sequences: bool = field(default=False, metadata={"help": "pack text examples into full-length rows"})
    adapter_path: str = field(default="adapters", metadata={"help": "where adapters are saved (and loaded for --test)"})
    resume: bool = field(default=False, metadata={"help": "continue from the checkpoint in --adapter-path"})
    test_batches: int = field(default=-1, metadata={"help": "test batches; -1 for all"})

    def __post_init__(self) -> None:
        if self.fine_tune_type not in ("lora", "dora", "full"):
            raise ValueError(f"fine-tune-type must be lora, dora or full, got {self.fine_tune_type!r}")
        if self.alpha:
            self.scale = self.alpha / self.rank


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mlx_qwen2.lora", description="Fine-tune a Qwen2 model.")
    p.add_argument("-c", "--config", default=None, help="YAML or JSON file with any of the options below")
    add_dataclass_args(p, LoraConfig, suppress=True)
    add_dataclass_args(p, TrainConfig, suppress=True)
    return p


def read_options(argv: list[str] | None) -> tuple[LoraConfig, TrainConfig]:
    """Dataclass defaults < config file < command line; unknown keys in the file are an error."""
    args = vars(build_parser().parse_args(argv))
    path = args.pop("config")
    values: dict[str, Any] = {}
    if path:
        if not Path(path).is_file():
            raise FileNotFoundError(f"config file {path} not found.")
        values = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(values, dict):
            raise ValueError(f"{path} must hold a mapping of option: value.")
        values = {k.replace("-", "_"): v for k, v in values.items()}
    names = {f.name for cls in (LoraConfig, TrainConfig) for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"{path}: unknown option(s) {', '.join(unknown)}.")
    values.update(args)
    split = lambda cls: {k: v for k, v in values.items() if k in {f.name for f in dataclasses.fields(cls)}}
    return LoraConfig(**split(LoraConfig)), TrainConfig(**split(TrainConfig))


def _atomic_write(path: Path, write: Any) -> None:
    """Write via a temporary file in the same folder: a failure (a full disk) leaves the old file intact."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_checkpoint(
    folder: Path, model: nn.Module, optimizer: optim.Optimizer, step: int, best: bool, config: dict
) -> None:
    """Adapters (+ the best ones), optimizer state and step, each file replaced atomically."""
    folder.mkdir(parents=True, exist_ok=True)
    weights = adapter_weights(model)
    _atomic_write(folder / "adapters.safetensors", lambda p: mx.save_safetensors(p, weights))
    if best:
        _atomic_write(folder / "best_adapters.safetensors", lambda p: mx.save_safetensors(p, weights))
    state = dict(tree_flatten(optimizer.state))
    _atomic_write(folder / "optimizer.safetensors", lambda p: mx.save_safetensors(p, state))
    _atomic_write(
        folder / "adapter_config.json", lambda p: Path(p).write_text(json.dumps({**config, "step": step}, indent=2))
    )


def load_data(cfg: LoraConfig, tokenizer: Any, needed: tuple[str, ...]) -> dict[str, list[Example]]:
    """Every file needed, fully checked before any training starts."""
    out = {}
    for split in needed:
        path = Path(cfg.data) / f"{split}.jsonl"
        if split == "valid" and not path.is_file():
            continue
        examples = load_jsonl(path, tokenizer, cfg.mask_prompt)
        if cfg.pack_sequences and split == "train":
            examples = pack(examples, cfg.max_seq_length)
        cut = truncate(examples, cfg.max_seq_length)
        if cut:
            print(
                f"warning: {cut} of {len(examples)} {split} sequences were longer than {cfg.max_seq_length} tokens and were truncated",
                file=sys.stderr,
            )
        out[split] = examples
    return out


def plot_losses(metrics: Path, out: Path) -> bool:
    """Train and validation loss against step, from metrics.jsonl; False without matplotlib."""
    if plt is None or not metrics.is_file():
        return False
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    fig, ax = plt.subplots(figsize=(7, 4))
    for key, label in (("train_loss", "train"), ("val_loss", "validation")):
        points = [(r["step"], r[key]) for r in rows if key in r]
        if points:
            ax.plot(*zip(*points), marker="o" if key == "val_loss" else None, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
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


@report_errors
def main(argv: list[str] | None = None) -> int:
    cfg, tcfg = read_options(argv)
    if not cfg.model:
        raise ValueError("--model is required")
    if not (cfg.train or cfg.test):
        raise ValueError("nothing to do: pass --train and/or --test")
    model, tokenizer = load(cfg.model)
    data = load_data(cfg, tokenizer, (("train", "valid") if cfg.train else ()) + (("test",) if cfg.test else ()))
    folder = Path(cfg.adapter_path)
    keys = tuple(k for k in cfg.keys.split(",") if k)
    config = adapter_config(cfg.fine_tune_type, cfg.num_layers, cfg.rank, cfg.scale, cfg.dropout, keys)
    if cfg.train:
        mx.random.seed(tcfg.seed)  # adapter initialisation is random: make it reproducible
        if cfg.fine_tune_type == "full":
            model.freeze()
            for layer in model.layers[-cfg.num_layers :] if cfg.num_layers != -1 else model.layers:
                layer.unfreeze()
        else:
            apply_adapters(model, cfg.num_layers, cfg.rank, cfg.scale, cfg.dropout, keys, cfg.fine_tune_type == "dora")
        optimizer = make_optimizer(tcfg)
        start = 0
        if cfg.resume:
            start = resume(folder, model, optimizer)
        print(f"trainable parameters: {trainable_count(model):,}", file=sys.stderr)
        model.train()
        metrics = folder / "metrics.jsonl"
        folder.mkdir(parents=True, exist_ok=True)
        train(
            model,
            optimizer,
            data["train"],
            data.get("valid"),
            tcfg,
            save=lambda step, best: save_checkpoint(folder, model, optimizer, step, best, config),
            report=lambda r: print_report(r, metrics),
            start_step=start,
        )
        model.eval()
        if plot_losses(metrics, folder / "loss.png"):
            print(f"loss curve: {folder / 'loss.png'}", file=sys.stderr)
    elif cfg.test:
        load_adapters(model, folder)
    if cfg.test:
        loss = evaluate(model, data["test"], tcfg.batch_size, cfg.test_batches)
        print(f"test loss {loss:.4f}, test ppl {math.exp(loss):.3f}")
    return 0


def resume(folder: Path, model: nn.Module, optimizer: optim.Optimizer) -> int:
    """Load adapters, optimizer state and step from a checkpoint folder; returns the step."""
    config_path = folder / "adapter_config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"--resume: no checkpoint in {folder}.")
    weights = mx.load(str(folder / "adapters.safetensors"))
    model.load_weights(list(weights.items()), strict=False)
    state = mx.load(str(folder / "optimizer.safetensors"))
    optimizer.init(model.trainable_parameters())
    optimizer.state = tree_unflatten(list(state.items()))
    return int(json.loads(config_path.read_text())["step"])


if __name__ == "__main__":
    sys.exit(main())
