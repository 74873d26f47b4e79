"""The prompt queue: claims with FOR UPDATE SKIP LOCKED, leases, bounded retries with backoff.

A claim is held by (worker_id, attempts): a prompt re-claimed after its lease expired has a higher
attempt count, so the first holder's late updates (renew, fail, complete) match no row and change nothing.
"""

import contextlib
import json
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg.rows import dict_row
from sqlalchemy.engine import make_url

from icldaemon.exceptions import DatabaseError
from icldaemon.settings import BACKOFF_SECONDS, LEASE_SECONDS, MAX_ATTEMPTS
from icldaemon.store.database import translate_errors
from icldaemon.store.queries import QUERIES


@dataclass(frozen=True)
class Claim:
    prompt_id: int
    attempts: int
    worker_id: str
    session_id: Any = None
    messages: list | None = None
    text: str | None = None

    @property
    def key(self) -> dict:
        return {"prompt_id": self.prompt_id, "worker_id": self.worker_id, "attempts": self.attempts}


@dataclass(frozen=True)
class Retrieval:
    memory_id: int
    rank: int
    exists: bool
    key: str | None
    content: str | None


Connection = psycopg.Connection
# What using a connection can raise: the store's own translation, and psycopg's where a connection's
# context manager commits or closes on the way out (a server gone by then).
DATABASE_ERRORS: tuple[type[Exception], ...] = (DatabaseError, psycopg.Error)


def driver_url(url: str) -> str:
    """The libpq URL psycopg.connect takes, from a postgresql:// or postgresql+psycopg:// URL."""
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


def connect(url: str, *, autocommit: bool = False) -> psycopg.Connection:
    with translate_errors(url, "connecting"):
        return psycopg.connect(driver_url(url), autocommit=autocommit)


def close_quietly(connection: psycopg.Connection | None) -> None:
    """Close a connection that may already be broken; returns None for the caller's variable."""
    if connection is not None:
        with contextlib.suppress(psycopg.Error):
            connection.close()
    return None


def wait_for_notification(connection: psycopg.Connection, timeout: float) -> bool:
    """Whether a notification arrived on a listening connection within `timeout` seconds."""
    with translate_errors(connection_url(connection), "waiting for notifications"):
        return any(True for _notify in connection.notifies(timeout=timeout, stop_after=1))


def connection_url(connection: psycopg.Connection) -> str:
    """A password-free URL of where a connection points, for error messages."""
    info = connection.info
    if info.host.startswith("/"):  # a Unix socket's directory (the embedded server) goes in the query
        return f"postgresql://{info.user}@/{info.dbname}?host={info.host}&port={info.port}"
    return f"postgresql://{info.user}@{info.host}:{info.port}/{info.dbname}"


def _held(connection: psycopg.Connection, query: str, parameters: dict, action: str) -> bool:
    with translate_errors(connection_url(connection), action), connection.transaction():
        return connection.execute(QUERIES[query], parameters).fetchone() is not None


def claim(connection: psycopg.Connection, worker_id: str, lease_seconds: float = LEASE_SECONDS) -> Claim | None:
    """Claim the next due prompt for `worker_id`, or None when nothing is due."""
    with translate_errors(connection_url(connection), "claiming a prompt"), connection.transaction():
        row = connection.execute(
            QUERIES["claim_prompt"], {"worker_id": worker_id, "lease_seconds": lease_seconds}
        ).fetchone()
    if row is None:
        return None
    prompt_id, attempts, session_id, messages, text = row
    return Claim(prompt_id, attempts, worker_id, session_id, messages, text)


def renew_lease(connection: psycopg.Connection, claim: Claim, lease_seconds: float = LEASE_SECONDS) -> bool:
    """Extend the lease; False when this worker no longer holds the prompt."""
    return _held(connection, "renew_lease", {**claim.key, "lease_seconds": lease_seconds}, "renewing a lease")


def release(connection: psycopg.Connection, claim: Claim) -> bool:
    """Put the prompt back in the queue, the attempt not counted; False when it was no longer held."""
    return _held(connection, "release_prompt", claim.key, "releasing a prompt")


