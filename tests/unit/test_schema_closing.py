"""Schema closing rules: an object schema naming properties allows no others unless it says so."""

from __future__ import annotations

from typing import Any

import jsonschema
import pytest

from common.formats.schema_closing import close_object_schemas

CLOSED = {"additionalProperties": False}


@pytest.mark.parametrize(
    ("schema", "expected"),
    [
        # pydantic / LangChain shape: closed
        (
            {"properties": {"city": {"type": "string"}}, "required": ["city"], "type": "object"},
            {"properties": {"city": {"type": "string"}}, "required": ["city"], "type": "object", **CLOSED},
        ),
        # "any object" stays open; an empty property list is a statement: no keys
        ({"type": "object"}, {"type": "object"}),
        ({}, {}),
        ({"type": "object", "properties": {}}, {"type": "object", "properties": {}, **CLOSED}),
        ({"type": "object", "required": ["a"]}, {"type": "object", "required": ["a"]}),
        # explicit choices are kept
        ({"properties": {"a": {}}, "additionalProperties": True},) * 2,
        ({"properties": {"a": {}}, "additionalProperties": {"type": "integer"}},) * 2,
        ({"properties": {"a": {}}, "unevaluatedProperties": True},) * 2,
        # patternProperties: matching keys stay allowed, others not
        ({"patternProperties": {"^x-": {}}}, {"patternProperties": {"^x-": {}}, **CLOSED}),
        # non-object schemas are untouched
        ({"type": "string", "maxLength": 3}, {"type": "string", "maxLength": 3}),
        (True, True),
    ],
)
def test_closing_rules(schema: Any, expected: Any) -> None:
    assert close_object_schemas(schema) == expected


def test_nested_places_are_closed() -> None:
    obj = {"type": "object", "properties": {"x": {"type": "integer"}}}
    schema = {
        "type": "object",
        "properties": {"inner": obj, "list": {"type": "array", "items": obj}, "tuple": {"prefixItems": [obj]}},
        "$defs": {"D": obj},
        "definitions": {"E": obj},
        "anyOf": [obj],
    }
    closed = close_object_schemas(schema)
    assert closed["additionalProperties"] is False
    props = closed["properties"]
    for node in (props["inner"], props["list"]["items"], props["tuple"]["prefixItems"][0],
                 closed["$defs"]["D"], closed["definitions"]["E"]):
        assert node["additionalProperties"] is False, node
    assert schema["properties"]["inner"] == obj  # the input is not changed


def test_properties_named_like_keywords_and_data_are_left_alone() -> None:
    schema = {
        "type": "object",
        "properties": {"properties": {"type": "object", "properties": {"type": {"type": "string"}}}},
        "default": {"properties": {"a": 1}},
        "not": {"properties": {"q": {}}},
        "if": {"properties": {"k": {"const": 1}}},
    }
    closed = close_object_schemas(schema)
    assert closed["properties"]["properties"]["additionalProperties"] is False
    assert "additionalProperties" not in closed["properties"]["properties"]["properties"]["type"]
    assert closed["default"] == {"properties": {"a": 1}}
    assert closed["not"] == schema["not"] and closed["if"] == schema["if"]


def test_union_alternatives_are_closed_each() -> None:
    schema = {
        "anyOf": [{"$ref": "#/$defs/Cat"}, {"$ref": "#/$defs/Dog"}, {"type": "null"}],
        "$defs": {"Cat": {"properties": {"meow": {}}}, "Dog": {"properties": {"bark": {}}}},
    }
    closed = close_object_schemas(schema)
    assert closed["$defs"]["Cat"]["additionalProperties"] is False
    assert closed["$defs"]["Dog"]["additionalProperties"] is False
    assert "additionalProperties" not in closed


def test_all_of_parts_stay_open_and_the_whole_is_closed_over_their_names() -> None:
    schema = {
        "$defs": {"Base": {"type": "object", "properties": {"id": {"type": "integer"}}}},
        "allOf": [{"$ref": "#/$defs/Base"}, {"properties": {"name": {"type": "string"}}, "required": ["name"]}],
    }
    closed = close_object_schemas(schema)
    assert "additionalProperties" not in closed["$defs"]["Base"]
    assert "additionalProperties" not in closed["allOf"][1]
    assert closed["additionalProperties"] is False
    assert list(closed["properties"]) == ["id", "name"]
    jsonschema.validate({"id": 1, "name": "x"}, closed)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"id": 1, "name": "x", "extra": 2}, closed)


def test_own_properties_beside_branches_take_the_branches_names() -> None:
    schema = {"properties": {"kind": {"enum": ["a", "b"]}},
              "oneOf": [{"properties": {"a": {"type": "integer"}}}, {"properties": {"b": {"type": "string"}}}]}
    closed = close_object_schemas(schema)
    assert closed["additionalProperties"] is False
    assert list(closed["properties"]) == ["kind", "a", "b"]
    assert all("additionalProperties" not in branch for branch in closed["oneOf"])


def test_a_part_that_allows_extra_keys_keeps_the_whole_open() -> None:
    schema = {"allOf": [{"properties": {"a": {}}}, {"properties": {"b": {}}, "additionalProperties": True}]}
    assert "additionalProperties" not in close_object_schemas(schema)
    recursive = {"$defs": {"N": {"properties": {"next": {"$ref": "#/$defs/N"}}}},
                 "allOf": [{"$ref": "#/$defs/N"}, {"properties": {"v": {}}}]}
    closed = close_object_schemas(recursive)  # a cycle through $ref terminates
    assert list(closed["properties"]) == ["next", "v"] and closed["additionalProperties"] is False
