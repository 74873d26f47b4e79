"""The README's configuration table, generated from the settings models so that it cannot drift from them.

    python -m icldaemon.settings_table                 # print the table
    python -m icldaemon.settings_table --write README.md  # replace the table between its markers

Every field of `Settings` (ICLD_...) and `ConsolidationSettings` (ICLD_CONSOLIDATE_...) is one row: its
variable, its default and its description. A test checks that the README holds exactly this table.
"""

import argparse
import sys
from pathlib import Path

from pydantic_settings import BaseSettings

START = "<!-- settings table: generated from icldaemon/settings.py and icldaemon/consolidate.py by " \
        "`python -m icldaemon.settings_table --write README.md` -->"
END = "<!-- end of settings table -->"


def _models() -> list[type[BaseSettings]]:
    from icldaemon.consolidate import ConsolidationSettings
    from icldaemon.settings import Settings

    return [Settings, ConsolidationSettings]


def _default(field) -> str:
    extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
    if "shown_default" in extra:  # a default that differs by machine or user (the data directory)
        return extra["shown_default"]
    value = field.default
    if value is None:
        return "unset"
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return f"`{value}`"


def rows() -> list[tuple[str, str, str]]:
    """(variable, default, meaning) for every setting, in the models' order."""
    table = []
    for model in _models():
        prefix = model.model_config.get("env_prefix", "")
        for name, field in model.model_fields.items():
            description = (field.description or "").replace("|", "\\|")
            table.append((f"`{(prefix + name).upper()}`", _default(field), description))
    return table


def table() -> str:
    lines = [START, "", "| variable | default | meaning |", "| --- | --- | --- |"]
    lines += [f"| {variable} | {default} | {meaning} |" for variable, default, meaning in rows()]
    return "\n".join([*lines, "", END])


def replaced(text: str) -> str:
    """`text` with the part between the markers (markers included) replaced by the current table."""
    start, end = text.find(START), text.find(END)
    if start < 0 or end < start:
        raise ValueError(f"the table's markers are missing: {START!r} ... {END!r}")
    return text[:start] + table() + text[end + len(END):]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="The configuration table of the README, from the settings models.")
    parser.add_argument("--write", type=Path, metavar="FILE", help="replace the table between its markers in FILE")
    args = parser.parse_args(argv)
    if args.write is None:
        print(table())
        return 0
    text = args.write.read_text(encoding="utf-8")
    args.write.write_text(replaced(text), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
