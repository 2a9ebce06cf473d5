"""Object ids in OpenAI's shapes: a prefix (asst, thread, msg, run, step, resp, conv, fc, ...) and 24 random characters."""

from __future__ import annotations

import secrets
import string

_ALPHABET = string.ascii_letters + string.digits


def new_id(prefix: str) -> str:
    return prefix + "_" + "".join(secrets.choice(_ALPHABET) for _ in range(24))
