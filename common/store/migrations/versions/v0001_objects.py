"""The objects table (see common/store/tables.py).

Revision ID: 0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "parley_objects",
        sa.Column("seq", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True, autoincrement=True),
        sa.Column("id", sa.String(64), nullable=False, unique=True),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("owner", sa.String(64), nullable=False),
        sa.Column("parent_id", sa.String(64), nullable=True),
        sa.Column("created_at", sa.BigInteger(), nullable=False),
        sa.Column("status", sa.String(32), nullable=True),
        sa.Column("active_on", sa.String(64), nullable=True, unique=True),
        sa.Column("data", sa.JSON(), nullable=False),
    )
    op.create_index("ix_parley_objects_kind_owner_seq", "parley_objects", ["kind", "owner", "seq"])
    op.create_index("ix_parley_objects_parent_seq", "parley_objects", ["parent_id", "seq"])


def downgrade() -> None:
    op.drop_table("parley_objects")
