"""A chat whose every message is empty fails by name at the first attempt (it once escaped as StopIteration)."""

import json

import psycopg
from daemon_fixtures import save_tiny_model

from icldaemon.engine.loading import load_model
from icldaemon.service import Service
from icldaemon.worker import Worker


def test_a_chat_of_empty_messages_fails_by_name(database_url, tmp_path):
    with psycopg.connect(database_url) as connection:
        prompt_id = connection.execute("INSERT INTO prompts (messages) VALUES (%s::jsonb) RETURNING id",
                                       (json.dumps([{"role": "user", "content": ""}]),)).fetchone()[0]
    tiny = load_model(str(save_tiny_model(tmp_path / "tiny-llama")), models_dir=tmp_path / "models", device="cpu")

    counts = Service(Worker(database_url, tiny, worker_id="test", max_attempts=1)).run_once()

    with psycopg.connect(database_url) as connection:
        last_error = connection.execute("SELECT last_error FROM prompts").fetchone()[0]
    assert counts == {"failed": 1}
    assert last_error == f"prompt {prompt_id}: every one of the 1 messages is empty: there is nothing to measure"
