"""Text <-> token ids, a streaming detokenizer, and chat templates.

Wraps a `tokenizers.Tokenizer` read from tokenizer.json; the chat template is
the checkpoint's own, rendered with jinja2. Knows nothing of models.
"""

from __future__ import annotations

import codecs
import functools
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as HFTokenizer

from .errors import UserError
from .files import read_json

QWEN2_EOS = ("<|im_end|>", "<|endoftext|>")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table used by byte-level BPE."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


_UNICODE_TO_BYTE = {c: b for b, c in _bytes_to_unicode().items()}


class StreamingDetokenizer:
    """Turns tokens into text pieces, never emitting half a multi-byte character.

    For byte-level BPE, each token maps to its raw bytes and an incremental
    UTF-8 decoder holds back incomplete sequences, so the cost per token is
    constant. The concatenated pieces equal `Tokenizer.decode` of all tokens.
    """

    def __init__(self, tokenizer: Tokenizer):
        self._tok = tokenizer
        self.reset()

    def reset(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.tokens: list[int] = []
        self.text = ""

    def add_token(self, token: int) -> str:
        """Feed one token; return the text it completes (possibly empty)."""
        self.tokens.append(token)
        piece = self._decoder.decode(self._tok.token_bytes(token))
        self.text += piece
        return piece

    def finalize(self) -> str:
        """Flush what is held back (invalid trailing bytes become U+FFFD)."""
        piece = self._decoder.decode(b"", final=True)
        self.text += piece
        return piece


class Tokenizer:
    """Qwen2 tokenizer: encode/decode, EOS ids, chat template."""

    def __init__(
        self,
        tokenizer: HFTokenizer,
        chat_template: str | None = None,
        eos_token_ids: Iterable[int] = (),
        special_tokens: dict[str, str] | None = None,
    ):
        self._tokenizer = tokenizer
        self.chat_template = chat_template
        self.eos_token_ids = set(eos_token_ids)
        self.special_tokens = special_tokens or {}
        self._added = tokenizer.get_added_tokens_decoder()
        self._special_ids = {i for i, t in self._added.items() if t.special}
        self._byte_level = json.loads(tokenizer.to_str()).get("decoder", {}).get("type") == "ByteLevel"
        self._bytes_cache: dict[int, bytes] = {}

    @classmethod
    def from_folder(cls, folder: str | Path, eos_token_ids: Iterable[int] = ()) -> Tokenizer:
        """Read tokenizer.json, tokenizer_config.json and any chat template file from a folder."""
        folder = Path(folder)
        path = folder / "tokenizer.json"
        if not path.is_file():
            raise UserError(f"{path} not found: the model folder needs a tokenizer.json (fast tokenizer).")
        try:
            tokenizer = HFTokenizer.from_file(str(path))
        except Exception as e:  # the tokenizers library raises a bare Exception for a file it cannot parse
            raise UserError(f"{path} is not a valid tokenizer.json ({e}); re-download or re-convert the model.") from e
        config = read_json(folder / "tokenizer_config.json", missing_ok=True)
        template = config.get("chat_template")
        if (folder / "chat_template.jinja").is_file():
            template = (folder / "chat_template.jinja").read_text()
        if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
            named = {t["name"]: t["template"] for t in template}
            template = named.get("default", next(iter(named.values()), None))
        special = {k: _token_text(config[k]) for k in ("eos_token", "bos_token", "pad_token") if config.get(k)}
        eos = set(eos_token_ids)
        if "eos_token" in special and tokenizer.token_to_id(special["eos_token"]) is not None:
            eos.add(tokenizer.token_to_id(special["eos_token"]))
        if not eos:  # nothing configured: fall back on Qwen2's end tokens
            eos = {i for t in QWEN2_EOS if (i := tokenizer.token_to_id(t)) is not None}
        return cls(tokenizer, template, eos, special)

    @property
    def vocab_size(self) -> int:
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        return self._tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def vocab(self) -> dict[str, int]:
        """Every token (added ones too) and its id."""
        return self._tokenizer.get_vocab(with_added_tokens=True)

    def backend_json(self) -> str:
        """The tokenizer as tokenizer.json text (for libraries that build their own view of it)."""
        return self._tokenizer.to_str()

    def token_to_id(self, token: str) -> int | None:
        return self._tokenizer.token_to_id(token)

    def id_to_token(self, token: int) -> str | None:
        return self._tokenizer.id_to_token(token)

    def token_bytes(self, token: int) -> bytes:
        """The bytes one token contributes to decoded text (special tokens contribute none)."""
        cached = self._bytes_cache.get(token)
        if cached is not None:
            return cached
        if token in self._special_ids:
            data = b""
        elif self._byte_level:
            piece = self._tokenizer.id_to_token(token) or ""
            if token in self._added:
                data = piece.encode()  # added, non-special tokens are stored as plain text
            else:
                data = bytes(_UNICODE_TO_BYTE[c] for c in piece)
        else:
            data = self._tokenizer.decode([token], skip_special_tokens=True).encode()
        self._bytes_cache[token] = data
        return data

    def detokenizer(self) -> StreamingDetokenizer:
        return StreamingDetokenizer(self)

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        tokenize: bool = True,
        **kwargs: Any,
    ) -> list[int] | str:
        """Render messages with the checkpoint's chat template; token ids by default."""
        if not self.chat_template:
            raise UserError("this tokenizer has no chat template; pass plain text instead (--no-chat-template).")
        text = _compile_template(self.chat_template).render(
            messages=messages, add_generation_prompt=add_generation_prompt, **self.special_tokens, **kwargs
        )
        return self.encode(text) if tokenize else text


def prompt_ids(tokenizer: Tokenizer, prompt: str, system: str | None, use_template: bool | None) -> list[int]:
    """The prompt as token ids, through the chat template when asked (or available)."""
    if use_template is None:
        use_template = tokenizer.chat_template is not None
    if not use_template:
        return tokenizer.encode(prompt)
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True)


def check_same_vocab(target: Tokenizer, draft: Tokenizer) -> None:
    """UserError unless a draft model's tokenizer maps every token to the same id as the target's."""
    ours, theirs = target.vocab(), draft.vocab()
    if ours != theirs:
        differ = len(set(ours.items()) ^ set(theirs.items()))
        raise UserError(
            f"the draft model's tokenizer differs from the target's ({differ} token ids differ); "
            "use a draft of the same model family (e.g. Qwen2.5-0.5B-Instruct for Qwen2.5-7B-Instruct)."
        )


def _token_text(value: str | dict[str, Any]) -> str:
    return value["content"] if isinstance(value, dict) else value


def _raise(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


@functools.lru_cache(maxsize=8)
def _compile_template(source: str) -> jinja2.Template:
    """The template, compiled once per source (9-18 ms a compile here: every chat turn and server request
    renders one). The same environment settings as transformers, so templates render identically."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = lambda x, indent=None, **kw: json.dumps(x, ensure_ascii=False, indent=indent)
    env.globals["raise_exception"] = _raise
    return env.from_string(source)
