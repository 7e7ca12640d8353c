"""Batch jobs in files: a .jsonl of requests in, a .jsonl of results out, resumable.

Each input line is {"prompt": "..."} or {"messages": [...]} (rendered with the chat template), with
an optional "id" and any generation settings of its own ("max_tokens", "temp", "top_p", "top_k",
"min_p", "repetition_penalty", "repetition_context_size", "seed", "stop"). Each output line is
{"line", "id", "text", "prompt_tokens", "generation_tokens", "finish_reason"}, written as its
request finishes. A line already in the output is not run again.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import UserError, check_types
from .files import jsonl_records
from .generation import BatchResult, GenerationConfig
from .generation.step import check_room
from .tokenizer import Tokenizer, prompt_ids

SETTINGS = {f.name for f in dataclasses.fields(GenerationConfig)} - {"prefill_step_size"}


@dataclass
class Job:
    line: int  # 1-based line number in the prompts file
    id: Any
    ids: list[int]
    config: GenerationConfig


def _job(record: Any, n: int, tok: Tokenizer, base: GenerationConfig, context: int, template: bool) -> Job:
    if not isinstance(record, dict):
        raise UserError("expected a JSON object")
    unknown = sorted(set(record) - SETTINGS - {"prompt", "messages", "id"})
    if unknown:
        raise UserError(f"unknown field(s) {', '.join(unknown)}")
    settings = {k: v for k, v in record.items() if k in SETTINGS}
    check_types(GenerationConfig, settings, "this line")
    config = dataclasses.replace(base, **settings)
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m for m in messages):
            raise UserError('"messages" must be a list of {"role": ..., "content": ...}')
        ids = tok.apply_chat_template(messages, add_generation_prompt=True)
    elif isinstance(record.get("prompt"), str):
        ids = prompt_ids(tok, record["prompt"], None, None if template else False)  # the template, if there is one
    else:
        raise UserError('expected a "prompt" string or a "messages" list')
    check_room(ids, 0, context)
    return Job(n, record.get("id", n), ids, config)


def read_jobs(
    path: Path, tok: Tokenizer, base: GenerationConfig, context: int, chat_template: bool = True
) -> list[Job]:
    """Every request of a prompts file, all checked before any runs; UserError naming the file and line."""
    if not path.is_file():
        raise UserError(f"prompts file {path} not found.")
    jobs = []
    for n, record in jsonl_records(path):
        try:
            jobs.append(_job(record, n, tok, base, context, chat_template))
        except ValueError as e:
            raise UserError(f"{path}, line {n}: {e}") from e
    if not jobs:
        raise UserError(f"{path} has no prompts.")
    return jobs


def done_lines(output: Path) -> set[int]:
    """Input lines an earlier run already wrote results for. A last line cut off by a crash is removed."""
    if not output.exists():
        return set()
    if not output.is_file():
        raise UserError(f"--output {output} is not a file; choose a file path.")
    data = output.read_bytes()
    if data and not data.endswith(b"\n"):  # the unfinished last write of an interrupted run
        data = data[: data.rfind(b"\n") + 1]
        with open(output, "r+b") as f:
            f.truncate(len(data))
    done = set()
    for n, raw in enumerate(data.splitlines(), 1):
        if not raw.strip():
            continue
        try:
            done.add(int(json.loads(raw)["line"]))
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as e:
            raise UserError(f"{output}, line {n} is not a result of ours ({e}); move the file away or fix it.") from e
    return done


def append_result(output: Path, job: Job, result: BatchResult) -> None:
    """One result line, in a single write, flushed to disk before the next."""
    row = {
        "line": job.line,
        "id": job.id,
        "text": result.text,
        "prompt_tokens": result.prompt_tokens,
        "generation_tokens": result.generation_tokens,
        "finish_reason": result.finish_reason,
    }
    with open(output, "a", encoding="utf-8") as f:
        f.write(json.dumps(row, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
