"""Chat templates: Hugging Face-compatible Jinja2 prompt formatting.

A chat template turns a list of chat messages into the single prompt string a
model was trained on. Templates come from `templates/*.jinja`, from a model's
own `tokenizer_config.json`, or from a client, so they are treated as
untrusted code: they run in Jinja2's immutable sandbox, are compiled from
strings (no loader, so no `{% include %}` of files), and any unsafe attribute
access (`__class__`, `__globals__`, ...) raises instead of rendering as empty.

The environment mirrors `transformers` (`trim_blocks`, `lstrip_blocks`, the
`loopcontrols` extension, `raise_exception`, `strftime_now`, an unescaped
`tojson`, and the `{% generation %}` tag) so templates shipped with models on
the Hub render exactly as `tokenizer.apply_chat_template` would.

A template may declare metadata at its top level, read without rendering:

    {%- set stop_strings = ["<|im_end|>"] -%}
    {%- set tool_start = "<tool_call>" -%}
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path, PurePosixPath, PureWindowsPath
from types import TracebackType
from typing import Any, NoReturn

import jinja2
import jinja2.ext
import jinja2.runtime
from jinja2 import nodes
from jinja2.exceptions import SecurityError, TemplateSyntaxError
from jinja2.parser import Parser
from jinja2.sandbox import ImmutableSandboxedEnvironment

from common.errors import BadRequestError

TEMPLATE_SUFFIX = ".jinja"

# Limits on what one template expression may build (see _ChatTemplateEnvironment).
MAX_REPEAT = 1_000_000
MAX_EXPONENT = 1_000

# The code object filename Jinja gives compiled templates made by from_string.
_JINJA_FILENAME = "<template>"


class TemplateError(BadRequestError):
    """A chat template could not be compiled or rendered.

    The message is meant for the client (it is a 400): it names the template
    and says what to change. It is also raised by `raise_exception(...)`
    inside a template, carrying the template's own message.
    """

    code = "chat_template_error"


class _RaisedByTemplate(TemplateError):
    """`raise_exception(msg)` was called by the template itself."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.template_message = message


@dataclass(frozen=True)
class TemplateMetadata:
    """Values a template declares with top-level `{% set %}` statements."""

    stop_strings: list[str] = field(default_factory=list)
    tool_start: str | None = None


class _GenerationExtension(jinja2.ext.Extension):
    """Accept `{% generation %}...{% endgeneration %}` like transformers does.

    transformers uses the tag to mark assistant tokens for training masks; for
    rendering it only outputs its body, which is all this does.
    """

    tags = {"generation"}

    def parse(self, parser: Parser) -> nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        call = self.call_method("_render_body")
        return nodes.CallBlock(call, [], [], body).set_lineno(lineno)

    def _render_body(self, caller: Callable[[], str]) -> str:
        return caller()


class _ChatTemplateEnvironment(ImmutableSandboxedEnvironment):
    """The immutable sandbox, made strict about unsafe attributes.

    Jinja's default returns an Undefined (rendering as "") for an unsafe
    attribute and only fails when it is used further; here the access itself
    fails, so probing templates are stopped at once with a clear error.
    """

    # `"a" * 10**10` or `2 ** 10**9` would exhaust memory or CPU before any output.
    intercepted_binops = frozenset({"*", "**"})

    def unsafe_undefined(self, obj: Any, attribute: str) -> NoReturn:
        raise SecurityError(
            f"access to attribute {attribute!r} of {type(obj).__name__!r} object is unsafe"
        )

    def call_binop(self, context: jinja2.runtime.Context, operator: str, left: Any, right: Any) -> Any:
        if operator == "*":
            for seq, times in ((left, right), (right, left)):
                if (
                    isinstance(seq, (str, list, tuple))
                    and isinstance(times, int)
                    and len(seq) * times > MAX_REPEAT
                ):
                    raise SecurityError(
                        f"repeating a sequence into {len(seq) * times} items is over the limit of {MAX_REPEAT}"
                    )
        elif operator == "**" and isinstance(right, int) and abs(right) > MAX_EXPONENT:
            raise SecurityError(f"exponent {right} is over the limit of {MAX_EXPONENT}")
        return super().call_binop(context, operator, left, right)


def _raise_exception(message: Any) -> NoReturn:
    raise _RaisedByTemplate(str(message))


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | str | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # Jinja's own tojson HTML-escapes (<, >, &, '), which corrupts prompts.
    return json.dumps(
        value,
        ensure_ascii=ensure_ascii,
        indent=indent,
        separators=separators,
        sort_keys=sort_keys,
    )


