"""Executions record their compensations (``ExecutionResult.compensations``) in a JSON column.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision: str | None = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("dspex_executions", sa.Column("compensations", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("dspex_executions") as batch:  # SQLite rebuilds the table
        batch.drop_column("compensations")
