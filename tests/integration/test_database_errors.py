"""translate_errors: a statement's error from PostgreSQL, with what was being done; the schema hint only where a table,
function or column is missing."""

import psycopg
import pytest

from icldaemon.exceptions import DatabaseError
from icldaemon.store.database import translate_errors

SCHEMA_HINT = "has no icldaemon schema (or is behind): run `icldaemon migrate`"
STATEMENTS = {  # statement: PostgreSQL's message, as the user reads it
    "SELECT 99999999999::bigint::integer": "integer out of range",  # 22003, a DataError
    "DO $$ BEGIN RAISE EXCEPTION 'priority 5000 is above the limit 1000' USING ERRCODE = '22023'; END $$":
        "priority 5000 is above the limit 1000",
    "SELECT 1 / 0": "division by zero",
}


@pytest.mark.parametrize("statement", STATEMENTS)
def test_an_error_that_is_not_a_missing_schema_is_the_databases_own_message(database_url, statement):
    database = database_url.rsplit("/", 1)[1]

    with psycopg.connect(database_url) as connection, pytest.raises(DatabaseError) as raised:
        with translate_errors(database_url, "submitting a prompt"):
            connection.execute(statement)

    assert str(raised.value) == (f"submitting a prompt failed on database '{database}' on 127.0.0.1:5432: "
                                 f"{STATEMENTS[statement]}")
    assert isinstance(raised.value.__cause__, psycopg.Error)


def test_a_missing_table_says_to_run_migrate(empty_database_url):
    database = empty_database_url.rsplit("/", 1)[1]

    with psycopg.connect(empty_database_url) as connection, pytest.raises(DatabaseError) as raised:
        with translate_errors(empty_database_url, "counting prompts"):
            connection.execute("SELECT count(*) FROM prompts")

    assert str(raised.value) == (f"counting prompts failed: the database '{database}' on 127.0.0.1:5432 {SCHEMA_HINT} "
                                 '(relation "prompts" does not exist)')
