import pytest

from icldaemon.exceptions import ConfigurationError
from icldaemon.store.queries import load_queries, parse_queries

TWO_QUERIES = """\
-- Queries for the tests.

-- name: first_query --
-- The first one.
SELECT 1;

-- name: second_query --
-- The second one, over two lines.
SELECT *
FROM prompts
WHERE id = %(prompt_id)s;
"""


def test_parse_queries_by_name_without_their_description():
    queries = parse_queries(TWO_QUERIES, "test.sql")

    assert queries == {
        "first_query": "SELECT 1;",
        "second_query": "SELECT *\nFROM prompts\nWHERE id = %(prompt_id)s;",
    }


def test_a_name_defined_twice_in_one_file_is_an_error():
    text = "-- name: same --\n-- One.\nSELECT 1;\n-- name: same --\n-- Two.\nSELECT 2;\n"

    with pytest.raises(ConfigurationError, match=r"test\.sql:4: query 'same' is defined twice"):
        parse_queries(text, "test.sql")


def test_a_name_defined_in_two_files_is_an_error(tmp_path):
    (tmp_path / "a.sql").write_text("-- name: same --\n-- One.\nSELECT 1;\n")
    (tmp_path / "b.sql").write_text("-- name: same --\n-- Two.\nSELECT 2;\n")

    with pytest.raises(ConfigurationError, match=r"'same' is defined in both .*a\.sql and .*b\.sql"):
        load_queries(tmp_path)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("-- name: no_description --\nSELECT 1;\n", "needs a one-line '-- description'"),
        ("-- name: empty --\n-- Nothing follows.\n\n", "has no SQL"),
        ("SELECT 1;\n-- name: late --\n-- Late.\nSELECT 2;\n", "SQL before the first"),
        ("-- name: Bad-Name --\n-- Bad.\nSELECT 1;\n", "is not lower_snake_case"),
    ],
)
def test_malformed_files_are_errors(text, message):
    with pytest.raises(ConfigurationError, match=message):
        parse_queries(text, "test.sql")


def test_the_packaged_queries_load():
    queries = load_queries()

    assert "attach_icl_dynamics_log_partition" in queries
    assert all(sql and not sql.startswith("--") for sql in queries.values())
