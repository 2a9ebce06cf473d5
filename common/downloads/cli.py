"""`python main.py download REPO_ID ...`: the downloader with a progress bar and an exit code.

Exit codes: 0 done, 1 the download failed (hub, network, disk), 2 the request itself is wrong
(bad repo id, folder name, revision or glob), 130 interrupted (the partial files are kept; run the same
command again to resume).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from common.downloads.request import DownloadRequest
from common.downloads.transfer import DownloadPlan, DownloadProgress, download
from common.errors import APIError


def request_from(options: dict[str, Any]) -> DownloadRequest:
    return DownloadRequest(
        repo_id=options["repo_id"],
        revision=options.get("revision"),
        include=list(options.get("include") or []),
        exclude=list(options.get("exclude") or []),
        folder_name=options.get("folder_name"),
        token=options.get("token"),
        repo_type=options.get("repo_type") or "model",
    )


def download_cli(config: Any, options: dict[str, Any]) -> int:
    """Run one download in the foreground; returns the process exit code."""
    model_dir = Path(config.model.model_dir)
    req = request_from(options)
    err = Console(stderr=True)
    bar = Progress(
        TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn(),
        console=err, transient=False,
    )
    task: TaskID | None = None

    def planned(plan: DownloadPlan) -> None:
        nonlocal task
        print(f"{req.repo_id} at {plan.commit[:12]}: {len(plan.files)} file(s), "
              f"{plan.bytes_total / 1e6:.1f} MB into {plan.folder}", file=sys.stderr)
        task = bar.add_task(req.repo_id, total=plan.bytes_total or None)

    def progressed(p: DownloadProgress) -> None:
        if task is not None:
            label = f"{p.file} ({min(p.files_done + 1, p.files_total)}/{p.files_total})" if p.file else req.repo_id
            if p.status == "verifying":
                label += " verifying"
            bar.update(task, completed=p.bytes_done, description=label)

    try:
        with bar:
            result = download(model_dir, req, endpoint=config.model.hf_endpoint, on_progress=progressed, on_plan=planned)
    except APIError as exc:
        print(f"Download failed: {exc.message}", file=sys.stderr)
        return 2 if exc.status == 400 else 1
    except KeyboardInterrupt:
        print("Interrupted. The files fetched so far are kept: run the same command again to resume.", file=sys.stderr)
        return 130
    print(
        f"Downloaded {req.repo_id} ({len(result.files)} file(s), {result.bytes_total / 1e6:.1f} MB) into "
        f"{result.folder}. Serve it with: python main.py --model-name {result.folder.name}",
        file=sys.stdout,
    )
    return 0
