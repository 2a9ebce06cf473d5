"""A local stand-in for the Hugging Face Hub's file protocol, served from the test process.

It answers what huggingface_hub (0.36 to 2.x) and Parley's downloader ask for:

    GET  /api/{models,datasets}/<owner>/<name>[/revision/<rev>][?blobs=true]
         repo info: `sha` (the commit), `gated`, `siblings` with size, blobId and lfs {sha256, size}
    HEAD/GET /[datasets/]<owner>/<name>/resolve/<rev>/<path>
         the file, with ETag, X-Repo-Commit, Content-Length, Accept-Ranges and `Range: bytes=N-[M]` (206)

Errors carry the hub's `X-Error-Code` header (RepoNotFound, RevisionNotFound, EntryNotFound,
GatedRepo), which huggingface_hub turns into its typed exceptions. Faults can be scripted per
file and are used up one per GET: drop the connection after N body bytes, stall after N bytes
until `release` is set, or answer a status code.
"""

from __future__ import annotations

import hashlib
import json
import re
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

CHUNK = 1 << 20
LFS_SUFFIXES = (".gguf", ".safetensors", ".bin")


@dataclass
class HubFile:
    data: bytes | None = None
    source: Path | None = None  # served from disk (large files)
    size: int = 0
    sha256: str = ""
    blob_id: str = ""  # git blob sha1 of the content (or of the LFS pointer for LFS files)
    lfs: bool = False

    @classmethod
    def of(cls, path: str, content: bytes | Path) -> HubFile:
        lfs = path.lower().endswith(LFS_SUFFIXES)
        if isinstance(content, Path):
            digest, size = hashlib.sha256(), 0
            with content.open("rb") as f:
                while block := f.read(CHUNK):
                    digest.update(block)
                    size += len(block)
            item = cls(source=content, size=size, sha256=digest.hexdigest(), lfs=lfs)
        else:
            item = cls(data=content, size=len(content), sha256=hashlib.sha256(content).hexdigest(), lfs=lfs)
        if lfs:
            pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{item.sha256}\nsize {item.size}\n"
            item.blob_id = _git_blob_sha1(pointer.encode())
        else:
            item.blob_id = _git_blob_sha1(item.read_all())
        return item

    @property
    def etag(self) -> str:
        return self.sha256 if self.lfs else self.blob_id

    def read_all(self) -> bytes:
        return self.data if self.data is not None else self.source.read_bytes()  # type: ignore[union-attr]

    def chunks(self, start: int, end: int) -> Iterator[bytes]:
        """Bytes start..end (exclusive) in blocks."""
        if self.data is not None:
            for pos in range(start, end, CHUNK):
                yield self.data[pos:min(end, pos + CHUNK)]
            return
        with self.source.open("rb") as f:  # type: ignore[union-attr]
            f.seek(start)
            left = end - start
            while left > 0 and (block := f.read(min(CHUNK, left))):
                left -= len(block)
                yield block


def _git_blob_sha1(content: bytes) -> str:
    return hashlib.sha1(b"blob %d\x00" % len(content) + content).hexdigest()


@dataclass
class HubRepo:
    repo_id: str
    repo_type: str
    commits: dict[str, dict[str, HubFile]] = field(default_factory=dict)
    refs: dict[str, str] = field(default_factory=dict)
    gated: bool = False
    tokens: set[str] = field(default_factory=set)  # tokens that may read a gated repo

    def resolve(self, revision: str) -> str | None:
        if revision in self.commits:
            return revision
        return self.refs.get(revision)


@dataclass
class Seen:
    method: str
    path: str
    range: str | None
    authorization: str | None


