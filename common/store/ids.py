"""Object ids in OpenAI's shapes: a prefix (asst, thread, msg, run, step, resp, conv, fc, ...) and 24 random characters."""

from __future__ import annotations

import secrets
import string

_ALPHABET = string.ascii_letters + string.digits


def new_id(prefix: str) -> str:
    return prefix + "_" + "".join(secrets.choice(_ALPHABET) for _ in range(24))


# The prefix of each stored kind's ids, as OpenAI writes them.
PREFIXES = {"assistant": "asst", "thread": "thread", "message": "msg", "run": "run", "step": "step",
            "response": "resp", "conversation": "conv", "item": "msg"}


def id_for(kind: str) -> str:
    return new_id(PREFIXES.get(kind, kind))
