"""Connecting to PostgreSQL: URLs, engines, the embedded server, and driver errors translated at the boundary."""

import contextlib
import os
import shutil
import subprocess
import warnings
from collections.abc import Iterator
from pathlib import Path

import psycopg
import sqlalchemy
from sqlalchemy.engine import URL, Engine, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError
from sqlalchemy.pool import NullPool

from icldaemon.exceptions import ConfigurationError, DatabaseError
from icldaemon.extras import require
from icldaemon.logs import get_logger
from icldaemon.settings import DATABASE_URL_VARIABLE, Settings
from icldaemon.store import embedded_root

DRIVER_NAME = "postgresql+psycopg"
ACCEPTED_SCHEMES = ("postgresql", "postgres", "postgresql+psycopg", "postgres+psycopg")
URL_FORM = "postgresql://user[:password]@host[:port]/database (or postgres://, either optionally +psycopg)"
HANDLE_LIST_FILE = ".handle_pids.json"  # pgserver's list of the processes using a data directory
# What a statement meets in a database that was never migrated, or migrated by an older release.
SCHEMA_MISSING_ERRORS = (psycopg.errors.UndefinedTable, psycopg.errors.UndefinedFunction,
                         psycopg.errors.UndefinedColumn)


# --- URLs


def _parse(url: str, source: str = "the database URL") -> URL:
    """The parsed URL; ConfigurationError naming `source` (ICLD_DATABASE_URL, ...) unless it is a PostgreSQL URL."""
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError) as exc:
        # the messages of both repeat parts of the URL, the password among them
        reason = "its port is not a number" if "int()" in str(exc) else "it is not of the form scheme://..."
        raise ConfigurationError(f"{source} cannot be parsed ({reason}); expected {URL_FORM}") from None
    if parsed.drivername not in ACCEPTED_SCHEMES:
        raise ConfigurationError(
            f"{source} has the scheme {parsed.drivername + '://'!r}; icldaemon runs on PostgreSQL only: "
            f"expected {URL_FORM}"
        )
    return parsed


def check_url(url: str, source: str) -> None:
    """Refuse, naming `source`, a URL that is not a PostgreSQL URL, before anything connects with it."""
    _parse(url, source)


def normalize_url(url: str) -> str:
    """The SQLAlchemy URL, with the psycopg 3 driver, of a postgresql:// (or postgres://) URL."""
    return _parse(url).set(drivername=DRIVER_NAME).render_as_string(hide_password=False)


def libpq_url(url: str) -> str:
    """The URL as psql and libpq take it: scheme postgresql://, no +driver, no empty password (`user:@`)."""
    _parse(url)
    rest = url.split("://", 1)[1]
    authority_end = min((index for index in (rest.find("/"), rest.find("?")) if index >= 0), default=len(rest))
    userinfo, at, host = rest[:authority_end].rpartition("@")
    if at and userinfo.endswith(":"):
        rest = f"{userinfo[:-1]}@{host}{rest[authority_end:]}"
    return f"postgresql://{rest}"


def describe_url(url: str) -> str:
    """Where a URL points, for messages: database, host and port; never the password."""
    try:
        parsed = _parse(url)
    except ConfigurationError:
        return "an unparsable database URL"
    host = parsed.host or parsed.query.get("host") or "the local socket"
    if isinstance(host, tuple):
        host = ",".join(host)
    where = f"{host}:{parsed.port}" if parsed.port else host
    return f"database {parsed.database or '(default)'!r} on {where}"


def create_engine_for(url: str, **engine_options) -> Engine:
    """A SQLAlchemy engine for a postgresql:// URL, on psycopg 3."""
    engine_options.setdefault("pool_pre_ping", True)
    return sqlalchemy.create_engine(normalize_url(url), **engine_options)


def create_unpooled_engine_for(url: str) -> Engine:
    """An engine for one short piece of work (a migration, a check): connections close when returned."""
    return sqlalchemy.create_engine(normalize_url(url), poolclass=NullPool)


# --- errors


def _driver_message(exc: BaseException, password: str | None) -> str:
    original = exc.orig if isinstance(exc, DBAPIError) and exc.orig is not None else exc
    lines = str(original).strip().splitlines()
    message = lines[0] if lines else type(original).__name__
    if password:
        message = message.replace(password, "***")
    return message


