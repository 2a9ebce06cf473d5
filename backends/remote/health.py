"""Active health checks of a remote model's replicas: one GET per replica every `interval` seconds.

A replica that answers 200 is up; anything else (llama-server's 503 while it
loads, a refused connection, a timeout) marks it down until a check succeeds.
`/health` that is not there (404) falls back to `/v1/models`.
"""

from __future__ import annotations

import asyncio

import httpx
from loguru import logger

from backends.remote.replicas import Replica, ReplicaPool

CHECK_TIMEOUT = 3.0


class HealthChecker:
    def __init__(self, pool: ReplicaPool, client: httpx.AsyncClient, path: str, interval: float) -> None:
        self.pool = pool
        self.client = client
        self.path = path
        self.interval = interval
        self._task: asyncio.Task[None] | None = None

    async def check(self, replica: Replica) -> bool:
        try:
            response = await self.client.get(replica.url + self.path, timeout=CHECK_TIMEOUT)
            if response.status_code == 404 and self.path == "/health":
                response = await self.client.get(replica.url + "/v1/models", timeout=CHECK_TIMEOUT)
            up = response.status_code == 200
            why = f"HTTP {response.status_code}"
        except httpx.HTTPError as exc:
            up, why = False, f"{type(exc).__name__} {exc}".strip()
        if up != replica.healthy:
            if up:
                logger.info("Remote replica {} is up again", replica.url)
            else:
                logger.warning("Remote replica {} failed its health check ({}); left out until it passes", replica.url, why)
        replica.healthy = up
        return up

    async def check_all(self) -> list[bool]:
        return list(await asyncio.gather(*(self.check(r) for r in self.pool.replicas)))

    def start(self) -> None:
        if self.interval > 0 and self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._loop(), name="remote health checks")

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            await self.check_all()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
