"""Every Grafana panel's and variable's SQL, expanded as Grafana expands it, run as the read-only role on measured data.

Grafana's frontend substitutes template variables (a single value as it is, quotes doubled; a multi-value or
"All" selection as a comma-separated list of quoted literals), then its PostgreSQL data source replaces
$__interval and expands the macros (pkg/tsdb/grafana-postgresql-datasource/macros.go):
`$__timeFilter(col)` -> `col BETWEEN 'from' AND 'to'` (RFC 3339, UTC), `$__timeFrom()` -> `'from'`,
`$__timeGroup(col, 5m)` -> `floor(extract(epoch from col)/300)*300`, `$__timeGroupAlias` the same `AS "time"`.
"""

import datetime
import json
import re
from pathlib import Path

import psycopg
import pytest
import yaml
from analytics_fixtures import database_from_template, load_tiny, populate
from sqlalchemy.engine import make_url

from icldaemon.store.roles import READER_ROLE, ensure_roles

GRAFANA = Path(__file__).resolve().parents[2] / "deploy" / "grafana"
DASHBOARDS = sorted((GRAFANA / "dashboards").glob("*.json"))
INTERVAL = "20s"  # what Grafana picks for a 6-hour range at about 1,000 points (the data source's minimum is 10s)
INTERVAL_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}  # seconds
MACRO = re.compile(r"\$([_a-zA-Z0-9]+)\(([^\)]*)\)")
VARIABLE = re.compile(r"\$(\w+)|\[\[(\w+)\]\]|\$\{(\w+)\}")


def rfc3339(moment: datetime.datetime) -> str:
    """Go's time.RFC3339Nano in UTC: fractional seconds without trailing zeros."""
    moment = moment.astimezone(datetime.UTC)
    fraction = f"{moment.microsecond:06d}".rstrip("0")
    return moment.strftime("%Y-%m-%dT%H:%M:%S") + (f".{fraction}" if fraction else "") + "Z"


def interval_seconds(text: str) -> str:
    """The interval in seconds as Go prints a float64 with %v (whole numbers below a million as integers)."""
    match = re.fullmatch(r"(\d+)(ms|s|m|h|d|w)", text.strip().strip("'"))
    assert match, f"interval {text!r} is not one Grafana parses here"
    seconds = int(match[1]) * INTERVAL_UNITS[match[2]]
    assert seconds < 1e6
    return str(int(seconds)) if seconds == int(seconds) else repr(seconds)


def expand_macros(query: str, time_from: datetime.datetime, time_to: datetime.datetime) -> str:
    query = query.replace("$__interval_ms", str(int(float(interval_seconds(INTERVAL)) * 1000)))
    query = query.replace("$__interval", INTERVAL)

    def macro(match: re.Match) -> str:
        name, arguments = match[1], [argument.strip() for argument in match[2].split(",")]
        if name == "__timeFilter":
            return f"{arguments[0]} BETWEEN '{rfc3339(time_from)}' AND '{rfc3339(time_to)}'"
        if name == "__timeFrom":
            return f"'{rfc3339(time_from)}'"
        if name == "__timeTo":
            return f"'{rfc3339(time_to)}'"
        if name in ("__timeGroup", "__timeGroupAlias"):
            seconds = interval_seconds(arguments[1])
            group = f"floor(extract(epoch from {arguments[0]})/{seconds})*{seconds}"
            return group + (' AS "time"' if name == "__timeGroupAlias" else "")
        raise AssertionError(f"macro ${name} is not one the dashboards are expected to use")

    return MACRO.sub(macro, query)


def expand_variables(query: str, values: dict[str, tuple[list[str], bool]]) -> str:
    def substitute(match: re.Match) -> str:
        name = match[1] or match[2] or match[3]
        if name not in values:
            return match[0]  # a macro or a built-in, for the data source
        selected, quoted = values[name]
        if quoted:
            return ",".join("'" + value.replace("'", "''") + "'" for value in selected)
        return selected[0].replace("'", "''")

    return VARIABLE.sub(substitute, query)


@pytest.fixture(scope="module")
def measured(pg_server_url, _template_database, tmp_path_factory):
    tiny = load_tiny(tmp_path_factory.mktemp("tiny-llama"), tmp_path_factory.mktemp("models"))
    with database_from_template(pg_server_url, _template_database) as url:
        measured = populate(url, tiny)
        ensure_roles(url)
        yield measured


