"""API keys: load them from a YAML file, check them on each request.

The keys file (`api_tokens.yml` by default) holds `api_key:` (one string or a
list) and `admin_key:` (one string), and/or `keys:`, a list of named keys
with their own rate limits:

    keys:
      - key: "<secret>"
        name: alice              # shown in logs and metrics, never the secret
        role: api                # api (default) or admin
        requests_per_minute: 60  # optional
        tokens_per_minute: 20000 # optional: generated (or embedded) tokens
      - {key: "<secret>", name: ci, unlimited: true}  # no limits, not even the defaults

It is created with random keys on first start and re-read within a second of
being edited. The admin key also works wherever an API key is required. A key
without limits of its own gets the server's default limits (config
`limits.default_requests_per_minute` / `default_tokens_per_minute`) when it is
an API key; admin keys have no limits unless they set their own.
"""

from __future__ import annotations

import hashlib
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
KNOWN_FIELDS = ("api_key", "admin_key", "keys")
KEY_FIELDS = ("key", "name", "role", "requests_per_minute", "tokens_per_minute", "unlimited")
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
    name: str = ""
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    unlimited: bool = False  # no limits at all, not even the server's defaults

    @property
    def fingerprint(self) -> str:
        """A stable id for the key that does not reveal it (rate-limit state survives reloads)."""
        return hashlib.sha256(self.secret.encode("utf-8")).hexdigest()[:16]


def _check_secret(value: Any, where: str, path: Path) -> str:
    if value is None or value == "":
        raise AuthConfigError(f"{path}: {where} is empty; set it to a secret, or delete the file for new random keys")
    if not isinstance(value, str):
        raise AuthConfigError(f"{path}: {where} must be a string, got {type(value).__name__}; put the key in quotes")
    if any(c.isspace() or not c.isprintable() for c in value):
        raise AuthConfigError(f"{path}: {where} contains whitespace or control characters; remove them")
    return value


def _check_limit(value: Any, where: str, path: Path) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise AuthConfigError(f"{path}: {where} must be a whole number of at least 1, got {value!r}; "
                              "remove it for no limit")
    return value


def _rich_keys(raw: Any, path: Path) -> list[KeyEntry]:
    """The `keys:` list: one mapping per key with its name, role and limits."""
    if not isinstance(raw, list):
        raise AuthConfigError(f"{path}: keys must be a list of mappings like "
                              "`- {key: \"<secret>\", name: alice, requests_per_minute: 60}`")
    entries = []
    for i, item in enumerate(raw):
        where = f"keys[{i}]"
        if not isinstance(item, Mapping):
            raise AuthConfigError(f"{path}: {where} must be a mapping with at least `key:`, got {type(item).__name__}")
        unknown = [str(k) for k in item if k not in KEY_FIELDS]
        if unknown:
            raise AuthConfigError(f"{path}: {where} has unknown setting(s) {', '.join(unknown)}; "
                                  f"known: {', '.join(KEY_FIELDS)}")
        role = item.get("role", "api")
        if role not in ("api", "admin"):
            raise AuthConfigError(f"{path}: {where}.role must be api or admin, got {role!r}")
        name = item.get("name", f"key-{i}")
        if not isinstance(name, str) or not name.strip():
            raise AuthConfigError(f"{path}: {where}.name must be a non-empty string")
        unlimited = item.get("unlimited", False)
        if not isinstance(unlimited, bool):
            raise AuthConfigError(f"{path}: {where}.unlimited must be true or false")
        rpm = _check_limit(item.get("requests_per_minute"), f"{where}.requests_per_minute", path)
        tpm = _check_limit(item.get("tokens_per_minute"), f"{where}.tokens_per_minute", path)
        if unlimited and (rpm or tpm):
            raise AuthConfigError(f"{path}: {where} sets limits and unlimited: true; keep one of them")
        entries.append(KeyEntry(
            _check_secret(item.get("key"), f"{where}.key", path), Permission(role), name.strip(), rpm, tpm, unlimited,
        ))
    return entries


def parse_tokens(data: Any, path: Path) -> tuple[KeyEntry, ...]:
    """Validate the parsed YAML of a keys file and turn it into key entries."""
    if data is None:
        raise AuthConfigError(f"{path} is empty; add `api_key:` and `admin_key:`, or delete it to get new random keys")
    if not isinstance(data, Mapping):
        raise AuthConfigError(f"{path} must be a mapping with `api_key:` and `admin_key:`, got {type(data).__name__}")
    for name in data:
        if name not in KNOWN_FIELDS:
            logger.warning("{}: ignoring unknown setting {!r} (known: {})", path, name, ", ".join(KNOWN_FIELDS))
    rich = data.get("keys") is not None
    if not rich:  # the simple form needs both; with `keys:` each is optional
        for name in ("api_key", "admin_key"):
            if data.get(name) is None:
                raise AuthConfigError(f"{path}: `{name}:` is missing or empty; add `{name}: \"<secret>\"`")

    entries: list[KeyEntry] = []
    raw_api = data.get("api_key")
    if raw_api is not None:
        if isinstance(raw_api, Mapping):
            raise AuthConfigError(f"{path}: api_key must be a string or a list of strings, got a mapping")
        if not isinstance(raw_api, list):
            raw_api = [raw_api]
        if not raw_api:
            raise AuthConfigError(f"{path}: api_key is an empty list; list at least one key")
        many = len(raw_api) > 1
        entries += [
            KeyEntry(_check_secret(value, f"api_key[{i}]" if many else "api_key", path), Permission.API,
                     f"api-{i}" if many else "api")
            for i, value in enumerate(raw_api)
        ]
    if data.get("admin_key") is not None:
        admin = _check_secret(data["admin_key"], "admin_key", path)
        if any(e.secret == admin for e in entries):
            raise AuthConfigError(f"{path}: admin_key must differ from every api_key")
        entries.append(KeyEntry(admin, Permission.ADMIN, "admin"))
    if rich:
        entries += _rich_keys(data["keys"], path)
    if not entries:
        raise AuthConfigError(f"{path}: no key is configured; add `api_key:`/`admin_key:` or entries under `keys:`")
    secrets_seen: set[str] = set()
    names_seen: set[str] = set()
    for e in entries:
        if e.secret in secrets_seen:
            raise AuthConfigError(f"{path}: the key of '{e.name}' is used twice; every key must be different")
        if e.name in names_seen:
            raise AuthConfigError(f"{path}: the name '{e.name}' is used twice; give every key its own name")
        secrets_seen.add(e.secret)
        names_seen.add(e.name)
    return tuple(entries)


