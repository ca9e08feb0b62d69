"""Persistence: tables, typed queries and alembic migrations."""
