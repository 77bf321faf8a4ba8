"""memlayer 0.2.0: a record's key is (tenant, id); each row keeps its keyword string; a change
log of rowids by write sequence number. Rows are copied with their rowids, so a vector index
saved by 0.1.0 stays valid.

Revision ID: 0002
Revises: 0001
"""

import json
from typing import Any

import sqlalchemy as sa
from alembic import context, op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

_SCOPE = ("tenant_id", "user_id", "agent_id", "session_id")
_COLUMNS = ("rowid", "id", *_SCOPE, "text", "metadata", "embedding", "created_at", "updated_at")
_BATCH = 1000


def upgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name == "sqlite":
        for trigger in ("records_ai", "records_ad", "records_au"):
            op.execute(f"DROP TRIGGER IF EXISTS {trigger}")
        op.execute("DROP TABLE IF EXISTS records_fts")
    op.drop_index("records_scope", table_name="records")
    op.rename_table("records", "records_v1")
    if bind.dialect.name == "postgresql":  # free the constraint names the new table takes
        for (name,) in bind.exec_driver_sql(
            "SELECT indexname FROM pg_indexes WHERE tablename = 'records_v1'"
        ).all():
            op.execute(f'ALTER INDEX "{name}" RENAME TO "{name}_v1"')
    records = op.create_table(
        "records",
        sa.Column("rowid", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("id", sa.String(128), nullable=False),
        sa.Column("tenant_id", sa.String(256), nullable=False),
        *(sa.Column(name, sa.String(256), nullable=True) for name in _SCOPE[1:]),
        sa.Column("text", sa.Text, nullable=False),
        sa.Column("keywords", sa.Text, nullable=False),
        sa.Column("metadata", sa.JSON, nullable=False),
        sa.Column("embedding", sa.LargeBinary, nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("updated_at", sa.Float, nullable=False),
        sa.UniqueConstraint("tenant_id", "id", name="records_key"),
        sqlite_autoincrement=True,
    )
    op.create_index("records_scope", "records", list(_SCOPE))
    _copy(bind, records, context.config.attributes["keywords"])
    op.drop_table("records_v1")
    if bind.dialect.name == "postgresql":  # the copied rowids were given explicitly
        op.execute(
            "SELECT setval(pg_get_serial_sequence('records', 'rowid'), "
            "COALESCE((SELECT max(rowid) FROM records), 0) + 1, false)"
        )
    op.create_table(
        "record_changes",
        sa.Column("seq", sa.Integer, nullable=False),
        sa.Column("rowid", sa.Integer, nullable=False),
    )
    op.create_index("record_changes_seq", "record_changes", ["seq"])


def _copy(bind: Any, records: sa.Table, keywords: Any) -> None:
    """Copy 0.1.0's rows batch by batch: an empty tenant is stored as '', keywords derived."""
    last = 0
    while True:
        rows = bind.exec_driver_sql(
            f"SELECT {', '.join(_COLUMNS)} FROM records_v1 WHERE rowid > {last} "
            f"ORDER BY rowid LIMIT {_BATCH}"
        ).all()
        if not rows:
            return
        values = [dict(zip(_COLUMNS, row, strict=True)) for row in rows]
        for row in values:
            row["tenant_id"] = row["tenant_id"] or ""
            row["keywords"] = keywords(row["text"])
            if isinstance(row["metadata"], str):
                row["metadata"] = json.loads(row["metadata"])
        bind.execute(records.insert(), values)
        last = values[-1]["rowid"]
