"""`icldaemon memories add | list`, `icldaemon runs`, the run ids after `run --once`, and the demo run twice.

Each runs as a user runs it (`python -m icldaemon ...`, `python -m icldaemon.demo`) on a migrated database.
"""

import json
import os
import re
import subprocess
import sys
import threading

import psycopg
import pytest
from daemon_fixtures import save_tiny_model

from icldaemon.demo import MEMORIES, PROMPTS
from icldaemon.store import queue
from icldaemon.store.memories import upsert_memory

PET = "The user has a grey cat called Miso."


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture
def icldaemon(database_url, tiny_model_dir, tmp_path):
    environment = {**os.environ, "ICLD_DATABASE_URL": database_url, "ICLD_MODEL": str(tiny_model_dir),
                   "ICLD_DEVICE": "cpu", "ICLD_DATA_DIR": str(tmp_path / "data"), "ICLD_LOG_FORMAT": "json",
                   "HF_HUB_OFFLINE": "1"}

    def run(*arguments: str, module: str = "icldaemon") -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", module, *arguments], capture_output=True, text=True,
                              cwd=tmp_path, env=environment, timeout=300)

    return run


def memories_in(url: str) -> list[tuple]:
    with psycopg.connect(url) as connection:
        return connection.execute("SELECT id, key, content FROM memories ORDER BY id").fetchall()


def write(name: str, text: str) -> str:
    """A file in the test's working directory, which is the CLI's too; returns its name."""
    with open(name, "w", encoding="utf-8") as handle:
        handle.write(text)
    return name


@pytest.fixture(autouse=True)
def _in_tmp_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)


# --- memories


def test_memories_add_upserts_by_key_and_prints_the_id(icldaemon, database_url):
    added = icldaemon("memories", "add", "--key", "pet", "--content", "The user has a cat.")
    updated = icldaemon("memories", "add", "--key", "pet", "--content", PET)
    unchanged = icldaemon("memories", "add", "--key", "pet", "--content", PET)
    other = icldaemon("memories", "add", "--key", "city", "--content", "The user lives in Lisbon.")

    assert [result.returncode for result in (added, updated, unchanged, other)] == [0, 0, 0, 0], added.stderr
    pet_id, city_id = int(added.stdout), int(other.stdout)
    assert int(updated.stdout) == int(unchanged.stdout) == pet_id != city_id
    assert [result.stderr.strip() for result in (added, updated, unchanged)] == [
        f"memory {pet_id} ('pet') added", f"memory {pet_id} ('pet') updated", f"memory {pet_id} ('pet') unchanged"]
    assert memories_in(database_url) == [(pet_id, "pet", PET), (city_id, "city", "The user lives in Lisbon.")]


def test_memories_add_updates_the_lowest_id_of_a_repeated_key(icldaemon, database_url):
    with psycopg.connect(database_url) as connection:
        first, second = (connection.execute("INSERT INTO memories (key, content) VALUES ('pet', %s) RETURNING id",
                                            (content,)).fetchone()[0] for content in ("old one", "old two"))

    result = icldaemon("memories", "add", "--key", "pet", "--content", PET)

    assert result.returncode == 0, result.stderr
    assert int(result.stdout) == first
    assert memories_in(database_url) == [(first, "pet", PET), (second, "pet", "old two")]


