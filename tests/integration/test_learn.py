"""`icldaemon learn`: questions about a memory queued in its learn session, as the owner or as a submitter, measured
and consolidated on request, and learned on the daemon's schedule once per memory."""

import json
import os
import subprocess
import sys

import psycopg
import pytest
import structlog
from analytics_fixtures import as_role
from daemon_fixtures import save_tiny_model
from sqlalchemy.engine import make_url

from icldaemon.consolidate import ConsolidationSettings
from icldaemon.engine.loading import load_model
from icldaemon.exceptions import BadInputError, DatabaseError
from icldaemon.learn import QUESTIONS, SYSTEM, learn_memory, questions_for, session_id
from icldaemon.service import Service
from icldaemon.store.roles import SUBMITTER_ROLE, ensure_roles
from icldaemon.worker import Worker

MEMORIES = {  # stored in this order: ids m, m+1, m+2, m+3
    "pet": "The user has a grey cat called Miso.",
    "favourite colour": "The user's favourite colour is teal.",
    "home city": "The user lives in Porto.",
    "job": "The user works as a glassblower.",
}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="module")
def tiny(tiny_dir, tmp_path_factory):
    return load_model(str(tiny_dir), models_dir=tmp_path_factory.mktemp("models"), device="cpu")


def put_memories(url: str, memories: dict[str, str]) -> dict[str, int]:
    with psycopg.connect(url) as connection:
        return {key: connection.execute("SELECT memory_id FROM icl_put_memory(%s, %s)", (key, content)).fetchone()[0]
                for key, content in memories.items()}


def queued(url: str, prompt_ids: list[int]) -> list[tuple]:
    """(session, messages, retrieved memory ids by rank, submitter, priority) of each prompt, by id."""
    with psycopg.connect(url) as connection:
        return connection.execute(
            "SELECT prompts.session_id, prompts.messages, "
            "       ARRAY(SELECT memory_id FROM memory_retrievals WHERE prompt_id = prompts.id ORDER BY rank), "
            "       ARRAY(SELECT rank FROM memory_retrievals WHERE prompt_id = prompts.id ORDER BY rank), "
            "       prompts.submitted_by, prompts.priority "
            "FROM prompts WHERE prompts.id = ANY(%s) ORDER BY prompts.id", (prompt_ids,)).fetchall()


