"""The `model` field of a request: any name a client sends, as long as it is not a path.

With one model loaded, OpenAI-style routes answer to any model name (clients
send "gpt-4o" or "org/model"), and Ollama names carry a host and a tag
("hf.co/owner/repo:Q4_K_M"); so names may contain '/' and ':'. What they may
not contain is anything that only makes sense as a path outside the model
directory: '..' segments (also percent-encoded), a leading '/' or '~',
backslashes, NUL or other control characters.
"""

from __future__ import annotations

import re
from typing import Annotated
from urllib.parse import unquote

from pydantic import AfterValidator

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
MAX_NAME_LENGTH = 256


def check_model_name(name: str) -> str:
    decoded = unquote(name)
    if (
        len(name) > MAX_NAME_LENGTH
        or _CONTROL.search(decoded)
        or "\\" in decoded
        or decoded.startswith(("/", "~"))
        or ".." in decoded.split("/")
        or ".." in decoded
    ):
        raise ValueError(
            "not a model name: send a name from GET /v1/models (or GET /api/tags), "
            f"at most {MAX_NAME_LENGTH} characters, not a path ('..', '/' first, '\\\\', control characters)"
        )
    return name


ModelName = Annotated[str, AfterValidator(check_model_name)]