def backoff_seconds(attempts: int, base_seconds: float = BACKOFF_SECONDS) -> float:
    """Delay before the next attempt after `attempts` failed ones: base, 2 base, 4 base, ..."""
    return base_seconds * 2 ** max(attempts - 1, 0)


def fail(
    connection: psycopg.Connection,
    claim: Claim,
    error: str,
    *,
    retry: bool,
    max_attempts: int = MAX_ATTEMPTS,
    backoff_base_seconds: float = BACKOFF_SECONDS,
) -> str | None:
    """Record a failed attempt: 'queued' again after a backoff while attempts remain and `retry`, else 'failed'.

    Returns the new status, or None when this worker no longer held the prompt. Whatever transaction the
    failed attempt left open is rolled back first; a connection lost with the server cannot even roll back,
    and the DatabaseError sends the caller to reconnect while the prompt's lease runs out.
    """
    with translate_errors(connection_url(connection), f"rolling back prompt {claim.prompt_id}"):
        if connection.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
            connection.rollback()
    if retry and claim.attempts < max_attempts:
        parameters = {**claim.key, "error": error, "backoff_seconds": backoff_seconds(claim.attempts,
                                                                                     backoff_base_seconds)}
        return "queued" if _held(connection, "retry_prompt", parameters, "retrying a prompt") else None
    return "failed" if _held(connection, "fail_prompt", {**claim.key, "error": error}, "failing a prompt") else None


def complete(connection: psycopg.Connection, claim: Claim) -> bool:
    """Mark the prompt done in the caller's transaction; False (and nothing changed) when it is no longer held."""
    return connection.execute(QUERIES["complete_prompt"], claim.key).fetchone() is not None


def retrievals(connection: psycopg.Connection, prompt_id: int) -> list[Retrieval]:
    """The prompt's retrieved memories ordered by rank."""
    with translate_errors(connection_url(connection), "reading a prompt's memories"), connection.transaction():
        rows = connection.execute(QUERIES["prompt_retrievals"], {"prompt_id": prompt_id}).fetchall()
    return [Retrieval(*row) for row in rows]


def submit(
    connection: psycopg.Connection,
    *,
    messages: list | None = None,
    text: str | None = None,
    memory_ids: list[int] = (),
    session_id: str | None = None,
    priority: int = 0,
) -> int:
    """Queue a prompt through icl_submit(); returns its id."""
    parameters = {
        "messages": None if messages is None else json.dumps(messages),
        "memory_ids": list(memory_ids),
        "text": text,
        "session_id": session_id,
        "priority": priority,
    }
    with translate_errors(connection_url(connection), "submitting a prompt"), connection.transaction():
        return connection.execute(QUERIES["submit_prompt"], parameters).fetchone()[0]


def submit_all(connection: psycopg.Connection, prompts: list[dict]) -> list[int]:
    """Queue several prompts, each given as submit()'s keyword arguments, in one transaction: all or none."""
    with translate_errors(connection_url(connection), f"submitting {len(prompts)} prompts"), connection.transaction():
        return [submit(connection, **prompt) for prompt in prompts]


def listen(connection: psycopg.Connection) -> None:
    """Subscribe an autocommit connection to the notification sent when a prompt is queued."""
    with translate_errors(connection_url(connection), "listening for prompts"):
        connection.execute(QUERIES["listen_prompts"])


def queue_counts(connection: psycopg.Connection) -> dict[str, int]:
    with translate_errors(connection_url(connection), "counting prompts"), connection.transaction():
        return dict(connection.execute(QUERIES["queue_counts"]).fetchall())


def last_errors(connection: psycopg.Connection, limit: int = 5) -> list[dict]:
    with translate_errors(connection_url(connection), "reading errors"), connection.transaction():
        with connection.cursor(row_factory=dict_row) as cursor:
            return cursor.execute(QUERIES["last_errors"], {"limit": limit}).fetchall()
