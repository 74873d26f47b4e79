"""Alembic revisions of the schema; run them through icldaemon.store.migrate."""
