"""API keys: load them from a YAML file, check them on each request.

The keys file (`api_tokens.yml` by default) holds `api_key:` (one string or a
list) and `admin_key:` (one string). It is created with random keys on first
start and re-read within a second of being edited. The admin key also works
wherever an API key is required.
"""

from __future__ import annotations

import hmac
import os
import secrets
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from fastapi import Request
from loguru import logger
from ruamel.yaml import YAML
from ruamel.yaml.error import YAMLError

from common.errors import AuthenticationError, PermissionDeniedError

DEFAULT_TOKENS_PATH = Path("api_tokens.yml")
RELOAD_INTERVAL = 1.0  # seconds between two stats of the keys file
KNOWN_FIELDS = ("api_key", "admin_key")
_HOW_TO_SEND = "send it as `Authorization: Bearer <key>` or `X-API-Key: <key>`"


class AuthConfigError(Exception):
    """The keys file cannot be created, read or understood."""


class Permission(str, Enum):
    API = "api"
    ADMIN = "admin"

    def allows(self, needed: Permission) -> bool:
        return self is Permission.ADMIN or needed is Permission.API


@dataclass(frozen=True)
class KeyEntry:
    secret: str = field(repr=False)
    permission: Permission


def _check_secret(value: Any, where: str, path: Path) -> str:
    if value is None or value == "":
        raise AuthConfigError(f"{path}: {where} is empty; set it to a secret, or delete the file for new random keys")
    if not isinstance(value, str):
        raise AuthConfigError(f"{path}: {where} must be a string, got {type(value).__name__}; put the key in quotes")
    if any(c.isspace() or not c.isprintable() for c in value):
        raise AuthConfigError(f"{path}: {where} contains whitespace or control characters; remove them")
    return value


def parse_tokens(data: Any, path: Path) -> tuple[KeyEntry, ...]:
    """Validate the parsed YAML of a keys file and turn it into key entries."""
    if data is None:
        raise AuthConfigError(f"{path} is empty; add `api_key:` and `admin_key:`, or delete it to get new random keys")
    if not isinstance(data, Mapping):
        raise AuthConfigError(f"{path} must be a mapping with `api_key:` and `admin_key:`, got {type(data).__name__}")
    for name in data:
        if name not in KNOWN_FIELDS:
            logger.warning("{}: ignoring unknown setting {!r} (known: {})", path, name, ", ".join(KNOWN_FIELDS))
    for name in KNOWN_FIELDS:
        if data.get(name) is None:
            raise AuthConfigError(f"{path}: `{name}:` is missing or empty; add `{name}: \"<secret>\"`")

    raw_api = data["api_key"]
    if isinstance(raw_api, Mapping):
        raise AuthConfigError(f"{path}: api_key must be a string or a list of strings, got a mapping")
    if not isinstance(raw_api, list):
        raw_api = [raw_api]
    if not raw_api:
        raise AuthConfigError(f"{path}: api_key is an empty list; list at least one key")
    entries = [
        KeyEntry(_check_secret(value, f"api_key[{i}]" if len(raw_api) > 1 else "api_key", path), Permission.API)
        for i, value in enumerate(raw_api)
    ]
    admin = _check_secret(data["admin_key"], "admin_key", path)
    if any(e.secret == admin for e in entries):
        raise AuthConfigError(f"{path}: admin_key must differ from every api_key")
    entries.append(KeyEntry(admin, Permission.ADMIN))
    return tuple(entries)


def _new_tokens_file(path: Path) -> None:
    """Create the keys file with random secrets, readable by its owner only."""
    api_key, admin_key = secrets.token_hex(16), secrets.token_hex(16)
    text = (
        "# Parley API keys. Send one with each request as\n"
        "#   Authorization: Bearer <key>   or   X-API-Key: <key>\n"
        "# api_key may be one key or a list of keys. admin_key also opens the admin\n"
        "# endpoints (send it the same way, or as X-Admin-Key: <key>).\n"
        "# Edits take effect within a second, without a restart.\n"
        f'api_key: "{api_key}"\n'
        f'admin_key: "{admin_key}"\n'
    )
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return  # created meanwhile by another process: use that one
    except OSError as e:
        raise AuthConfigError(f"cannot create the keys file {path}: {e}; check the directory's permissions") from e
    try:
        if hasattr(os, "fchmod"):
            os.fchmod(fd, 0o600)  # the mode given to os.open is reduced by the umask
        os.write(fd, text.encode())
    finally:
        os.close(fd)
    logger.info(
        "Created API keys in {} (readable by you only; edit it to change them):\n"
        "  API key:   {}\n  Admin key: {}\n"
        "Send a key as `Authorization: Bearer <key>` or `X-API-Key: <key>`.",
        path.resolve(), api_key, admin_key,
    )


