"""A database holding real measurements: a few prompts in two sessions, with memories, measured by the worker.

The tiny random Llama of daemon_fixtures measures them; one prompt is measured with a stride, so that
the log holds skipped prefixes (NULL norms) as well.
"""

import contextlib
import json
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
from daemon_fixtures import save_tiny_model
from psycopg import sql
from sqlalchemy.engine import make_url

from icldaemon.engine.loading import load_model
from icldaemon.service import Service
from icldaemon.worker import Worker

MEMORIES = {
    "pet": "The user has a grey cat called Miso.",
    "city": "The user lives in Lisbon, near the river.",
    "colour": "The user's favourite colour is teal.",
    "job": "The user repairs bicycles for a living.",
}
STRIDED = 3  # the stride of the one prompt measured with a stride


@dataclass
class MeasuredDatabase:
    url: str
    memory_ids: dict[str, int]
    sessions: dict[str, uuid.UUID]
    prompt_ids: list[int] = field(default_factory=list)
    failed_prompt_id: int | None = None
    model: str = ""


def as_role(url: str, role: str) -> str:
    """The same database's URL, logged in as `role` (no password: the test server trusts local logins)."""
    return make_url(url).set(username=role, password=None).render_as_string(hide_password=False)


def load_tiny(directory: Path, models_dir: Path):
    return load_model(str(save_tiny_model(directory)), models_dir=models_dir, device="cpu")


def _submit(connection, *, session_id=None, text=None, messages=None, memory_ids=()) -> int:
    return connection.execute(
        "SELECT icl_submit(%s::jsonb, %s::bigint[], text => %s, session_id => %s)",
        (None if messages is None else json.dumps(messages), list(memory_ids), text, session_id),
    ).fetchone()[0]


def populate(url: str, tiny) -> MeasuredDatabase:
    """Queue and measure the example prompts into the migrated database at `url`."""
    sessions = {"morning": uuid.uuid4(), "evening": uuid.uuid4()}
    with psycopg.connect(url) as connection:
        memory_ids = {key: connection.execute("INSERT INTO memories (key, content) VALUES (%s, %s) RETURNING id",
                                              (key, content)).fetchone()[0] for key, content in MEMORIES.items()}
        measured = MeasuredDatabase(url, memory_ids, sessions)
        chats = [
            ("morning", "What is my cat called?", ["pet", "city"]),
            ("morning", "Where do I live?", ["city", "colour", "pet"]),
            ("evening", "What do I do for a living?", ["job", "colour"]),
            ("evening", "Which colour do I like?", ["colour"]),
        ]
        for session, question, keys in chats:
            measured.prompt_ids.append(_submit(
                connection, session_id=sessions[session], memory_ids=[memory_ids[key] for key in keys],
                messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": question}]))
        measured.prompt_ids.append(_submit(connection, text="cheese => fromage\nbread => pain\nwater =>"))
        # messages that are not a list: measured as a failure, with its error text
        measured.failed_prompt_id = connection.execute(
            "INSERT INTO prompts (messages, session_id) VALUES ('{\"role\": \"user\"}', %s) RETURNING id",
            (sessions["evening"],)).fetchone()[0]
    Service(Worker(url, tiny, worker_id="analytics")).run_once()
    with psycopg.connect(url) as connection:
        strided = _submit(connection, session_id=sessions["evening"], memory_ids=[memory_ids["job"]],
                          messages=[{"role": "user", "content": "Tell me about my work, please."}])
    Service(Worker(url, tiny, worker_id="analytics-strided", stride=STRIDED)).run_once()
    measured.prompt_ids.append(strided)
    measured.model = tiny.name
    return measured


@contextlib.contextmanager
def database_from_template(server_url: str, template: str) -> Iterator[str]:
    """A new database copied from `template` for a whole test module, dropped afterwards."""
    name = f"icld_test_{os.getpid()}_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(server_url, autocommit=True) as connection:
        connection.execute(sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(sql.Identifier(name),
                                                                           sql.Identifier(template)))
    try:
        yield make_url(server_url).set(database=name).render_as_string(hide_password=False)
    finally:
        with psycopg.connect(server_url, autocommit=True) as connection:
            connection.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
