"""POST /v1/download, GET /v1/downloads and `main.py download` against a local fake hub.

The fake hub (tests/fake_hub.py) speaks the part of the Hugging Face Hub protocol that
huggingface_hub uses (0.36 on requests up to 2.x on httpx2); it serves a copy of the real SmolLM2
GGUF so a downloaded model is loaded for real.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from tests.conftest import (
    MODEL_FILE,
    MODEL_NAME,
    ROOT,
    Keys,
    free_port,
    make_config,
    run_server,
)
from tests.fake_hub import FakeHub

GGUF_REPO = "acme/SmolLM2-GGUF"
TINY_REPO = "acme/tiny"
GATED_REPO = "acme/gated"
TEN_MIB = 10 * 1024 * 1024  # huggingface_hub writes what it receives in blocks of this size


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


@pytest.fixture(scope="module")
def hub(model_path: Path) -> Iterator[FakeHub]:
    with FakeHub() as fake:
        fake.add_repo(GGUF_REPO, {MODEL_FILE: model_path, "README.md": b"# SmolLM2 GGUF\n"})
        fake.add_repo(TINY_REPO, {
            "config.json": b'{"model_type": "llama", "version": 1}',
            "tokenizer.json": b'{"version": "1.0"}',
            "model-00001-of-00002.safetensors": b"\x01" * 4096,
            "model-00002-of-00002.safetensors": b"\x02" * 2048,
            "docs/usage.md": b"How to use it.\n",
        })
        fake.add_repo(TINY_REPO, {"config.json": b'{"model_type": "llama", "version": 2}'}, revision="v2")
        fake.add_repo(GATED_REPO, {"config.json": b"{}", "w.safetensors": b"\x03" * 1000},
                      gated=True, tokens=("hf_granted",))
        yield fake


@pytest.fixture(scope="module")
def env(hub: FakeHub, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[TestClient, Keys, Path]]:
    """An app over an empty model directory of its own, pointed at the fake hub; no model loaded."""
    from endpoints.app import create_app

    tmp = tmp_path_factory.mktemp("downloads")
    model_dir = tmp / "models"
    model_dir.mkdir()
    config = make_config(tmp, model_dir, model={"hf_endpoint": hub.url, "model_name": None})
    with TestClient(create_app(config, load_model_on_startup=False)) as client:
        keys = Keys(tmp / "api_tokens.yml")
        client.headers.update(keys.admin_headers())
        yield client, keys, model_dir


@pytest.fixture
def client(env: tuple[TestClient, Keys, Path]) -> TestClient:
    return env[0]


@pytest.fixture
def model_dir(env: tuple[TestClient, Keys, Path]) -> Path:  # shadows the session-wide one on purpose
    return env[2]


def listed(client: TestClient) -> list[str]:
    return [m["id"] for m in client.get("/v1/model/list").json()["data"]]


def download_events(client: TestClient, body: dict[str, Any]) -> tuple[int, list[dict[str, Any]]]:
    with client.stream("POST", "/v1/download", json=body) as r:
        if r.status_code != 200:
            r.read()
            return r.status_code, [r.json()]
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: ")]
    return r.status_code, events


# -- the whole flow with the real model ------------------------------------------------
def test_gguf_is_listed_only_when_complete_then_loads(
    client: TestClient, hub: FakeHub, model_dir: Path, model_path: Path
) -> None:
    hub.release.clear()
    hub.fail(MODEL_FILE, ("stall", 5 * TEN_MIB))
    results: dict[str, Any] = {}

    def streamed() -> None:
        results["stream"] = download_events(client, {"repo_id": GGUF_REPO, "include": ["*.gguf"]})

    def joined() -> None:
        results["joined"] = client.post("/v1/download", json={"repo_id": GGUF_REPO, "include": ["*.gguf"],
                                                              "stream": False})

    first = threading.Thread(target=streamed)
    first.start()
    try:
        assert hub.stalled.wait(60), "the download never reached the stall point"
        folder = model_dir / "SmolLM2-GGUF"
        # Half-way: hidden from the listing and from the loader, nothing named *.gguf on disk yet.
        assert "SmolLM2-GGUF" not in listed(client)
        assert (folder / ".incomplete").exists() and list(folder.rglob("*.gguf")) == []
        r = client.post("/v1/model/load", json={"model_name": "SmolLM2-GGUF"})
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
        running = client.get("/v1/downloads").json()["data"]
        assert [(d["repo_id"], d["folder"], d["file"]) for d in running] == [(GGUF_REPO, "SmolLM2-GGUF", MODEL_FILE)]
        assert 0 < running[0]["bytes_done"] < running[0]["bytes_total"] == model_path.stat().st_size
        # Other files into the same folder: refused; the same download: joins the running one.
        r = client.post("/v1/download", json={"repo_id": GGUF_REPO, "include": ["README.md"], "stream": False})
        assert r.status_code == 409 and r.json()["error"]["param"] == "folder_name"
        second = threading.Thread(target=joined)
        second.start()
        deadline = time.monotonic() + 60
        while client.get("/v1/downloads").json()["data"][0]["requests"] < 2:
            assert time.monotonic() < deadline, "the second request did not join the running download"
            time.sleep(0.05)
    finally:
        hub.release.set()
    first.join(120)
    second.join(120)

    status, events = results["stream"]
    assert status == 200
    progress, final = events[:-1], events[-1]
    assert progress and all(e["object"] == "download.progress" for e in progress)
    done = [e["bytes_done"] for e in progress]
    assert done == sorted(done) and progress[-1]["bytes_done"] == progress[-1]["bytes_total"]
    assert {e["file"] for e in progress} >= {MODEL_FILE}
    assert final["object"] == "download.finished" and final["files"] == [MODEL_FILE]
    assert final["model_name"] == "SmolLM2-GGUF" and final["download_path"] == str(folder)
    assert results["joined"].status_code == 200 and results["joined"].json()["revision"] == final["revision"]
    assert len(hub.gets(MODEL_FILE)) == 1  # the joined request fetched nothing itself

    assert sha256_of(folder / MODEL_FILE) == sha256_of(model_path)
    assert not (folder / ".incomplete").exists() and "SmolLM2-GGUF" in listed(client)
    assert client.get("/v1/downloads").json()["data"] == []
    with client.stream("POST", "/v1/model/load", json={"model_name": "SmolLM2-GGUF", "max_seq_len": 512}) as r:
        frames = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: ")]
    assert r.status_code == 200 and frames[-1]["status"] == "finished"
    try:
        assert client.get("/v1/model").json()["id"] == "SmolLM2-GGUF"
        out = client.post("/v1/completions", json={"prompt": "The capital of France is", "max_tokens": 3})
        assert out.status_code == 200 and out.json()["choices"][0]["text"]
    finally:
        client.post("/v1/model/unload", json={})


def test_interrupted_transfer_resumes_with_a_range_request(
    client: TestClient, hub: FakeHub, model_dir: Path, model_path: Path
) -> None:
    before = len(hub.gets(MODEL_FILE))
    # The connection drops after 45 MB; the download resumes at once with a Range request (inside
    # huggingface_hub >=1.0, in Parley for 0.x), which the hub answers 501: the attempt fails, and what
    # arrived stays as the partial file. (501: huggingface_hub 0.x itself retries 500/502/503/504 with
    # backoff, later releases only 408/429; no release retries 501.)
    hub.fail(MODEL_FILE, ("drop", 45_000_000), ("status", 501))
    body = {"repo_id": GGUF_REPO, "include": ["*.gguf"], "folder_name": "resumed", "stream": False}
    r = client.post("/v1/download", json=body)
    assert r.status_code == 502 and r.json()["error"]["code"] == "hub_error"
    assert "again" in r.json()["error"]["message"]
    folder = model_dir / "resumed"
    parts = list((folder / ".parley-download").glob("*.part"))
    assert len(parts) == 1 and parts[0].stat().st_size == 4 * TEN_MIB
    assert "resumed" not in listed(client) and not (folder / MODEL_FILE).exists()

    r = client.post("/v1/download", json=body)
    assert r.status_code == 200 and r.json()["files"] == [MODEL_FILE]
    ranges = [s.range for s in hub.gets(MODEL_FILE)[before:]]
    assert ranges == [None, f"bytes={4 * TEN_MIB}-", f"bytes={4 * TEN_MIB}-"]
    assert sha256_of(folder / MODEL_FILE) == sha256_of(model_path)
    assert "resumed" in listed(client) and list((folder / ".parley-download").glob("*.part")) == []


# -- choosing files ---------------------------------------------------------------------------
def test_include_exclude_revision_and_folder_name(client: TestClient, hub: FakeHub, model_dir: Path) -> None:
    r = client.post("/v1/download", json={"repo_id": TINY_REPO, "include": ["*.json", "docs/*"],
                                          "exclude": ["tokenizer*"], "stream": False})
    assert r.status_code == 200, r.text
    assert sorted(r.json()["files"]) == ["config.json", "docs/usage.md"]
    folder = model_dir / "tiny"
    assert json.loads((folder / "config.json").read_text())["version"] == 1
    assert (folder / "docs" / "usage.md").read_bytes() == b"How to use it.\n"
    assert not (folder / "tokenizer.json").exists() and "tiny" in listed(client)

    status, events = download_events(client, {"repo_id": TINY_REPO, "revision": "v2", "folder_name": "tiny-v2"})
    assert status == 200 and events[-1]["revision"] == hub.repos[("model", TINY_REPO)].refs["v2"]
    assert json.loads((model_dir / "tiny-v2" / "config.json").read_text())["version"] == 2
    assert events[-1]["files"] == ["config.json"]

    # A second download of the same repo into its folder adds files and keeps the model listed.
    r = client.post("/v1/download", json={"repo_id": TINY_REPO, "include": "*.safetensors", "stream": False})
    assert r.status_code == 200 and len(r.json()["files"]) == 2
    assert (folder / "model-00002-of-00002.safetensors").read_bytes() == b"\x02" * 2048
    # Another repo into that folder is refused.
    r = client.post("/v1/download", json={"repo_id": GATED_REPO, "folder_name": "tiny", "token": "hf_granted",
                                          "stream": False})
    assert r.status_code == 409 and r.json()["error"]["param"] == "folder_name"


def test_nothing_matched_is_an_error_not_an_empty_model(client: TestClient, hub: FakeHub, model_dir: Path) -> None:
    r = client.post("/v1/download", json={"repo_id": TINY_REPO, "include": ["*.gguf"], "folder_name": "none"})
    err = r.json()["error"]
    assert r.status_code == 404 and err["param"] == "include" and err["code"] == "no_matching_files"
    assert "config.json" in err["message"] and "globs" in err["message"]
    r = client.post("/v1/download", json={"repo_id": TINY_REPO, "exclude": ["*"], "folder_name": "none"})
    assert r.status_code == 404 and r.json()["error"]["param"] == "exclude"
    assert not (model_dir / "none").exists()


# -- refusals ---------------------------------------------------------------------------------
@pytest.mark.parametrize(("body", "param"), [
    ({"repo_id": "../x"}, "repo_id"),
    ({"repo_id": "a/b/c"}, "repo_id"),
    ({"repo_id": "/etc/passwd"}, "repo_id"),
    ({"repo_id": "a\\b"}, "repo_id"),
    ({"repo_id": "a/b\x00c"}, "repo_id"),
    ({"repo_id": "owner/.."}, "repo_id"),
    ({"repo_id": "https://huggingface.co/a/b"}, "repo_id"),
    ({"repo_id": ""}, "repo_id"),
    ({"repo_id": TINY_REPO, "folder_name": "../escape"}, "folder_name"),
    ({"repo_id": TINY_REPO, "folder_name": "a/b"}, "folder_name"),
    ({"repo_id": TINY_REPO, "folder_name": "/tmp/x"}, "folder_name"),
    ({"repo_id": TINY_REPO, "folder_name": ".hidden"}, "folder_name"),
    ({"repo_id": TINY_REPO, "folder_name": "a\\b"}, "folder_name"),
    ({"repo_id": TINY_REPO, "revision": "main branch"}, "revision"),
    ({"repo_id": TINY_REPO, "include": [""]}, "include"),
    ({"repo_id": TINY_REPO, "repo_type": "bucket"}, "repo_type"),
])
def test_bad_fields_are_400_before_the_hub_is_asked(
    client: TestClient, hub: FakeHub, model_dir: Path, body: dict[str, Any], param: str
) -> None:
    asked, entries = len(hub.requests), sorted(p.name for p in model_dir.iterdir())
    r = client.post("/v1/download", json=body)
    err = r.json()["error"]
    assert r.status_code == 400 and err["param"] == param and err["type"] == "invalid_request_error"
    assert len(hub.requests) == asked and sorted(p.name for p in model_dir.iterdir()) == entries


def test_hub_answers_become_clear_errors(client: TestClient, model_dir: Path) -> None:
    r = client.post("/v1/download", json={"repo_id": "acme/missing"})
    assert r.status_code == 404 and r.json()["error"]["param"] == "repo_id" and "spelling" in r.json()["error"]["message"]
    r = client.post("/v1/download", json={"repo_id": TINY_REPO, "revision": "v9", "folder_name": "v9"})
    assert r.status_code == 404 and r.json()["error"]["param"] == "revision"
    r = client.post("/v1/download", json={"repo_id": GATED_REPO})
    err = r.json()["error"]
    assert r.status_code == 401 and err["code"] == "gated_repo" and err["param"] == "token"
    assert "accept its terms" in err["message"]
    # A token without access: the hub refuses the file itself, after the stream started.
    status, events = download_events(client, {"repo_id": GATED_REPO, "token": "hf_other"})
    assert status == 200 and events[-1]["error"]["code"] == "gated_repo" and "no access" in events[-1]["error"]["message"]
    assert not (model_dir / "gated").exists()  # nothing fetched, nothing left behind
    r = client.post("/v1/download", json={"repo_id": GATED_REPO, "token": "hf_granted", "stream": False})
    assert r.status_code == 200 and sorted(r.json()["files"]) == ["config.json", "w.safetensors"]


def test_unreachable_hub_is_503_and_lists_nothing(tmp_path: Path) -> None:
    from endpoints.app import create_app

    model_dir = tmp_path / "models"
    model_dir.mkdir()
    config = make_config(tmp_path, model_dir, model={"hf_endpoint": f"http://127.0.0.1:{free_port()}"},
                         network={"disable_auth": True})
    with TestClient(create_app(config, load_model_on_startup=False)) as client:
        for stream in (True, False):
            r = client.post("/v1/download", json={"repo_id": TINY_REPO, "stream": stream})
            err = r.json()["error"]
            assert r.status_code == 503 and err["code"] == "hub_unreachable"
            assert "hf_endpoint" in err["message"] and r.headers["Retry-After"]
        assert client.get("/v1/model/list").json()["data"] == [] and list(model_dir.iterdir()) == []


def test_admin_key_required(env: tuple[TestClient, Keys, Path]) -> None:
    client, keys, _ = env
    bare = TestClient(client.app)
    assert bare.post("/v1/download", json={"repo_id": TINY_REPO}).status_code == 401
    r = bare.post("/v1/download", json={"repo_id": TINY_REPO}, headers=keys.api_headers())
    assert r.status_code == 403
    assert bare.get("/v1/downloads", headers=keys.api_headers()).status_code == 403


# -- a client that leaves (real socket) ---------------------------------------------------------
def test_client_that_leaves_does_not_stop_the_download(
    hub: FakeHub, model_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model_dir = tmp_path / "models"
    model_dir.mkdir()
    (model_dir / MODEL_FILE).symlink_to(model_path)
    monkeypatch.setenv("HF_ENDPOINT", hub.url)  # read by huggingface_hub when the server imports it
    hub.release.clear()
    hub.fail(MODEL_FILE, ("stall", 3 * TEN_MIB))
    with run_server(model_dir, MODEL_NAME, tmp_path) as server:
        admin = {"X-Admin-Key": server.keys.admin}
        body = {"repo_id": GGUF_REPO, "include": ["*.gguf"], "folder_name": "left"}
        try:
            with httpx.stream("POST", server.base_url + "/v1/download", json=body, headers=admin, timeout=60) as r:
                assert r.status_code == 200
                for line in r.iter_lines():
                    if line.startswith("data: ") and json.loads(line[6:])["bytes_done"] > 0:
                        break  # leave mid-download
            assert hub.stalled.wait(60)
            running = httpx.get(server.base_url + "/v1/downloads", headers=admin).json()["data"]
            assert [d["folder"] for d in running] == ["left"]
        finally:
            hub.release.set()
        deadline = time.monotonic() + 120
        while "left" not in [m["id"] for m in httpx.get(server.base_url + "/v1/model/list", headers=admin).json()["data"]]:
            assert time.monotonic() < deadline, "the download did not finish after its client left"
            time.sleep(0.2)
    assert sha256_of(model_dir / "left" / MODEL_FILE) == sha256_of(model_path)


# -- shutdown ---------------------------------------------------------------------------------
async def test_shutdown_stops_a_download_and_keeps_what_arrived(hub: FakeHub, tmp_path: Path) -> None:
    import asyncio

    from common.downloads.jobs import DownloadManager
    from common.downloads.request import DownloadRequest
    from common.errors import APIError
    from common.models.files import scan_models

    manager = DownloadManager(tmp_path, hub.url)
    hub.release.clear()
    hub.fail(MODEL_FILE, ("stall", 3 * TEN_MIB))
    plan = await manager.plan(DownloadRequest(GGUF_REPO, include=["*.gguf"], folder_name="stopped"))
    job, joined = manager.start(plan)
    assert not joined and await asyncio.to_thread(hub.stalled.wait, 60)
    closing = asyncio.create_task(manager.close())
    await asyncio.sleep(0)  # close() has asked the job to stop; the next block of bytes stops it
    hub.release.set()
    await closing
    with pytest.raises(APIError) as info:
        await job.result()
    assert info.value.status == 503 and info.value.code == "download_cancelled" and "resume" in info.value.message
    folder = tmp_path / "stopped"
    kept = [p.stat().st_size for p in (folder / ".parley-download").glob("*.part")]
    assert len(kept) == 1 and 0 < kept[0] <= 3 * TEN_MIB and kept[0] % TEN_MIB == 0
    assert (folder / ".incomplete").exists() and scan_models(tmp_path) == [] and manager.active() == []


# -- the command line ---------------------------------------------------------------------------
def cli(tmp: Path, *args: str) -> subprocess.CompletedProcess[str]:
    (tmp / "empty.yml").touch()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PARLEY_", "HF_"))}
    return subprocess.run(
        [sys.executable, str(ROOT / "main.py"), "download", *args, "--config", str(tmp / "empty.yml")],
        cwd=tmp, env=env, capture_output=True, text=True, timeout=300, check=False,
    )


def test_cli_downloads_refuses_and_resumes(hub: FakeHub, model_path: Path, tmp_path: Path) -> None:
    models = tmp_path / "models"
    where = ["--model-dir", str(models), "--hf-endpoint", hub.url]
    done = cli(tmp_path, TINY_REPO, "--include", "*.json", "--exclude", "tokenizer*", "--folder-name", "cli-tiny", *where)
    assert done.returncode == 0, done.stderr
    assert "Downloaded acme/tiny (1 file(s)" in done.stdout and "--model-name cli-tiny" in done.stdout
    assert json.loads((models / "cli-tiny" / "config.json").read_text())["version"] == 1

    bad = cli(tmp_path, "../etc", *where)
    assert bad.returncode == 2 and "Download failed" in bad.stderr and "owner/name" in bad.stderr

    before = len(hub.gets(MODEL_FILE))
    hub.fail(MODEL_FILE, ("drop", 25_000_000), ("status", 501))  # 501: see the test above
    failed = cli(tmp_path, GGUF_REPO, "--include", "*.gguf", *where)
    assert failed.returncode == 1 and "resumes" in failed.stderr
    resumed = cli(tmp_path, GGUF_REPO, "--include", "*.gguf", *where)
    assert resumed.returncode == 0, resumed.stderr
    assert [s.range for s in hub.gets(MODEL_FILE)[before:]][-1] == f"bytes={2 * TEN_MIB}-"
    assert sha256_of(models / "SmolLM2-GGUF" / MODEL_FILE) == sha256_of(model_path)