def _signature(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size


class AuthManager:
    """Holds the configured keys and checks the ones requests present."""

    def __init__(
        self,
        tokens_path: Path,
        *,
        disabled: bool = False,
        clock: Callable[[], float] = time.monotonic,
        reload_interval: float = RELOAD_INTERVAL,
    ) -> None:
        self.tokens_path = Path(tokens_path)
        self.disabled = disabled
        self._clock = clock
        self._reload_interval = reload_interval
        self._lock = threading.Lock()
        self._entries: tuple[KeyEntry, ...] = ()
        self._signature: tuple[int, int] | None = None
        self._last_check = clock()
        if disabled:
            logger.warning("Authentication is disabled: every request gets admin rights")
            return
        if not self.tokens_path.exists():
            _new_tokens_file(self.tokens_path)
        self.reload()

    @classmethod
    def load(cls, tokens_path: str | os.PathLike[str] | None = None, *, disabled: bool = False) -> AuthManager:
        """Build from a config value; `None` means `api_tokens.yml` in the working directory."""
        path = Path(tokens_path).expanduser() if tokens_path else DEFAULT_TOKENS_PATH
        return cls(path, disabled=disabled)

    @property
    def entries(self) -> tuple[KeyEntry, ...]:
        return self._entries

    def reload(self) -> None:
        """Read the keys file now; raises AuthConfigError and keeps the old keys if it is invalid."""
        path = self.tokens_path
        signature = _signature(path)
        try:
            data = YAML(typ="safe").load(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as e:
            raise AuthConfigError(f"cannot read the keys file {path}: {e}") from e
        except YAMLError as e:
            raise AuthConfigError(f"{path} is not valid YAML; fix it or delete it to get new random keys:\n{e}") from e
        entries = parse_tokens(data, path)
        self._entries, self._signature = entries, signature
        logger.info("Loaded {} API key(s) and the admin key from {}", len(entries) - 1, path)

    def maybe_reload(self) -> bool:
        """Reload when the file changed; stats it at most once per interval. True if reloaded."""
        if self.disabled:
            return False
        now = self._clock()
        if now - self._last_check < self._reload_interval or not self._lock.acquire(blocking=False):
            return False
        try:
            self._last_check = now
            signature = _signature(self.tokens_path)
            if signature == self._signature:
                return False
            self._signature = signature  # report each broken state once, not every second
            if signature is None:
                logger.error("Keys file {} is gone; keeping the keys loaded before", self.tokens_path)
                return False
            try:
                self.reload()
            except AuthConfigError as e:
                logger.error("Keeping the previous API keys: {}", e)
                return False
            return True
        finally:
            self._lock.release()

    def _match(self, presented: str) -> Permission | None:
        # Compare with every key, without stopping at a match, in constant time.
        given = presented.encode("utf-8", "surrogateescape")
        matched: Permission | None = None
        for entry in self._entries:
            if hmac.compare_digest(given, entry.secret.encode("utf-8")) and matched is not Permission.ADMIN:
                matched = entry.permission
        return matched

    def authenticate(self, headers: Mapping[str, str]) -> Permission:
        """Return the permission of the key in the request headers, or raise 401."""
        if self.disabled:
            return Permission.ADMIN
        self.maybe_reload()
        lowered = {name.lower(): value for name, value in headers.items()}
        key = ""
        authorization = lowered.get("authorization", "").strip()
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() == "bearer":
            key = token.strip()
        for name in ("x-admin-key", "x-api-key"):
            key = key or lowered.get(name, "").strip()
        if not key:
            hint = "the Authorization header must be `Bearer <key>`; " if authorization else ""
            raise AuthenticationError(
                f"no API key was sent: {hint}{_HOW_TO_SEND}. The keys are in {self.tokens_path.name} on the server.",
                headers={"WWW-Authenticate": "Bearer"},
            )
        permission = self._match(key)
        if permission is None:
            raise AuthenticationError(
                f"invalid API key: check it against {self.tokens_path.name} on the server",
                headers={"WWW-Authenticate": "Bearer"},
            )
        return permission

    def require(self, headers: Mapping[str, str], needed: Permission) -> Permission:
        """Authenticate and check the key grants `needed`; raises 401 or 403."""
        permission = self.authenticate(headers)
        if not permission.allows(needed):
            raise PermissionDeniedError(
                "this endpoint requires the admin key (admin_key in "
                f"{self.tokens_path.name}); send it as `Authorization: Bearer <key>` or `X-Admin-Key: <key>`"
            )
        return permission


def _manager(request: Request) -> AuthManager:
    manager = getattr(request.app.state, "auth", None)
    if not isinstance(manager, AuthManager):
        raise RuntimeError("app.state.auth must be set to an AuthManager before serving requests")
    return manager


def require_api(request: Request) -> Permission:
    """FastAPI dependency: any valid key (API or admin)."""
    return _manager(request).require(request.headers, Permission.API)


def require_admin(request: Request) -> Permission:
    """FastAPI dependency: the admin key only."""
    return _manager(request).require(request.headers, Permission.ADMIN)


async def permission_of(request: Request) -> Permission:
    """FastAPI dependency: which permission the request's key has (401 without a valid key)."""
    return _manager(request).authenticate(request.headers)
