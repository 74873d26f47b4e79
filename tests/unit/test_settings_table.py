"""The README's configuration table is the one the settings models generate, every field with its default."""

from pathlib import Path

from icldaemon import settings_table
from icldaemon.consolidate import ConsolidationSettings
from icldaemon.settings import Settings

README = Path(__file__).resolve().parents[2] / "README.md"


def test_the_readme_holds_the_generated_table():
    assert settings_table.table() in README.read_text(encoding="utf-8"), (
        "README.md's configuration table is stale: run `.venv/bin/python -m icldaemon.settings_table --write README.md`")


def test_every_setting_has_a_description_and_a_row_with_its_default():
    readme = README.read_text(encoding="utf-8")
    for model, prefix in ((Settings, "ICLD_"), (ConsolidationSettings, "ICLD_CONSOLIDATE_")):
        for name, field in model.model_fields.items():
            assert field.description and len(field.description) > 10, name
            variable = f"`{prefix}{name.upper()}`"
            row = next(line for line in readme.splitlines() if line.startswith(f"| {variable} |"))
            default = row.split(" | ")[1]
            if field.default is None:
                assert default == "unset", name
            elif name != "data_dir":
                assert default.strip("`") in {str(field.default), str(field.default).removesuffix(".0")}, name


def test_writing_the_table_replaces_only_what_lies_between_its_markers():
    text = f"before\n{settings_table.START}\n| old | table |\n{settings_table.END}\nafter\n"

    assert settings_table.replaced(text) == f"before\n{settings_table.table()}\nafter\n"
