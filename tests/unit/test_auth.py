from __future__ import annotations

import hmac
import os
import stat
from pathlib import Path

import pytest
from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse
from fastapi.testclient import TestClient
from ruamel.yaml import YAML

from endpoints.http.auth import (
    AuthConfigError,
    AuthManager,
    KeyEntry,
    Permission,
    permission_of,
    require_admin,
    require_api,
)
from common.errors import APIError, AuthenticationError, PermissionDeniedError

API = "api-key-0123456789abcdef"
API2 = "api-key-second-0123456789"
ADMIN = "admin-key-0123456789abcdef"


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def write_tokens(path: Path, text: str) -> None:
    path.write_text(text, encoding="utf-8")


@pytest.fixture
def tokens(tmp_path: Path) -> Path:
    path = tmp_path / "api_tokens.yml"
    write_tokens(path, f'api_key: "{API}"\nadmin_key: "{ADMIN}"\n')
    return path


@pytest.fixture
def manager(tokens: Path) -> AuthManager:
    return AuthManager(tokens)


# --- the keys file ---------------------------------------------------------


def test_missing_file_is_created_with_random_keys(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "api_tokens.yml"
    mgr = AuthManager(path)
    assert path.exists()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    data = YAML(typ="safe").load(path.read_text())
    assert isinstance(data["api_key"], str) and isinstance(data["admin_key"], str)
    assert len(data["api_key"]) == 32 and len(data["admin_key"]) == 32
    assert data["api_key"] != data["admin_key"]
    assert mgr.authenticate({"X-API-Key": data["api_key"]}) is Permission.API
    assert mgr.authenticate({"X-API-Key": data["admin_key"]}) is Permission.ADMIN
    # A second start reuses the file instead of making new keys.
    AuthManager(path)
    assert YAML(typ="safe").load(path.read_text()) == data


def test_created_keys_differ_between_files(tmp_path: Path) -> None:
    AuthManager(tmp_path / "a.yml")
    AuthManager(tmp_path / "b.yml")
    a = YAML(typ="safe").load((tmp_path / "a.yml").read_text())
    b = YAML(typ="safe").load((tmp_path / "b.yml").read_text())
    assert a["api_key"] != b["api_key"] and a["admin_key"] != b["admin_key"]


def test_load_classmethod(tokens: Path) -> None:
    mgr = AuthManager.load(str(tokens))
    assert mgr.tokens_path == tokens
    assert mgr.authenticate({"X-API-Key": API}) is Permission.API


def test_entries_are_parsed_and_secret_not_in_repr(manager: AuthManager) -> None:
    assert manager.entries == (KeyEntry(API, Permission.API, "api"), KeyEntry(ADMIN, Permission.ADMIN, "admin"))
    assert API not in repr(manager.entries)


def test_list_of_api_keys(tokens: Path) -> None:
    write_tokens(tokens, f'api_key:\n  - "{API}"\n  - "{API2}"\nadmin_key: "{ADMIN}"\n')
    mgr = AuthManager(tokens)
    assert mgr.authenticate({"X-API-Key": API}) is Permission.API
    assert mgr.authenticate({"X-API-Key": API2}) is Permission.API
    assert mgr.authenticate({"X-API-Key": ADMIN}) is Permission.ADMIN


def test_unknown_settings_are_ignored(tokens: Path) -> None:
    write_tokens(tokens, f'api_key: "{API}"\nadmin_key: "{ADMIN}"\nrate_limits: {{a: 1}}\n')
    mgr = AuthManager(tokens)
    assert mgr.authenticate({"X-API-Key": API}) is Permission.API


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("api_key: [unclosed\n", "not valid YAML"),
        ("", "empty"),
        ("- a\n- b\n", "mapping"),
        (f'admin_key: "{ADMIN}"\n', "api_key"),
        (f'api_key: "{API}"\n', "admin_key"),
        (f'api_key: ""\nadmin_key: "{ADMIN}"\n', "empty"),
        (f'api_key: []\nadmin_key: "{ADMIN}"\n', "empty list"),
        (f'api_key: 12345\nadmin_key: "{ADMIN}"\n', "quotes"),
        (f'api_key: {{a: 1}}\nadmin_key: "{ADMIN}"\n', "list of strings"),
        (f'api_key: ["{API}", 7]\nadmin_key: "{ADMIN}"\n', "api_key[1]"),
        (f'api_key: "{API}"\nadmin_key: "has space"\n', "whitespace"),
        (f'api_key: "{API}"\nadmin_key: "{API}"\n', "differ"),
    ],
)
def test_invalid_file_raises_naming_the_file(tokens: Path, text: str, fragment: str) -> None:
    write_tokens(tokens, text)
    with pytest.raises(AuthConfigError) as info:
        AuthManager(tokens)
    assert str(tokens) in str(info.value)
    assert fragment in str(info.value)


