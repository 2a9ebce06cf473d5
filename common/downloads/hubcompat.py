"""The parts of huggingface_hub whose names or signatures changed between releases, behind one seam.

Parley supports huggingface_hub from 0.36 (requests transport; what `transformers<5` resolves to) up to
2.x (httpx2 transport). What differs and is used here:

- transport: requests (<1.0), httpx (1.x) or its fork httpx2 (2.x); `transport_errors` lists the
  exceptions of every importable one that mean "the hub could not be reached or the connection broke".
- the "file not on the hub" error: `EntryNotFoundError` (<1.0) became `RemoteEntryNotFoundError`.
- `http_get`'s progress hook: a `tqdm_class` (1.x and later) or a ready bar as `_tqdm_bar` (<1.0).
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any, BinaryIO

# Per transport: the exception classes (by attribute name) that mean the connection failed or broke.
_TRANSPORT_ERRORS = {
    "requests.exceptions": ("ConnectionError", "Timeout", "ChunkedEncodingError", "ContentDecodingError"),
    "httpx": ("TransportError",),
    "httpx2": ("TransportError",),
}


def transport_errors() -> tuple[type[BaseException], ...]:
    """Connection-level failures of every HTTP client huggingface_hub may be using that is installed."""
    found: list[type[BaseException]] = []
    for module_name, names in _TRANSPORT_ERRORS.items():
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        found.extend(cls for name in names if isinstance(cls := getattr(module, name, None), type))
    return tuple(found)


def transport_name() -> str:
    """The HTTP client the installed huggingface_hub uses: "requests", "httpx" or "httpx2"."""
    from huggingface_hub.errors import HfHubHTTPError

    for base in HfHubHTTPError.__mro__[1:]:
        if base.__name__ == "HTTPError" and base.__module__ != "builtins":
            return base.__module__.split(".")[0]
    return "requests"


def entry_not_found_error() -> type[BaseException]:
    """The error for a file missing on the hub (its name changed in huggingface_hub 1.0)."""
    from huggingface_hub import errors

    return getattr(errors, "RemoteEntryNotFoundError", None) or errors.EntryNotFoundError


def response_status(exc: BaseException) -> int:
    """The HTTP status of a huggingface_hub HTTP error (requests and httpx responses alike), else 0."""
    response = getattr(exc, "response", None)
    return int(getattr(response, "status_code", 0) or 0) if response is not None else 0


def http_get(url: str, out: BinaryIO, *, resume_size: int, headers: dict[str, str], expected_size: int | None,
             displayed_filename: str, tqdm_class: type) -> None:
    """huggingface_hub's `http_get` (Range resume, retries, size check) with `tqdm_class` as its progress bar."""
    from huggingface_hub.file_download import http_get as hub_http_get

    progress: dict[str, Any]
    if "tqdm_class" in inspect.signature(hub_http_get).parameters:
        progress = {"tqdm_class": tqdm_class}
    else:  # before 1.0: no tqdm_class; a bar handed in as _tqdm_bar is used as it is, across its own retries
        progress = {"_tqdm_bar": tqdm_class(initial=resume_size)}
    hub_http_get(url, out, resume_size=resume_size, headers=headers, expected_size=expected_size,
                 displayed_filename=displayed_filename, **progress)
