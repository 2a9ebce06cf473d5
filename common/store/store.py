"""The store's operations: open (and migrate) a database, then add, read, update, list and delete objects
on behalf of an owner.

Every read and write names the `Owner` asking. An object another owner created
reads as missing (404 naming the field that held its id), never as forbidden:
its existence is not revealed. An admin owner reads and lists every owner's
objects. SQLite (through aiosqlite) is the embedded default; PostgreSQL
(through asyncpg) lets several Parley processes share one store.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config as AlembicConfig
from loguru import logger
from sqlalchemy import Connection, delete, event, func, select, text, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine

from common.errors import BadRequestError, ConflictError, NotFoundError
from common.store.ids import id_for
from common.store.tables import StoredObject

MIGRATIONS = Path(__file__).resolve().parent / "migrations"
MAX_PAGE = 100
_MIGRATION_LOCK = 0x70617231  # PostgreSQL advisory lock id: one process migrates at a time


@dataclass(frozen=True)
class Owner:
    """Who asks: `id` is a hash of the API key ("" with auth off); an admin sees every owner's objects."""

    id: str
    admin: bool = False

    @staticmethod
    def of_key(secret: str | None, *, admin: bool = False) -> Owner:
        if secret is None:
            return Owner("", admin)
        return Owner(hashlib.sha256(("parley-store:" + secret).encode("utf-8")).hexdigest()[:32], admin)


@dataclass
class Record:
    id: str
    kind: str
    owner: str
    created_at: int
    data: dict[str, Any]
    parent_id: str | None = None
    status: str | None = None


@dataclass
class Page:
    items: list[Record] = field(default_factory=list)
    has_more: bool = False


def database_url(url: str | None, data_dir: str) -> str:
    """The SQLAlchemy URL: `url` as given (postgresql:// becomes postgresql+asyncpg://), else a SQLite
    file in `data_dir` (created when missing)."""
    if url:
        return async_url(url)
    folder = Path(data_dir).expanduser()
    folder.mkdir(parents=True, exist_ok=True)
    return f"sqlite+aiosqlite:///{(folder / 'parley.db').resolve()}"


def async_url(url: str) -> str:
    """postgresql:// (or postgres://) as SQLAlchemy's asyncpg URL; any other URL as it is."""
    for plain in ("postgresql://", "postgres://"):
        if url.startswith(plain):
            return "postgresql+asyncpg://" + url[len(plain):]
    return url


def _migrate(connection: Connection) -> None:
    if connection.dialect.name == "postgresql":
        connection.execute(text(f"SELECT pg_advisory_xact_lock({_MIGRATION_LOCK})"))
    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.attributes["connection"] = connection
    command.upgrade(cfg, "head")


def _sqlite_pragmas(connection: Any, _record: Any) -> None:
    """WAL: readers never wait for the writer, and a commit is one append instead of a journal round trip
    (synchronous=NORMAL: a power cut may lose the last commits, never corrupt the file)."""
    cursor = connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


def _record(row: StoredObject) -> Record:
    return Record(row.id, row.kind, row.owner, row.created_at, dict(row.data), row.parent_id, row.status)


