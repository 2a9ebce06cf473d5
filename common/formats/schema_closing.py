"""Close JSON schemas before they become grammars: no property the schema does not name.

Plain JSON Schema lets an object carry any key it does not mention unless it
says `additionalProperties: false`. Most schemas clients send (pydantic's,
LangChain's, most tool definitions) leave that out, and a grammar built from
them lets a small model add property after property until `max_tokens`.
OpenAI's strict mode and vLLM's structured outputs generate only the named
properties; `close_object_schemas` makes a schema say so explicitly:

- an object schema with `properties` (even empty) or `patternProperties` and
  neither `additionalProperties` nor `unevaluatedProperties` gets
  `additionalProperties: false` (keys matching `patternProperties` stay
  allowed);
- an object schema naming no properties (`{"type": "object"}`, "any object")
  stays open, and `additionalProperties: true` or a schema is kept as sent;
- parts combined into one object (two or more `allOf` branches, or branches
  and `$ref`s beside an object's own `properties`) are intersected, so each
  part stays open (closing one would forbid the others' keys) and the object
  that combines them is closed over the union of their property names
  instead; the combination stays open when a part allows extra keys itself;
- subschemas are walked wherever they may hold objects: `properties`,
  `patternProperties`, `additionalProperties`, `items`, `prefixItems`,
  `contains`, `anyOf`/`oneOf`/`allOf`, `then`/`else`, `$defs`/`definitions`,
  `dependentSchemas`; never inside `not` or `if` (closing a condition would
  change what it rejects) nor inside data (`const`, `enum`, `default`,
  `examples`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
_SINGLE = ("additionalProperties", "items", "contains", "then", "else", "additionalItems", "unevaluatedItems")
_LISTS = ("prefixItems", "items")
_BRANCHES = ("anyOf", "oneOf", "allOf")
_OPENERS = ("additionalProperties", "unevaluatedProperties")


def close_object_schemas(schema: Any) -> Any:
    """A copy of `schema` whose object schemas allow only the properties they name (rules above)."""
    if not isinstance(schema, Mapping):
        return schema
    return _Closer(schema).walk(schema, "#", fragment=False)


def _parts(node: Mapping[str, Any]) -> list[Any]:
    """The subschemas intersected with `node` into one object (empty when it is no combination)."""
    own = "properties" in node or "patternProperties" in node
    parts: list[Any] = []
    for key in _BRANCHES:
        branches = node.get(key)
        if isinstance(branches, list) and (own or (key == "allOf" and len(branches) > 1)):
            parts.extend(branches)
    if own and isinstance(node.get("$ref"), str):
        parts.append({"$ref": node["$ref"]})
    return parts


def _escape(key: str) -> str:
    return key.replace("~", "~0").replace("/", "~1")


class _Closer:
    def __init__(self, root: Mapping[str, Any]) -> None:
        self.root = root
        self.fragment_refs: set[str] = set()
        self._find_fragment_refs(root)

    # -- references -----------------------------------------------------------
    def _find_fragment_refs(self, node: Any) -> None:
        """Local `$ref` targets used as parts of a combination: they must stay open."""
        if isinstance(node, list):
            for item in node:
                self._find_fragment_refs(item)
            return
        if not isinstance(node, Mapping):
            return
        for part in _parts(node):
            if isinstance(part, Mapping) and isinstance(part.get("$ref"), str):
                self.fragment_refs.add(part["$ref"])
        for key, value in node.items():
            if key not in ("const", "enum", "default", "examples"):
                self._find_fragment_refs(value)

    def _resolve(self, ref: str) -> Any:
        if not ref.startswith("#"):
            return None
        node: Any = self.root
        for raw in ref[1:].split("/")[1:] if ref != "#" else []:
            key = raw.replace("~1", "/").replace("~0", "~")
            if isinstance(node, Mapping) and key in node:
                node = node[key]
            elif isinstance(node, list) and key.isdigit() and int(key) < len(node):
                node = node[int(key)]
            else:
                return None
        return node

    def _names(self, part: Any, seen: frozenset[int] = frozenset()) -> list[str] | None:
        """Property names a part may hold, in order; None when it allows other keys itself."""
        if isinstance(part, Mapping) and isinstance(part.get("$ref"), str) and len(part) == 1:
            part = self._resolve(part["$ref"])
        if not isinstance(part, Mapping) or id(part) in seen:
            return []
        seen = seen | {id(part)}
        if "patternProperties" in part or any(part[k] is not False for k in _OPENERS if k in part):
            return None
        properties = part.get("properties")
        names = list(properties) if isinstance(properties, Mapping) else []
        subparts = [b for key in _BRANCHES if isinstance(part.get(key), list) for b in part[key]]
        if isinstance(part.get("$ref"), str):
            subparts.append({"$ref": part["$ref"]})
        for sub in subparts:
            more = self._names(sub, seen)
            if more is None:
                return None
            names.extend(n for n in more if n not in names)
        return names

    # -- the walk -------------------------------------------------------------
    def walk(self, node: Any, path: str, *, fragment: bool) -> Any:
        if not isinstance(node, Mapping):
            return node
        parts = _parts(node)
        fragment = fragment or path in self.fragment_refs
        out: dict[str, Any] = {}
        for key, value in node.items():
            here = f"{path}/{_escape(key)}"
            if key in _MAPS and isinstance(value, Mapping):
                out[key] = {k: self.walk(v, f"{here}/{_escape(k)}", fragment=False) for k, v in value.items()}
            elif key in _BRANCHES and isinstance(value, list):
                out[key] = [
                    self.walk(v, f"{here}/{i}", fragment=any(v is p for p in parts)) for i, v in enumerate(value)
                ]
            elif key in _LISTS and isinstance(value, list):
                out[key] = [self.walk(v, f"{here}/{i}", fragment=False) for i, v in enumerate(value)]
            elif key in _SINGLE:
                out[key] = self.walk(value, here, fragment=False)
            else:
                out[key] = value
        if fragment or any(k in node for k in _OPENERS):
            return out
        own = "properties" in node or "patternProperties" in node
        if not parts:
            if own:
                out["additionalProperties"] = False
            return out
        names = self._names({k: v for k, v in node.items() if k not in _BRANCHES and k != "$ref"} | {"allOf": parts})
        if names is None or (not names and not own) or not isinstance(out.get("properties", {}), Mapping):
            return out
        properties = dict(out.get("properties") or {})
        for name in names:
            properties.setdefault(name, True)
        out["properties"] = properties
        out["additionalProperties"] = False
        return out
