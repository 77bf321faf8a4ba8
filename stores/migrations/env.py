"""Alembic's environment for memlayer's schema: runs on the connection (and inside the
transaction) that `memlayer.stores.migrations.upgrade` hands over, never opens its own."""

from alembic import context

from memlayer.stores.migrations import VERSION_TABLE

connection = context.config.attributes["connection"]
context.configure(connection=connection, version_table=VERSION_TABLE)
with context.begin_transaction():
    context.run_migrations()
