"""memlayer 0.3.0: on PostgreSQL, a GIN index (jsonb_path_ops) on the metadata, so a filter
on a field's value (`$eq`, `$in`) reads only the matching rows instead of every row.

Revision ID: 0004
Revises: 0003
"""

from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("CREATE INDEX records_metadata ON records USING gin (metadata jsonb_path_ops)")
