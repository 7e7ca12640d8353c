"""User errors: the one exception class for problems a user can cause and fix, and the type check of settings.

`UserError` is raised where input is checked, with a message that says what to do.
The command-line tools report it (and file-system errors) as one line; any other
exception is a bug and keeps its traceback. It is a `ValueError`, so library callers
may catch either.
"""

from __future__ import annotations

import dataclasses
from typing import Any

# Annotation (as written, `from __future__ import annotations` style) -> accepted types and their name.
_KINDS: dict[str, tuple[tuple[type, ...], str]] = {
    "int": ((int,), "an integer"),
    "float": ((int, float), "a number"),
    "bool": ((bool,), "true or false"),
    "str": ((str,), "a string"),
    "dict[str, Any]": ((dict,), "a mapping"),
    "list[str]": ((list,), "a list of strings"),
    "list[int]": ((list,), "a list of integers"),
}


class UserError(ValueError):
    """Input that cannot be used as given; the message says what to do instead."""


def check_types(cls: type, values: dict[str, Any], source: str) -> None:
    """Raise UserError naming the first value whose type does not fit its field of dataclass `cls`."""
    for f in dataclasses.fields(cls):
        if f.name not in values:
            continue
        value, annotation = values[f.name], str(f.type)
        optional = annotation.endswith(" | None")
        kinds, expected = _KINDS[annotation.removesuffix(" | None")]
        if value is None and optional:
            continue
        wrong_bool = isinstance(value, bool) and bool not in kinds  # True is an int to Python, not to a user
        if wrong_bool or not isinstance(value, kinds):
            raise UserError(f"{source}: {f.name} is {value!r}, but it must be {expected}{' or null' * optional}.")
