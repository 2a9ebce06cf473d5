"""Tool calls above the engine, for every API: forcing grammars and (streaming) parsers.

Three output formats are understood (`ToolFormat`), picked per model from its
chat template with `detect_format(template_source)`:

- hermes (Qwen, Hermes, many others): one block per call,
  `<tool_call>\\n{"name": "f", "arguments": {...}}\\n</tool_call>`, blocks
  separated by newlines;
- llama3: `{"name": "f", "parameters": {...}}`, either as the whole output or
  after `<|python_tag|>`; several calls separated by `;`;
- mistral: `[TOOL_CALLS] [{"name": "f", "arguments": {...}}, ...]`.

Parsing accepts "arguments" and "parameters" in every format, arguments given
as an object or as a JSON-encoded string, and a missing `</tool_call>`. The
parser itself lives in `common/formats/tool_parsing.py`; everything is importable
from here.

API for the endpoint layer:

- `tool_call_grammar(tools, tool_choice, parallel, fmt)` -> `ConstraintSpec`
  or None. For tool_choice "required" (several calls when `parallel`) or a
  named function (exactly one call) it returns a Lark grammar (with inline
  JSON schemas) that forces the model's tool-call format, with arguments
  valid against the function's `parameters`, closed as
  `common/formats/schema_closing.py` says (no property the schema does not name) and
  with the same bounded whitespace as JSON schemas; "auto"/"none" need no
  constraint (None).
- `ToolCallStreamParser(fmt, tool_names=None)`: `feed(text) -> list[Delta]`,
  `finish() -> list[Delta]`. A Delta is `ContentDelta(text)` or
  `ToolCallDelta(index, id, name, arguments_fragment)`: the first delta of a
  call carries id and name (fragment ""), later ones only argument text, so
  they map one-to-one onto OpenAI's incremental `tool_calls` deltas. Text that
  might be the start of a marker is held back until decided; whitespace next
  to tool calls is dropped. With `tool_names`, a call naming an unknown
  function stays plain content.
- `parse_tool_calls(text, fmt, tool_names=None) -> (content, [ToolCall])` for
  whole outputs (the same machine, so streaming and non-streaming agree).
- `collect(deltas)` assembles deltas into (content, calls);
  `tool_names(tools)` lists the function names of a request's tools.
- When the model also reasons, feed this parser the content stream of
  `common/formats/reasoning.py`'s parser, not the raw output.

Tool markers such as `[TOOL_CALLS]` and `<|python_tag|>` are special tokens
in their models' vocabularies: text fed here must be detokenized with special
tokens rendered, or the markers are invisible. Forcing grammars spell the
markers as plain text.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from common.formats.constraints import JSON_WHITESPACE, ConstraintSpec
from common.errors import BadRequestError
from common.formats.schema_closing import close_object_schemas
from common.formats.tool_parsing import (
    HERMES_END,
    HERMES_START,
    LLAMA3_TAG,
    MISTRAL_START,
    ContentDelta,
    Delta,
    ToolCall,
    ToolCallDelta,
    ToolCallStreamParser,
    ToolFormat,
    collect,
    new_tool_call_id,
    parse_tool_calls,
)

__all__ = [
    "ContentDelta",
    "Delta",
    "ToolCall",
    "ToolCallDelta",
    "ToolCallStreamParser",
    "ToolFormat",
    "collect",
    "detect_format",
    "new_tool_call_id",
    "parse_tool_calls",
    "tool_call_grammar",
    "tool_names",
]


def detect_format(template_source: str | None) -> ToolFormat:
    """The tool-call format a chat template teaches its model (hermes by default)."""
    text = template_source or ""
    if HERMES_START in text:
        return ToolFormat.HERMES
    if MISTRAL_START in text:
        return ToolFormat.MISTRAL
    if LLAMA3_TAG in text or "ipython" in text:
        return ToolFormat.LLAMA3
    return ToolFormat.HERMES


# -- forcing grammars ------------------------------------------------------------


def _function(tool: Mapping[str, Any]) -> Mapping[str, Any]:
    fn = tool.get("function", tool) if isinstance(tool, Mapping) else None
    if not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str) or not fn["name"]:
        raise BadRequestError("Each tool needs a 'function' with a 'name'.", param="tools")
    return fn


def tool_names(tools: Iterable[Mapping[str, Any]]) -> list[str]:
    return [str(_function(t)["name"]) for t in tools]


def _chosen_name(tool_choice: Any) -> str | None:
    if isinstance(tool_choice, Mapping):
        fn = tool_choice.get("function", tool_choice)
        name = fn.get("name") if isinstance(fn, Mapping) else None
        if not isinstance(name, str) or not name:
            raise BadRequestError(
                "tool_choice must be 'none', 'auto', 'required' or "
                '{"type": "function", "function": {"name": ...}}.',
                param="tool_choice",
            )
        return name
    return None


_DATA_KEYS = frozenset({"const", "enum", "default", "examples"})


def _rebase_refs(node: Any, base: str) -> Any:
    """Rewrite local `$ref`s ("#...") so a schema still resolves when nested under `base`."""
    if isinstance(node, Mapping):
        out: dict[str, Any] = {}
        for key, value in node.items():
            if key == "$ref" and isinstance(value, str) and value.startswith("#"):
                out[key] = base + value[1:]
            elif key in _DATA_KEYS:
                out[key] = value
            else:
                out[key] = _rebase_refs(value, base)
        return out
    if isinstance(node, list):
        return [_rebase_refs(v, base) for v in node]
    return node


def _call_schema(functions: Sequence[Mapping[str, Any]], args_key: str) -> dict[str, Any]:
    defs: dict[str, Any] = {}
    choices: list[dict[str, Any]] = []
    for i, fn in enumerate(functions):
        params = fn.get("parameters")
        if params is None:  # no parameters: the arguments are {}
            params = {"type": "object", "properties": {}, "additionalProperties": False}
        if not isinstance(params, Mapping):
            raise BadRequestError(
                f"The parameters of tool '{fn['name']}' must be a JSON schema object.", param="tools"
            )
        def_name = f"tool{i}_parameters"
        defs[def_name] = _rebase_refs(close_object_schemas(params), f"#/$defs/{def_name}")
        choices.append(
            {
                "type": "object",
                "properties": {"name": {"const": fn["name"]}, args_key: {"$ref": f"#/$defs/{def_name}"}},
                "required": ["name", args_key],
                "additionalProperties": False,
            }
        )
    schema: dict[str, Any] = {"$defs": defs, "x-guidance": {"whitespace_pattern": JSON_WHITESPACE}}
    if len(choices) == 1:
        schema.update(choices[0])
    else:
        schema["anyOf"] = choices
    return schema


def tool_call_grammar(
    tools: Sequence[Mapping[str, Any]] | None,
    tool_choice: Any,
    parallel: bool,
    fmt: ToolFormat,
) -> ConstraintSpec | None:
    """A constraint forcing tool calls for tool_choice "required" or a named function.

    A named function is called exactly once; "required" allows several calls
    when `parallel`. Returns None for "auto", "none" or no tool_choice (the output is parsed
    afterwards instead). BadRequestError for an unknown function name, a
    required call without tools, or malformed tools.
    """
    if tool_choice is None or tool_choice in ("auto", "none"):
        return None
    if not tools:
        raise BadRequestError("tool_choice requires a non-empty 'tools' list.", param="tool_choice")
    functions = [_function(t) for t in tools]
    name = _chosen_name(tool_choice)
    if name is not None:
        functions = [fn for fn in functions if fn["name"] == name]
        if not functions:
            raise BadRequestError(
                f"tool_choice names function '{name}', which is not in 'tools'. "
                "Name one of the functions you send, or use 'required'.",
                param="tool_choice",
            )
        parallel = False  # a named function is called once, as OpenAI and vLLM do
    elif tool_choice != "required":
        raise BadRequestError(
            f"Unsupported tool_choice {tool_choice!r}; use 'none', 'auto', 'required' or a named function.",
            param="tool_choice",
        )
    lit = json.dumps
    if fmt is ToolFormat.MISTRAL:
        item = _call_schema(functions, "arguments")
        defs = item.pop("$defs")
        whitespace = item.pop("x-guidance")
        array = {
            "$defs": defs,
            "x-guidance": whitespace,
            "type": "array",
            "items": item,
            "minItems": 1,
            **({} if parallel else {"maxItems": 1}),
        }
        array_schema = json.dumps(array, ensure_ascii=False)
        body = f"start: {lit(MISTRAL_START + ' ')} calls\ncalls: %json {array_schema}\n"
    else:
        args_key = "parameters" if fmt is ToolFormat.LLAMA3 else "arguments"
        schema = json.dumps(_call_schema(functions, args_key), ensure_ascii=False)
        if fmt is ToolFormat.LLAMA3:
            sep, call = lit("; "), f"call: %json {schema}\n"
        else:
            sep = lit("\n")
            open_tag, close_tag = lit(HERMES_START + "\n"), lit("\n" + HERMES_END)
            call = f"call: {open_tag} obj {close_tag}\nobj: %json {schema}\n"
        body = (f"start: call ({sep} call)*\n" if parallel else "start: call\n") + call
    return ConstraintSpec("grammar", "%llguidance {}\n" + body, "tool_choice")
