"""Calibration token sequences for GPTQ: from a user's .txt / .jsonl file, or the fixed sample we ship.

The shipped sample is a versioned file that never changes once released (a new sample gets
a new version), so the same command calibrates the same model whatever the package's code.
`calibration-v1.txt`: mixed text (prose, Q&A, math, Chinese, SQL, JSON) followed by Python
source (a frozen copy of mlx_qwen2 0.1.0's modules), 16,389 tokens of the Qwen2 tokenizer.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import UserError
from ..files import jsonl_records
from ..tokenizer import Tokenizer

SAMPLE = Path(__file__).with_name("calibration-v1.txt")
DEFAULT_TOKENS = 4096
SEQUENCE_LENGTH = 512


def _read_texts(path: Path) -> list[str]:
    if path.suffix != ".jsonl":
        try:
            return [path.read_text(encoding="utf-8")]
        except UnicodeDecodeError as e:
            raise UserError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8.") from e
    texts = []
    for n, record in jsonl_records(path):
        if not isinstance(record, dict) or "text" not in record:
            raise UserError(f'{path}, line {n}: expected a JSON object with a "text" field.')
        if not isinstance(record["text"], str):
            raise UserError(f'{path}, line {n}: "text" must be a string.')
        texts.append(record["text"])
    return texts


def calibration_ids(
    tokenizer: Tokenizer, path: str | Path | None = None, n_tokens: int = DEFAULT_TOKENS, seq_len: int = SEQUENCE_LENGTH
) -> list[list[int]]:
    """Sequences of `seq_len` tokens, `n_tokens` in all, from a .txt or .jsonl ({"text": ...} lines) file or the sample."""
    if path is not None and not Path(path).is_file():
        raise UserError(f"calibration data {path} not found.")
    texts = _read_texts(Path(path) if path is not None else SAMPLE)
    ids = [t for text in texts for t in tokenizer.encode(text)][:n_tokens]
    if len(ids) < seq_len:
        raise UserError(f"calibration data has {len(ids)} tokens; give at least {seq_len}.")
    return [ids[i : i + seq_len] for i in range(0, len(ids) - seq_len + 1, seq_len)]
