"""The command line's help: no internal notes, every number's default, the consolidation defaults as the code has them."""

import argparse

import pytest

from icldaemon.cli import build_parser
from icldaemon.consolidate import MIN_PATCHES
from icldaemon.engine.answers import PRESERVATION, RANK, RIDGE
from icldaemon.exceptions import BadInputError


def subparsers(parser: argparse.ArgumentParser, prefix: str = "icldaemon") -> dict[str, argparse.ArgumentParser]:
    """Every (sub)command's parser by its full name, the top level included."""
    found = {prefix: parser}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, subparser in action.choices.items():
                found |= subparsers(subparser, f"{prefix} {name}")
    return found


PARSERS = subparsers(build_parser())


def is_numeric(action: argparse.Action) -> bool:
    try:
        return action.type is not None and isinstance(action.type("2"), int | float)
    except (argparse.ArgumentTypeError, ValueError):
        return False


def test_the_top_level_help_says_what_the_program_does_and_no_internal_note():
    text = build_parser().format_help()
    assert "The only place errors become messages" not in text
    assert "implicit weights" in text and "COMMAND --help" in text


@pytest.mark.parametrize("name", PARSERS)
def test_every_numeric_option_states_its_default(name):
    for action in PARSERS[name]._actions:
        if action.option_strings and not action.required and is_numeric(action):
            assert "default" in (action.help or ""), f"{name} {action.option_strings[0]}: {action.help!r}"


def test_every_option_has_help():
    for name, parser in PARSERS.items():
        for action in parser._actions:
            if not isinstance(action, argparse._SubParsersAction):  # its commands have their own help
                assert action.help, f"{name} {action.option_strings or action.dest} has no help"


def test_the_consolidation_defaults_in_the_help_are_the_codes():
    options = {action.option_strings[0]: action.help for action in PARSERS["icldaemon consolidate"]._actions
               if action.option_strings}
    assert options["--rank"].endswith(f"else {RANK})")
    assert options["--min-patches"].endswith(f"else {MIN_PATCHES})")
    assert options["--ridge"].endswith(f"else {RIDGE})")
    assert options["--preservation"].endswith(f"else {PRESERVATION})")


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["consolidate", "--min-patches", "1"],
         "argument --min-patches: expected a whole number of at least 2 (one retrieval to fit, one held out), got '1'"),
        (["consolidate", "--rank", "0"], "argument --rank: expected a whole number of at least 1, got '0'"),
        (["consolidate", "--ridge", "0"], "argument --ridge: expected a positive number, got '0'"),
        (["consolidate", "--preservation", "-1"], "argument --preservation: expected a number of at least 0, got '-1'"),
        (["measure", "--text-file", "a.txt", "--stride", "0"],
         "argument --stride: expected a whole number of at least 1, got '0'"),
        (["run", "--stride", "x"], "argument --stride: expected a whole number of at least 1, got 'x'"),
    ],
)
def test_numbers_are_refused_before_any_work_naming_the_option(capsys, arguments, message):
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(arguments)
    assert exited.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1].endswith(message)


def test_distillation_refuses_the_fit_options_naming_them():
    from icldaemon.cli import cmd_consolidate
    from icldaemon.settings import load_settings

    args = build_parser().parse_args(["consolidate", "--method", "distillation", "--ridge", "0.1", "--focus", "1",
                                      "--refinements", "2"])

    # refused before the database or the model is touched
    with pytest.raises(BadInputError) as refused:
        cmd_consolidate(args, load_settings())
    assert str(refused.value) == ("--ridge, --focus, --refinements belong to the down_projection fit; --method "
                                  "distillation trains by gradient steps and takes none of them")
