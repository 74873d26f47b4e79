"""Memories as an operator keeps them (upserted by key, listed), and the runs listed for the command line."""

from dataclasses import dataclass

import psycopg
from psycopg.rows import dict_row

from icldaemon.exceptions import BadInputError
from icldaemon.store.database import translate_errors
from icldaemon.store.queries import QUERIES
from icldaemon.store.queue import connection_url


@dataclass(frozen=True)
class Upserted:
    memory_id: int
    outcome: str  # "added", "updated" or "unchanged"


def _require_text(value: str, what: str) -> str:
    if not value.strip():
        raise BadInputError(f"{what} is empty or blank; a memory needs a key and a content")
    if "\x00" in value:
        raise BadInputError(f"{what} contains a NUL character, which PostgreSQL text cannot hold")
    return value


def upsert_memory(connection: psycopg.Connection, key: str, content: str) -> Upserted:
    """Set the content of the session user's lowest-id memory with `key`, or add one; two upserts of one key
    never both add. Memories other roles stored are never touched: each submitter keeps its own."""
    parameters = {"key": _require_text(key, "the memory's key"),
                  "content": _require_text(content, f"the content of memory {key!r}")}
    with translate_errors(connection_url(connection), f"storing memory {key!r}"), connection.transaction():
        memory_id, outcome = connection.execute(QUERIES["put_memory"], parameters).fetchone()
    return Upserted(memory_id, outcome)


def list_memories(connection: psycopg.Connection, limit: int) -> list[dict]:
    """The first `limit` memories by id, each with `retrievals`, `measured` and `total` (all memories)."""
    with translate_errors(connection_url(connection), "listing memories"), connection.transaction():
        with connection.cursor(row_factory=dict_row) as cursor:
            return cursor.execute(QUERIES["list_memories"], {"limit": limit}).fetchall()


def recent_runs(connection: psycopg.Connection, limit: int) -> list[dict]:
    """The newest `limit` measurement runs, newest first, with their prompt, session, size, exactness and cost."""
    with translate_errors(connection_url(connection), "listing measurement runs"), connection.transaction():
        with connection.cursor(row_factory=dict_row) as cursor:
            return cursor.execute(QUERIES["recent_runs"], {"limit": limit}).fetchall()


def runs_of_prompts(connection: psycopg.Connection, prompt_ids: list[int]) -> dict[int, int]:
    """prompt id -> the id of its newest measurement run, for those of `prompt_ids` that were measured."""
    with translate_errors(connection_url(connection), "finding the runs of measured prompts"), \
            connection.transaction():
        rows = connection.execute(QUERIES["runs_of_prompts"], {"prompt_ids": list(prompt_ids)}).fetchall()
    return {prompt_id: run_id for run_id, prompt_id in rows}


# --- learning a memory (learn.py)


def memory_to_learn(connection: psycopg.Connection, memory_id: int,
                    neighbours: int) -> tuple[str | None, str, list[int]] | None:
    """(key, content, the ids of up to `neighbours` other memories of its submitter, nearest first, the lower on a
    tie), or None when the memory does not exist."""
    with translate_errors(connection_url(connection), f"reading memory {memory_id} to learn it"), \
            connection.transaction():
        row = connection.execute(QUERIES["memory_to_learn"],
                                 {"memory_id": memory_id, "neighbours": neighbours}).fetchone()
    return None if row is None else (row[0], row[1], list(row[2]))


def learnable_memories(connection: psycopg.Connection) -> list[int]:
    """The memories with a key that the session user may attach to its prompts, by id."""
    with translate_errors(connection_url(connection), "finding memories to learn"), connection.transaction():
        return [memory_id for (memory_id,) in connection.execute(QUERIES["learnable_memories"]).fetchall()]


def sessions_with_prompts(connection: psycopg.Connection, session_ids: list) -> set:
    """Which of `session_ids` hold a prompt, of any submitter."""
    with translate_errors(connection_url(connection), "finding sessions with prompts"), connection.transaction():
        return {session for (session,) in connection.execute(QUERIES["sessions_with_prompts"],
                                                             {"session_ids": list(session_ids)}).fetchall()}


def own_session_prompts(connection: psycopg.Connection, session_id) -> int:
    """How many prompts the session user submitted in `session_id`."""
    with translate_errors(connection_url(connection), f"counting the prompts of session {session_id}"), \
            connection.transaction():
        return connection.execute(QUERIES["own_session_prompts"], {"session_id": session_id}).fetchone()[0]
