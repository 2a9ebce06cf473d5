"""Hugging Face downloads into the model directory: complete, verified, resumable.

`plan_download` asks the hub which files a request means (the repo's file list pinned to one
commit, filtered by the include/exclude globs) before anything is written, so a missing or
gated repo, a glob that matches nothing or an unreachable hub fails without leaving a folder
behind. `run_download` then fetches the files one by one into
`<folder>/.parley-download/<content id>.part`, resuming a partial file with a Range request,
checks each file's size and hash (the LFS sha256, or the git blob sha1 of a small file) and only
then moves it into place, so no half-written file ever carries a model's name. Until every file
is in place the folder holds a `.incomplete` marker, which the model scanner skips. One download
per folder at a time: a lock file holds against other requests and other processes
(`main.py download`) alike.

huggingface_hub's own downloaders are not used for the transfer: 2.4.0 writes each file to a
uniquely named temporary file and deletes it when the transfer fails, so an interrupted download
starts over, and `snapshot_download` answers an unreachable hub with whatever local folder
exists. Its `http_get` (Range, retries within one attempt), `repo_info` and error types are used, through
hubcompat.py where releases differ (0.36 on requests up to 2.x on httpx2).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import quote

from loguru import logger

from common.downloads import hubcompat
from common.downloads.errors import DownloadCancelled, gated_error, hub_error
from common.downloads.request import DownloadRequest, check_repo_id, check_request, target_folder
from common.errors import APIError, ConflictError, NotFoundError

# DownloadRequest and its checks live in request.py; importers of this module may still name them here.
__all__ = ["DownloadPlan", "DownloadProgress", "DownloadRequest", "DownloadResult", "FolderLock", "RemoteFile",
           "check_disk_space", "check_repo_id", "check_request", "download", "file_url", "hub_endpoint",
           "plan_download", "read_manifest", "run_download", "target_folder"]

_COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")
INCOMPLETE_MARKER = ".incomplete"
STATE_DIR = ".parley-download"  # lock, manifest and partial files, inside the model folder
HUB_TIMEOUT = 30.0
LIBRARY = "parley"
MAX_RESUMES = 3  # a file whose connection breaks is resumed this often, each time only if bytes arrived


@dataclass(frozen=True)
class RemoteFile:
    path: str
    size: int | None
    sha256: str | None = None  # LFS files
    blob_id: str | None = None  # git blob sha1, for files kept in git itself

    def partial_name(self, commit: str) -> str:
        ident = self.sha256 or self.blob_id or hashlib.sha1(f"{commit}/{self.path}".encode()).hexdigest()
        return f"{ident}.part"

    def mismatch(self, local: Path) -> str | None:
        """Why `local` is not this file (size or hash), or None when it is."""
        size = local.stat().st_size
        if self.size is not None and size != self.size:
            return f"{size} bytes instead of {self.size}"
        if self.sha256:
            got = _hash_file(local, hashlib.sha256())
            return None if got == self.sha256 else f"sha256 {got[:12]}… instead of {self.sha256[:12]}…"
        if self.blob_id:
            got = _hash_file(local, hashlib.sha1(b"blob %d\x00" % size))
            return None if got == self.blob_id else f"git blob id {got[:12]}… instead of {self.blob_id[:12]}…"
        return None


@dataclass
class DownloadPlan:
    """What one download fetches: resolved to a commit, filtered, not yet started."""

    request: DownloadRequest
    folder: Path
    endpoint: str
    commit: str
    files: list[RemoteFile]

    @property
    def name(self) -> str:
        return self.folder.name

    @property
    def bytes_total(self) -> int:
        return sum(f.size or 0 for f in self.files)

    def narrowed(self, paths: list[str]) -> DownloadPlan:
        wanted = set(paths)
        return replace(self, files=[f for f in self.files if f.path in wanted])

    def same_download(self, other: DownloadPlan) -> bool:
        """Would `other` fetch exactly what this one does (so a request may join it)?"""
        return (
            self.request.repo_id == other.request.repo_id
            and self.request.repo_type == other.request.repo_type
            and self.commit == other.commit
            and self.folder == other.folder
            and sorted(f.path for f in self.files) == sorted(f.path for f in other.files)
        )


@dataclass
class DownloadProgress:
    repo_id: str
    folder: str
    revision: str  # the commit
    status: str  # "downloading" | "verifying" (the file just fetched is being checked)
    files_total: int
    files_done: int = 0
    bytes_total: int = 0
    bytes_done: int = 0
    file: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"object": "download.progress", **asdict(self)}


@dataclass
class DownloadResult:
    repo_id: str
    folder: Path
    revision: str
    files: list[str]
    bytes_total: int

    def as_dict(self) -> dict[str, Any]:
        return {
            "object": "download.finished",
            "status": "finished",
            "repo_id": self.repo_id,
            "revision": self.revision,
            "folder": self.folder.name,
            "model_name": self.folder.name,
            "download_path": str(self.folder),
            "files": self.files,
            "bytes_total": self.bytes_total,
        }


ProgressFn = Callable[[DownloadProgress], None]


# -- the hub -----------------------------------------------------------------------
def hub_endpoint(configured: str | None = None) -> str:
    """The configured hub address, else huggingface_hub's (HF_ENDPOINT, read when it is imported)."""
    from huggingface_hub import constants

    return (configured or constants.ENDPOINT).rstrip("/")


