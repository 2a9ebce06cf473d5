"""Hugging Face downloads into the model directory.

A download lands in `<model_dir>/<folder>` with a `.incomplete` marker that
the model scanner skips, so a half-written model is never loaded; the marker
goes when every file is in place. huggingface_hub resumes partial files.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from loguru import logger

from common.errors import BadRequestError

_REPO_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}(/[A-Za-z0-9][A-Za-z0-9._-]{0,95})?$")
INCOMPLETE_MARKER = ".incomplete"


@dataclass
class DownloadRequest:
    repo_id: str
    revision: str | None = None
    include: list[str] = field(default_factory=list)
    exclude: list[str] = field(default_factory=list)
    folder_name: str | None = None
    token: str | None = None
    repo_type: str = "model"


def check_repo_id(repo_id: str) -> str:
    if not _REPO_RE.match(repo_id or "") or ".." in repo_id:
        raise BadRequestError(
            f"'{repo_id[:100]}' is not a Hugging Face repo id; use the form 'owner/name'.", param="repo_id"
        )
    return repo_id


def target_folder(model_dir: Path, req: DownloadRequest) -> Path:
    from common.models import confine_name

    name = req.folder_name or req.repo_id.split("/")[-1]
    confine_name(name, "folder")
    return model_dir / name


def download(model_dir: Path, req: DownloadRequest) -> Path:
    """Blocking download; returns the model folder."""
    from huggingface_hub import snapshot_download

    check_repo_id(req.repo_id)
    folder = target_folder(model_dir, req)
    folder.mkdir(parents=True, exist_ok=True)
    marker = folder / INCOMPLETE_MARKER
    marker.touch()
    snapshot_download(
        repo_id=req.repo_id,
        revision=req.revision,
        repo_type=req.repo_type,
        allow_patterns=req.include or None,
        ignore_patterns=req.exclude or None,
        local_dir=str(folder),
        token=req.token,
    )
    marker.unlink(missing_ok=True)
    logger.info("Downloaded {} into {}", req.repo_id, folder)
    return folder


def download_cli(config: object, options: dict) -> None:
    model_dir = Path(config.model.model_dir)  # type: ignore[attr-defined]
    req = DownloadRequest(
        repo_id=options["repo_id"],
        revision=options.get("revision"),
        include=list(options.get("include") or []),
        exclude=list(options.get("exclude") or []),
        folder_name=options.get("folder_name"),
        token=options.get("token"),
    )
    try:
        download(model_dir, req)
    except BadRequestError as exc:
        raise SystemExit(f"Download refused: {exc.message}") from exc
