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
