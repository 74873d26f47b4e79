"""Bad input the worker should name but does not yet: kept here, strict, until the engine names it."""

import json

import psycopg
import pytest
from daemon_fixtures import save_tiny_model

from icldaemon.daemon import Worker
from icldaemon.engine.loading import load_model


@pytest.mark.xfail(strict=True, raises=AssertionError,
                   reason="engine: build_prompt raises StopIteration on a chat whose every message is empty, which "
                          "the worker takes for a passing failure and retries instead of naming the input")
def test_a_chat_of_empty_messages_fails_by_name(database_url, tmp_path):
    with psycopg.connect(database_url) as connection:
        prompt_id = connection.execute("INSERT INTO prompts (messages) VALUES (%s::jsonb) RETURNING id",
                                       (json.dumps([{"role": "user", "content": ""}]),)).fetchone()[0]
    tiny = load_model(str(save_tiny_model(tmp_path / "tiny-llama")), models_dir=tmp_path / "models", device="cpu")

    counts = Worker(database_url, tiny, worker_id="test", max_attempts=1).run_once()

    with psycopg.connect(database_url) as connection:
        last_error = connection.execute("SELECT last_error FROM prompts").fetchone()[0]
    assert counts == {"failed": 1}
    assert "StopIteration" not in last_error and last_error.startswith(f"prompt {prompt_id}: "), last_error
