"""Fill-in-the-middle (FIM) prompts for code completion.

A FIM prompt asks the model for the text between a prefix and a suffix. It is
built from the first of:

1. `tabby.json` in the model's own folder (TabbyML's registry layout):
   `{"prompt_template": "<PRE>{prefix}<SUF>{suffix}<MID>"}`; `{prefix}` and
   `{suffix}` are replaced by the request's text, and the result is tokenized
   with special tokens parsed, so markers such as `<PRE>` become their tokens.
2. The GGUF's FIM token ids (`tokenizer.ggml.fim_pre_token_id`,
   `fim_suf_token_id`, `fim_mid_token_id`, or the older `prefix_token_id`,
   `suffix_token_id`, `middle_token_id`), laid out as llama.cpp does (PSM):
   [BOS] <pre> prefix <suf> suffix <mid> [middle]. Prefix and suffix are
   tokenized as plain text: code that happens to contain `<|endoftext|>`
   stays text.

A model with neither cannot do FIM; asking for it is a 400 naming the request
field that carried the suffix.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from common.errors import APIError, BadRequestError
from common.generation.prompts import Prompt
from common.models.manager import LoadedModel

TABBY_FILE = "tabby.json"

# (pre, suf, mid) metadata keys, newest naming first.
FIM_KEYS: tuple[tuple[str, str, str], ...] = (
    ("tokenizer.ggml.fim_pre_token_id", "tokenizer.ggml.fim_suf_token_id", "tokenizer.ggml.fim_mid_token_id"),
    ("tokenizer.ggml.prefix_token_id", "tokenizer.ggml.suffix_token_id", "tokenizer.ggml.middle_token_id"),
)

_PLACEHOLDER = re.compile(r"\{(prefix|suffix)\}")


class FimConfigError(APIError):
    """The model's tabby.json is unreadable or malformed: the operator must fix it."""

    status = 500
    type = "server_error"
    code = "fim_config_error"


@dataclass(frozen=True)
class FimTokens:
    pre: int
    suf: int
    mid: int


def model_folder(model: LoadedModel) -> Path | None:
    """The folder that belongs to this model alone, where its tabby.json may live.

    A folder model loads from a GGUF inside a folder named after the model; a
    GGUF lying directly in the model directory has no folder of its own (the
    model directory is shared by every model, so a tabby.json there is ignored).
    """
    path = Path(model.info.path)
    if path.is_dir():
        return path
    if path.parent.name == model.name:
        return path.parent
    return None


def tabby_template(model: LoadedModel) -> str | None:
    """The `prompt_template` of the model's tabby.json, or None when it has none."""
    folder = model_folder(model)
    if folder is None:
        return None
    file = folder / TABBY_FILE
    if not file.is_file():
        return None
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise FimConfigError(
            f"'{file}' is not valid JSON ({exc}). Fix it, e.g. "
            '{"prompt_template": "<PRE>{prefix}<SUF>{suffix}<MID>"}, or remove it.'
        ) from None
    template = data.get("prompt_template") if isinstance(data, dict) else None
    if template is None:
        return None  # a tabby.json may carry other settings (chat_template) only
    if not isinstance(template, str) or "{prefix}" not in template:
        raise FimConfigError(
            f"'prompt_template' in '{file}' must be a string containing {{prefix}} (and usually {{suffix}}), "
            'e.g. "<PRE>{prefix}<SUF>{suffix}<MID>". Fix the file and retry.'
        )
    return template


def fim_tokens(model: LoadedModel) -> FimTokens | None:
    """The model's FIM token ids from its GGUF metadata, when all three are present and valid."""
    meta = model.info.metadata
    n_vocab = model.info.n_vocab
    for keys in FIM_KEYS:
        try:
            ids = [int(meta[k]) for k in keys]
        except (KeyError, ValueError):
            continue
        if all(0 <= t < n_vocab for t in ids):
            return FimTokens(*ids)
    return None


def has_fim(model: LoadedModel) -> bool:
    """Whether fim_prompt can build a prompt for this model (raises on a broken tabby.json)."""
    return tabby_template(model) is not None or fim_tokens(model) is not None


def render_template(template: str, prefix: str, suffix: str) -> str:
    """Replace {prefix} and {suffix} in one pass (text inside the prefix is never re-expanded)."""
    values = {"prefix": prefix, "suffix": suffix}
    return _PLACEHOLDER.sub(lambda m: values[m.group(1)], template)


def _no_fim_error(model: LoadedModel, param: str) -> BadRequestError:
    return BadRequestError(
        f"'{param}' asks for fill-in-the-middle, but the model '{model.name}' has no FIM tokens "
        "(its GGUF sets no tokenizer.ggml.fim_pre_token_id / fim_suf_token_id / fim_mid_token_id). "
        f"Load a code model with FIM support, or put the GGUF in a folder named after the model with a "
        f'{TABBY_FILE} beside it such as {{"prompt_template": "<PRE>{{prefix}}<SUF>{{suffix}}<MID>"}} '
        f"using the model's own FIM markers. Without '{param}', the request is a plain completion.",
        param=param,
        code="fim_not_supported",
    )


def fim_prompt(
    model: LoadedModel,
    prefix: str,
    suffix: str,
    *,
    middle: str = "",
    add_bos: bool | None = None,
    param: str = "suffix",
) -> Prompt:
    """The FIM prompt for `prefix`/`suffix`; `middle` is text the answer starts with.

    `add_bos` None follows the model; `param` names the request field in errors.
    """
    info = model.info
    engine = model.engine
    if add_bos is None:
        add_bos = info.add_bos_token
    template = tabby_template(model)
    if template is not None:
        text = render_template(template, prefix, suffix) + middle
        bos = add_bos and not (info.bos_token and text.startswith(info.bos_token))
        return Prompt(engine.tokenize(text, add_bos=bos, special=True), text)
    ids = fim_tokens(model)
    if ids is None:
        raise _no_fim_error(model, param)
    tokens: list[int] = [info.bos_token_id] if add_bos and info.bos_token_id >= 0 else []
    tokens.append(ids.pre)
    tokens += engine.tokenize(prefix, add_bos=False, special=False)
    tokens.append(ids.suf)
    tokens += engine.tokenize(suffix, add_bos=False, special=False)
    tokens.append(ids.mid)
    if middle:
        tokens += engine.tokenize(middle, add_bos=False, special=False)
    return Prompt(tokens, engine.detokenize(tokens, special=True))