def _new_tokens_file(path: Path) -> None:
    """Create the keys file with random secrets, readable by its owner only."""
    api_key, admin_key = secrets.token_hex(16), secrets.token_hex(16)
    text = (
        "# Parley API keys. Send one with each request as\n"
        "#   Authorization: Bearer <key>   or   X-API-Key: <key>\n"
        "# api_key may be one key or a list of keys. admin_key also opens the admin\n"
        "# endpoints (send it the same way, or as X-Admin-Key: <key>).\n"
        "# Named keys with their own rate limits go in a list:\n"
        "#   keys:\n"
        "#     - {key: \"<secret>\", name: alice, requests_per_minute: 60, tokens_per_minute: 20000}\n"
        "#     - {key: \"<secret>\", name: ops, role: admin}\n"
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
        admins = sum(e.permission is Permission.ADMIN for e in entries)
        limited = sum(bool(e.requests_per_minute or e.tokens_per_minute) for e in entries)
        logger.info(
            "Loaded {} API key(s) and {} admin key(s) from {}{}", len(entries) - admins, admins, path,
            f" ({limited} with their own rate limits)" if limited else "",
        )

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

    def _match(self, presented: str) -> KeyEntry | None:
        # Compare with every key, without stopping at a match, in constant time.
        given = presented.encode("utf-8", "surrogateescape")
        matched: KeyEntry | None = None
        for entry in self._entries:
            if hmac.compare_digest(given, entry.secret.encode("utf-8")):
                matched = entry
        return matched

    def identify(self, headers: Mapping[str, str]) -> KeyEntry | None:
        """The key entry the request presents (None when auth is disabled), or raise 401."""
        if self.disabled:
            return None
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
        entry = self._match(key)
        if entry is None:
            raise AuthenticationError(
                f"invalid API key: check it against {self.tokens_path.name} on the server",
                headers={"WWW-Authenticate": "Bearer"},
            )
        return entry

    def authenticate(self, headers: Mapping[str, str]) -> Permission:
        """Return the permission of the key in the request headers, or raise 401."""
        entry = self.identify(headers)
        return Permission.ADMIN if entry is None else entry.permission

    def require_entry(self, headers: Mapping[str, str], needed: Permission) -> KeyEntry | None:
        """Identify the key and check it grants `needed`; raises 401 or 403. None when auth is off."""
        entry = self.identify(headers)
        if entry is not None and not entry.permission.allows(needed):
            raise PermissionDeniedError(
                "this endpoint requires the admin key (admin_key in "
                f"{self.tokens_path.name}); send it as `Authorization: Bearer <key>` or `X-Admin-Key: <key>`"
            )
        return entry

    def require(self, headers: Mapping[str, str], needed: Permission) -> Permission:
        """Authenticate and check the key grants `needed`; raises 401 or 403."""
        entry = self.require_entry(headers, needed)
        return Permission.ADMIN if entry is None else entry.permission


def _manager(request: Request) -> AuthManager:
    manager = getattr(request.app.state, "auth", None)
    if not isinstance(manager, AuthManager):
        raise RuntimeError("app.state.auth must be set to an AuthManager before serving requests")
    return manager


def _remember(request: Request, entry: KeyEntry | None) -> Permission:
    """Note which key the request used (rate limits, logs and metrics read it from request.state)."""
    request.state.api_key = entry
    return Permission.ADMIN if entry is None else entry.permission


def key_of(request: Request) -> KeyEntry | None:
    """The key a request authenticated with, once an auth dependency ran (None if none did or auth is off)."""
    return getattr(request.state, "api_key", None)


def require_api(request: Request) -> Permission:
    """FastAPI dependency: any valid key (API or admin)."""
    return _remember(request, _manager(request).require_entry(request.headers, Permission.API))


def require_admin(request: Request) -> Permission:
    """FastAPI dependency: the admin key only."""
    return _remember(request, _manager(request).require_entry(request.headers, Permission.ADMIN))


async def permission_of(request: Request) -> Permission:
    """FastAPI dependency: which permission the request's key has (401 without a valid key)."""
    return _remember(request, _manager(request).identify(request.headers))
