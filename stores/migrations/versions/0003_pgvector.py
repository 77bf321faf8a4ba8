"""memlayer 0.3.0: on PostgreSQL, embeddings move from float32 bytes to a pgvector
`vector(dim)` column (searched in SQL) and metadata from json to jsonb (what the filters'
typed paths need). SQLite keeps its layout.

Revision ID: 0003
Revises: 0002
"""

import json
from typing import Any

import numpy as np
from alembic import context, op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

_BATCH = 1000


def upgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name != "postgresql":
        return
    op.execute("CREATE EXTENSION IF NOT EXISTS vector")
    dim = _dim(bind)
    op.execute(f"ALTER TABLE records ADD COLUMN embedding_vector vector({dim})")
    _convert(bind, dim)
    op.execute("ALTER TABLE records DROP COLUMN embedding")
    op.execute("ALTER TABLE records RENAME COLUMN embedding_vector TO embedding")
    op.execute("ALTER TABLE records ALTER COLUMN embedding SET NOT NULL")
    op.execute("ALTER TABLE records ALTER COLUMN metadata TYPE jsonb USING metadata::jsonb")


def _dim(bind: Any) -> int:
    """The width the memory was created with, else the opening embedder's (a new database)."""
    stored = bind.exec_driver_sql(
        "SELECT value FROM memlayer_settings WHERE key = 'embedder'"
    ).scalar()
    return int(json.loads(stored)["dim"]) if stored else int(context.config.attributes["dim"])


def _convert(bind: Any, dim: int) -> None:
    """Decode each row's float32 bytes into the vector column, batch by batch."""
    last = 0
    while True:
        rows = bind.exec_driver_sql(
            "SELECT rowid, embedding FROM records WHERE rowid > %(last)s "
            "ORDER BY rowid LIMIT %(n)s",
            {"last": last, "n": _BATCH},
        ).all()
        if not rows:
            return
        values = []
        for rowid, blob in rows:
            vector = np.frombuffer(bytes(blob), dtype=np.float32)
            if vector.size != dim:
                raise ValueError(
                    f"record rowid {rowid} holds a {vector.size}-dim embedding; "
                    f"this memory's embedder makes {dim}-dim vectors"
                )
            values.append({"rowid": rowid, "v": "[" + ",".join(map(repr, vector.tolist())) + "]"})
        bind.exec_driver_sql(
            "UPDATE records SET embedding_vector = %(v)s::vector WHERE rowid = %(rowid)s", values
        )
        last = rows[-1][0]
