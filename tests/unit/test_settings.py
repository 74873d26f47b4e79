"""Settings read from the environment: a variable set to nothing is refused, not read as unset."""

import pydantic
import pytest

from icldaemon import cli
from icldaemon.settings import Settings

EMPTY_URL_MESSAGE = ("ICLD_DATABASE_URL is set but empty: unset it for the embedded database, or give a PostgreSQL "
                     "URL")


@pytest.mark.parametrize("empty", ["", "  "])
def test_an_empty_database_url_is_refused_naming_the_variable(monkeypatch, empty):
    monkeypatch.setenv("ICLD_DATABASE_URL", empty)

    with pytest.raises(pydantic.ValidationError, match=EMPTY_URL_MESSAGE):
        Settings()


def test_an_unset_database_url_means_the_embedded_database_and_a_set_one_is_kept(monkeypatch):
    monkeypatch.delenv("ICLD_DATABASE_URL", raising=False)
    assert Settings().database_url is None

    monkeypatch.setenv("ICLD_DATABASE_URL", "postgresql://icld@db.example:5432/icld")
    assert Settings().database_url == "postgresql://icld@db.example:5432/icld"


def test_the_cli_prints_each_invalid_setting_on_one_line_and_exits_2(monkeypatch, capsys):
    monkeypatch.setenv("ICLD_DATABASE_URL", "")
    monkeypatch.setenv("ICLD_POLL_INTERVAL", "-1")

    assert cli.main(["status"]) == cli.EXIT_USAGE

    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == (f"icldaemon: invalid configuration: {EMPTY_URL_MESSAGE}; poll_interval: Input should be "
                            "greater than 0 (got '-1')\n")