# --- authenticate / require ------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"Authorization": f"Bearer {API}"}, Permission.API),
        ({"authorization": f"bearer {ADMIN}"}, Permission.ADMIN),
        ({"X-API-Key": API}, Permission.API),
        ({"x-api-key": ADMIN}, Permission.ADMIN),
        ({"X-Admin-Key": ADMIN}, Permission.ADMIN),
        # The header does not grant anything: an API key stays an API key.
        ({"X-Admin-Key": API}, Permission.API),
    ],
)
def test_keys_are_accepted(manager: AuthManager, headers: dict[str, str], expected: Permission) -> None:
    assert manager.authenticate(headers) is expected


def test_header_order_authorization_first(manager: AuthManager) -> None:
    headers = {"X-API-Key": "wrong", "X-Admin-Key": "wrong", "Authorization": f"Bearer {ADMIN}"}
    assert manager.authenticate(headers) is Permission.ADMIN
    assert manager.authenticate({"X-API-Key": API, "X-Admin-Key": ADMIN}) is Permission.ADMIN
    with pytest.raises(AuthenticationError):
        manager.authenticate({"X-Admin-Key": "wrong", "X-API-Key": ADMIN})


def test_wrong_key_is_401(manager: AuthManager) -> None:
    with pytest.raises(AuthenticationError) as info:
        manager.authenticate({"Authorization": "Bearer nope"})
    assert info.value.status == 401
    assert "invalid API key" in info.value.message
    # A prefix of a real key is not a match.
    with pytest.raises(AuthenticationError):
        manager.authenticate({"X-API-Key": API[:-1]})


@pytest.mark.parametrize("headers", [{}, {"X-API-Key": ""}, {"Authorization": "Bearer "}, {"Other": API}])
def test_missing_key_is_401_and_says_how(manager: AuthManager, headers: dict[str, str]) -> None:
    with pytest.raises(AuthenticationError) as info:
        manager.authenticate(headers)
    assert info.value.status == 401
    assert "Authorization: Bearer" in info.value.message and "X-API-Key" in info.value.message
    assert info.value.headers["WWW-Authenticate"] == "Bearer"


def test_non_bearer_authorization_is_explained(manager: AuthManager) -> None:
    with pytest.raises(AuthenticationError) as info:
        manager.authenticate({"Authorization": f"Basic {API}"})
    assert "Bearer <key>" in info.value.message
    # Another header still works next to a non-Bearer Authorization (e.g. from a proxy).
    assert manager.authenticate({"Authorization": "Basic abc", "X-API-Key": API}) is Permission.API


def test_api_key_on_admin_is_403(manager: AuthManager) -> None:
    with pytest.raises(PermissionDeniedError) as info:
        manager.require({"X-API-Key": API}, Permission.ADMIN)
    assert info.value.status == 403
    assert "admin key" in info.value.message


def test_admin_key_on_api_is_ok(manager: AuthManager) -> None:
    assert manager.require({"X-API-Key": ADMIN}, Permission.API) is Permission.ADMIN
    assert manager.require({"X-Admin-Key": ADMIN}, Permission.ADMIN) is Permission.ADMIN
    assert manager.require({"X-API-Key": API}, Permission.API) is Permission.API


def test_require_checks_the_key_before_the_permission(manager: AuthManager) -> None:
    with pytest.raises(AuthenticationError):
        manager.require({"X-API-Key": "nope"}, Permission.ADMIN)


def test_disabled_mode(tmp_path: Path) -> None:
    path = tmp_path / "api_tokens.yml"
    mgr = AuthManager(path, disabled=True)
    assert not path.exists()
    assert mgr.authenticate({}) is Permission.ADMIN
    assert mgr.require({}, Permission.ADMIN) is Permission.ADMIN
    assert mgr.authenticate({"X-API-Key": "anything"}) is Permission.ADMIN


def test_compares_with_every_key(tokens: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_tokens(tokens, f'api_key: ["{API}", "{API2}"]\nadmin_key: "{ADMIN}"\n')
    mgr = AuthManager(tokens)
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        assert isinstance(a, bytes) and isinstance(b, bytes)
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    assert mgr.authenticate({"X-API-Key": API}) is Permission.API
    assert len(calls) == 3  # no early exit on the first match


# --- reload ------------------------------------------------------------------


def bump_mtime(path: Path, seconds: int = 10) -> None:
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + seconds * 1_000_000_000))


