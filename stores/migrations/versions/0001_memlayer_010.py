"""memlayer 0.1.0: records with ids unique across tenants, FTS5 over the raw text on SQLite.

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

_SCOPE = ("tenant_id", "user_id", "agent_id", "session_id")
_FTS = (
    "CREATE VIRTUAL TABLE records_fts USING fts5(text, content='records', "
    "content_rowid='rowid', tokenize='unicode61')",
    "CREATE TRIGGER records_ai AFTER INSERT ON records BEGIN "
    "INSERT INTO records_fts(rowid, text) VALUES (new.rowid, new.text); END",
    "CREATE TRIGGER records_ad AFTER DELETE ON records BEGIN "
    "INSERT INTO records_fts(records_fts, rowid, text) VALUES('delete', old.rowid, old.text); END",
    "CREATE TRIGGER records_au AFTER UPDATE OF text ON records BEGIN "
    "INSERT INTO records_fts(records_fts, rowid, text) VALUES('delete', old.rowid, old.text); "
    "INSERT INTO records_fts(rowid, text) VALUES (new.rowid, new.text); END",
)


def upgrade() -> None:
    op.create_table(
        "records",
        sa.Column("rowid", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("id", sa.String(128), nullable=False, unique=True),
        *(sa.Column(name, sa.String(256), nullable=True) for name in _SCOPE),
        sa.Column("text", sa.Text, nullable=False),
        sa.Column("metadata", sa.JSON, nullable=False),
        sa.Column("embedding", sa.LargeBinary, nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("updated_at", sa.Float, nullable=False),
    )
    op.create_index("records_scope", "records", list(_SCOPE))
    op.create_table(
        "memlayer_settings",
        sa.Column("key", sa.String(64), primary_key=True),
        sa.Column("value", sa.Text, nullable=False),
    )
    if op.get_bind().dialect.name == "sqlite":
        for ddl in _FTS:
            op.execute(ddl)
