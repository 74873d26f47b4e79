"""`icldaemon measure --model NAME` for a name that is no model here: it fails in seconds and says how it read NAME;
so does every other command that loads a model (ICLD_MODEL).

No real hub is contacted: HF_ENDPOINT points at a closed port (an unreachable hub) or at a small local server
that answers like the hub does for a model it does not have.
"""

import http.server
import os
import socket
import subprocess
import sys
import threading
import time

import psycopg
import pytest

FAIL_WITHIN = 30.0  # seconds; the hub client's own retries took about 50 s


def measure_with_model(model: str, tmp_path, **environment: str) -> tuple[subprocess.CompletedProcess, float]:
    (tmp_path / "prompt.txt").write_text("cheese => fromage\nbread =>", encoding="utf-8")
    env = {key: value for key, value in os.environ.items() if not key.startswith(("HF_", "TRANSFORMERS_"))}
    env.update({"ICLD_DATA_DIR": str(tmp_path / "data"), "HF_HOME": str(tmp_path / "hf"), **environment})
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "icldaemon", "measure", "--model", model, "--text-file",
                             "prompt.txt"], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    return result, time.monotonic() - started


def the_error(result: subprocess.CompletedProcess) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 1 and len(lines) == 1, result.stderr
    return lines[0]


@pytest.fixture
def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def hub_without_models():
    """A local server answering every request as the hub answers for a repository it does not have."""

    class NotFound(http.server.BaseHTTPRequestHandler):
        def do_HEAD(self):  # noqa: N802 (the name http.server calls)
            self.send_response(404)
            self.send_header("X-Error-Code", "RepoNotFound")
            self.send_header("Content-Length", "0")
            self.end_headers()

        do_GET = do_HEAD  # noqa: N815

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), NotFound)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_a_hub_id_with_the_hub_unreachable_fails_in_seconds(tmp_path, closed_port):
    hub = f"http://127.0.0.1:{closed_port}"
    result, seconds = measure_with_model("nosuch-org/nosuch-model", tmp_path, HF_ENDPOINT=hub)

    error = the_error(result)
    assert seconds < FAIL_WITHIN
    assert error.startswith("icldaemon: model 'nosuch-org/nosuch-model' was read as a hub id (it is not a "
                            f"directory here); the hub {hub} cannot be reached within 5 s (")
    assert error.endswith("and the hub cache does not hold it; give a model directory, or download it where the hub "
                          "can be reached")
    assert "Retrying" not in result.stderr


def test_a_hub_id_the_hub_does_not_have_is_named(tmp_path, hub_without_models):
    result, seconds = measure_with_model("nosuch-org/nosuch-model", tmp_path, HF_ENDPOINT=hub_without_models)

    assert seconds < FAIL_WITHIN
    assert the_error(result) == (f"icldaemon: model 'nosuch-org/nosuch-model' was read as a hub id (it is not a "
                                 f"directory here); the hub {hub_without_models} has no such model (a private or "
                                 "gated one needs HF_TOKEN with access to it)")


def test_a_hub_id_offline_asks_no_hub(tmp_path, closed_port):
    result, seconds = measure_with_model("nosuch-org/nosuch-model", tmp_path, HF_HUB_OFFLINE="1",
                                         HF_ENDPOINT=f"http://127.0.0.1:{closed_port}")

    assert seconds < FAIL_WITHIN
    assert the_error(result) == ("icldaemon: model 'nosuch-org/nosuch-model' was read as a hub id (it is not a "
                                 f"directory here); HF_HUB_OFFLINE is set and the hub cache {tmp_path / 'hf' / 'hub'} "
                                 "does not hold it")


@pytest.mark.parametrize("model", ["./no-such-model", "models/org/no-such-model", "~/no-such-model-here"])
def test_a_path_that_does_not_exist_is_named_as_a_path(tmp_path, closed_port, model):
    result, seconds = measure_with_model(model, tmp_path, HF_ENDPOINT=f"http://127.0.0.1:{closed_port}")

    assert seconds < FAIL_WITHIN
    expected_path = tmp_path / model if not model.startswith("~") else os.path.expanduser(model)
    assert the_error(result) == (f"icldaemon: model {model!r} was read as a path (a hub id is \"org/name\"), and "
                                 f"{expected_path} does not exist")


def test_a_name_that_is_neither_a_path_nor_a_hub_id_says_so(tmp_path, closed_port):
    result, _seconds = measure_with_model("my model", tmp_path, HF_ENDPOINT=f"http://127.0.0.1:{closed_port}")

    assert the_error(result) == ("icldaemon: model 'my model' is not a directory here and not a valid hub id "
                                 "(\"org/name\": letters, digits, '-', '_' and '.', at most 96 characters)")


# --- every command that loads a model


MODEL_COMMANDS = {
    "measure": ["measure", "--model", "nosuch-org/nosuch-model", "--text-file", "prompt.txt"],
    "run": ["run", "--once"],
    "consolidate": ["consolidate", "--memory-id", "1"],
    "generate": ["generate", "--adapter", "{adapter}", "--text-file", "prompt.txt"],
}
COMMAND_FAILS_WITHIN = 10.0  # seconds, process start included: the name is refused before torch is imported


@pytest.fixture
def stored_adapter(database_url, tmp_path) -> int:
    """An adapter row, with a directory holding an adapter_config.json, for `generate` to get as far as the model."""
    directory = tmp_path / "adapter"
    directory.mkdir()
    (directory / "adapter_config.json").write_text("{}", encoding="utf-8")
    with psycopg.connect(database_url) as connection:
        return connection.execute(
            "INSERT INTO adapters (scope, scope_key, model, version, layers, rank, ridge, patch_count, held_out_count, "
            "path, method, status) VALUES ('all', 'all', 'nosuch-org/nosuch-model', 1, '{0}', 1, 0.05, 1, 1, %s, "
            "'down_projection', 'rejected') RETURNING id", (str(directory),)).fetchone()[0]


@pytest.mark.parametrize("command", MODEL_COMMANDS.values(), ids=MODEL_COMMANDS)
def test_every_command_that_loads_a_model_names_an_unknown_one_at_once(tmp_path, closed_port, database_url,
                                                                      stored_adapter, command):
    (tmp_path / "prompt.txt").write_text("cheese => fromage\nbread =>", encoding="utf-8")
    hub = f"http://127.0.0.1:{closed_port}"
    env = {key: value for key, value in os.environ.items() if not key.startswith(("HF_", "TRANSFORMERS_"))}
    env.update({"ICLD_DATA_DIR": str(tmp_path / "data"), "HF_HOME": str(tmp_path / "hf"), "HF_ENDPOINT": hub,
                "ICLD_MODEL": "nosuch-org/nosuch-model", "ICLD_DATABASE_URL": database_url, "ICLD_LOG_FORMAT": "json"})
    command = [part.format(adapter=stored_adapter) for part in command]

    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "icldaemon", *command], capture_output=True, text=True,
                            cwd=tmp_path, env=env, timeout=300)
    seconds = time.monotonic() - started

    assert the_error(result).startswith("icldaemon: model 'nosuch-org/nosuch-model' was read as a hub id (it is not "
                                        f"a directory here); the hub {hub} cannot be reached within 5 s (")
    assert result.stdout == ""
    assert seconds < COMMAND_FAILS_WITHIN
