"""Bad input of every kind among good prompts: the schema or icl_submit refuses what it can, the daemon fails the rest by name.

What PostgreSQL itself refuses (neither or both of messages and text, a retrieval of a memory that does not
exist, NUL characters, invalid UTF-8) never reaches a daemon; the test shows the refusal, from a plain
INSERT and from icl_submit. Everything else is inserted directly, mixed into a queue of good prompts,
and one running daemon measures the good ones and fails each bad one at its first attempt, with the
message that names what is wrong.
"""

import json
from dataclasses import dataclass

import psycopg
from daemon_fixtures import MAX_POSITIONS
from daemon_processes import STARTUP_TIMEOUT, Daemon, RawPrompt, assert_each_measured_exactly_once, insert_prompts


MISSING_MEMORY = 987_654_321
CHAT_TEMPLATE_OPENING = "<|user|>\n"  # the test tokenizer's chat template before a user message's content


def refusal(connection: psycopg.Connection, statement: str, parameters=()) -> psycopg.Error:
    """The error PostgreSQL answers `statement` with (in a savepoint, so that the connection stays usable)."""
    try:
        with connection.transaction():
            connection.execute(statement, parameters)
    except psycopg.Error as exc:
        return exc
    raise AssertionError(f"accepted: {statement}")


def test_what_the_schema_and_icl_submit_refuse(database_url):
    chat = json.dumps([{"role": "user", "content": "What is my cat called?"}])
    nul_chat = json.dumps([{"role": "user", "content": "a\x00b"}])
    refused = {
        "neither messages nor text": [
            ("INSERT INTO prompts (priority) VALUES (1)", (), psycopg.errors.CheckViolation,
             "prompts_messages_xor_text_check"),
            ("SELECT icl_submit(NULL, '{}', text => NULL)", (), psycopg.errors.InvalidParameterValue,
             "icl_submit: exactly one of messages and text must be given")],
        "both messages and text": [
            ("INSERT INTO prompts (messages, text) VALUES (%s::jsonb, 'hello')", (chat,), psycopg.errors.CheckViolation,
             "prompts_messages_xor_text_check"),
            ("SELECT icl_submit(%s::jsonb, '{}', text => 'hello')", (chat,), psycopg.errors.InvalidParameterValue,
             "icl_submit: exactly one of messages and text must be given")],
        "a retrieval of a memory that does not exist": [
            ("WITH prompt AS (INSERT INTO prompts (text) VALUES ('hello there') RETURNING id) "
             "INSERT INTO memory_retrievals (prompt_id, memory_id, rank) SELECT id, %s, 1 FROM prompt",
             (MISSING_MEMORY,), psycopg.errors.ForeignKeyViolation, "memory_retrievals_memory_id_fkey"),
            ("SELECT icl_submit(NULL, ARRAY[%s]::bigint[], text => 'hello there')", (MISSING_MEMORY,),
             psycopg.errors.ForeignKeyViolation, f"icl_submit: memory {MISSING_MEMORY} does not exist")],
        "a NUL character": [
            ("INSERT INTO prompts (text) VALUES ('cheese' || chr(0))", (), psycopg.errors.ProgramLimitExceeded,
             "null character not permitted"),
            ("INSERT INTO prompts (messages) VALUES (%s::jsonb)", (nul_chat,), psycopg.errors.UntranslatableCharacter,
             "unsupported Unicode escape sequence"),
            ("INSERT INTO memories (content) VALUES ('cheese' || chr(0))", (), psycopg.errors.ProgramLimitExceeded,
             "null character not permitted"),
            ("SELECT icl_submit(NULL, '{}', text => 'cheese' || chr(0))", (), psycopg.errors.ProgramLimitExceeded,
             "null character not permitted"),
            ("SELECT icl_submit(%s::jsonb)", (nul_chat,), psycopg.errors.UntranslatableCharacter,
             "unsupported Unicode escape sequence")],
        "invalid Unicode": [
            ("INSERT INTO prompts (text) VALUES (convert_from('\\x63ff'::bytea, 'UTF8'))", (),
             psycopg.errors.CharacterNotInRepertoire, 'invalid byte sequence for encoding "UTF8": 0xff'),
            ("INSERT INTO prompts (messages) VALUES ('[{\"role\": \"user\", \"content\": \"\\ud800\"}]'::jsonb)", (),
             psycopg.errors.InvalidTextRepresentation, "invalid input syntax for type json"),
            ("SELECT icl_submit(NULL, '{}', text => convert_from('\\x63ff'::bytea, 'UTF8'))", (),
             psycopg.errors.CharacterNotInRepertoire, 'invalid byte sequence for encoding "UTF8": 0xff')],
        "malformed messages (icl_submit only; a plain INSERT takes any JSON)": [
            ("SELECT icl_submit('{\"role\": \"user\", \"content\": \"hi\"}'::jsonb)", (),
             psycopg.errors.InvalidParameterValue, "icl_submit: messages must be a non-empty JSON array"),
            ("SELECT icl_submit('[]'::jsonb)", (), psycopg.errors.InvalidParameterValue,
             "icl_submit: messages must be a non-empty JSON array"),
            ("SELECT icl_submit('[{\"role\": \"user\"}]'::jsonb)", (), psycopg.errors.InvalidParameterValue,
             "icl_submit: every message must be a {\"role\": string, \"content\": string} object"),
            ("SELECT icl_submit('[\"hello\"]'::jsonb)", (), psycopg.errors.InvalidParameterValue,
             "icl_submit: every message must be a {\"role\": string, \"content\": string} object")],
    }
    with psycopg.connect(database_url) as connection:
        memory_id = connection.execute("INSERT INTO memories (content) VALUES ('A cat called Miso.') RETURNING id"
                                       ).fetchone()[0]
        connection.execute("SELECT icl_submit(NULL, ARRAY[%s]::bigint[], text => 'hello there')", (memory_id,))
        for kind, statements in refused.items():
            for statement, parameters, error_type, message in statements:
                error = refusal(connection, statement, parameters)
                assert isinstance(error, error_type) and message in str(error), (kind, statement, error)
        # nor can a retrieved memory be deleted from under its prompt
        error = refusal(connection, "DELETE FROM memories WHERE id = %s", (memory_id,))
        assert isinstance(error, psycopg.errors.ForeignKeyViolation), error
        assert connection.execute("SELECT count(*) FROM prompts").fetchone()[0] == 1