def test_learn_queues_the_questions_retrieving_the_memory_first_and_its_two_nearest(database_url):
    ensure_roles(database_url)
    ids = put_memories(database_url, dict(list(MEMORIES.items())[:2]))
    # another submitter's memory, nearer in id than the owner's fourth: never retrieved beside the owner's
    [foreign] = put_memories(as_role(database_url, SUBMITTER_ROLE), {"car": "The user drives a green Skoda."}).values()
    ids |= put_memories(database_url, dict(list(MEMORIES.items())[2:]))
    owner = make_url(database_url).username

    with structlog.testing.capture_logs() as logs:
        prompt_ids = learn_memory(database_url, ids["favourite colour"], 4)

    assert len(prompt_ids) == 4
    rows = queued(database_url, prompt_ids)
    expected_questions = questions_for("favourite colour", MEMORIES["favourite colour"], 4)
    assert [row[1] for row in rows] == [[{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]
                                        for question in expected_questions]
    # nearest ids of the same submitter: pet (1 below) and home city (2 above; the foreign memory, 1 above, is not)
    assert foreign == ids["favourite colour"] + 1
    assert {row[2] == [ids["favourite colour"], ids["pet"], ids["home city"]] for row in rows} == {True}
    assert {tuple(row[3]) for row in rows} == {(1, 2, 3)}
    assert {(row[0], row[4], row[5]) for row in rows} == {(session_id(ids["favourite colour"]), owner, -1)}
    [event] = [entry for entry in logs if entry["event"] == "learn_submitted"]
    assert (event["memory_id"], event["questions"], event["session_id"]) == (
        ids["favourite colour"], 4, str(session_id(ids["favourite colour"])))
    assert not any(question in json.dumps(event) for question in expected_questions)  # never the texts

    with pytest.raises(BadInputError, match="memory 999999 does not exist"):
        learn_memory(database_url, 999999, 4)


def test_a_submitter_learns_its_own_memory_with_the_key_and_content_it_stored(database_url):
    ensure_roles(database_url)
    submitter_url = as_role(database_url, SUBMITTER_ROLE)
    [others_memory] = put_memories(database_url, {"pet": MEMORIES["pet"]}).values()
    ids = put_memories(submitter_url, {key: MEMORIES[key] for key in ("home city", "job", "favourite colour")})
    city = ids["home city"]

    prompt_ids = learn_memory(submitter_url, city, 3, key="home city", content=MEMORIES["home city"],
                              other_memory_ids=[ids["job"], ids["favourite colour"]])

    rows = queued(database_url, prompt_ids)
    assert [row[1][1]["content"] for row in rows] == questions_for("home city", MEMORIES["home city"], 3)
    assert {(row[0], tuple(row[2]), row[4]) for row in rows} == {
        (session_id(city), (city, ids["job"], ids["favourite colour"]), SUBMITTER_ROLE)}
    with psycopg.connect(submitter_url) as connection:
        own = [prompt_id for (prompt_id,) in connection.execute(
            "SELECT id FROM icl_own_prompts WHERE session_id = %s ORDER BY id", (session_id(city),))]
    assert own == prompt_ids

    # it cannot read memories: without the key and content, the database refuses, naming the table
    with pytest.raises(DatabaseError, match=f"reading memory {city} to learn it failed .*permission denied"):
        learn_memory(submitter_url, city, 3)
    # another's memory beside its own is refused by the database, and nothing of the learn is queued
    with pytest.raises(DatabaseError, match=f"retrieval refused: memory {others_memory} belongs to another"):
        learn_memory(submitter_url, ids["job"], 3, key="job", content=MEMORIES["job"],
                     other_memory_ids=[others_memory])
    with psycopg.connect(database_url) as connection:
        assert connection.execute("SELECT count(*) FROM prompts WHERE session_id = %s",
                                  (session_id(ids["job"]),)).fetchone() == (0,)
    with pytest.raises(BadInputError, match="both the memory's key and its content"):
        learn_memory(submitter_url, city, 3, key="home city")


def cli_environment(database_url, tiny_dir, tmp_path) -> dict:
    return {**os.environ, "ICLD_DATABASE_URL": database_url, "ICLD_MODEL": str(tiny_dir), "ICLD_DEVICE": "cpu",
            "ICLD_DATA_DIR": str(tmp_path), "ICLD_LOG_FORMAT": "json"}


def test_the_learn_command_prints_the_prompt_ids_and_says_when_the_memory_was_learned_before(
        database_url, tiny_dir, tmp_path):
    ids = put_memories(database_url, MEMORIES)
    command = [sys.executable, "-m", "icldaemon", "learn", "--memory-id", str(ids["job"]), "--questions", "4"]
    environment = cli_environment(database_url, tiny_dir, tmp_path)

    first, second = (subprocess.run(command, env=environment, capture_output=True, text=True, timeout=120)
                     for _ in range(2))

    assert first.returncode == second.returncode == 0, first.stderr + second.stderr
    with psycopg.connect(database_url) as connection:
        prompt_ids = [prompt_id for (prompt_id,) in connection.execute(
            "SELECT id FROM prompts WHERE session_id = %s ORDER BY id", (session_id(ids["job"]),))]
    assert first.stdout.split() + second.stdout.split() == [str(prompt_id) for prompt_id in prompt_ids]
    assert len(prompt_ids) == 8
    assert f"memory {ids['job']}: 4 questions queued in session {session_id(ids['job'])}\n" in first.stderr
    assert "(learned before: 4 earlier prompts in it)" in second.stderr
    events = [json.loads(line) for line in first.stderr.splitlines() if line.startswith("{")]
    assert [(event["memory_id"], event["questions"]) for event in events if event["event"] == "learn_submitted"] == [
        (ids["job"], 4)]

    too_many = subprocess.run([*command[:-1], "21"], env=environment, capture_output=True, text=True, timeout=120)
    assert too_many.returncode == 1 and "it must be from 2 to 20, the number of question templates" in too_many.stderr
    missing = subprocess.run([*command[:5], "999999", *command[6:]], env=environment, capture_output=True, text=True, timeout=120)
    assert missing.returncode == 1 and "memory 999999 does not exist" in missing.stderr


def test_learn_with_consolidate_measures_the_questions_and_lists_an_adapter_version(database_url, tiny_dir, tmp_path):
    ids = put_memories(database_url, MEMORIES)
    memory_id = ids["pet"]
    command = [sys.executable, "-m", "icldaemon", "learn", "--memory-id", str(memory_id), "--questions", "4",
               "--consolidate"]

    done = subprocess.run(command, env=cli_environment(database_url, tiny_dir, tmp_path), capture_output=True,
                          text=True, timeout=600)

    assert done.returncode == 0, done.stderr
    with psycopg.connect(database_url) as connection:
        statuses = connection.execute("SELECT status FROM prompts WHERE session_id = %s",
                                      (session_id(memory_id),)).fetchall()
        adapters = connection.execute("SELECT scope_key, version, status, patch_count + held_out_count FROM adapters"
                                      ).fetchall()
    assert statuses == [("done",)] * 4
    # the tiny random model's answers never say the memory's words: the version is listed, and rejected by the gate
    [(scope_key, version, status, retrievals)] = adapters
    assert (scope_key, version, retrievals) == (f"memory:{memory_id}", 1, 4) and status in {"accepted", "rejected"}
    assert f"memory:{memory_id} v1 {status}" in done.stdout
    events = [json.loads(line)["event"] for line in done.stderr.splitlines() if line.startswith("{")]
    assert events.count("run_measured") == 4 and "adapter_written" in events


class TwoRounds(Service):
    """A daemon that stops after its second scheduled consolidation, noting the queue as each one starts."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.queue_at_consolidation: list[dict] = []

    def consolidate(self) -> None:
        with psycopg.connect(self.worker.url) as connection:
            self.queue_at_consolidation.append(dict(connection.execute(
                "SELECT status, count(*) FROM prompts GROUP BY status").fetchall()))
        super().consolidate()
        if len(self.queue_at_consolidation) == 2:
            self.stop()


def test_the_daemon_learns_each_new_memory_once_before_consolidating(database_url, tiny, tmp_path):
    ids = put_memories(database_url, {key: MEMORIES[key] for key in ("pet", "job")})
    # a memory with no key has nothing to write questions over: never learned
    with psycopg.connect(database_url) as connection:
        connection.execute("INSERT INTO memories (content) VALUES ('The user is left-handed.')")
    consolidation = ConsolidationSettings(interval_minutes=0.005, min_patches=10_000)  # every 0.3 s; nothing due
    service = TwoRounds(Worker(database_url, tiny, worker_id="test"), poll_interval=60.0, consolidation=consolidation,
                        adapters_dir=tmp_path / "adapters", learn_new_memories=True)

    with structlog.testing.capture_logs() as logs:
        assert service.run_forever() == 0

    # the first round queued and measured both memories' questions before consolidating; the second queued none
    assert service.queue_at_consolidation == [{"done": 2 * QUESTIONS}] * 2
    submitted = [(entry["memory_id"], entry["questions"]) for entry in logs if entry["event"] == "learn_submitted"]
    assert submitted == [(ids["pet"], QUESTIONS), (ids["job"], QUESTIONS)]
    with psycopg.connect(database_url) as connection:
        sessions = dict(connection.execute("SELECT session_id, count(*) FROM prompts GROUP BY session_id").fetchall())
    assert sessions == {session_id(ids["pet"]): QUESTIONS, session_id(ids["job"]): QUESTIONS}


def test_without_the_setting_the_daemon_learns_nothing(database_url, tiny, tmp_path):
    put_memories(database_url, {"pet": MEMORIES["pet"]})
    service = Service(Worker(database_url, tiny, worker_id="test"), consolidation=ConsolidationSettings(),
                      adapters_dir=tmp_path / "adapters")

    assert service.learn_memories() is False
    with psycopg.connect(database_url) as connection:
        assert connection.execute("SELECT count(*) FROM prompts").fetchone() == (0,)
