"""memlayer 0.3.0: on PostgreSQL, embeddings stay in the table row (storage MAIN) instead of
pgvector's default EXTERNAL, which moves a 384-d vector (1.5 kB) of a ~2.2 kB row out to the
TOAST table: an exact ranking of 10,000 filtered records then fetched each vector through
the TOAST index (6.5 µs a distance at 1M records). Rows written before keep their
out-of-line vectors until the table is rewritten (`VACUUM FULL records`).

Revision ID: 0005
Revises: 0004
"""

from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("ALTER TABLE records ALTER COLUMN embedding SET STORAGE MAIN")