def reader_url(url: str) -> str:
    return make_url(url).set(username=READER_ROLE, password=None).render_as_string(hide_password=False)


def panels_of(board: dict) -> list[dict]:
    found = []
    for panel in board["panels"]:
        found.append(panel)
        found.extend(panel.get("panels", []))  # panels inside a collapsed row
    return found


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda path: path.stem)
def test_every_query_of_the_dashboard_runs_on_measured_data(measured, path):
    board = json.loads(path.read_text(encoding="utf-8"))
    time_to = datetime.datetime.now(datetime.UTC) + datetime.timedelta(minutes=1)
    time_from = time_to - datetime.timedelta(hours=6)
    values: dict[str, tuple[list[str], bool]] = {}

    with psycopg.connect(reader_url(measured.url), autocommit=True) as connection:
        for variable in board["templating"]["list"]:
            query = expand_macros(expand_variables(variable["query"], values), time_from, time_to)
            cursor = connection.execute(query)
            columns = [column.name for column in cursor.description]
            options = [str(row[columns.index("__value")] if "__value" in columns else row[0]) for row in cursor]
            assert options, f"variable {variable['name']} offers nothing: {query}"
            # the first option, or with "All" every option, as Grafana selects on a fresh load
            multiple = variable.get("multi", False) or variable.get("includeAll", False)
            values[variable["name"]] = (options if variable.get("includeAll") else options[:1], multiple)
        for panel in panels_of(board):
            for target in panel.get("targets", []):
                query = expand_macros(expand_variables(target["rawSql"], values), time_from, time_to)
                assert "$" not in query.replace("$$", ""), f"{panel['title']}: unexpanded {query}"
                cursor = connection.execute(query)
                rows = cursor.fetchall()
                assert rows, f"panel {panel['title']!r} found nothing: {query}"
                if target["format"] == "time_series":
                    columns = [column.name for column in cursor.description]
                    assert columns[0] == "time", panel["title"]
                    times = [row[0] for row in rows]
                    assert times == sorted(times), f"panel {panel['title']!r}: a time series must be sorted"

    assert values["model"][0] == [measured.model]


def test_dashboards_have_stable_unique_uids_and_read_the_provisioned_data_source():
    datasources = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "icldaemon.yaml").read_text())
    (datasource,) = datasources["datasources"]
    providers = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "icldaemon.yaml").read_text())
    boards = [json.loads(path.read_text(encoding="utf-8")) for path in DASHBOARDS]

    assert datasource["user"] == READER_ROLE and datasource["type"] == "grafana-postgresql-datasource"
    assert providers["providers"][0]["type"] == "file"
    assert {board["uid"]: path.stem for board, path in zip(boards, DASHBOARDS)} == {
        "icldaemon-memories": "icldaemon-memories", "icldaemon-run": "icldaemon-run",
        "icldaemon-service": "icldaemon-service"}
    for board in boards:
        panels = panels_of(board)
        assert len({panel["id"] for panel in panels}) == len(panels), board["uid"]
        for panel in panels:
            assert panel["datasource"]["uid"] == datasource["uid"], panel["title"]
            assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24, panel["title"]
        for variable in board["templating"]["list"]:
            assert variable["datasource"]["uid"] == datasource["uid"], variable["name"]
    uses = " ".join(target["rawSql"] for board in boards for panel in panels_of(board) for target in panel["targets"])
    assert "$__timeFilter(" in uses and "$__timeGroupAlias(" in uses
    run_variables = [variable["name"] for variable in boards[1]["templating"]["list"]]
    assert run_variables[:3] == ["model", "session", "run"]


def test_the_expansion_matches_grafanas_for_known_inputs():
    moment_from = datetime.datetime(2026, 11, 23, 10, 0, 0, 500000, tzinfo=datetime.UTC)
    moment_to = datetime.datetime(2026, 11, 23, 16, 0, tzinfo=datetime.UTC)

    expanded = expand_macros("SELECT $__timeGroupAlias(created_at, 5m), x WHERE $__timeFilter(created_at) "
                             "AND y IN ($model) AND z = '$run'", moment_from, moment_to)
    expanded = expand_variables(expanded, {"model": (["a'b", "c"], True), "run": (["7"], False)})

    assert expanded == ("SELECT floor(extract(epoch from created_at)/300)*300 AS \"time\", x WHERE created_at "
                        "BETWEEN '2026-11-23T10:00:00.5Z' AND '2026-11-23T16:00:00Z' AND y IN ('a''b','c') "
                        "AND z = '7'")
