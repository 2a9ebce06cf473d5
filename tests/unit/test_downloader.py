"""Download request validation, file checks, folder rules and error mapping (no network)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from common.downloads.errors import DownloadCancelled, hub_error
from common.downloads.hubcompat import entry_not_found_error, transport_errors, transport_name
from common.downloads.request import DownloadRequest, check_repo_id, check_request
from common.downloads.transfer import (
    STATE_DIR,
    DownloadPlan,
    FolderLock,
    RemoteFile,
    _check_folder,
    _safe_repo_path,
    check_disk_space,
)
from common.errors import APIError, BadRequestError, ConflictError


@pytest.mark.parametrize("repo_id", ["bartowski/SmolLM2-135M-Instruct-GGUF", "gpt2", "Org_1/model.v2-GGUF"])
def test_repo_ids_accepted(repo_id: str) -> None:
    assert check_repo_id(repo_id) == repo_id


@pytest.mark.parametrize("repo_id", [
    "", "../x", "x/..", "a/b/c", "/abs", "a\\b", "a/b\x00", "a/../b", "-a/b", "a/b.git", "a/ b",
    "https://huggingface.co/a/b", "hf.co/a/b", "a" * 97 + "/b",
])
def test_repo_ids_refused(repo_id: str) -> None:
    with pytest.raises(BadRequestError) as info:
        check_repo_id(repo_id)
    assert info.value.param == "repo_id" and "owner/name" in info.value.message


@pytest.mark.parametrize(("changes", "param"), [
    ({"revision": ""}, "revision"),
    ({"revision": "a..b"}, "revision"),
    ({"revision": "has space"}, "revision"),
    ({"revision": "x\x00"}, "revision"),
    ({"include": ["ok", ""]}, "include"),
    ({"exclude": ["bad\nglob"]}, "exclude"),
    ({"folder_name": ".."}, "folder_name"),
    ({"folder_name": "a/b"}, "folder_name"),
    ({"folder_name": "x" * 256}, "folder_name"),
    ({"repo_type": "bucket"}, "repo_type"),
])
def test_request_fields_checked(changes: dict, param: str) -> None:
    with pytest.raises(BadRequestError) as info:
        check_request(DownloadRequest("owner/name", **changes))
    assert info.value.param == param


def test_request_fields_accepted() -> None:
    check_request(DownloadRequest("owner/name", revision="refs/pr/1", include=["*.gguf", "sub/*"],
                                  exclude=["*Q8_0*"], folder_name="My Model", repo_type="dataset"))


def test_token_stays_out_of_reprs() -> None:
    assert "hf_secret" not in repr(DownloadRequest("owner/name", token="hf_secret"))


@pytest.mark.parametrize(("path", "safe"), [
    ("model.gguf", True), ("sub/dir/config.json", True), (".gitattributes", True),
    ("../escape", False), ("a/../../b", False), ("/etc/passwd", False), ("a\\b", False), ("a\x00b", False),
    (".incomplete", False), (f"{STATE_DIR}/lock", False), (".cache/huggingface/x", False), ("", False),
])
def test_repo_file_paths_that_may_be_written(path: str, safe: bool) -> None:
    assert _safe_repo_path(path) is safe


def test_file_checks_use_lfs_sha256_or_git_blob_id(tmp_path: Path) -> None:
    local = tmp_path / "f"
    local.write_bytes(b"hello\n")
    # `git hash-object` of "hello\n"
    assert RemoteFile("f", 6, blob_id="ce013625030ba8dba906f756967f9e9ca394464a").mismatch(local) is None
    assert "git blob id" in (RemoteFile("f", 6, blob_id="0" * 40).mismatch(local) or "")
    good = hashlib.sha256(b"hello\n").hexdigest()
    assert RemoteFile("f", 6, sha256=good).mismatch(local) is None
    assert "sha256" in (RemoteFile("f", 6, sha256="f" * 64).mismatch(local) or "")
    assert RemoteFile("f", 7, sha256=good).mismatch(local) == "6 bytes instead of 7"
    assert RemoteFile("f", None).mismatch(local) is None
    # Partial files are named after the content, so a new commit with the same file resumes it.
    assert RemoteFile("a", 1, sha256="ab" * 32).partial_name("c1") == RemoteFile("b", 1, sha256="ab" * 32).partial_name("c2")


def test_folder_rules(tmp_path: Path) -> None:
    req = DownloadRequest("owner/name")
    _check_folder(tmp_path / "new", req)  # a new folder is fine
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConflictError) as info:
        _check_folder(tmp_path / "file", req)
    assert info.value.param == "folder_name"
    mine = tmp_path / "mine"
    (mine / "mine.gguf").parent.mkdir()
    (mine / "mine.gguf").write_text("x")
    with pytest.raises(ConflictError, match="did not come from a download"):
        _check_folder(mine, req)
    (mine / STATE_DIR).mkdir()
    (mine / STATE_DIR / "manifest.json").write_text(json.dumps({"repo_id": "other/repo"}))
    with pytest.raises(ConflictError, match="other/repo"):
        _check_folder(mine, req)
    (mine / STATE_DIR / "manifest.json").write_text(json.dumps({"repo_id": "owner/name"}))
    _check_folder(mine, req)  # the same repo again: adds or updates files


def test_folder_lock_is_exclusive(tmp_path: Path) -> None:
    first, second = FolderLock(tmp_path / "m"), FolderLock(tmp_path / "m")
    first.acquire()
    with pytest.raises(ConflictError) as info:
        second.acquire()
    assert info.value.status == 409 and "already running" in info.value.message
    first.release()
    second.acquire()
    second.release()


def test_disk_space_is_checked_before_downloading(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil
    from types import SimpleNamespace

    plan = DownloadPlan(DownloadRequest("owner/name"), tmp_path / "name", "http://hub", "c" * 40,
                        [RemoteFile("big.gguf", 5_000_000_000, sha256="a" * 64)])
    monkeypatch.setattr(shutil, "disk_usage", lambda path: SimpleNamespace(total=10**10, used=9 * 10**9, free=10**9))
    with pytest.raises(APIError) as info:
        check_disk_space(plan)
    assert info.value.status == 507 and "5.00 GB" in info.value.message and "include" in info.value.message


# -- failures built with the HTTP client the installed huggingface_hub uses (requests before 1.0, then httpx,
# then httpx2), so the mapping is checked against the classes it really raises.
URL = "http://hub/owner/name/resolve/main/x"


def connect_failure() -> BaseException:
    import importlib

    transport = importlib.import_module(transport_name())
    if transport_name() == "requests":
        return transport.ConnectionError("refused")
    return transport.ConnectError("refused")


def hub_failure(status: int, cls: type | None = None) -> BaseException:
    import importlib

    from huggingface_hub.errors import HfHubHTTPError

    transport = importlib.import_module(transport_name())
    if transport_name() == "requests":
        response = transport.Response()
        response.status_code, response.url = status, URL
        response.request = transport.Request("GET", URL).prepare()
    else:
        response = transport.Response(status, request=transport.Request("GET", URL))
    return (cls or HfHubHTTPError)(f"{status} error", response=response)


def test_the_transport_in_use_is_known() -> None:
    from huggingface_hub.errors import HfHubHTTPError

    assert transport_name() in ("requests", "httpx", "httpx2")
    assert isinstance(connect_failure(), transport_errors())
    assert not issubclass(HfHubHTTPError, transport_errors())  # an answer of the hub is no connection failure
    assert issubclass(entry_not_found_error(), HfHubHTTPError)


def test_transport_and_local_failures_map_to_advice() -> None:
    req = DownloadRequest("owner/name")
    err = hub_error(connect_failure(), req, "http://mirror")
    assert err.status == 503 and err.code == "hub_unreachable" and "http://mirror" in err.message
    assert err.headers["Retry-After"]
    err = hub_error(OSError(28, "No space left on device"), req, "http://mirror")
    assert err.status == 507 and "free space" in err.message
    err = hub_error(DownloadCancelled(), req, "http://mirror")
    assert err.status == 503 and "resume" in err.message
    mine = BadRequestError("x", param="repo_id")
    assert hub_error(mine, req, "http://mirror") is mine


def test_hub_http_statuses_map_to_advice() -> None:
    failure = hub_failure
    req = DownloadRequest("owner/name")
    assert (hub_error(failure(401), req, "h").status, hub_error(failure(401), req, "h").param) == (401, "token")
    assert hub_error(failure(403), req, "h").status == 403
    limited = hub_error(failure(429), req, "h")
    assert limited.status == 429 and limited.headers["Retry-After"] == "60"
    assert (hub_error(failure(500), req, "h").status, hub_error(failure(500), req, "h").code) == (502, "hub_error")
    gone = hub_error(hub_failure(404, entry_not_found_error()), req, "h")
    assert (gone.status, gone.code) == (502, "hub_error") and "disappeared" in gone.message