@contextlib.contextmanager
def translate_errors(url: str, action: str) -> Iterator[None]:
    """Turn driver errors raised inside into DatabaseError('<action> failed on <database>: <reason>').

    A missing table, function or column says the schema is missing or older than the code, and how to fix it.
    """
    try:
        yield
    except (DBAPIError, psycopg.Error) as exc:
        try:
            password = make_url(url).password
        except (ArgumentError, ValueError):
            password = None
        reason = _driver_message(exc, password and str(password))
        original = exc.orig if isinstance(exc, DBAPIError) else exc
        if isinstance(original, SCHEMA_MISSING_ERRORS):
            raise DatabaseError(
                f"{action} failed: the {describe_url(url)} has no icldaemon schema (or is behind): "
                f"run `icldaemon migrate` ({reason})"
            ) from exc
        raise DatabaseError(f"{action} failed on {describe_url(url)}: {reason}") from exc


# --- the embedded server


def _import_pgserver():
    # pgserver reads the XDG runtime directory at import, for its lock file. Where XDG_RUNTIME_DIR is
    # unset (a service, a container) platformdirs warns and falls back to a private directory under
    # /tmp, which serves that purpose as well; the warning tells the user nothing they can act on.
    # pgserver is imported here, not at the top, because it is needed only without a configured URL
    # (an extra: icldaemon[embedded]).
    require("pgserver")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR is not set")
        import pgserver
        import pgserver.utils
    return pgserver


def psql_command() -> str:
    """`psql` where it is on PATH, else the psql that the pgserver wheel ships."""
    if shutil.which("psql"):
        return "psql"
    bundled = Path(_import_pgserver().postgres_server.POSTGRES_BIN_PATH) / "psql"
    return str(bundled) if bundled.is_file() else "psql"


def _postmaster_running(pgdata: Path) -> bool:
    info = _import_pgserver().utils.PostmasterInfo.read_from_pgdata(pgdata)
    return info is not None and info.is_running()


@contextlib.contextmanager
def embedded_database(pgdata_dir: Path) -> Iterator[str]:
    """Start (or join) an embedded PostgreSQL in `pgdata_dir`, yield its URL, and stop it on exit if it was started here.

    The processes using one data directory are counted (pgserver's list in the directory), and the
    server is stopped when the last of them leaves; a server that was already running when this
    started (another icldaemon process, or one started by hand) is left running. As root, the server
    runs as a system user and is reachable by no other local user (embedded_root.py); otherwise
    pgserver runs it as the current user.
    """
    pgserver = _import_pgserver()
    pgdata = Path(pgdata_dir).expanduser().resolve()
    serve = embedded_root.served_as_root if os.geteuid() == 0 else _served_by_pgserver
    # Fetched here, not at import: a logger bound before configure_logging() keeps the default output.
    log = get_logger(pgdata=str(pgdata))
    started_here = False
    try:
        with serve(pgserver, pgdata, HANDLE_LIST_FILE) as (url, pid, started_here):
            log.info("embedded_database_started" if started_here else "embedded_database_joined", url=url, pid=pid)
            yield url
    finally:
        if started_here and _postmaster_running(pgdata):
            log.info("embedded_database_left_running", reason="other processes still use it")
        elif started_here:
            log.info("embedded_database_stopped")


@contextlib.contextmanager
def _served_by_pgserver(pgserver, pgdata: Path, handle_list_file: str) -> Iterator[tuple[str, int, bool]]:
    pgdata.mkdir(mode=0o700, parents=True, exist_ok=True)
    started_here = not _postmaster_running(pgdata)
    if started_here and (pgdata / "PG_VERSION").exists():
        # pgserver stops the server when the last process on its list of users leaves. A process killed
        # before it could leave stays on the list, and with it the server would never be stopped again;
        # with no server running, nobody on the list is using it.
        pgserver.utils.DiskList(pgdata / handle_list_file).put([])
    try:
        server = pgserver.get_server(pgdata, cleanup_mode="stop" if started_here else None)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError, RuntimeError) as exc:
        raise DatabaseError(
            f"the embedded PostgreSQL server in {pgdata} did not start ({exc}); its log is {pgdata / 'log'}"
        ) from exc
    with server:
        yield server.get_uri(), server.get_pid(), started_here


@contextlib.contextmanager
def database_url(settings: Settings) -> Iterator[str]:
    """The configured database URL, checked; without one, the embedded server's in `settings.pgdata_dir`."""
    if settings.database_url:
        check_url(settings.database_url, DATABASE_URL_VARIABLE)
        yield settings.database_url
        return
    with embedded_database(settings.pgdata_dir) as url:
        yield url
