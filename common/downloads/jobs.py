"""The server's downloads: one background job per model folder, followed by any number of requests.

A job belongs to the server, not to the request that started it: a client that leaves (a closed
SSE stream, a dropped non-streaming request) only stops watching, and the download finishes in the
background (GET /v1/downloads lists what runs). A second request for the same files into the same
folder joins the running job and follows its progress; a request for different files into that
folder gets 409 until the first finishes. At shutdown running jobs are stopped; their partial files
stay, and the same request later resumes them.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

from loguru import logger

from common.downloads.request import DownloadRequest
from common.downloads.transfer import (
    DownloadPlan,
    DownloadProgress,
    DownloadResult,
    FolderLock,
    check_disk_space,
    plan_download,
    run_download,
)
from common.errors import ConflictError

SHUTDOWN_WAIT_SECONDS = 15.0


class DownloadJob:
    def __init__(self, plan: DownloadPlan, lock: FolderLock) -> None:
        self.plan = plan
        self.started = time.time()
        self.requests = 1  # requests that started or joined it
        self.progress = DownloadProgress(
            plan.request.repo_id, plan.name, plan.commit, "downloading", len(plan.files),
            bytes_total=plan.bytes_total,
        )
        self.cancel = threading.Event()
        self._lock = lock
        self._version = 0
        self._changed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.task: asyncio.Task[DownloadResult] = asyncio.create_task(self._run())

    async def _run(self) -> DownloadResult:
        loop = asyncio.get_running_loop()

        def report(progress: DownloadProgress) -> None:  # called from the download thread
            try:
                loop.call_soon_threadsafe(self._publish, progress)
            except RuntimeError:  # the loop has closed; nobody is watching any more
                pass

        try:
            return await asyncio.to_thread(run_download, self.plan, report, self.cancel)
        finally:
            self._lock.release()

    def _publish(self, progress: DownloadProgress) -> None:
        self.progress = progress
        self._version += 1
        waiter, self._changed = self._changed, asyncio.get_running_loop().create_future()
        waiter.set_result(None)

    @property
    def done(self) -> bool:
        return self.task.done()

    async def updates(self) -> AsyncIterator[DownloadProgress]:
        """The latest progress each time it changes (a slow reader skips intermediate ones), until the end."""
        seen = -1
        while True:
            if self._version != seen:
                seen = self._version
                yield replace(self.progress)
            if self.task.done():
                return
            if self._version == seen:  # waiting never cancels the job or the shared future
                await asyncio.wait([self._changed, self.task], return_when=asyncio.FIRST_COMPLETED)

    def describe(self) -> dict[str, object]:
        return {**self.progress.as_dict(), "started": int(self.started), "requests": self.requests}

    async def result(self) -> DownloadResult:
        """Wait for the end; cancelling the wait leaves the download running."""
        return await asyncio.shield(self.task)


class DownloadManager:
    def __init__(self, model_dir: Path, endpoint: str | None = None) -> None:
        self.model_dir = model_dir
        self.endpoint = endpoint
        self._jobs: dict[Path, DownloadJob] = {}

    async def plan(self, req: DownloadRequest) -> DownloadPlan:
        """Validate and ask the hub what to fetch (raises the 4xx/5xx before any stream starts)."""
        return await asyncio.to_thread(plan_download, self.model_dir, req, self.endpoint)

    def start(self, plan: DownloadPlan) -> tuple[DownloadJob, bool]:
        """Start the plan, or join the same download already running. Returns (job, joined)."""
        running = self._jobs.get(plan.folder)
        if running is not None and not running.done:
            if running.plan.same_download(plan):
                logger.info("A request joined the running download of {} into {}", plan.request.repo_id, plan.name)
                running.requests += 1
                return running, True
            raise ConflictError(
                f"A download of '{running.plan.request.repo_id}' into '{plan.name}' is already running with other "
                "files. Wait for it to finish (GET /v1/downloads shows it), or choose another folder_name.",
                param="folder_name",
            )
        check_disk_space(plan)
        lock = FolderLock(plan.folder)
        lock.acquire()  # 409 when another process downloads into the folder
        job = DownloadJob(plan, lock)
        self._jobs[plan.folder] = job
        job.task.add_done_callback(lambda _t, folder=plan.folder, j=job: self._forget(folder, j))
        logger.info("Downloading {} ({} files, {:.1f} MB) into {}", plan.request.repo_id, len(plan.files),
                    plan.bytes_total / 1e6, plan.folder)
        return job, False

    def _forget(self, folder: Path, job: DownloadJob) -> None:
        if self._jobs.get(folder) is job:
            del self._jobs[folder]
        if not job.task.cancelled() and job.task.exception() is not None:
            logger.warning("Download of {} failed: {}", job.plan.request.repo_id, job.task.exception())

    def active(self) -> list[DownloadJob]:
        return [job for job in self._jobs.values() if not job.done]

    async def close(self) -> None:
        """Stop running downloads at shutdown (their partial files are kept for a later resume)."""
        jobs = self.active()
        for job in jobs:
            job.cancel.set()
        if jobs:
            logger.info("Stopping {} running download(s); the same requests resume them later", len(jobs))
            await asyncio.wait([job.task for job in jobs], timeout=SHUTDOWN_WAIT_SECONDS)