class FakeHub:
    """Start with `with FakeHub() as hub:`; `hub.url` is the endpoint to give the downloader."""

    def __init__(self) -> None:
        self.repos: dict[tuple[str, str], HubRepo] = {}
        self.requests: list[Seen] = []
        self.faults: dict[str, list[tuple[str, int]]] = {}
        self.stalled = threading.Event()  # set while a "stall" fault holds a response
        self.release = threading.Event()  # set it to let a stalled response finish
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None

    # -- content --------------------------------------------------------------
    def add_repo(
        self,
        repo_id: str,
        files: dict[str, bytes | Path],
        *,
        revision: str = "main",
        repo_type: str = "model",
        gated: bool = False,
        tokens: tuple[str, ...] = (),
    ) -> str:
        """Add (or add a revision to) a repo; returns the commit sha of that revision."""
        repo = self.repos.setdefault((repo_type, repo_id), HubRepo(repo_id, repo_type))
        repo.gated = repo.gated or gated
        repo.tokens.update(tokens)
        entries = {path: HubFile.of(path, content) for path, content in files.items()}
        listing = "".join(f"{p}:{e.etag}\n" for p, e in sorted(entries.items()))
        commit = hashlib.sha1(f"{repo_id}@{revision}\n{listing}".encode()).hexdigest()
        repo.commits[commit] = entries
        repo.refs[revision] = commit
        return commit

    def fail(self, path: str, *faults: tuple[str, int]) -> None:
        """Script the next GETs of a file (by its path in the repo): ("drop", n_bytes),
        ("stall", n_bytes) or ("status", code); each GET uses up one fault."""
        with self._lock:
            self.faults.setdefault(path, []).extend(faults)

    def gets(self, path: str) -> list[Seen]:
        return [s for s in self.requests if s.method == "GET" and "/resolve/" in s.path and s.path.endswith("/" + path)]

    # -- server ---------------------------------------------------------------
    @property
    def url(self) -> str:
        assert self._server is not None
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> Any:
        hub = self

        class Handler(_Handler):
            pass

        Handler.hub = hub
        self._server = _Server(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def _next_fault(self, path: str) -> tuple[str, int] | None:
        with self._lock:
            pending = self.faults.get(path)
            return pending.pop(0) if pending else None


class _Server(ThreadingHTTPServer):
    def handle_error(self, request: object, client_address: object) -> None:
        """A client that hangs up mid-body (a stopped download) is expected here, not an error."""


_INFO = re.compile(r"^/api/(models|datasets|spaces)/([^/]+/[^/]+)(?:/revision/([^/]+))?$")
_RESOLVE = re.compile(r"^/(?:(datasets|spaces)/)?([^/]+/[^/]+)/resolve/([^/]+)/(.+)$")


class _Handler(BaseHTTPRequestHandler):
    hub: FakeHub
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:
        """Silent."""

    def do_HEAD(self) -> None:
        self._serve(body=False)

    def do_GET(self) -> None:
        self._serve(body=True)

    # -- dispatch ---------------------------------------------------------------
    def _serve(self, body: bool) -> None:
        path = urlsplit(self.path).path
        self.hub.requests.append(Seen(self.command, path, self.headers.get("Range"), self.headers.get("Authorization")))
        if m := _INFO.match(path):
            kind = {"models": "model", "datasets": "dataset", "spaces": "space"}[m.group(1)]
            self._info(kind, unquote(m.group(2)), unquote(m.group(3) or "main"))
        elif m := _RESOLVE.match(path):
            kind = {"datasets": "dataset", "spaces": "space"}.get(m.group(1) or "", "model")
            self._file(kind, unquote(m.group(2)), unquote(m.group(3)), unquote(m.group(4)), body)
        else:
            self._error(404, "", "Not found")

    def _repo(self, kind: str, repo_id: str) -> HubRepo | None:
        repo = self.hub.repos.get((kind, repo_id))
        if repo is None:  # the hub answers 401 for a missing repo (it might be private)
            self._error(401, "RepoNotFound", "Repository not found")
        return repo

    def _info(self, kind: str, repo_id: str, revision: str) -> None:
        repo = self._repo(kind, repo_id)
        if repo is None:
            return
        commit = repo.resolve(revision)
        if commit is None:
            self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
            return
        siblings = []
        for path, item in repo.commits[commit].items():
            entry: dict[str, object] = {"rfilename": path, "size": item.size, "blobId": item.blob_id}
            if item.lfs:
                entry["lfs"] = {"sha256": item.sha256, "size": item.size, "pointerSize": 130}
            siblings.append(entry)
        self._json(200, {
            "_id": commit[:24], "id": repo_id, "sha": commit, "private": False,
            "gated": "manual" if repo.gated else False, "disabled": False, "tags": [], "siblings": siblings,
        })

    def _file(self, kind: str, repo_id: str, revision: str, path: str, body: bool) -> None:
        repo = self._repo(kind, repo_id)
        if repo is None:
            return
        if repo.gated:
            auth = self.headers.get("Authorization") or ""
            token = auth.removeprefix("Bearer ").strip()
            if not token:
                self._error(401, "GatedRepo", "Access to this model is restricted. Please log in.")
                return
            if token not in repo.tokens:
                self._error(403, "GatedRepo", "Access to this model is restricted and you are not in the authorized list.")
                return
        commit = repo.resolve(revision)
        if commit is None:
            self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
            return
        item = repo.commits[commit].get(path)
        if item is None:
            self._error(404, "EntryNotFound", f"{path} does not exist on {revision}")
            return
        fault = self.hub._next_fault(path) if body else None
        if fault and fault[0] == "status":
            self._error(fault[1], "", "Service temporarily unavailable")
            return
        start, end, status = 0, item.size, 200
        wanted = self.headers.get("Range")
        if wanted:
            m = re.fullmatch(r"bytes=(\d+)-(\d*)", wanted.strip())
            if m is None or int(m.group(1)) >= item.size:
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{item.size}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            start = int(m.group(1))
            end = min(item.size, int(m.group(2)) + 1) if m.group(2) else item.size
            status = 206
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(end - start))
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("ETag", f'"{item.etag}"')
        self.send_header("X-Repo-Commit", commit)
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end - 1}/{item.size}")
        self.end_headers()
        if not body:
            return
        self._send_body(item, start, end, fault)

    def _send_body(self, item: HubFile, start: int, end: int, fault: tuple[str, int] | None) -> None:
        sent = 0
        limit = fault[1] if fault else None
        for block in item.chunks(start, end):
            if limit is not None and sent + len(block) >= limit:
                head = block[: max(0, limit - sent)]
                self.wfile.write(head)
                self.wfile.flush()
                sent += len(head)
                block = block[len(head):]
                if fault and fault[0] == "drop":
                    self._drop()
                    return
                self.hub.stalled.set()
                self.hub.release.wait(60)
                self.hub.stalled.clear()
                limit = None
            if block:
                self.wfile.write(block)
                sent += len(block)
        self.wfile.flush()

    def _drop(self) -> None:
        """Cut the connection in the middle of the body."""
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _error(self, status: int, code: str, message: str) -> None:
        payload = json.dumps({"error": message}).encode()
        self.send_response(status)
        if code:
            self.send_header("X-Error-Code", code)
        self.send_header("X-Error-Message", message)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)

    def _json(self, status: int, obj: object) -> None:
        payload = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)