def test_reload_after_edit(tokens: Path) -> None:
    clock = FakeClock()
    mgr = AuthManager(tokens, clock=clock)
    write_tokens(tokens, f'api_key: "{API2}"\nadmin_key: "{ADMIN}"\n')
    bump_mtime(tokens)
    # Within the throttle interval the file is not looked at.
    clock.now += 0.5
    assert mgr.authenticate({"X-API-Key": API}) is Permission.API
    clock.now += 0.6
    assert mgr.authenticate({"X-API-Key": API2}) is Permission.API
    with pytest.raises(AuthenticationError):
        mgr.authenticate({"X-API-Key": API})


def test_reload_detects_size_change_with_same_mtime(tokens: Path) -> None:
    clock = FakeClock()
    mgr = AuthManager(tokens, clock=clock)
    st = tokens.stat()
    write_tokens(tokens, f'api_key: ["{API}", "{API2}"]\nadmin_key: "{ADMIN}"\n')
    os.utime(tokens, ns=(st.st_atime_ns, st.st_mtime_ns))
    clock.now += 1
    assert mgr.maybe_reload() is True
    assert mgr.authenticate({"X-API-Key": API2}) is Permission.API


def test_no_reload_when_unchanged(tokens: Path) -> None:
    clock = FakeClock()
    mgr = AuthManager(tokens, clock=clock)
    clock.now += 5
    assert mgr.maybe_reload() is False


def test_broken_edit_keeps_previous_keys(tokens: Path) -> None:
    clock = FakeClock()
    mgr = AuthManager(tokens, clock=clock)
    write_tokens(tokens, "api_key: [broken\n")
    bump_mtime(tokens)
    clock.now += 2
    assert mgr.authenticate({"X-API-Key": API}) is Permission.API
    # Fixing the file later is picked up.
    write_tokens(tokens, f'api_key: "{API2}"\nadmin_key: "{ADMIN}"\n')
    bump_mtime(tokens, 20)
    clock.now += 2
    assert mgr.authenticate({"X-API-Key": API2}) is Permission.API


def test_deleted_file_keeps_previous_keys(tokens: Path) -> None:
    clock = FakeClock()
    mgr = AuthManager(tokens, clock=clock)
    tokens.unlink()
    clock.now += 2
    assert mgr.authenticate({"X-API-Key": API}) is Permission.API
    assert not tokens.exists()


# --- FastAPI dependencies ----------------------------------------------------


@pytest.fixture
def client(manager: AuthManager) -> TestClient:
    app = FastAPI()
    app.state.auth = manager

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError) -> JSONResponse:
        return JSONResponse(status_code=e.status, content=e.openai_body(), headers=e.headers)

    @app.get("/v1/models")
    async def models(permission: Permission = Depends(permission_of)) -> dict[str, str]:
        return {"permission": permission.value}

    @app.post("/v1/completions")
    def completions(permission: Permission = Depends(require_api)) -> dict[str, str]:
        return {"permission": permission.value}

    @app.post("/v1/model/load")
    async def load(permission: Permission = Depends(require_admin)) -> dict[str, str]:
        return {"permission": permission.value}

    return TestClient(app)


def test_http_api_endpoint(client: TestClient) -> None:
    r = client.post("/v1/completions", headers={"Authorization": f"Bearer {API}"})
    assert r.status_code == 200 and r.json() == {"permission": "api"}
    r = client.post("/v1/completions", headers={"X-API-Key": ADMIN})
    assert r.status_code == 200 and r.json() == {"permission": "admin"}


def test_http_missing_and_wrong_key_are_401(client: TestClient) -> None:
    r = client.post("/v1/completions")
    assert r.status_code == 401
    assert r.headers["www-authenticate"] == "Bearer"
    assert r.json()["error"]["type"] == "authentication_error"
    r = client.post("/v1/completions", headers={"X-API-Key": "nope"})
    assert r.status_code == 401
    assert r.json()["error"]["code"] == "invalid_api_key"


def test_http_admin_endpoint(client: TestClient) -> None:
    r = client.post("/v1/model/load", headers={"X-API-Key": API})
    assert r.status_code == 403
    assert r.json()["error"]["type"] == "permission_error"
    r = client.post("/v1/model/load", headers={"X-Admin-Key": ADMIN})
    assert r.status_code == 200 and r.json() == {"permission": "admin"}


def test_http_permission_of(client: TestClient) -> None:
    assert client.get("/v1/models", headers={"X-API-Key": API}).json() == {"permission": "api"}
    assert client.get("/v1/models", headers={"X-API-Key": ADMIN}).json() == {"permission": "admin"}
    assert client.get("/v1/models").status_code == 401
