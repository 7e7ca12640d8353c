"""Tool calls in Qwen2.5's format: `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>` blocks in the
model's text become OpenAI `tool_calls`, also while streaming; and the grammar that forces one call.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

from ..generation.text import held_back
from .schema import Message, Tool

OPEN, CLOSE = "<tool_call>", "</tool_call>"


class ToolCallParser:
    """Feed the streamed text; get back plain text pieces and parsed calls, in order.

    Text that could be the start of `<tool_call>` is held back until it is known not to be; a block
    whose body is not a JSON call comes back as text, unchanged. Whitespace next to calls is dropped.
    """

    def __init__(self) -> None:
        self.buffer, self.inside, self.space = "", False, ""
        self.text_since_call = False
        self.calls: list[dict[str, Any]] = []

    def feed(self, text: str, final: bool = False) -> list[tuple[str, Any]]:
        """[("text", str) | ("call", OpenAI tool call dict), ...] for what `text` completes."""
        self.buffer += text
        out: list[tuple[str, Any]] = []
        while True:
            if self.inside:
                end = self.buffer.find(CLOSE)
                if end < 0:
                    if final:
                        self._text(out, OPEN + self.buffer)
                        self.buffer = ""
                    break
                body, self.buffer, self.inside = self.buffer[:end], self.buffer[end + len(CLOSE) :], False
                call = parse_call(body)
                if call is None:
                    self._text(out, OPEN + body + CLOSE)
                else:
                    self.space, self.text_since_call = "", False
                    self.calls.append(call)
                    out.append(("call", call))
                continue
            start = self.buffer.find(OPEN)
            if start >= 0:
                self._text(out, self.buffer[:start])
                self.buffer, self.inside = self.buffer[start + len(OPEN) :], True
                continue
            keep = 0 if final else held_back(self.buffer, [OPEN])
            self._text(out, self.buffer[: len(self.buffer) - keep])
            self.buffer = self.buffer[len(self.buffer) - keep :]
            break
        if final and self.space and not self.calls:
            out.append(("text", self.space))
            self.space = ""
        return out

    def _text(self, out: list[tuple[str, Any]], text: str) -> None:
        """Emit text, holding trailing whitespace until more text comes (dropped if a call comes first)."""
        if self.calls and not self.text_since_call:
            text = text.lstrip()  # whitespace right after a call
        body = text.rstrip()
        if not body:
            self.space += text
            return
        out.append(("text", self.space + body))
        self.space, self.text_since_call = text[len(body) :], True


def parse_call(body: str) -> dict[str, Any] | None:
    """An OpenAI tool call from the JSON inside one block; None if it is not one."""
    try:
        value = json.loads(body)
    except json.JSONDecodeError:
        return None
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        return None
    arguments = value.get("arguments", {})
    if not isinstance(arguments, str):
        arguments = json.dumps(arguments, ensure_ascii=False)
    return {
        "id": f"call_{uuid.uuid4().hex[:24]}",
        "type": "function",
        "function": {"name": value["name"], "arguments": arguments},
    }


def template_messages(messages: list[Message]) -> list[dict[str, Any]]:
    """Messages as the chat template reads them: text content, and tool-call arguments as objects.

    Raises ValueError (a 400) for an assistant tool call whose arguments are not a JSON object."""
    out = []
    for m in messages:
        item: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
        if m.name is not None:
            item["name"] = m.name
        if m.tool_call_id is not None:
            item["tool_call_id"] = m.tool_call_id
        if m.tool_calls:
            item["tool_calls"] = [_template_call(call.function.name, call.function.arguments) for call in m.tool_calls]
        out.append(item)
    return out


def _template_call(name: str, arguments: str) -> dict[str, Any]:
    try:
        parsed = json.loads(arguments) if arguments else {}
    except json.JSONDecodeError as e:
        raise ValueError(f"tool call {name!r}: arguments are not JSON ({e.msg})") from e
    return {"type": "function", "function": {"name": name, "arguments": parsed}}


def forced_call_grammar(tools: list[Tool], name: str | None = None, tag_tokens: bool = False) -> str:
    """A Lark grammar (llguidance's dialect) for exactly one call block: to the named tool, or to any.

    With `tag_tokens` (the tokenizer has `<tool_call>` and `</tool_call>` as tokens of their own, as
    Qwen2.5's does), the tags are those tokens, which llguidance names like special tokens; otherwise text.
    """
    chosen = [t for t in tools if name is None or t.function.name == name]
    if not chosen:
        raise ValueError(f"tool_choice names {name!r}, which is not among the tools")
    schemas = [
        {
            "type": "object",
            "properties": {
                "name": {"const": t.function.name},
                "arguments": t.function.parameters or {"type": "object"},
            },
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for t in chosen
    ]
    schema = schemas[0] if len(schemas) == 1 else {"anyOf": schemas}
    schema = {**schema, "x-guidance": {"whitespace_flexible": False}}  # compact JSON, as Qwen writes it
    open_, close = (OPEN, CLOSE) if tag_tokens else (json.dumps(OPEN), json.dumps(CLOSE))
    return f'start: {open_} "\\n" call "\\n" {close}\ncall: %json {json.dumps(schema)}\n'