def test_concurrent_upserts_of_one_new_key_add_one_memory(database_url):
    barrier = threading.Barrier(6)
    ids = []

    def upsert(content: str) -> None:
        with queue.connect(database_url) as connection:
            barrier.wait()
            ids.append(upsert_memory(connection, "pet", content).memory_id)

    threads = [threading.Thread(target=upsert, args=(f"version {index}",)) for index in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert len(ids) == 6 and len(set(ids)) == 1
    assert [(memory_id, key) for memory_id, key, _content in memories_in(database_url)] == [(ids[0], "pet")]


@pytest.mark.parametrize(
    ("arguments", "code", "message"),
    [
        (["--key", "pet", "--content", "  \n "], 1, "icldaemon: the content of memory 'pet' is empty or blank"),
        (["--key", " ", "--content", PET], 1, "icldaemon: the memory's key is empty or blank"),
        (["--key", "pet"], 2, "the following arguments are required: --content"),
    ],
)
def test_memories_add_refuses_bad_input_by_name(icldaemon, database_url, arguments, code, message):
    result = icldaemon("memories", "add", *arguments)

    assert result.returncode == code
    assert message in result.stderr and "Traceback" not in result.stderr
    assert memories_in(database_url) == []


def test_memories_list_shows_ids_keys_use_and_content(icldaemon, database_url):
    assert icldaemon("memories", "list").stdout.startswith("no memories yet")
    ids = [int(icldaemon("memories", "add", "--key", key, "--content", content).stdout)
           for key, content in MEMORIES.items()]
    submitted = icldaemon("submit", "--text-file", write("prompt.txt", "bread =>"),
                          "--memory-ids", f"{ids[2]},{ids[0]}")
    assert submitted.returncode == 0, submitted.stderr

    listed = icldaemon("memories", "list")
    first = icldaemon("memories", "list", "--limit", "1")
    zero = icldaemon("memories", "list", "--limit", "0")

    assert listed.returncode == 0, listed.stderr
    rows = [line.split(None, 4) for line in listed.stdout.splitlines()[1:]]
    assert [row[0] for row in rows] == [str(memory_id) for memory_id in ids]
    assert " ".join(rows[0][1:]).startswith("pet 1 0 The user has a grey cat")
    assert "favourite colour" in listed.stdout.splitlines()[2]
    assert first.stdout.splitlines()[-1] == "the first 1 of 3 memories; --limit shows more"
    assert zero.returncode == 2 and "argument --limit: expected a whole number of at least 1, got '0'" in zero.stderr


# --- runs


def test_run_once_prints_the_run_ids_and_runs_lists_them(icldaemon, database_url):
    assert icldaemon("runs").stdout.startswith("no measurement runs yet")
    pet = int(icldaemon("memories", "add", "--key", "pet", "--content", PET).stdout)
    write("chat.json", json.dumps([{"role": "user", "content": "What is my cat called?"}]))
    session = "6f1c2a52-1d51-4b55-9a53-2f1e0e0d9c11"
    prompts = [int(icldaemon("submit", "--messages-file", "chat.json", "--memory-ids", str(pet),
                             "--session-id", session).stdout),
               int(icldaemon("submit", "--text-file", write("few.txt", "cheese => fromage\nbread =>"))
                   .stdout)]

    ran = icldaemon("run", "--once", "--no-migrate")
    listed = icldaemon("runs")
    newest = icldaemon("runs", "--limit", "1")

    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.strip() == "2 done"
    with psycopg.connect(database_url) as connection:
        runs = dict(connection.execute("SELECT prompt_id, id FROM measurement_runs").fetchall())
        total_tokens = dict(connection.execute("SELECT id, total_tokens FROM measurement_runs").fetchall())
    assert set(runs) == set(prompts)
    announced = re.search(r"^measured: (.*); `icldaemon plot RUN_ID` draws one$", ran.stderr, re.MULTILINE)
    assert announced is not None, ran.stderr
    assert announced.group(1) == ", ".join(f"run {runs[prompt]} (prompt {prompt})" for prompt in sorted(prompts))

    assert listed.returncode == 0, listed.stderr
    rows = [line.split() for line in listed.stdout.splitlines()[1:]]
    assert [(int(row[0]), int(row[1])) for row in rows] == sorted(((runs[p], p) for p in prompts), reverse=True)
    by_run = {int(row[0]): row for row in rows}
    assert by_run[runs[prompts[0]]][2] == session and by_run[runs[prompts[1]]][2] == "-"
    assert all(int(row[3]) == total_tokens[int(row[0])] for row in rows)
    assert [int(row[5]) for row in rows] == [0, 1]  # memories: the text prompt (newest) none, the chat one
    assert all(float(row[6]) < 1e-3 and float(row[7]) > 0 for row in rows)  # exactness, seconds
    assert [line.split()[0] for line in newest.stdout.splitlines()[1:]] == [str(max(runs.values()))]


def test_run_once_with_nothing_queued_prints_no_run(icldaemon):
    ran = icldaemon("run", "--once", "--no-migrate")

    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.strip() == "nothing to do"
    assert "measured:" not in ran.stderr


# --- the demo


def test_the_demo_run_twice_reuses_its_memories_and_prints_run_ids(icldaemon, database_url):
    first = icldaemon(module="icldaemon.demo")
    second = icldaemon(module="icldaemon.demo")

    assert first.returncode == 0, first.stderr
    assert second.returncode == 0, second.stderr
    stored = memories_in(database_url)
    # a fresh database numbers them as examples/memories.json and the README do
    assert stored == [(index, key, content) for index, (key, content) in enumerate(MEMORIES.items(), start=1)]
    numbered = ", ".join(f"{memory_id} {key}" for memory_id, key, _content in stored)
    assert f"memories: {numbered}\n" in first.stdout and f"memories: {numbered}\n" in second.stdout
    with psycopg.connect(database_url) as connection:
        run_ids = [row[0] for row in connection.execute("SELECT id FROM measurement_runs ORDER BY id")]
    assert len(run_ids) == 10
    titles = [title for title, _example in PROMPTS]
    for output, runs in ((first.stdout, run_ids[:5]), (second.stdout, run_ids[5:])):
        table = output.split("Per prompt (")[1].split("Per memory (")[0].splitlines()
        assert sorted(int(line[28:].split()[0]) for line in table if line[:28].strip() in titles) == runs
        assert f".venv/bin/icldaemon plot {runs[0]} --out run.png" in output
    # the summary says what its columns are, in which units, where the results are and what to run next
    assert "context KL: KL(with context || without it) at the query, nats" in first.stdout
    assert "mean KL: KL(with it || without it) at the query, nats" in first.stdout
    assert "The results are stored in the database of ICLD_DATABASE_URL: tables measurement_runs" in first.stdout
    assert "icl_analytics" in first.stdout and ".venv/bin/icldaemon db" in first.stdout
    assert f".venv/bin/icldaemon consolidate --memory-id {stored[2][0]} --min-patches 2" in first.stdout
