"""The index: SQLAlchemy 2 tables, engine/session factory, repository functions, migrations."""