class Store:
    """One database of stored objects. Build it with `await Store.open(url)`; `await close()` at the end."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self._sessions = async_sessionmaker(engine, expire_on_commit=False)

    @classmethod
    async def open(cls, url: str) -> Store:
        """Connect and bring the schema to the newest migration."""
        url = async_url(url)
        kwargs: dict[str, Any] = {}
        if url.startswith("sqlite"):
            kwargs["connect_args"] = {"timeout": 30}
        engine = create_async_engine(url, **kwargs)
        if engine.dialect.name == "sqlite":
            event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
        async with engine.begin() as conn:
            await conn.run_sync(_migrate)
        logger.info("Store ready: {}", engine.url.render_as_string(hide_password=True))
        return cls(engine)

    async def close(self) -> None:
        await self.engine.dispose()

    # -- writing ----------------------------------------------------------------------
    async def add(
        self, kind: str, owner: Owner, data: dict[str, Any], *, id: str | None = None, parent_id: str | None = None,
        status: str | None = None, active_on: str | None = None, created_at: int | None = None,
    ) -> Record:
        """Store a new object. `active_on` claims a thread for an active run: a second claim is a 409."""
        return (await self.add_many([(kind, data, id, parent_id, status, active_on, created_at)], owner))[0]

    async def add_many(
        self, rows: Sequence[tuple[str, dict[str, Any], str | None, str | None, str | None, str | None, int | None]],
        owner: Owner,
    ) -> list[Record]:
        """Several objects in one transaction, in order: (kind, data, id, parent_id, status, active_on, created_at)."""
        now = int(time.time())
        objects = [
            StoredObject(id=id or id_for(kind), kind=kind, owner=owner.id, parent_id=parent_id,
                         created_at=created_at or now, status=status, active_on=active_on, data=data)
            for kind, data, id, parent_id, status, active_on, created_at in rows
        ]
        try:
            async with self._sessions.begin() as session:
                session.add_all(objects)
        except IntegrityError as exc:
            claimed = next((o.active_on for o in objects if o.active_on), None)
            if claimed is not None:
                raise ConflictError(
                    f"Thread {claimed} already has an active run; wait for it to finish, or cancel it, "
                    "before starting another.", param="thread_id",
                ) from None
            raise BadRequestError(f"An object with this id exists already: {exc.orig}", param="id") from None
        return [_record(o) for o in objects]

    async def save(
        self, record: Record, *, expect_status: Sequence[str] | None = None, release: bool = False,
        claim: str | None = None,
    ) -> bool:
        """Write back a record's data and status. With `expect_status`, only while the stored status is one
        of those (False when it was not: another request changed it first). `release` frees the thread the
        run held; `claim` claims one (409 when taken)."""
        values: dict[str, Any] = {"data": record.data, "status": record.status}
        if release:
            values["active_on"] = None
        if claim is not None:
            values["active_on"] = claim
        stmt = update(StoredObject).where(StoredObject.id == record.id).values(**values)
        if expect_status is not None:
            stmt = stmt.where(StoredObject.status.in_(list(expect_status)))
        try:
            async with self._sessions.begin() as session:
                result = await session.execute(stmt)
        except IntegrityError:
            raise ConflictError(
                f"Thread {claim} already has an active run; wait for it to finish, or cancel it.", param="thread_id",
            ) from None
        return bool(result.rowcount)

    async def delete(self, kind: str, id: str, owner: Owner, *, param: str) -> Record:
        """Delete an object and what hangs under it (two levels: a thread's runs and their steps)."""
        record = await self.get(kind, id, owner, param=param)
        async with self._sessions.begin() as session:
            children = select(StoredObject.id).where(StoredObject.parent_id == id).scalar_subquery()
            await session.execute(delete(StoredObject).where(StoredObject.parent_id.in_(children)))
            await session.execute(delete(StoredObject).where(StoredObject.parent_id == id))
            await session.execute(delete(StoredObject).where(StoredObject.id == id))
        return record

    async def delete_children(self, parent_id: str, ids: Sequence[str]) -> None:
        async with self._sessions.begin() as session:
            await session.execute(
                delete(StoredObject).where(StoredObject.parent_id == parent_id, StoredObject.id.in_(list(ids)))
            )

    # -- reading ----------------------------------------------------------------------
    async def find(self, kind: str | Sequence[str], id: str, owner: Owner, *,
                   parent_id: str | None = None) -> Record | None:
        """The object if `owner` may read it; under `parent_id` (whose owner the caller checked) whoever
        added it (an admin may add to another key's thread)."""
        kinds = [kind] if isinstance(kind, str) else list(kind)
        stmt = select(StoredObject).where(StoredObject.id == id, StoredObject.kind.in_(kinds))
        if parent_id is not None:
            stmt = stmt.where(StoredObject.parent_id == parent_id)
        elif not owner.admin:
            stmt = stmt.where(StoredObject.owner == owner.id)
        async with self._sessions() as session:
            row = (await session.execute(stmt)).scalar_one_or_none()
        return _record(row) if row is not None else None

    async def get(self, kind: str | Sequence[str], id: str, owner: Owner, *, param: str,
                  parent_id: str | None = None) -> Record:
        """The object, or a 404 naming `param` (missing, another owner's, or not under `parent_id`)."""
        record = await self.find(kind, id, owner, parent_id=parent_id)
        if record is None:
            noun = kind if isinstance(kind, str) else kind[0]
            where = f" in {parent_id}" if parent_id else ""
            raise NotFoundError(
                f"No {noun} with id '{id}'{where} (it may belong to another API key). "
                "Check the id, or list the objects you own.", param=param,
            )
        return record

    async def children(self, parent_id: str, kind: str | Sequence[str] | None = None) -> list[Record]:
        """Everything stored under `parent_id`, oldest first (the caller checked the parent's owner)."""
        stmt = select(StoredObject).where(StoredObject.parent_id == parent_id).order_by(StoredObject.seq)
        if kind is not None:
            stmt = stmt.where(StoredObject.kind.in_([kind] if isinstance(kind, str) else list(kind)))
        async with self._sessions() as session:
            return [_record(r) for r in (await session.execute(stmt)).scalars()]

    async def count_children(self, parent_id: str, kind: str) -> int:
        stmt = select(func.count()).where(StoredObject.parent_id == parent_id, StoredObject.kind == kind)
        async with self._sessions() as session:
            return int((await session.execute(stmt)).scalar_one())

    async def list(
        self, kind: str | Sequence[str], owner: Owner, *, parent_id: str | None = None, limit: int = 20,
        order: str = "desc", after: str | None = None, before: str | None = None,
    ) -> Page:
        """One page in insertion order (`order` asc or desc); `after`/`before` are ids from an earlier page."""
        if not 1 <= limit <= MAX_PAGE:
            raise BadRequestError(f"limit is {limit}; ask for 1 to {MAX_PAGE} objects per page.", param="limit")
        if order not in ("asc", "desc"):
            raise BadRequestError(f"order is {order!r}; use 'asc' or 'desc'.", param="order")
        kinds = [kind] if isinstance(kind, str) else list(kind)
        stmt = select(StoredObject).where(StoredObject.kind.in_(kinds))
        if parent_id is not None:
            stmt = stmt.where(StoredObject.parent_id == parent_id)
        elif not owner.admin:
            stmt = stmt.where(StoredObject.owner == owner.id)
        descending = order == "desc"
        async with self._sessions() as session:
            for cursor, name in ((after, "after"), (before, "before")):
                if cursor is None:
                    continue
                seq = (await session.execute(select(StoredObject.seq).where(StoredObject.id == cursor))).scalar()
                if seq is None:
                    raise BadRequestError(
                        f"'{name}' is '{cursor}', which is not an object id; pass the id of an object from the "
                        "previous page.", param=name,
                    )
                later = (name == "after") != descending
                stmt = stmt.where(StoredObject.seq > seq if later else StoredObject.seq < seq)
            stmt = stmt.order_by(StoredObject.seq.desc() if descending else StoredObject.seq).limit(limit + 1)
            rows = [_record(r) for r in (await session.execute(stmt)).scalars()]
        return Page(rows[:limit], len(rows) > limit)
