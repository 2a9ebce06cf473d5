"""The store's one table: every stored object as JSON with its kind, owner, parent and order.

Objects of every kind share one table: their wire shapes are JSON already and
the store never queries inside them. What the store does query is a column:
`kind`, `owner` (a hash of the API key, never the key), `parent_id` (the
thread of a message or run, the run of a step, the conversation of an item),
`seq` (insertion order, the cursor order of every list), `status` (for
conditional updates of runs) and `active_on`, set to the thread id while a
run is active: its unique index makes "one active run per thread" hold across
processes sharing one database.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import JSON, BigInteger, Index, Integer, String
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

TABLE = "parley_objects"


class Base(DeclarativeBase):
    pass


class StoredObject(Base):
    __tablename__ = TABLE

    seq: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True,
                                     autoincrement=True)
    id: Mapped[str] = mapped_column(String(64), unique=True)
    kind: Mapped[str] = mapped_column(String(32))
    owner: Mapped[str] = mapped_column(String(64))
    parent_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    created_at: Mapped[int] = mapped_column(BigInteger)
    status: Mapped[str | None] = mapped_column(String(32), nullable=True)
    active_on: Mapped[str | None] = mapped_column(String(64), nullable=True, unique=True)
    data: Mapped[dict[str, Any]] = mapped_column(JSON)

    __table_args__ = (
        Index("ix_parley_objects_kind_owner_seq", "kind", "owner", "seq"),
        Index("ix_parley_objects_parent_seq", "parent_id", "seq"),
    )
