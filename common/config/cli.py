"""Command-line parser generated from the config models.

Every config key becomes a flag named after the bare key (`model_dir` ->
`--model-dir`), so the models in `common/config/loader.py` stay the single source of
truth for names, help text and allowed values. Flags default to
`argparse.SUPPRESS`: only what the user typed overrides the file and env.
Boolean flags take both argparse's form (`--disable-auth`, `--no-disable-auth`)
and TabbyAPI's (`--disable-auth true|false`, also yes/no, on/off, 1/0).
This module knows nothing about `ParleyConfig` itself (it gets the class
passed in), which keeps the import graph one-way.
"""

from __future__ import annotations

import argparse
import json
import sys
import types
from typing import Any, Literal, NoReturn, Union, get_args, get_origin

from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import to_jsonable_python

COMMANDS = ("serve", "export-config", "export-openapi", "download")


class UsageError(ValueError):
    """Bad command line; raised instead of argparse's print-and-exit."""


BOOL_WORDS = {"true": True, "yes": True, "on": True, "1": True, "false": False, "no": False, "off": False, "0": False}


def bool_word(text: str) -> bool:
    """`true`/`false` (also yes/no, on/off, 1/0, any case) -> bool; argparse type converter."""
    try:
        return BOOL_WORDS[text.strip().lower()]
    except KeyError:
        raise argparse.ArgumentTypeError(
            f"expected true or false (or yes/no, on/off, 1/0), got {text!r}; give the flag alone for true"
        ) from None


class BoolFlag(argparse.Action):
    """`--flag`, `--flag VALUE`, `--flag=VALUE` and `--no-flag` for one boolean key.

    `nargs="?"` alone would let `--flag` swallow whatever follows it (a
    positional, another flag's value), so `_Parser` first rewrites each bare
    `--flag` to `--flag=true`, or to `--flag=WORD` when the next argument is a
    boolean word, and `--no-flag` to `--flag=false`: this action then always
    gets an explicit value.
    """

    def __init__(self, option_strings: list[str], dest: str, **kwargs: Any) -> None:
        negatives = ["--no-" + o[2:] for o in option_strings if o.startswith("--")]
        kwargs.update(nargs="?", type=bool_word, metavar="true|false")
        super().__init__([*option_strings, *negatives], dest, **kwargs)
        self.negatives = frozenset(negatives)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        value = True if values is None else bool(values)
        setattr(namespace, self.dest, not value if option_string in self.negatives else value)


class _Formatter(argparse.HelpFormatter):
    """Shows a boolean flag as `--flag [true|false], --no-flag`."""

    def _format_action_invocation(self, action: argparse.Action) -> str:
        if isinstance(action, BoolFlag):
            positives = [o for o in action.option_strings if o not in action.negatives]
            return ", ".join([f"{o} [true|false]" for o in positives] + sorted(action.negatives))
        return super()._format_action_invocation(action)


def normalize_bool_flags(args: list[str], flags: dict[str, BoolFlag]) -> list[str]:
    """Rewrite bare boolean flags to `--flag=VALUE` (see `BoolFlag`); stops at `--`."""
    out: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        i += 1
        name, eq, value = arg.partition("=")
        action = flags.get(name)
        if arg == "--":
            return out + args[i - 1:]
        if action is None:
            out.append(arg)
            continue
        positive = next(o for o in action.option_strings if o not in action.negatives)
        if name in action.negatives:
            if eq:
                raise UsageError(f"{name} takes no value: write '{positive} {value}' or '{name}' alone")
            out.append(f"{positive}=false")
        elif eq:
            out.append(arg)
        elif i < len(args) and args[i].strip().lower() in BOOL_WORDS:
            out.append(f"{name}={args[i]}")
            i += 1
        else:
            out.append(f"{name}=true")
    return out