@dataclass(frozen=True)
class UserChat:
    """A one-message chat; under the test tokenizer its context is the bytes after the template's opening, less the query."""

    content: str
    memories: tuple = ()

    @property
    def messages(self) -> list[dict]:
        return [{"role": "user", "content": self.content}]

    @property
    def rendered(self) -> str:
        return f"{CHAT_TEMPLATE_OPENING}{self.content}\n<|assistant|>\n"

    @property
    def context_tokens(self) -> int:
        return len(self.rendered.encode("utf-8")) - len(CHAT_TEMPLATE_OPENING) - 1


def insert_raw(connection, *, text=None, messages=None, memory_ids=()) -> int:
    """Insert straight into prompts and memory_retrievals, past icl_submit's checks."""
    prompt_id = connection.execute(
        "INSERT INTO prompts (text, messages) VALUES (%s, %s::jsonb) RETURNING id",
        (text, None if messages is None else json.dumps(messages))).fetchone()[0]
    for rank, memory_id in enumerate(memory_ids, start=1):
        connection.execute("INSERT INTO memory_retrievals (prompt_id, memory_id, rank) VALUES (%s, %s, %s)",
                           (prompt_id, memory_id, rank))
    return prompt_id


def test_the_daemon_fails_each_bad_prompt_by_name_and_measures_the_good_ones(database_url, tiny_model_dir, tmp_path):
    good_text = [RawPrompt("cheese => fromage\nbread =>"),
                 RawPrompt("What is my cat called?", (("pet", "The user has a grey cat called Miso."),))]
    good = insert_prompts(database_url, good_text[:1])
    chat = UserChat("What is my cat called?")
    too_long_chat = UserChat("x" * MAX_POSITIONS)
    too_long_memory = RawPrompt("Hello there", (("long", "y" * MAX_POSITIONS),))  # BOS + its bytes: context + 2
    with psycopg.connect(database_url) as connection:
        good[insert_raw(connection, messages=chat.messages)] = chat
        empty = connection.execute("INSERT INTO memories (key, content) VALUES ('empty', '') RETURNING id").fetchone()[0]
        blank = connection.execute("INSERT INTO memories (key, content) VALUES ('blank', ' \n ') RETURNING id"
                                   ).fetchone()[0]
        long_memory = connection.execute("INSERT INTO memories (key, content) VALUES ('long', %s) RETURNING id",
                                         ("y" * MAX_POSITIONS,)).fetchone()[0]
        bad = {
            "messages not a list": (insert_raw(connection, messages={"role": "user", "content": "hi"}),
                                    "messages must be a non-empty JSON list of {\"role\", \"content\"} objects"),
            "messages an empty list": (insert_raw(connection, messages=[]),
                                       "messages must be a non-empty JSON list of {\"role\", \"content\"} objects"),
            "a message without content": (insert_raw(connection, messages=[{"role": "user"}]),
                                          "message 0 is not a {\"role\": str, \"content\": str} object"),
            "a message without role": (insert_raw(connection, messages=[{"content": "hi"}]),
                                       "message 0 is not a {\"role\": str, \"content\": str} object"),
            "a message not an object": (insert_raw(connection, messages=["hello"]),
                                        "message 0 is not a {\"role\": str, \"content\": str} object"),
            "a message's content not a string": (insert_raw(connection, messages=[{"role": "user", "content": 5}]),
                                                 "message 0 is not a {\"role\": str, \"content\": str} object"),
            "the second message malformed": (
                insert_raw(connection, messages=[{"role": "user", "content": "hi"}, {"role": "assistant"}]),
                "message 1 is not a {\"role\": str, \"content\": str} object"),
            "an empty memory": (insert_raw(connection, text="Hello there", memory_ids=[empty]),
                                f"memory:{empty} is empty"),
            "a blank memory": (insert_raw(connection, text="Hello there", memory_ids=[blank]),
                               f"memory:{blank} is empty"),
            "text too long": (insert_raw(connection, text="x" * (MAX_POSITIONS + 10)),
                              f"the prompt has {MAX_POSITIONS + 11} tokens; the model's context is {MAX_POSITIONS}"),
            "a chat too long": (insert_raw(connection, messages=too_long_chat.messages),
                                f"the prompt has {len(too_long_chat.rendered)} tokens; "
                                f"the model's context is {MAX_POSITIONS}"),
            "a memory making it too long": (
                insert_raw(connection, text="Hello there", memory_ids=[long_memory]),
                f"the prompt has {too_long_memory.context_tokens + 2} tokens; the model's context is {MAX_POSITIONS}"),
            "a chat of empty messages": (
                insert_raw(connection, messages=[{"role": "system", "content": ""}, {"role": "user", "content": ""}]),
                "every one of the 2 messages is empty: there is nothing to measure"),
            "empty text": (insert_raw(connection, text=""), "the prompt text is empty"),
            "blank text": (insert_raw(connection, text="  \n\t "), "the prompt text is empty"),
            "no context tokens": (insert_raw(connection, text="x"),
                                  "the prompt has no context tokens: 2 tokens, 1 anchor, 1 query"),
        }
        # A retrieval of a memory that does not exist gets past the foreign key only with its triggers off
        # (a restored dump, a replica): the daemon still names it.
        connection.execute("SET session_replication_role = replica")
        bad["a memory that does not exist"] = (
            insert_raw(connection, text="Hello there", memory_ids=[MISSING_MEMORY]),
            f"memory {MISSING_MEMORY} (rank 1) does not exist")
        connection.execute("RESET session_replication_role")
    good |= insert_prompts(database_url, good_text[1:])  # queued after the bad ones

    daemon = Daemon(database_url, tiny_model_dir, tmp_path, "solo", poll_interval=1, backoff_seconds=1)
    try:
        daemon.wait_for("listening", STARTUP_TIMEOUT)
        daemon.wait_for("run_measured", 60, count=len(good))
        daemon.wait_for("prompt_failed", 60, count=len(bad))
        return_code = daemon.terminate()
    finally:
        daemon.close()

    assert return_code == 0, daemon.output()
    with psycopg.connect(database_url) as connection:
        state = {row[0]: row[1:] for row in connection.execute("SELECT id, status, attempts, last_error FROM prompts")}
        bad_runs = connection.execute("SELECT count(*) FROM measurement_runs WHERE prompt_id = ANY(%s)",
                                      ([prompt_id for prompt_id, _ in bad.values()],)).fetchone()[0]
    for kind, (prompt_id, message) in bad.items():
        assert state[prompt_id] == ("failed", 1, f"prompt {prompt_id}: {message}"), kind
    assert bad_runs == 0
    with psycopg.connect(database_url) as connection:  # the good ones' rows, as if no bad prompt had been queued
        connection.execute("DELETE FROM prompts WHERE status = 'failed'")
    assert_each_measured_exactly_once(database_url, good, num_layers=2)
    failed_events = {entry["prompt_id"]: entry for entry in daemon.events("prompt_failed")}
    assert {prompt_id for prompt_id, _ in bad.values()} == set(failed_events)
    assert all(entry["status"] == "failed" for entry in failed_events.values())
