"""Alembic environment: runs on the connection crgate hands it (see engine.migrate)."""

from __future__ import annotations

from alembic import context

from services.core.db.tables import Base

connection = context.config.attributes.get("connection")
if connection is None:  # pragma: no cover - crgate always passes its connection
    raise RuntimeError("run migrations through services.core.db.engine.migrate()")
context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
