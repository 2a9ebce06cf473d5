"""What a download asks for, checked before the hub is asked anything (no network).

`DownloadRequest` is the repo, revision, file globs and target folder; `check_request` refuses
every client mistake it can hold with a 400 naming the field; `target_folder` is where it lands.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from common.errors import BadRequestError
from common.models.files import confine_name

_REPO_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}(/[A-Za-z0-9][A-Za-z0-9._-]{0,95})?$")
REPO_TYPES = ("model", "dataset", "space")


@dataclass
class DownloadRequest:
    repo_id: str
    revision: str | None = None
    include: list[str] = field(default_factory=list)
    exclude: list[str] = field(default_factory=list)
    folder_name: str | None = None
    token: str | None = field(default=None, repr=False)
    repo_type: str = "model"


def check_repo_id(repo_id: str) -> str:
    if not _REPO_RE.match(repo_id or "") or ".." in repo_id or repo_id.endswith((".git", ".")):
        raise BadRequestError(
            f"'{(repo_id or '')[:100]}' is not a Hugging Face repo id; use the form 'owner/name' "
            "(e.g. 'bartowski/SmolLM2-135M-Instruct-GGUF'), without paths, URLs or '..'.",
            param="repo_id",
        )
    return repo_id


def check_request(req: DownloadRequest) -> None:
    """Every client mistake a request can hold, before the hub is asked anything."""
    check_repo_id(req.repo_id)
    if req.repo_type not in REPO_TYPES:
        raise BadRequestError(f"repo_type must be one of {', '.join(REPO_TYPES)}.", param="repo_type")
    if req.revision is not None and (
        not req.revision or len(req.revision) > 255 or ".." in req.revision
        or any(c in req.revision for c in "\\\x00 ~^:?*[") or not req.revision.isprintable()
    ):
        raise BadRequestError(
            f"'{req.revision[:100]}' is not a branch, tag or commit; leave 'revision' out for the default branch.",
            param="revision",
        )
    for name, patterns in (("include", req.include), ("exclude", req.exclude)):
        for pattern in patterns:
            if not pattern or len(pattern) > 500 or not pattern.isprintable():
                raise BadRequestError(
                    f"'{pattern[:100]}' is not a file glob; use patterns such as '*.gguf' or '*Q4_K_M*'.", param=name
                )
    if req.folder_name is not None:
        confine_name(req.folder_name, "folder")
        if len(req.folder_name) > 255:
            raise BadRequestError("folder_name is longer than 255 characters; choose a shorter name.", param="folder_name")


def target_folder(model_dir: Path, req: DownloadRequest) -> Path:
    """The model folder the download goes into: `folder_name`, else the repo's name."""
    name = req.folder_name or req.repo_id.split("/")[-1]
    confine_name(name, "folder")
    return model_dir / name
