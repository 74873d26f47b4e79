import re
from pathlib import Path

import pytest

from icldaemon.exceptions import ConfigurationError
from icldaemon.store.queries import load_analytics_queries, load_queries, parse_queries, psql_to_psycopg

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

    assert "create_icl_dynamics_log_partition" in queries
    assert all(sql and not sql.startswith("--") for sql in queries.values())


def test_psql_variables_become_bound_parameters_and_nothing_else_does():
    sql = ("SELECT ':x', \"col:y\", a::int, :'since'::timestamptz, 'it''s 10%', :run_id -- 5% :z\n"
           "/* :w */ $body$ :v $body$ WHERE x LIKE 'a%' AND y = :'since' LIMIT :limit")
    converted, names = psql_to_psycopg(sql)
    assert names == ["since", "run_id", "limit"]
    assert converted == ("SELECT ':x', \"col:y\", a::int, %(since)s::timestamptz, 'it''s 10%%', %(run_id)s -- 5%% :z\n"
                         "/* :w */ $body$ :v $body$ WHERE x LIKE 'a%%' AND y = %(since)s LIMIT %(limit)s")


def test_the_analytics_queries_ship_with_the_package_and_match_sql():
    repository_sql = Path(__file__).resolve().parents[2] / "sql"
    shipped = load_analytics_queries()
    assert shipped == load_analytics_queries(repository_sql)
    assert len(shipped) >= 10
    for name, (sql, names) in shipped.items():
        assert names, f"{name} binds no variable"
        assert "%(" in sql and ":'" not in sql, name


def test_every_analytics_file_lists_the_variables_its_queries_use():
    for path in sorted((Path(__file__).resolve().parents[2] / "sql").glob("*.sql")):
        text = path.read_text(encoding="utf-8")
        opening = text.split("-- name:")[0]
        used = {name for query in parse_queries(text, path.name).values() for name in psql_to_psycopg(query)[1]}
        listed = set(re.findall(r"^--   (\w+)  ", opening, re.MULTILINE))
        assert listed == used, path.name
        assert f"-f sql/{path.name}" in opening, path.name