def _safe_repo_path(path: str) -> bool:
    """A repo file path that stays inside the folder and does not touch Parley's own files."""
    parts = PurePosixPath(path).parts
    return (
        bool(parts)
        and not path.startswith("/")
        and "\\" not in path
        and "\x00" not in path
        and all(p not in ("..", ".") for p in parts)
        and parts[0] not in (STATE_DIR, INCOMPLETE_MARKER, ".cache")
    )


# -- the folder ------------------------------------------------------------------
def read_manifest(folder: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((folder / STATE_DIR / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _write_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    path = folder / STATE_DIR / "manifest.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(manifest, indent=1), encoding="utf-8")
    os.replace(tmp, path)


def _check_folder(folder: Path, req: DownloadRequest) -> None:
    """The folder must be new, or hold an earlier download of the same repo."""
    if folder.exists() and not folder.is_dir():
        raise ConflictError(
            f"'{folder.name}' in the model directory is a file; choose another folder_name.", param="folder_name"
        )
    if not folder.is_dir():
        return
    manifest = read_manifest(folder)
    if manifest is not None:
        if (manifest.get("repo_id"), manifest.get("repo_type", "model")) != (req.repo_id, req.repo_type):
            raise ConflictError(
                f"Folder '{folder.name}' holds a download of '{manifest.get('repo_id')}'; choose another "
                "folder_name for this repo.", param="folder_name",
            )
        return
    foreign = [p.name for p in folder.iterdir() if p.name not in (INCOMPLETE_MARKER, STATE_DIR, ".cache")]
    if foreign and not (folder / ".cache" / "huggingface").is_dir():
        raise ConflictError(
            f"Folder '{folder.name}' already exists with files that did not come from a download "
            f"({', '.join(sorted(foreign)[:3])}); choose another folder_name or move them away.",
            param="folder_name",
        )


def _present(folder: Path, f: RemoteFile, manifest: dict[str, Any]) -> bool:
    """Is the file already in place (recorded by an earlier download, or checked now)?"""
    dest = folder / f.path
    if not dest.is_file():
        return False
    known = manifest.get("files", {}).get(f.path)
    if known and known.get("sha256") == f.sha256 and known.get("blob_id") == f.blob_id and (
        f.size is None or dest.stat().st_size == f.size
    ):
        return True
    return f.mismatch(dest) is None


def check_disk_space(plan: DownloadPlan) -> None:
    """507 when the files still to fetch do not fit on the model directory's disk."""
    needed = 0
    for f in plan.files:
        if f.size is None or (plan.folder / f.path).is_file():
            continue
        partial = plan.folder / STATE_DIR / f.partial_name(plan.commit)
        needed += f.size - (partial.stat().st_size if partial.is_file() else 0)
    probe = plan.folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if needed > free:
        raise APIError(
            f"Downloading '{plan.request.repo_id}' needs {needed / 1e9:.2f} GB but the model directory's disk has "
            f"{free / 1e9:.2f} GB free. Free some space, or narrow the download with 'include' globs.",
            status=507, code="insufficient_storage",
        )


class FolderLock:
    """An exclusive, non-blocking lock on one model folder (held across processes)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._fd: int | None = None

    def acquire(self) -> None:
        path = self.folder / STATE_DIR / "lock"
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            _lock(fd)
        except OSError:
            os.close(fd)
            raise ConflictError(
                f"A download into '{self.folder.name}' is already running (another request or `main.py download`). "
                "Wait for it to finish (GET /v1/downloads shows it), or choose another folder_name.",
                param="folder_name",
            ) from None
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the lock
            self._fd = None


def _lock(fd: int) -> None:
    try:
        import fcntl
    except ImportError:  # Windows
        import msvcrt

        msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        return
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)


# -- planning ----------------------------------------------------------------------
def plan_download(model_dir: Path, req: DownloadRequest, endpoint: str | None = None) -> DownloadPlan:
    """Blocking: validate, ask the hub for the repo's files at one commit, apply the globs."""
    from huggingface_hub import HfApi, get_token
    from huggingface_hub.utils import filter_repo_objects

    check_request(req)
    folder = target_folder(model_dir, req)
    _check_folder(folder, req)
    endpoint = hub_endpoint(endpoint)
    try:
        info = HfApi(endpoint=endpoint, library_name=LIBRARY).repo_info(
            req.repo_id, repo_type=req.repo_type, revision=req.revision, files_metadata=True,
            token=req.token or None, timeout=HUB_TIMEOUT,
        )
    except Exception as exc:
        raise hub_error(exc, req, endpoint) from exc
    commit = getattr(info, "sha", None) or ""
    if not _COMMIT_RE.match(commit):
        raise APIError(
            f"The hub at {endpoint} answered without a commit for '{req.repo_id}'. Check model.hf_endpoint / "
            "HF_ENDPOINT points at a Hugging Face Hub, then retry.", status=502, code="hub_error",
        )
    files = []
    for s in info.siblings or []:
        if not _safe_repo_path(s.rfilename):
            logger.warning("Skipping repo file with an unsafe path: {!r}", s.rfilename[:200])
            continue
        lfs = s.lfs
        files.append(RemoteFile(s.rfilename, s.size, lfs.sha256 if lfs else None, None if lfs else s.blob_id))
    if not files:
        raise NotFoundError(f"'{req.repo_id}' has no files to download at '{req.revision or 'main'}'.", param="repo_id")
    chosen = list(filter_repo_objects(
        files, allow_patterns=req.include or None, ignore_patterns=req.exclude or None, key=lambda f: f.path,
    ))
    if not chosen:
        names = ", ".join(f.path for f in files[:12]) + (", …" if len(files) > 12 else "")
        raise NotFoundError(
            f"No file of '{req.repo_id}' matches include {req.include or ['*']} / exclude {req.exclude}. "
            f"Its files: {names}. Fix the globs (e.g. '*.gguf', '*Q4_K_M*').",
            param="include" if req.include else "exclude", code="no_matching_files",
        )
    if getattr(info, "gated", False) and not (req.token or get_token()):
        raise gated_error(req, endpoint, has_token=False)
    return DownloadPlan(req, folder, endpoint, commit, chosen)


# -- transfer ----------------------------------------------------------------------
def run_download(plan: DownloadPlan, on_progress: ProgressFn | None = None,
                 cancel: threading.Event | None = None) -> DownloadResult:
    """Blocking: fetch, verify and move every planned file in place. The caller holds the folder lock."""
    req, folder = plan.request, plan.folder
    folder.mkdir(parents=True, exist_ok=True)
    marker = folder / INCOMPLETE_MARKER
    # A folder that was usable before (no marker, files in it) is usable again if this download fails:
    # files only ever arrive checked and whole.
    was_complete = not marker.exists() and any(p.name not in (STATE_DIR, INCOMPLETE_MARKER) for p in folder.iterdir())
    marker.touch()
    (folder / STATE_DIR).mkdir(exist_ok=True)
    manifest = read_manifest(folder) or {"files": {}}
    manifest.update(repo_id=req.repo_id, repo_type=req.repo_type, revision=req.revision, commit=plan.commit)
    _write_manifest(folder, manifest)
    progress = DownloadProgress(req.repo_id, folder.name, plan.commit, "downloading", len(plan.files),
                                bytes_total=plan.bytes_total)
    report = on_progress or (lambda p: None)
    finished = False
    try:
        report(replace(progress))
        for f in plan.files:
            progress.file = f.path
            if not _present(folder, f, manifest):
                _fetch(plan, f, progress, report, cancel)
            manifest["files"][f.path] = {"size": f.size, "sha256": f.sha256, "blob_id": f.blob_id}
            _write_manifest(folder, manifest)
            progress.files_done += 1
            progress.bytes_done = sum(x.size or 0 for x in plan.files[: progress.files_done])
            report(replace(progress))
        missing = [f.path for f in plan.files if not (folder / f.path).is_file()]
        if missing:  # never report success for a folder that lacks a planned file
            raise APIError(f"Files missing after the download of '{req.repo_id}': {', '.join(missing[:5])}. "
                           "Send the request again.", status=502, code="download_incomplete")
        finished = True
    except Exception as exc:
        raise hub_error(exc, req, plan.endpoint) from exc
    finally:
        if finished or was_complete:
            marker.unlink(missing_ok=True)
        if finished:
            for part in (folder / STATE_DIR).glob("*.part"):
                part.unlink(missing_ok=True)
        elif _only_state(folder):
            shutil.rmtree(folder, ignore_errors=True)  # nothing fetched: leave no trace
    logger.info("Downloaded {} ({} files, {:.1f} MB) into {}", req.repo_id, len(plan.files), plan.bytes_total / 1e6, folder)
    return DownloadResult(req.repo_id, folder, plan.commit, [f.path for f in plan.files], plan.bytes_total)


def _only_state(folder: Path) -> bool:
    """Nothing worth keeping: only the marker and a state dir without partial bytes or finished files."""
    if any(p.name not in (INCOMPLETE_MARKER, STATE_DIR) for p in folder.iterdir()):
        return False
    if any(part.stat().st_size > 0 for part in (folder / STATE_DIR).glob("*.part")):
        return False
    return not (read_manifest(folder) or {}).get("files")


def _fetch(plan: DownloadPlan, f: RemoteFile, progress: DownloadProgress, report: ProgressFn,
           cancel: threading.Event | None) -> None:
    """One file: resume its partial file, check it, move it in place."""
    from huggingface_hub.errors import HfHubHTTPError
    from huggingface_hub.utils import build_hf_headers

    req = plan.request
    partial = plan.folder / STATE_DIR / f.partial_name(plan.commit)
    url = file_url(plan, f.path)
    headers = build_hf_headers(token=req.token or None, library_name=LIBRARY)
    base = progress.bytes_done
    broken = hubcompat.transport_errors()
    restarted, resumes = False, 0
    while True:
        resume = partial.stat().st_size if partial.is_file() else 0
        if f.size is not None and resume > f.size:
            partial.unlink()
            resume = 0
        if resume:
            logger.info("Resuming {} at byte {}", f.path, resume)
        try:
            with partial.open("ab") as out:
                hubcompat.http_get(url, out, resume_size=resume, headers=headers, expected_size=f.size,
                                   displayed_filename=f.path, tqdm_class=_progress_hook(progress, base, report, cancel))
            break
        except HfHubHTTPError as exc:  # 416: the partial file does not fit the remote one; start it over
            if hubcompat.response_status(exc) != 416 or restarted:
                raise
            restarted = True
            partial.unlink(missing_ok=True)
        except broken:
            # The connection broke off mid-body. huggingface_hub >=1.0 resumes that itself, 0.x does not
            # (requests' ChunkedEncodingError): resume here while bytes keep arriving.
            grew = partial.is_file() and partial.stat().st_size > resume
            if not grew or resumes >= MAX_RESUMES:
                raise
            resumes += 1
    progress.status = "verifying"
    report(replace(progress))
    problem = f.mismatch(partial)
    progress.status = "downloading"
    if problem is not None:
        partial.unlink(missing_ok=True)
        raise APIError(
            f"'{f.path}' of '{req.repo_id}' arrived damaged ({problem}); it was deleted. Send the request again.",
            status=502, code="download_corrupted",
        )
    dest = plan.folder / f.path
    dest.parent.mkdir(parents=True, exist_ok=True)
    os.replace(partial, dest)


def file_url(plan: DownloadPlan, path: str) -> str:
    """`<endpoint>/[datasets/|spaces/]<repo>/resolve/<commit>/<path>`. Built here: hf_hub_url only swaps in an
    endpoint when its import-time template still starts with huggingface_hub.constants.ENDPOINT."""
    from huggingface_hub import constants

    prefix = constants.REPO_TYPES_URL_PREFIXES.get(plan.request.repo_type, "")
    return f"{plan.endpoint}/{prefix}{plan.request.repo_id}/resolve/{quote(plan.commit, safe='')}/{quote(path)}"


def _progress_hook(progress: DownloadProgress, base: int, report: ProgressFn,
                   cancel: threading.Event | None) -> type:
    """A tqdm stand-in for http_get: counts the current file's bytes and stops a cancelled download."""

    class Hook:
        def __init__(self, *args: Any, initial: int = 0, **kwargs: Any) -> None:
            self.n = initial
            self._show()

        def _show(self) -> None:
            progress.bytes_done = base + self.n
            report(replace(progress))

        def update(self, n: float | None = 1) -> None:
            if cancel is not None and cancel.is_set():
                raise DownloadCancelled
            self.n += int(n or 0)
            self._show()

        def __enter__(self) -> Any:
            return self

        def __exit__(self, *exc: object) -> None:
            pass

        def close(self) -> None:
            pass

        def set_postfix_str(self, *args: Any, **kwargs: Any) -> None:
            pass

    return Hook


def _hash_file(path: Path, digest: Any) -> str:
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


# -- all in one (CLI) ------------------------------------------------------------------
def download(model_dir: Path, req: DownloadRequest, *, endpoint: str | None = None,
             on_progress: ProgressFn | None = None, on_plan: Callable[[DownloadPlan], None] | None = None,
             cancel: threading.Event | None = None) -> DownloadResult:
    """Blocking: plan, lock the folder, fetch. Raises APIError."""
    plan = plan_download(model_dir, req, endpoint)
    check_disk_space(plan)
    if on_plan is not None:
        on_plan(plan)
    lock = FolderLock(plan.folder)
    lock.acquire()
    try:
        return run_download(plan, on_progress, cancel)
    finally:
        lock.release()
