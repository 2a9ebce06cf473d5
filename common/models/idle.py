"""Idle eviction: a background task that unloads models idle for longer than their keep_alive.

The reaper runs only while some loaded model has a keep_alive; it never touches a busy model
(leases held, or work in the engine), and hands each expired model to the manager's callback.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from loguru import logger

from common.models.loaded import LoadedModel


class IdleReaper:
    def __init__(
        self,
        loaded: Callable[[], list[LoadedModel]],
        expire: Callable[[LoadedModel], Awaitable[None]],
    ) -> None:
        self._loaded = loaded  # a snapshot of the loaded models
        self._expire = expire  # unloads one model, remembering it for a reload on demand
        self._task: asyncio.Task[None] | None = None

    def watch(self) -> None:
        """Run the reaper (if it is not running) while some loaded model has a keep_alive."""
        wanted = any(m.keep_alive is not None for m in self._loaded())
        if wanted and (self._task is None or self._task.done()):
            self._task = asyncio.get_running_loop().create_task(self._run(), name="model keep_alive")

    async def _run(self) -> None:
        while True:
            limits = [m.keep_alive for m in self._loaded() if m.keep_alive is not None]
            if not limits:
                return
            await asyncio.sleep(min(1.0, max(0.05, min(limits) / 4)))
            for model in self._loaded():
                if model.keep_alive is None or model.busy() or model.idle_seconds() < model.keep_alive:
                    continue
                logger.info("Model {} idle for {:.0f}s (keep_alive): unloading", model.name, model.idle_seconds())
                try:
                    await self._expire(model)
                except Exception:  # noqa: BLE001 - the reaper must survive a failed close
                    logger.exception("Unloading idle model {} failed", model.name)

    async def stop(self) -> None:
        """Cancel the reaper (shutdown); a task of another event loop is left alone."""
        task, self._task = self._task, None
        if task is not None and not task.done() and task.get_loop() is asyncio.get_running_loop():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
