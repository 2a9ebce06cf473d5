"""The store as routes reach it: opened (and migrated) at start-up in the background, awaited by the first
route that needs it; the `Owner` a request acts as, from the key it authenticated with; and a list's page query."""

from __future__ import annotations

import asyncio

from fastapi import Query, Request
from loguru import logger

from common.config.loader import ParleyConfig
from common.errors import ServiceUnavailableError
from common.store.store import Owner, Store, database_url
from endpoints.http.auth import Permission, key_of


class StoreHolder:
    """Opens the store once; `await get()` hands it out (503 naming the cause when it could not be opened)."""

    def __init__(self, config: ParleyConfig) -> None:
        self._config = config
        self._task: asyncio.Task[Store] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._open())

    async def _open(self) -> Store:
        url = database_url(self._config.store.url, self._config.store.data_dir)
        try:
            return await Store.open(url)
        except Exception as exc:
            logger.error("Could not open the store ({}): {}", type(exc).__name__, exc)
            raise

    async def get(self) -> Store:
        self.start()
        assert self._task is not None
        try:
            return await asyncio.shield(self._task)
        except Exception as exc:
            raise ServiceUnavailableError(
                f"The conversation store could not be opened ({type(exc).__name__}: {exc}). Check store.url / "
                "store.data_dir and the database server, then restart Parley.",
            ) from None

    async def close(self) -> None:
        if self._task is None:
            return
        if not self._task.done():
            self._task.cancel()
        results = await asyncio.gather(self._task, return_exceptions=True)
        if isinstance(results[0], Store):
            await results[0].close()


async def get_store(request: Request) -> Store:
    return await request.app.state.store.get()


def owner_of(request: Request) -> Owner:
    """The owner of what this request stores: a hash of its key (the admin key sees every owner's objects)."""
    entry = key_of(request)
    if entry is None:
        return Owner("", admin=False)
    return Owner.of_key(entry.secret, admin=entry.permission is Permission.ADMIN)


class PageQuery:
    """limit / order / after, as the Responses and Conversations item lists take them: `q: PageQuery = Depends()`."""

    def __init__(self, limit: int = Query(20), order: str = Query("desc"), after: str | None = Query(None)) -> None:
        self.limit, self.order, self.after = limit, order, after