def _make_environment() -> _ChatTemplateEnvironment:
    env = _ChatTemplateEnvironment(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[_GenerationExtension, jinja2.ext.loopcontrols],
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


def _extract_metadata(env: jinja2.Environment, source: str) -> TemplateMetadata:
    """Read constant top-level `stop_strings` / `tool_start` assignments.

    Parses instead of rendering, so templates that need real messages (or that
    call raise_exception on an empty conversation) still load.
    """
    found: dict[str, Any] = {}
    eval_ctx = nodes.EvalContext(env)
    for node in env.parse(source).body:
        if not (isinstance(node, nodes.Assign) and isinstance(node.target, nodes.Name)):
            continue
        if node.target.name not in ("stop_strings", "tool_start"):
            continue
        try:
            found[node.target.name] = node.node.as_const(eval_ctx)
        except Exception:  # not a constant expression (e.g. uses eos_token)
            continue

    raw_stops = found.get("stop_strings")
    if isinstance(raw_stops, str):
        raw_stops = [raw_stops]
    stop_strings: list[str] = []
    if isinstance(raw_stops, (list, tuple)):
        stop_strings = [s for s in raw_stops if isinstance(s, str) and s]

    raw_tool_start = found.get("tool_start")
    tool_start = raw_tool_start if isinstance(raw_tool_start, str) and raw_tool_start else None
    return TemplateMetadata(stop_strings=stop_strings, tool_start=tool_start)


def _template_lineno(tb: TracebackType | None) -> int | None:
    """The template line a render error happened on, if Jinja recorded one."""
    lineno: int | None = None
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == _JINJA_FILENAME:
            lineno = tb.tb_lineno
        tb = tb.tb_next
    return lineno


def _final_text(content: Any) -> str | None:
    """The text to continue from a message's content (string or content parts)."""
    if isinstance(content, str):
        return content
    if isinstance(content, (list, tuple)):
        # As transformers does: the last part that carries text.
        for part in reversed(content):
            if isinstance(part, dict) and isinstance(part.get("text"), str):
                return part["text"]
    return None


class ChatTemplate:
    """A compiled chat template plus the metadata it declares."""

    def __init__(
        self,
        name: str,
        source: str,
        template: jinja2.Template,
        metadata: TemplateMetadata,
    ) -> None:
        self.name = name
        self.source = source
        self.metadata = metadata
        self._template = template
        self._image_placeholder: tuple[str | None] | None = None  # probed once

    def __repr__(self) -> str:
        return f"ChatTemplate(name={self.name!r}, metadata={self.metadata!r})"

    @classmethod
    def from_string(cls, source: str, name: str = "custom") -> ChatTemplate:
        """Compile a template once; a syntax error names the template and line."""
        env = _make_environment()
        try:
            template = env.from_string(source)
            metadata = _extract_metadata(env, source)
        except TemplateSyntaxError as exc:
            raise TemplateError(
                f"Chat template '{name}' has a syntax error on line {exc.lineno}: "
                f"{exc.message}. Fix the template or choose another one."
            ) from exc
        return cls(name=name, source=source, template=template, metadata=metadata)

    @classmethod
    def from_file(cls, path: Path) -> ChatTemplate:
        """Load a template file; it is named after the file without extension."""
        path = Path(path)
        return cls.from_string(path.read_text(encoding="utf-8"), name=path.stem)

    def render(
        self,
        messages: list[dict[str, Any]],
        *,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        bos_token: str = "",
        eos_token: str = "",
        tools: list[dict[str, Any]] | None = None,
        template_vars: dict[str, Any] | None = None,
    ) -> str:
        """Render `messages` into a prompt string.

        `template_vars` add extra variables (e.g. `enable_thinking`); they never
        replace the named arguments. With `continue_final_message`, the final
        assistant message is left open so the model continues it.
        """
        if add_generation_prompt and continue_final_message:
            raise TemplateError(
                "add_generation_prompt and continue_final_message cannot both be true: "
                "a generation prompt opens a new assistant turn, while continuing "
                "extends the last one. Set one of them to false."
            )
        final_text: str | None = None
        if continue_final_message:
            if not messages or not isinstance(messages[-1], dict) or messages[-1].get("role") != "assistant":
                raise TemplateError(
                    "continue_final_message needs the last message to be an assistant "
                    "message to continue. Add the partial assistant reply as the last "
                    "message, or turn continue_final_message off."
                )
            final_text = _final_text(messages[-1].get("content"))
            if final_text is None:
                raise TemplateError(
                    "continue_final_message is set but the final assistant message has "
                    "no text to continue. Give it string content or a text part."
                )

        # Like transformers, `tools` (and `documents`) are always defined, None
        # when absent: Hub templates test `tools is not none` without a guard.
        context: dict[str, Any] = {"documents": None, **(template_vars or {})}
        context.update(
            messages=messages,
            tools=tools,
            add_generation_prompt=add_generation_prompt,
            bos_token=bos_token,
            eos_token=eos_token,
        )

        rendered = self._render(context)
        if final_text is None:
            return rendered
        return self._cut_after_final(rendered, final_text)

    def image_placeholder(self) -> str | None:
        """What this template writes for an image part, seen as HF processors show images to templates
        (`{"type": "image"}` among `{"type": "text", ...}` parts); None when it does not render content parts.

        Found once by rendering a probe with and without an image part: the text that appears is the
        model's own image marker (`<image>`, `<|image|>`, `<start_of_image>`, ...).
        """
        if self._image_placeholder is None:
            self._image_placeholder = (self._probe_image_placeholder(),)
        return self._image_placeholder[0]

    def _probe_image_placeholder(self) -> str | None:
        a, b = "PARLEYPROBEA", "PARLEYPROBEB"
        text_a, text_b = {"type": "text", "text": a}, {"type": "text", "text": b}

        def render(parts: list[dict[str, Any]]) -> str | None:
            try:
                return self._template.render(
                    messages=[{"role": "user", "content": parts}], add_generation_prompt=False, bos_token="",
                    eos_token="", tools=None, documents=None,
                )
            except Exception:  # noqa: BLE001 - a template that cannot take parts has no placeholder
                return None

        without = render([text_a, text_b])
        with_image = render([text_a, {"type": "image"}, text_b])
        if without is None or with_image is None or a not in without or b not in without or "'type'" in without:
            return None
        head = 0
        while head < len(without) and without[head] == with_image[head]:
            head += 1
        tail = 0
        while tail < len(without) - head and without[-1 - tail] == with_image[-1 - tail]:
            tail += 1
        inserted = with_image[head : len(with_image) - tail]
        if not inserted.strip() or a in inserted or b in inserted or "{" in inserted:
            return None
        return inserted.strip()

    def _render(self, context: dict[str, Any]) -> str:
        try:
            return self._template.render(**context)
        except _RaisedByTemplate as exc:
            raise TemplateError(
                f"{exc.template_message} (raised by chat template '{self.name}'; "
                "change the messages to fit what it accepts or use another template)"
            ) from exc
        except TemplateError:
            raise
        except MemoryError:
            raise
        except SecurityError as exc:
            raise TemplateError(
                f"Chat template '{self.name}' was stopped by the sandbox: {exc}. "
                "A chat template may only format messages; use a different template."
            ) from exc
        except Exception as exc:
            # Template code is data, so any failure in it is a template problem.
            line = _template_lineno(exc.__traceback__)
            where = f" on line {line}" if line is not None else ""
            detail = getattr(exc, "message", None) or str(exc) or type(exc).__name__
            raise TemplateError(
                f"Chat template '{self.name}' failed to render{where}: {detail}. "
                "Check that the messages have the shape it expects (roles, order, "
                "string content), or choose another template."
            ) from exc

    def _cut_after_final(self, rendered: str, final_text: str) -> str:
        """Drop everything after the final message's content, as transformers does."""
        stripped = final_text.strip()
        if stripped not in rendered:
            raise TemplateError(
                f"continue_final_message is set but chat template '{self.name}' did not "
                "include the final assistant message's text in the prompt, so it cannot "
                "be continued. Turn continue_final_message off or use another template."
            )
        start = rendered.rindex(stripped)
        lstripped = final_text.lstrip()
        if rendered[start : start + len(lstripped)] == lstripped:
            # The template kept the message's trailing whitespace: keep it too.
            return rendered[: start + len(lstripped)]
        return rendered[: start + len(stripped)]


def list_templates(directory: Path) -> list[str]:
    """Names of the `*.jinja` templates in `directory`, sorted, without extension."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted(
        p.name[: -len(TEMPLATE_SUFFIX)]
        for p in directory.iterdir()
        if p.name.endswith(TEMPLATE_SUFFIX) and len(p.name) > len(TEMPLATE_SUFFIX) and p.is_file()
    )


def resolve_template(directory: Path, name: str) -> Path:
    """The file of template `name` inside `directory`, never outside it.

    `name` may carry the `.jinja` suffix. Anything path-like (separators,
    `..`, absolute or drive paths, empty) raises ValueError; an unknown name
    raises FileNotFoundError listing the available templates.
    """
    directory = Path(directory)
    if name.endswith(TEMPLATE_SUFFIX):
        name = name[: -len(TEMPLATE_SUFFIX)]
    if (
        not name.strip()
        or "/" in name
        or "\\" in name
        or "\x00" in name
        or ".." in name
        or PurePosixPath(name).is_absolute()
        or PureWindowsPath(name).is_absolute()
        or PureWindowsPath(name).drive
        or (os.sep in name)
        or (os.altsep is not None and os.altsep in name)
    ):
        raise ValueError(
            f"Invalid chat template name {name!r}: give the bare name of a template "
            f"in {directory} (for example 'chatml'), not a path."
        )
    path = directory / f"{name}{TEMPLATE_SUFFIX}"
    if not path.is_file():
        available = list_templates(directory)
        listed = ", ".join(available) if available else "none"
        raise FileNotFoundError(
            f"Chat template '{name}' was not found in {directory}. "
            f"Available templates: {listed}."
        )
    return path
