"""Alembic's entry point: migrate over a connection passed in `config.attributes["connection"]`, or a URL."""

from alembic import context

from icldaemon.exceptions import ConfigurationError
from icldaemon.store.database import create_unpooled_engine_for, normalize_url
from icldaemon.store.migrate import include_name
from icldaemon.store.models import Base

config = context.config
target_metadata = Base.metadata


def run_migrations_offline(url: str) -> None:
    context.configure(url=normalize_url(url), target_metadata=target_metadata, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_on(connection) -> None:
    context.configure(connection=connection, target_metadata=target_metadata, include_name=include_name)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        run_migrations_on(connection)
        return
    url = config.get_main_option("sqlalchemy.url")
    if not url:
        raise ConfigurationError("no connection in config.attributes['connection'] and no sqlalchemy.url to migrate")
    engine = create_unpooled_engine_for(url)
    try:
        with engine.begin() as connection:
            run_migrations_on(connection)
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline(config.get_main_option("sqlalchemy.url") or "postgresql://")
else:
    run_migrations_online()