class _Parser(argparse.ArgumentParser):
    """Raises `UsageError` so the caller decides how to report and exit."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _Formatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog}: {message}. Run '{self.prog} --help' for every option.")

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> Any:
        flags = {o: a for a in self._actions if isinstance(a, BoolFlag) for o in a.option_strings}
        if flags:
            args = normalize_bool_flags(list(sys.argv[1:] if args is None else args), flags)
        return super().parse_known_args(args, namespace)


def unwrap_optional(annotation: Any) -> tuple[Any, bool]:
    """`X | None` -> (X, True); anything else -> (annotation, False)."""
    if get_origin(annotation) in (Union, types.UnionType):
        args = [a for a in get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return annotation, False


def is_bool(annotation: Any) -> bool:
    return unwrap_optional(annotation)[0] is bool


def is_list(annotation: Any) -> bool:
    return get_origin(unwrap_optional(annotation)[0]) is list


def literal_values(annotation: Any) -> tuple[str, ...] | None:
    """Allowed values of a `Literal[...]` or `list[Literal[...]]` field, else None."""
    inner = unwrap_optional(annotation)[0]
    if get_origin(inner) is list:
        inner = get_args(inner)[0]
    if get_origin(inner) is Literal:
        return tuple(str(v) for v in get_args(inner))
    return None


def flag_name(key: str) -> str:
    return "--" + key.replace("_", "-")


def default_text(info: FieldInfo) -> str:
    """The field default as it would be written in YAML/JSON (`null`, `true`, `[]`)."""
    return json.dumps(to_jsonable_python(info.get_default(call_default_factory=True)))


def _help(info: FieldInfo) -> str:
    text = info.description or ""
    allowed = literal_values(info.annotation)
    if allowed:
        text += f" Allowed: {', '.join(allowed)}."
    return f"{text} Default: {default_text(info)}.".replace("%", "%%")


def add_config_flags(parser: argparse.ArgumentParser, config_cls: type[BaseModel]) -> None:
    """One argument group per section, one flag per key, plus `--config PATH`."""
    parser.add_argument(
        "--config", metavar="PATH", default=None,
        help="YAML config file. Default: config.yml if it exists (a missing default file is fine).",
    )
    for section, section_info in config_cls.model_fields.items():
        section_cls: type[BaseModel] = section_info.annotation  # type: ignore[assignment]
        group = parser.add_argument_group(f"{section} settings", section_info.description)
        for key, info in section_cls.model_fields.items():
            kwargs: dict[str, Any] = {"dest": key, "default": argparse.SUPPRESS, "help": _help(info)}
            allowed = literal_values(info.annotation)
            metavar = "{" + ",".join(allowed) + "}" if allowed else key.upper()
            if is_bool(info.annotation):
                kwargs["action"] = BoolFlag
            elif is_list(info.annotation):
                item = get_args(unwrap_optional(info.annotation)[0])[0]
                if isinstance(item, type) and issubclass(item, BaseModel):  # e.g. --loras NAME[:SCALING]
                    first, *rest = (name.upper() for name in item.model_fields)
                    metavar = first + "".join(f"[:{name}]" for name in rest)
                kwargs.update(nargs="*", metavar=metavar)
            else:
                kwargs["metavar"] = metavar
            group.add_argument(flag_name(key), **kwargs)


def build_parser(config_cls: type[BaseModel]) -> argparse.ArgumentParser:
    """`main.py {serve,export-config,export-openapi,download}`; `serve` is the default."""
    parser = _Parser(
        prog="main.py", allow_abbrev=False,
        description="Parley: one server for OpenAI, KoboldAI and Ollama clients. "
        "With no command, 'serve' is assumed; run 'main.py serve --help' for every config flag.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    common = {"allow_abbrev": False}

    serve = commands.add_parser("serve", help="Run the API server (default).", **common)
    add_config_flags(serve, config_cls)

    export_config = commands.add_parser("export-config", help="Write a commented sample config.", **common)
    export_config.add_argument("--output", metavar="PATH", default="config_sample.yml",
                               help="Where to write it. Default: config_sample.yml.")

    export_openapi = commands.add_parser("export-openapi", help="Write the OpenAPI schema.", **common)
    export_openapi.add_argument("--output", metavar="PATH", default="openapi.json",
                                help="Where to write it. Default: openapi.json.")
    add_config_flags(export_openapi, config_cls)

    download = commands.add_parser("download", help="Download a model from the Hugging Face Hub.", **common)
    download.add_argument("repo_id", metavar="REPO_ID", help="Hub repository, e.g. Qwen/Qwen2.5-0.5B-Instruct.")
    download.add_argument("--revision", default=None, help="Branch, tag or commit.")
    download.add_argument("--include", nargs="+", action="extend", default=[], metavar="GLOB",
                          help="Only download files matching these globs.")
    download.add_argument("--exclude", nargs="+", action="extend", default=[], metavar="GLOB",
                          help="Skip files matching these globs.")
    download.add_argument("--folder-name", default=None, metavar="NAME",
                          help="Folder under model_dir to download into. Default: the repository name.")
    download.add_argument("--token", default=None,
                          help="Hugging Face token for gated or private repos. Default: HF_TOKEN or the stored login.")
    download.add_argument("--repo-type", default="model", choices=["model", "dataset", "space"],
                          help="Kind of repository. Default: model.")
    add_config_flags(download, config_cls)
    return parser
