"""`WireModel`: the base of request bodies whose numbers must be numbers.

Pydantic's lax mode reads JSON `true` as 1 for an int or float field, so
`{"max_tokens": true}` or `{"tokens": [true]}` would pass as 1. Clients do
send numbers as strings at times (those still coerce), but a boolean where a
number belongs is a mistake worth a 400 that names the field.
"""

from __future__ import annotations

import types
import typing
from typing import Any

from pydantic import AliasChoices, BaseModel, model_validator
from pydantic.fields import FieldInfo


def _types_in(annotation: Any) -> set[Any]:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType, list, tuple, typing.Annotated):
        args = typing.get_args(annotation)[:1] if origin is typing.Annotated else typing.get_args(annotation)
        return set().union(*(_types_in(a) for a in args))
    return {annotation}


def _is_number_field(info: FieldInfo) -> bool:
    found = _types_in(info.annotation)
    return bool(found & {int, float}) and not (found & {bool, Any})


def _keys(name: str, info: FieldInfo) -> list[str]:
    alias = info.validation_alias
    if isinstance(alias, AliasChoices):
        return [name, *(c for c in alias.choices if isinstance(c, str))]
    return [name, alias] if isinstance(alias, str) else [name]


class WireModel(BaseModel):
    @model_validator(mode="before")
    @classmethod
    def _no_booleans_for_numbers(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        for name, info in cls.model_fields.items():
            if not _is_number_field(info):
                continue
            for key in _keys(name, info):
                value = data.get(key)
                if isinstance(value, bool) or (isinstance(value, list) and any(isinstance(v, bool) for v in value)):
                    raise ValueError(f"'{key}' must be a number (or a list of numbers), not true/false")
        return data
