"""Validating a raw config against its schema, with errors a person can act on.

Pydantic's errors become one line that names the key, the problem and, for an unknown key, the
nearest valid one.
"""

from __future__ import annotations

import difflib
from typing import Any, TypeVar, get_args

from pydantic import BaseModel, ValidationError

from align.errors import ConfigError

Model = TypeVar("Model", bound=BaseModel)


def build_config(cls: type[Model], raw: dict[str, Any], where: str) -> Model:
    """Validate `raw` as `cls`; errors become one-line ConfigErrors that start with `where`."""
    try:
        return cls.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(f"{where}: {_describe(cls, exc)}") from None


def _describe(cls: type[BaseModel], exc: ValidationError) -> str:
    errors = exc.errors()
    first = errors[0]
    loc = [str(part) for part in first["loc"] if not str(part).startswith("function-")]
    key = ".".join(loc) or "(top level)"
    if first["type"] == "extra_forbidden":
        valid = fields_at(cls, loc[:-1])
        close = difflib.get_close_matches(loc[-1], valid, n=1, cutoff=0.5)
        hint = f"did you mean {close[0]!r}?" if close else f"valid keys: {', '.join(sorted(valid))}"
        message = f"unknown key {key!r}; {hint}"
    elif first["type"] == "missing":
        message = f"missing required key {key!r}"
    else:
        got = first.get("input")
        shown = f" (got {got!r})" if not isinstance(got, (dict, list)) else ""
        text = first["msg"].removeprefix("Value error, ")
        message = f"{key}: {text}{shown}" if loc else text
    more = len(errors) - 1
    return message + (f" (and {more} more problem{'s' * (more > 1)})" if more else "")


def fields_at(cls: type[BaseModel], loc: list[str]) -> list[str]:
    """The field names of the config block at `loc` inside `cls`."""
    for part in loc:
        if part.isdigit():  # an item of a list block
            continue
        field = cls.model_fields.get(part)
        block = model_in(getattr(field, "annotation", None))
        if block is None:
            return []
        cls = block
    return list(cls.model_fields)


def model_in(annotation: Any) -> type[BaseModel] | None:
    """The config block inside an annotation: X, list[X] or X | None."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in get_args(annotation):
        found = model_in(arg)
        if found is not None:
            return found
    return None
