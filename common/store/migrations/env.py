"""Alembic's entry for the store's migrations; `Store.open` runs it on the connection it passes in."""

from __future__ import annotations

from alembic import context

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=None, version_table="parley_alembic_version")
with context.begin_transaction():
    context.run_migrations()
