"""The store: PostgreSQL through SQLAlchemy and psycopg, no torch."""
