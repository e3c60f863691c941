"""The initial history schema: the tables ``create_all`` made before Alembic, and the version row.

Revision ID: 0001
Revises: (none)
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision: str | None = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    schema = op.create_table(
        "dspex_schema",
        sa.Column("name", sa.String(length=32), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("name"),
    )
    # Releases before Alembic accept a database whose row says 1.
    op.bulk_insert(schema, [{"name": "history", "version": 1}])
    op.create_table(
        "dspex_executions",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("program", sa.Text(), nullable=True),
        sa.Column("fingerprint", sa.String(length=64), nullable=True),
        sa.Column("strategy", sa.String(length=32), nullable=True),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("rank", sa.Integer(), nullable=False),
        sa.Column("inputs_digest", sa.String(length=64), nullable=True),
        sa.Column("outputs", sa.JSON(), nullable=True),
        sa.Column("failed_modules", sa.JSON(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("submitted_at", sa.DateTime(), nullable=True),
        sa.Column("started_at", sa.DateTime(), nullable=True),
        sa.Column("finished_at", sa.DateTime(), nullable=True),
        sa.Column("resumed_from", sa.String(length=64), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_dspex_executions_fingerprint", "dspex_executions", ["fingerprint"])
    op.create_index("ix_dspex_executions_program", "dspex_executions", ["program"])
    op.create_index("ix_dspex_executions_program_submitted", "dspex_executions", ["program", "submitted_at"])
    op.create_table(
        "dspex_module_attempts",
        sa.Column("execution_id", sa.String(length=64), nullable=False),
        sa.Column("module", sa.Text(), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("rank", sa.Integer(), nullable=False),
        sa.Column("resource", sa.Text(), nullable=True),
        sa.Column("queue", sa.Text(), nullable=True),
        sa.Column("worker", sa.Text(), nullable=True),
        sa.Column("started_at", sa.DateTime(), nullable=True),
        sa.Column("finished_at", sa.DateTime(), nullable=True),
        sa.Column("duration_s", sa.Float(), nullable=True),
        sa.Column("error_type", sa.Text(), nullable=True),
        sa.Column("error_message", sa.Text(), nullable=True),
        sa.Column("reused", sa.Boolean(), nullable=False),
        sa.Column("record", sa.JSON(), nullable=False),
        sa.ForeignKeyConstraint(["execution_id"], ["dspex_executions.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("execution_id", "module", "attempt"),
    )
    op.create_table(
        "dspex_program_plans",
        sa.Column("fingerprint", sa.String(length=64), nullable=False),
        sa.Column("program", sa.Text(), nullable=False),
        sa.Column("plan", sa.Text(), nullable=False),
        sa.Column("first_seen", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("fingerprint"),
    )
    op.create_table(
        "dspex_profiles",
        sa.Column("fingerprint", sa.String(length=64), nullable=False),
        sa.Column("program", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("executions", sa.Integer(), nullable=False),
        sa.Column("profile", sa.JSON(), nullable=False),
        sa.PrimaryKeyConstraint("fingerprint"),
    )
    op.create_index("ix_dspex_profiles_program", "dspex_profiles", ["program"])


def downgrade() -> None:
    for table in ("dspex_profiles", "dspex_program_plans", "dspex_module_attempts", "dspex_executions", "dspex_schema"):
        op.drop_table(table)
